//! Mesh behaviour through MockMesh, on loopback with real mTLS: balancing away from slow,
//! rate-limited and failing endpoints, a killed endpoint, a partition, authorization.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{get, load};
use http::StatusCode;
use mesh_core::config::{AuthorizationPolicy, BreakerConfig, TimeoutConfig};
use mesh_test::events::{BreakerTransition, Decision, EndpointChange, Event};
use mesh_test::{MockMesh, Outcome, Script};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_endpoint_gets_a_smaller_share() {
    let mesh = MockMesh::builder().seed(11).build().unwrap();
    let users = mesh
        .service("users")
        .scripts([
            Script::latency(ms(5)),
            Script::latency(ms(5)),
            Script::latency(ms(300)),
        ])
        .spawn()
        .await
        .unwrap();
    let client = mesh.client(&users).unwrap();
    load(&client, 4, ms(500)).await; // warm-up: every endpoint's load is measured
    let mark = mesh.events().len();
    let run = load(&client, 4, Duration::from_secs(2)).await;
    assert_eq!(run.failed, 0, "{:?}", run.failures);
    let shares = mesh.events().since(mark).shares("users", 3);
    assert!(shares[2] < 0.05, "the slow endpoint took {shares:?}");
    assert!(shares[0] > 0.3 && shares[1] > 0.3, "{shares:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_endpoint_is_sidelined_for_its_retry_after() {
    let mesh = MockMesh::new().unwrap();
    let users = mesh
        .service("users")
        .scripts([
            Script::latency(ms(2)),
            Script::latency(ms(2)),
            Script::rate_limited(Some(Duration::from_secs(5))),
        ])
        .spawn()
        .await
        .unwrap();
    let client = mesh.client(&users).unwrap();
    let run = load(&client, 4, Duration::from_millis(1500)).await;
    // A 429 is retried once on another endpoint: callers see none.
    assert_eq!(run.failed, 0, "{:?}", run.failures);
    let log = mesh.events();
    let limited = log.request_counts("users", 3)[2];
    let total: u64 = log.request_counts("users", 3).iter().sum();
    assert!(limited >= 1, "the limited endpoint was never tried");
    assert!(
        (limited as f64) < 0.03 * total as f64,
        "{limited} of {total} went to the limited endpoint"
    );
    assert_eq!(
        log.count_outcomes("users", |o| matches!(o, Outcome::RateLimited { .. })) as u64,
        limited
    );
    // Neither success nor failure: never ejected.
    assert_eq!(log.ejections("users", 2), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_endpoint_is_ejected_then_recovers() {
    let mesh = MockMesh::new().unwrap();
    let users = mesh.service("users").endpoints(3).spawn().await.unwrap();
    let bad = users.endpoint(2).unwrap();
    bad.set_script(Script::failing(StatusCode::SERVICE_UNAVAILABLE));
    let breaker: BreakerConfig = toml::from_str(
        "consecutive_failures = 3\nbackoff = { min = \"1s\", max = \"1s\", jitter = 0.0 }",
    )
    .unwrap();
    let client = mesh
        .client_builder(&users)
        .unwrap()
        .circuit_breaker(breaker)
        .build()
        .unwrap();
    let run = load(&client, 2, ms(400)).await;
    assert_eq!(run.failed, 0, "failures were retried: {:?}", run.failures);
    let log = mesh.events();
    assert_eq!(
        log.ejections("users", 2),
        1,
        "{:?}",
        log.breaker("users").collect::<Vec<_>>()
    );
    assert_eq!(users.client_stats().ejections(bad.addr()), 1);
    // Ejected after its 3rd consecutive failure (one more may have been in flight), and
    // no request reached it while ejected.
    let errors = log.count_outcomes("users", |o| matches!(o, Outcome::Error { .. }));
    assert!((3..=4).contains(&errors), "{errors} failures");

    bad.set_script(Script::default());
    load(&client, 2, Duration::from_millis(1500)).await;
    let log = mesh.events();
    let transitions: Vec<_> = log
        .breaker("users")
        .filter(|b| b.index == Some(2))
        .map(|b| b.transition)
        .collect();
    assert_eq!(
        transitions,
        [
            BreakerTransition::Ejected,
            BreakerTransition::Probation,
            BreakerTransition::Reinstated
        ]
    );
    let after = log.since(
        log.position(
            |e| matches!(e, Event::Breaker(b) if b.transition == BreakerTransition::Reinstated),
        )
        .unwrap(),
    );
    assert!(
        after.request_counts("users", 3)[2] > 0,
        "not back in rotation"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_endpoint_loses_no_idempotent_request_and_comes_back_on_restart() {
    let mesh = MockMesh::new().unwrap();
    let users = mesh
        .service("users")
        .endpoints(3)
        .script(Script::latency(ms(5)))
        .spawn()
        .await
        .unwrap();
    let client = mesh.client(&users).unwrap();
    let victim = users.endpoint(1).unwrap();
    let addr = victim.addr();
    let run = tokio::spawn({
        let client = client.clone();
        async move { load(&client, 8, Duration::from_secs(2)).await }
    });
    tokio::time::sleep(ms(600)).await;
    victim.kill();
    assert!(!victim.is_running());
    tokio::time::sleep(ms(600)).await;
    victim.restart().await.unwrap();
    assert_eq!(victim.addr(), addr);
    let run = run.await.unwrap();
    assert_eq!(
        run.failed,
        0,
        "{} of {} lost: {:?}",
        run.failed,
        run.ok + run.failed,
        run.failures
    );

    let log = mesh.events();
    let killed = log
        .position(|e| matches!(e, Event::Endpoint(x) if x.change == EndpointChange::Killed))
        .unwrap();
    let restarted = log
        .position(|e| matches!(e, Event::Endpoint(x) if x.change == EndpointChange::Restarted))
        .unwrap();
    assert!(killed < restarted);
    assert!(log.request_counts("users", 3)[1] > 0);
    // Back after the restart, on the same address: it serves again.
    let before = mesh.events().request_counts("users", 3)[1];
    let run = load(&client, 4, Duration::from_secs(2)).await;
    assert_eq!(run.failed, 0, "{:?}", run.failures);
    let after = mesh.events().request_counts("users", 3)[1];
    assert!(after > before, "the restarted endpoint got nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_endpoint_times_out_and_its_requests_go_elsewhere() {
    let mesh = MockMesh::new().unwrap();
    let users = mesh.service("users").endpoints(3).spawn().await.unwrap();
    let timeouts: TimeoutConfig = toml::from_str("per_try = \"100ms\"").unwrap();
    let client = mesh
        .client_builder(&users)
        .unwrap()
        .timeout(timeouts)
        .build()
        .unwrap();
    load(&client, 2, ms(200)).await;
    let cut = users.endpoint(0).unwrap();
    cut.partition();
    let mark = mesh.events().len();
    let run = load(&client, 4, Duration::from_secs(1)).await;
    assert_eq!(
        run.failed, 0,
        "per-try timeouts were retried: {:?}",
        run.failures
    );
    assert_eq!(
        mesh.events().since(mark).request_counts("users", 3)[0],
        0,
        "bytes crossed the partition"
    );
    cut.heal();
    let mark = mesh.events().len();
    load(&client, 4, Duration::from_secs(2)).await;
    assert!(
        mesh.events().since(mark).request_counts("users", 3)[0] > 0,
        "never healed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deny_policy_answers_403_and_logs_the_decision() {
    let mesh = MockMesh::new().unwrap();
    let policy: AuthorizationPolicy = toml::from_str(
        r#"default = "deny"
           [[rules]]
           name = "web-reads"
           clients = ["spiffe://example.org/web"]
           routes = [{ path = { prefix = "/public" } }]"#,
    )
    .unwrap();
    let users = mesh.service("users").policy(policy).spawn().await.unwrap();
    let web = mesh
        .client_builder_as(&users, "web")
        .unwrap()
        .build()
        .unwrap();
    let stranger = mesh.client(&users).unwrap();
    let req = |path: &str| {
        http::Request::get(format!("http://users{path}"))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap()
    };
    assert_eq!(
        web.send(req("/public/a")).await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(
        web.send(req("/private")).await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        stranger.send(get()).await.unwrap().status(),
        StatusCode::FORBIDDEN
    );

    let log = mesh.events();
    let decisions: Vec<_> = log
        .authz("users")
        .map(|a| {
            (
                a.peer.as_ref().unwrap().path().to_owned(),
                a.path.clone(),
                a.decision.clone(),
            )
        })
        .collect();
    assert_eq!(
        decisions,
        [
            (
                "/web".to_owned(),
                "/public/a".to_owned(),
                Decision::Allowed {
                    policy: "users".into(),
                    rule: Some("web-reads".into()),
                    audit: false
                }
            ),
            (
                "/web".to_owned(),
                "/private".to_owned(),
                Decision::Denied {
                    policy: "users".into()
                }
            ),
            (
                "/client".to_owned(),
                "/".to_owned(),
                Decision::Denied {
                    policy: "users".into()
                }
            ),
        ]
    );
    assert_eq!(log.denials("users"), 2);
    // Denied requests never reach the application.
    assert_eq!(log.requests("users").count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_added_and_removed_under_load_lose_no_request() {
    let mesh = MockMesh::new().unwrap();
    let users = mesh.service("users").endpoints(2).spawn().await.unwrap();
    let client = mesh.client(&users).unwrap();
    let run = tokio::spawn({
        let client = client.clone();
        async move { load(&client, 4, Duration::from_millis(1500)).await }
    });
    tokio::time::sleep(ms(300)).await;
    let added = users.add_endpoint(Script::default()).await.unwrap();
    assert_eq!(added.index(), 2);
    tokio::time::sleep(ms(400)).await;
    assert!(users.remove_endpoint(0));
    assert!(!users.remove_endpoint(0), "removed twice");
    // Discovery reaches the balancer through a task of its own: give it time to run on a
    // busy machine before counting.
    tokio::time::sleep(ms(200)).await;
    let mark = mesh.events().len();
    let run = run.await.unwrap();
    assert_eq!(run.failed, 0, "{:?}", run.failures);
    let log = mesh.events();
    assert!(
        log.request_counts("users", 3)[2] > 0,
        "the added endpoint got nothing"
    );
    // Requests in flight when the balancer saw the removal may finish; nothing more.
    assert!(log.since(mark).request_counts("users", 3)[0] <= 4);
    assert!(users.reinsert_endpoint(0));
}
