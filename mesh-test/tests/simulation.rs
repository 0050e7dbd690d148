//! The deterministic simulation: the determinism check (the same seed twice gives the same
//! event log, byte for byte) and property tests over many seeded runs.
//!
//! Each property runs over several seeds; a failure names the seed, and
//! `Simulation::new(seed)` with the same scenario replays it exactly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;
use http::{Request, StatusCode};
use http_body_util::Empty;
use mesh_core::error::BoxError;
use mesh_test::sim::{SimEndpoint, SimError, SimService, Simulation};
use mesh_test::{Event, EventLog, Latency, Script};
use mesh_tower::decision::{BreakerPhase, Event as Decided};

const SEEDS: u64 = 8;

fn get(path: &str) -> Request<Empty<Bytes>> {
    Request::get(format!("http://users{path}"))
        .body(Empty::new())
        .unwrap()
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// `loops` concurrent callers, each sending `each` requests to `/r/LOOP/N`, `pause`
/// apart; the statuses (or errors) of every request, in the order they were sent.
async fn load(
    users: SimService,
    loops: usize,
    each: usize,
    pause: Duration,
) -> Result<Vec<Result<StatusCode, String>>, BoxError> {
    let client = users.client()?;
    let callers = (0..loops).map(|l| {
        let client = client.clone();
        async move {
            let mut seen = Vec::with_capacity(each);
            for n in 0..each {
                let answer = client.send(get(&format!("/r/{l}/{n}"))).await;
                seen.push(answer.map(|r| r.status()).map_err(|e| e.to_string()));
                tokio::time::sleep(pause).await;
            }
            seen
        }
    });
    Ok(join_all(callers).await.into_iter().flatten().collect())
}

/// A scenario with latency, errors, an endpoint crashed and restarted: its event log and
/// the decisions (without their host-clock times).
fn eventful(seed: u64) -> (EventLog, Vec<String>) {
    let (sim, victim) = eventful_sim(seed);
    run_eventful(sim, &victim)
}

/// The scenario of [`eventful`], built but not run.
fn eventful_sim(seed: u64) -> (Simulation, SimEndpoint) {
    let mut sim = Simulation::new(seed).unwrap();
    let users = sim
        .service("users")
        .endpoints(3)
        .scripts([
            Script::default().with_latency(Latency::Uniform(ms(1), ms(20))),
            Script::default().with_errors(0.3, StatusCode::SERVICE_UNAVAILABLE),
            Script::default().with_latency(Latency::Tail {
                base: ms(2),
                tail: ms(80),
                tail_share: 0.1,
            }),
        ])
        .spawn()
        .unwrap();
    let victim = users.endpoint(2).unwrap().clone();
    let caller = users.clone();
    sim.client("caller", async move {
        let answers = load(caller, 4, 40, ms(3)).await?;
        assert_eq!(answers.len(), 160);
        Ok(())
    });
    (sim, victim)
}

/// Runs the scenario of [`eventful`].
fn run_eventful(mut sim: Simulation, victim: &SimEndpoint) -> (EventLog, Vec<String>) {
    assert!(!sim.run_for(ms(60)).unwrap());
    sim.crash(victim);
    assert!(!sim.run_for(ms(150)).unwrap());
    sim.bounce(victim);
    sim.run().unwrap();
    let decisions = sim
        .decisions()
        .snapshot()
        .into_iter()
        .map(|d| format!("{} {} {:?}", d.seq, d.source, d.event))
        .collect();
    (sim.events(), decisions)
}

#[test]
fn the_same_seed_gives_the_same_event_log_byte_for_byte() {
    let (first, first_decisions) = eventful(7);
    let (again, again_decisions) = eventful(7);
    let text = |log: &EventLog| format!("{log:#?}");
    // Not vacuous: the run saw every kind of outcome and the crash.
    let requests = first.requests("users").count();
    assert!(requests >= 160, "{requests} requests");
    assert!(first.requests("users").any(|r| r.outcome
        == mesh_test::Outcome::Error {
            status: StatusCode::SERVICE_UNAVAILABLE,
            grpc_code: None
        }));
    assert!(first.events().any(|e| matches!(e, Event::Endpoint(_))));
    assert!(first.last().unwrap().at > ms(200), "virtual time advanced");
    assert!(!first_decisions.is_empty());

    assert_eq!(text(&first), text(&again), "seed 7 replayed differently");
    assert_eq!(
        first_decisions, again_decisions,
        "decisions replayed differently"
    );

    // And the seed matters.
    let (other, _) = eventful(8);
    assert_ne!(
        text(&first),
        text(&other),
        "seeds 7 and 8 gave the same run"
    );
}

#[test]
fn simulations_replay_alike_however_they_share_their_thread() {
    let (reference, reference_decisions) = eventful(11);
    let text = |log: &EventLog| format!("{log:#?}");
    // Two built before either runs, and draws from the thread's generator between
    // building and running, and between steps of the other.
    let (first, first_victim) = eventful_sim(11);
    let (second, second_victim) = eventful_sim(11);
    for _ in 0..100 {
        fastrand::u64(..);
    }
    let (first_log, first_decisions) = run_eventful(first, &first_victim);
    let (second_log, second_decisions) = run_eventful(second, &second_victim);
    // Not vacuous: retries after errors drew back-off jitter.
    assert!(
        reference_decisions.iter().any(|d| d.contains("Retry(")),
        "{reference_decisions:#?}"
    );
    assert_eq!(text(&reference), text(&first_log));
    assert_eq!(text(&reference), text(&second_log));
    assert_eq!(reference_decisions, first_decisions);
    assert_eq!(reference_decisions, second_decisions);
}

#[test]
fn a_zero_tick_is_refused() {
    let built = Simulation::builder().tick(Duration::ZERO).build();
    assert!(matches!(built, Err(SimError::Invalid(_))), "{built:?}");
    assert!(Simulation::builder().tick(ms(2)).build().is_ok());
}

#[test]
fn endpoints_and_scripts_follow_the_mock_mesh_rule() {
    let (a, b) = (Script::latency(ms(1)), Script::latency(ms(2)));
    let mut sim = Simulation::new(1).unwrap();
    let scripts =
        |svc: &SimService| -> Vec<Script> { svc.endpoints().iter().map(|e| e.script()).collect() };
    let one = sim
        .service("one")
        .endpoints(3)
        .scripts([a.clone(), b.clone()])
        .spawn()
        .unwrap();
    assert_eq!(scripts(&one), [a.clone(), b.clone(), b.clone()]);
    let two = sim
        .service("two")
        .scripts([a.clone(), b.clone()])
        .endpoints(3)
        .spawn()
        .unwrap();
    assert_eq!(scripts(&two), [a.clone(), b.clone(), b.clone()]);
    // Without `endpoints`, one per script (before: one endpoint in all).
    let three = sim
        .service("three")
        .scripts([a.clone(), b.clone()])
        .spawn()
        .unwrap();
    assert_eq!(scripts(&three), [a.clone(), b.clone()]);
    let four = sim
        .service("four")
        .endpoints(2)
        .script(b.clone())
        .spawn()
        .unwrap();
    assert_eq!(scripts(&four), [b.clone(), b.clone()]);
    let five = sim
        .service("five")
        .scripts([a.clone(), b.clone()])
        .endpoints(1)
        .spawn()
        .unwrap();
    assert_eq!(scripts(&five), std::slice::from_ref(&a));
}

#[test]
fn property_no_request_reaches_an_ejected_endpoint() {
    for seed in 0..SEEDS {
        let mut sim = Simulation::new(seed).unwrap();
        let users = sim
            .service("users")
            .endpoints(3)
            .scripts([
                Script::default().with_errors(1.0, StatusCode::INTERNAL_SERVER_ERROR),
                Script::default().with_latency(Latency::Uniform(ms(1), ms(5))),
            ])
            .spawn()
            .unwrap();
        let failing = users.endpoint(0).unwrap().addr();
        let caller = users.clone();
        sim.client("caller", async move {
            load(caller, 3, 40, ms(5)).await?;
            Ok(())
        });
        sim.run().unwrap();
        let record = sim.decisions();
        assert_eq!(record.dropped(), 0, "seed {seed}: the record overflowed");

        // Walk the record in order: the breaker's phase of each endpoint, and each pick.
        let mut phase: BTreeMap<String, BreakerPhase> = BTreeMap::new();
        let (mut ejections, mut picks) = (0, 0);
        for d in record.snapshot() {
            match d.event {
                Decided::Breaker(change) => {
                    if change.to == BreakerPhase::Ejected {
                        ejections += 1;
                        assert_eq!(change.endpoint.parse::<SocketAddr>().unwrap(), failing);
                    }
                    phase.insert(change.endpoint.to_string(), change.to);
                }
                Decided::Pick(pick) => {
                    picks += 1;
                    let winner = pick.winner.addr.to_string();
                    assert_ne!(
                        phase.get(&winner),
                        Some(&BreakerPhase::Ejected),
                        "seed {seed}: decision {} picked {winner} while it was ejected",
                        d.seq
                    );
                }
                _ => {}
            }
        }
        assert!(
            ejections >= 1,
            "seed {seed}: the failing endpoint was never ejected"
        );
        assert!(picks >= 120, "seed {seed}: {picks} picks");
    }
}

#[test]
fn property_tries_stay_within_one_plus_the_retry_budget() {
    // Library defaults: 2 retries per request; the budget allows 20% of requests plus
    // 10 per second over a 10 s window.
    const MAX_RETRIES: usize = 2;
    const RATIO: f64 = 0.2;
    const MIN_PER_SECOND: f64 = 10.0;
    const TTL_SECS: f64 = 10.0;
    for seed in 0..SEEDS {
        let mut sim = Simulation::new(seed).unwrap();
        // Every endpoint fails most requests, retryably: without a budget, nearly every
        // request would be tried three times.
        let users = sim
            .service("users")
            .endpoints(3)
            .script(
                Script::default()
                    .with_errors(0.9, StatusCode::SERVICE_UNAVAILABLE)
                    .with_latency(Latency::Uniform(ms(1), ms(4))),
            )
            .spawn()
            .unwrap();
        let caller = users.clone();
        let requests = 6 * 50;
        sim.client("caller", async move {
            let answers = load(caller, 6, 50, ms(1)).await?;
            assert_eq!(answers.len(), requests);
            Ok(())
        });
        sim.run().unwrap();
        let seconds = sim.elapsed().as_secs_f64();

        let mut tries: BTreeMap<String, usize> = BTreeMap::new();
        for r in sim.events().requests("users") {
            *tries.entry(r.path.clone()).or_default() += 1;
        }
        for (path, n) in &tries {
            assert!(
                *n <= 1 + MAX_RETRIES,
                "seed {seed}: {path} was tried {n} times"
            );
        }
        let retries: usize = tries.values().map(|n| n - 1).sum();
        let budget = RATIO * requests as f64 + MIN_PER_SECOND * (seconds + TTL_SECS).ceil();
        assert!(
            retries as f64 <= budget,
            "seed {seed}: {retries} retries over {requests} requests in {seconds:.2} s (budget {budget})"
        );
        // Not vacuous: retries happened, and the budget, not the per-request cap, bound them.
        assert!(retries > 0, "seed {seed}: no retries");
        assert!(
            retries < requests * MAX_RETRIES * 9 / 10,
            "seed {seed}: {retries} retries: the budget did not bind"
        );
    }
}

#[test]
fn property_no_request_is_lost_during_discovery_churn() {
    for seed in 0..SEEDS {
        let mut sim = Simulation::new(seed).unwrap();
        let users = sim
            .service("users")
            .endpoints(4)
            .script(Script::default().with_latency(Latency::Uniform(ms(1), ms(30))))
            .spawn()
            .unwrap();
        let caller = users.clone();
        sim.client("caller", async move {
            let answers = load(caller, 4, 60, ms(2)).await?;
            let lost: Vec<_> = answers
                .iter()
                .filter(|a| *a != &Ok(StatusCode::OK))
                .collect();
            assert!(lost.is_empty(), "seed {seed}: {lost:?}");
            assert_eq!(answers.len(), 240);
            Ok(())
        });
        // Churn: every few milliseconds of virtual time, one endpoint leaves discovery or
        // comes back, with at least one always in; the schedule follows the seed.
        let mut rng = fastrand::Rng::with_seed(seed ^ 0xC4_0A11);
        let (mut removed, mut reinserted) = (0, 0);
        loop {
            if sim.run_for(ms(rng.u64(3..25))).unwrap() {
                break;
            }
            let index = rng.usize(0..users.endpoints().len());
            if users.remove_endpoint(index) {
                if users.discovered() == 0 {
                    users.reinsert_endpoint(index);
                } else {
                    removed += 1;
                }
            } else if users.reinsert_endpoint(index) {
                reinserted += 1;
            }
        }
        assert!(
            removed >= 5 && reinserted >= 3,
            "seed {seed}: only {removed} removals and {reinserted} reinsertions"
        );
        let served: std::collections::BTreeSet<usize> = sim
            .events()
            .requests("users")
            .map(|r| r.endpoint.index)
            .collect();
        assert_eq!(served.len(), 4, "seed {seed}: served by {served:?}");
    }
}

#[test]
fn grpc_through_the_simulation_sidelines_a_resource_exhausted_endpoint_for_its_pushback() {
    use mesh_tonic::test_util::echo::EchoRequest;
    use mesh_tonic::test_util::echo::echo_client::EchoClient;

    for seed in 0..4 {
        let mut sim = Simulation::new(seed).unwrap();
        let echo = sim
            .service("echo")
            .endpoints(3)
            .scripts([
                Script::default(),
                Script::default(),
                Script::rate_limited(Some(Duration::from_secs(5))),
            ])
            .spawn()
            .unwrap();
        let caller = echo.clone();
        sim.client("caller", async move {
            // RESOURCE_EXHAUSTED named among the codes to retry (an application's is
            // not retried elsewhere unless named).
            let retry = mesh_core::config::RetryConfig {
                grpc_codes: mesh_core::classify::grpc::CodeSet::of(&[
                    mesh_core::classify::grpc::Code::Unavailable,
                    mesh_core::classify::grpc::Code::ResourceExhausted,
                ]),
                ..Default::default()
            };
            let client = EchoClient::new(caller.channel_builder()?.retry(retry).build()?);
            let callers = (0..4).map(|_| {
                let mut client = client.clone();
                async move {
                    for _ in 0..50 {
                        let msg = EchoRequest {
                            message: "x".into(),
                            count: 0,
                        };
                        // Every call succeeds: a 429'd one is retried elsewhere at once.
                        let reply = client.unary(msg).await?.into_inner();
                        assert_eq!(reply.message, "x");
                        assert_eq!(reply.peer, "spiffe://example.org/client");
                    }
                    Ok::<_, tonic::Status>(())
                }
            });
            for done in join_all(callers).await {
                done?;
            }
            Ok(())
        });
        sim.run().unwrap();
        let log = sim.events();
        assert!(log.requests("echo").all(|r| r.grpc));
        let exhausted = log.count_outcomes("echo", |o| {
            *o == mesh_test::Outcome::RateLimited {
                retry_after: Some(Duration::from_secs(5)),
            }
        });
        assert!(exhausted >= 1, "seed {seed}");
        assert!(
            exhausted < 12,
            "seed {seed}: {exhausted} of 200 calls hit the exhausted endpoint"
        );
    }
}

#[test]
fn a_partitioned_endpoint_costs_no_request_and_serves_again_once_repaired() {
    // No timeout is configured: requests already on the cut connection are freed by its
    // HTTP/2 keep-alive (20 s without a frame, then 20 s for the ping) and retried. Their
    // 40 s count as the endpoint's latency, so peak-EWMA sidelines it until that decays
    // (about 90 s): the run lasts long enough to see it chosen again.
    let mut sim = Simulation::builder().seed(3).build().unwrap();
    let users = sim
        .service("users")
        .endpoints(3)
        .script(Script::default().with_latency(Latency::Uniform(ms(1), ms(3))))
        .spawn()
        .unwrap();
    let cut = users.endpoint(1).unwrap().clone();
    let caller = users.clone();
    sim.client("caller", async move {
        let answers = load(caller, 2, 1600, ms(100)).await?;
        let failed: Vec<_> = answers
            .iter()
            .filter(|a| *a != &Ok(StatusCode::OK))
            .collect();
        assert!(failed.is_empty(), "{failed:?}");
        Ok(())
    });
    assert!(!sim.run_for(Duration::from_secs(1)).unwrap());
    let before = sim.events();
    sim.partition("caller", &cut);
    assert!(!sim.run_for(Duration::from_secs(60)).unwrap());
    let during = sim.events().since(before.len());
    sim.repair("caller", &cut);
    let mark = sim.events().len();
    sim.run().unwrap();
    let after = sim.events().since(mark);
    let to_cut = |log: &EventLog| {
        log.requests("users")
            .filter(|r| r.endpoint.index == 1)
            .count()
    };
    assert!(to_cut(&before) > 0);
    // Nothing crosses a partition; the others serve meanwhile.
    assert_eq!(to_cut(&during), 0);
    assert!(
        during.requests("users").count() > 300,
        "{}",
        during.requests("users").count()
    );
    assert!(
        to_cut(&after) > 0,
        "the repaired endpoint never served again"
    );
}
