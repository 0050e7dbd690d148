//! The scenarios; each one's setup, expected outcome and tolerance are documented on its
//! [`Scenario`] variant.

use std::collections::BTreeMap;
use std::time::Duration;

use http::StatusCode;
use mesh_test::events::{BreakerTransition, EndpointChange, Event, EventLog};
use mesh_test::{Outcome, Script};

use crate::harness::{Answer, Harness, SERVICE, Setup, load};
use crate::{Result, Scenario, Stack};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

pub(crate) async fn run(stack: &Stack, scenario: Scenario) -> Result<()> {
    match scenario {
        Scenario::SlowEndpoint => slow_endpoint(stack).await,
        Scenario::RateLimitStorm => rate_limit_storm(stack).await,
        Scenario::EjectionAndRecovery => ejection_and_recovery(stack).await,
        Scenario::EndpointKilled => endpoint_killed(stack).await,
        Scenario::TotalOutage => total_outage(stack).await,
        Scenario::DenyByPolicy => deny_by_policy(stack).await,
        Scenario::RateLimitedByServer => rate_limited_by_server(stack).await,
        Scenario::CertificateRotation => certificate_rotation(stack).await,
    }
}

/// The share of the log's requests endpoint `index` received.
fn share(counts: &[u64], index: usize) -> f64 {
    let total: u64 = counts.iter().sum();
    match counts.get(index) {
        Some(&n) if total > 0 => n as f64 / total as f64,
        _ => 0.0,
    }
}

fn count(counts: &[u64], index: usize) -> u64 {
    counts.get(index).copied().unwrap_or(0)
}

/// [`Scenario::SlowEndpoint`].
async fn slow_endpoint(stack: &Stack) -> Result<()> {
    let h = Harness::start(
        stack,
        Setup::new([
            Script::latency(ms(5)),
            Script::latency(ms(5)),
            Script::latency(ms(300)),
        ]),
    )
    .await?;
    let caller = h.caller();
    // Warm-up: every endpoint's latency is measured.
    load(&caller, 4, ms(500), None).await;
    let mark = h.events().len();
    let run = load(&caller, 4, Duration::from_secs(2), None).await;
    ensure!(run.failed() == 0, "callers saw failures: {run}");
    let counts = h.counts(&h.events().since(mark));
    ensure!(
        share(&counts, 2) < 0.10,
        "the slow endpoint took {:.3} of {counts:?}",
        share(&counts, 2)
    );
    ensure!(
        share(&counts, 0) > 0.3 && share(&counts, 1) > 0.3,
        "the fast endpoints' requests: {counts:?}"
    );
    Ok(())
}

/// [`Scenario::RateLimitStorm`].
async fn rate_limit_storm(stack: &Stack) -> Result<()> {
    let h = Harness::start(
        stack,
        Setup::new([
            Script::latency(ms(2)),
            Script::latency(ms(2)),
            Script::rate_limited(Some(Duration::from_secs(5))),
        ]),
    )
    .await?;
    let run = load(&h.caller(), 4, ms(1500), None).await;
    ensure!(run.failed() == 0, "callers saw failures: {run}");
    let log = h.events();
    let counts = h.counts(&log);
    ensure!(
        count(&counts, 2) >= 1,
        "the limited endpoint was never tried"
    );
    ensure!(
        share(&counts, 2) < 0.05,
        "the limited endpoint took {:.3} of {counts:?}",
        share(&counts, 2)
    );
    let limited = log.count_outcomes(SERVICE, |o| matches!(o, Outcome::RateLimited { .. }));
    ensure!(
        limited as u64 == count(&counts, 2),
        "{limited} 429s, {counts:?}"
    );
    // Each 429 is retried once, on another endpoint, which answers: every request is
    // tried once on a healthy endpoint, plus once on the limited one if it went there
    // first.
    let tries = counts.iter().sum::<u64>();
    ensure!(
        tries == run.sent + limited as u64,
        "{tries} tries for {} requests and {limited} 429s: {counts:?}",
        run.sent
    );
    let mut by_path: BTreeMap<&str, Vec<(usize, &Outcome)>> = BTreeMap::new();
    for r in log.requests(SERVICE) {
        by_path
            .entry(r.path.as_str())
            .or_default()
            .push((r.endpoint.index, &r.outcome));
    }
    for (path, tries) in &by_path {
        let healthy = |(i, o): &(usize, &Outcome)| *i != 2 && **o == Outcome::Ok;
        let retried_once = match tries.as_slice() {
            [one] => healthy(one),
            [first, then] => first.0 == 2 && healthy(then),
            _ => false,
        };
        ensure!(
            retried_once,
            "{path} was not answered by one try, or one 429 and one retry: {tries:?}"
        );
    }
    if h.in_process() {
        // Neither success nor failure: never ejected.
        ensure!(
            log.ejections(SERVICE, 2) == 0,
            "the limited endpoint was ejected"
        );
    }
    Ok(())
}

/// [`Scenario::EjectionAndRecovery`].
async fn ejection_and_recovery(stack: &Stack) -> Result<()> {
    let h = Harness::start(
        stack,
        Setup::new([
            Script::default(),
            Script::default(),
            Script::failing(StatusCode::SERVICE_UNAVAILABLE),
        ])
        .client(
            "circuit_breaker = { consecutive_failures = 3, \
             backoff = { min = \"1s\", max = \"1s\", jitter = 0.0 } }",
        ),
    )
    .await?;
    let caller = h.caller();
    let run = load(&caller, 2, ms(400), None).await;
    ensure!(run.failed() == 0, "failures were not retried: {run}");
    let log = h.events();
    let errors = log.count_outcomes(SERVICE, |o| matches!(o, Outcome::Error { .. }));
    ensure!(
        (3..=5).contains(&errors),
        "the failing endpoint answered {errors} failures before its ejection, {:?} in all",
        h.counts(&log)
    );

    h.set_script(2, Script::default())?;
    let mark = h.events().len();
    let run = load(&caller, 2, ms(1500), None).await;
    ensure!(
        run.failed() == 0,
        "callers saw failures after the heal: {run}"
    );
    let healed = h.events().since(mark);
    let back = healed
        .requests(SERVICE)
        .filter(|r| r.endpoint.index == 2 && r.outcome == Outcome::Ok)
        .count();
    ensure!(
        back > 0,
        "the healed endpoint is not back in rotation: {:?}",
        h.counts(&healed)
    );
    if h.in_process() {
        let transitions: Vec<_> = h
            .events()
            .breaker(SERVICE)
            .filter(|b| b.index == Some(2))
            .map(|b| b.transition)
            .collect();
        ensure!(
            transitions
                == [
                    BreakerTransition::Ejected,
                    BreakerTransition::Probation,
                    BreakerTransition::Reinstated
                ],
            "breaker transitions: {transitions:?}"
        );
    }
    Ok(())
}

/// [`Scenario::EndpointKilled`].
async fn endpoint_killed(stack: &Stack) -> Result<()> {
    let h = Harness::start(stack, Setup::new(vec![Script::latency(ms(5)); 3])).await?;
    let caller = h.caller();
    let background = tokio::spawn({
        let caller = caller.clone();
        async move { load(&caller, 8, Duration::from_secs(2), None).await }
    });
    tokio::time::sleep(ms(600)).await;
    let before_kill = h.events().len();
    h.kill(1).await?;
    tokio::time::sleep(ms(600)).await;
    h.restart(1).await?;
    let run = background.await?;
    ensure!(run.failed() == 0, "requests were lost: {run}");
    ensure!(run.ok > 100, "too little traffic to judge: {run}");

    let log = h.events();
    let before = EventLog(log.get(..before_kill).unwrap_or_default().to_vec());
    ensure!(
        count(&h.counts(&before), 1) > 0,
        "the victim served nothing before it was killed"
    );
    if h.in_process() {
        let change = |change: EndpointChange| {
            log.position(
                |e| matches!(e, Event::Endpoint(x) if x.change == change && x.endpoint.index == 1),
            )
        };
        let (Some(killed), Some(restarted)) = (
            change(EndpointChange::Killed),
            change(EndpointChange::Restarted),
        ) else {
            return Err(crate::Failure::msg(
                "the log does not show endpoint 1's kill and restart",
            ));
        };
        ensure!(
            killed >= before_kill && killed < restarted,
            "the log shows endpoint 1 killed at {killed} (asked after {before_kill}) and \
             restarted at {restarted}"
        );
    }
    // Back on its address: it serves again.
    let mark = h.events().len();
    let run = load(&caller, 4, Duration::from_secs(2), None).await;
    ensure!(
        run.failed() == 0,
        "callers saw failures after the restart: {run}"
    );
    let after = h.counts(&h.events().since(mark));
    ensure!(
        count(&after, 1) > 0,
        "the restarted endpoint got nothing: {after:?}"
    );
    Ok(())
}

/// [`Scenario::TotalOutage`].
async fn total_outage(stack: &Stack) -> Result<()> {
    let h = Harness::start(
        stack,
        Setup::new(vec![Script::failing(StatusCode::SERVICE_UNAVAILABLE); 3])
            .client("retry = { budget = { ratio = 0.2, min_per_second = 1, ttl = \"2s\" } }"),
    )
    .await?;
    let run = load(&h.caller(), 2, Duration::from_secs(1), None).await;
    ensure!(run.sent > 0, "nothing was sent");
    ensure!(run.ok == 0, "requests succeeded in a total outage: {run}");
    ensure!(run.hung == 0, "callers hung instead of failing fast: {run}");
    let server_errors: u64 = run
        .statuses
        .iter()
        .filter(|(code, _)| (500..600).contains(*code))
        .map(|(_, n)| n)
        .sum();
    ensure!(
        server_errors == run.sent,
        "every answer should be a 5xx: {run}"
    );
    let tries = h.events().requests(SERVICE).count() as f64;
    let sent = run.sent as f64;
    let bound = 1.2 * sent + 1.0 * (run.elapsed.as_secs_f64() + 2.0) + 4.0;
    ensure!(
        tries >= sent,
        "{tries} tries for {sent} requests: some never reached an endpoint"
    );
    ensure!(
        tries <= bound,
        "{tries} tries for {sent} requests: over the budget's bound of {bound:.1}"
    );
    Ok(())
}

/// The policy of [`Scenario::DenyByPolicy`]: the mesh's default client may read `/public`.
const READ_PUBLIC: &str = "default = \"deny\"\n\
    rules = [{ name = \"public-reads\", clients = [\"spiffe://example.org/client\"], \
    routes = [{ path = { prefix = \"/public\" } }] }]";

/// [`Scenario::DenyByPolicy`].
async fn deny_by_policy(stack: &Stack) -> Result<()> {
    let h = Harness::start(stack, Setup::new([Script::default()]).policy(READ_PUBLIC)).await?;
    let caller = h.caller();
    for (path, expected) in [
        ("/public/a", StatusCode::OK),
        ("/private", StatusCode::FORBIDDEN),
        ("/public/b", StatusCode::OK),
    ] {
        let answer = caller.get(path).await;
        ensure!(
            answer == Answer::Status(expected, false),
            "GET {path}: expected {expected}, got {answer:?}"
        );
    }
    let log = h.events();
    let seen: Vec<_> = log.requests(SERVICE).map(|r| r.path.clone()).collect();
    ensure!(
        seen == ["/public/a", "/public/b"],
        "the application received {seen:?}"
    );
    // Not retried: the policy refused it once.
    let denials = match h.proxy_denials(0).await? {
        Some(n) => n,
        None => log.denials(SERVICE) as u64,
    };
    ensure!(denials == 1, "{denials} denials");
    if h.in_process() {
        let denied = log
            .authz(SERVICE)
            .find(|a| a.path == "/private")
            .and_then(|a| a.peer.clone());
        ensure!(
            denied.is_some_and(|p| p.to_string() == "spiffe://example.org/client"),
            "the denial does not name the caller"
        );
    }
    Ok(())
}

/// [`Scenario::RateLimitedByServer`].
async fn rate_limited_by_server(stack: &Stack) -> Result<()> {
    let h = Harness::start(
        stack,
        Setup::new([Script::default()])
            .rate_limit("total = { requests = 10, per = \"1s\", burst = 5 }"),
    )
    .await?;
    let run = load(&h.caller(), 1, Duration::from_secs(1), Some(ms(20))).await;
    ensure!(
        run.status(200) + run.status(429) == run.sent,
        "answers other than 200 and 429: {run}"
    );
    ensure!(
        run.limited_without_retry_after == 0,
        "429s without Retry-After: {run}"
    );
    ensure!(run.status(429) >= 10, "too few 429s: {run}");
    let answered = h.events().count_outcomes(SERVICE, |o| *o == Outcome::Ok) as u64;
    ensure!(
        answered == run.ok,
        "the application answered {answered} requests, callers got {} 200s",
        run.ok
    );
    let most = 5.0 + 10.0 * run.elapsed.as_secs_f64() + 2.0;
    ensure!(
        run.ok >= 5 && run.ok as f64 <= most,
        "{} admitted in {:?}: outside 5..={most:.1}",
        run.ok,
        run.elapsed
    );
    Ok(())
}

/// [`Scenario::CertificateRotation`].
async fn certificate_rotation(stack: &Stack) -> Result<()> {
    let h = Harness::start(stack, Setup::new(vec![Script::latency(ms(2)); 3])).await?;
    let caller = h.caller();
    // The proxies' file watches take a while per step: the load lasts until the end.
    let running = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let background = tokio::spawn({
        let (caller, running) = (caller.clone(), running.clone());
        async move {
            let mut total = crate::harness::Run::default();
            while running.load(std::sync::atomic::Ordering::Relaxed) {
                let run = load(&caller, 8, ms(250), None).await;
                total.sent += run.sent;
                total.ok += run.ok;
                total.elapsed += run.elapsed;
                if run.failed() > 0 {
                    return (total, Some(run));
                }
            }
            (total, None)
        }
    });
    let step = ms(400);
    tokio::time::sleep(step).await;
    h.rotate_svids().await?;
    h.bounce(0).await?;
    tokio::time::sleep(step).await;
    h.begin_trust_rotation().await?;
    h.bounce(1).await?;
    tokio::time::sleep(step).await;
    h.finish_trust_rotation().await?;
    h.bounce(2).await?;
    let mark = h.events().len();
    tokio::time::sleep(ms(600)).await;
    running.store(false, std::sync::atomic::Ordering::Relaxed);
    let (total, failed) = background.await?;
    if let Some(run) = failed {
        return Err(crate::Failure::msg(format!(
            "requests failed during the rotation: {run}"
        )));
    }
    ensure!(
        total.ok > 100,
        "too little traffic to judge: {} ok",
        total.ok
    );
    let after = h.counts(&h.events().since(mark));
    ensure!(
        count(&after, 2) > 0,
        "the endpoint bounced after the old root left served nothing: {after:?}"
    );
    Ok(())
}
