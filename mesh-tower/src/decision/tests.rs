#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use super::*;

fn retry(attempt: u32, verdict: RetryVerdict) -> Event {
    Event::Retry(RetryDecision {
        method: http::Method::GET,
        path: "/a?secret=1".parse().ok(),
        attempt,
        outcome: TryOutcome::Failed(503),
        verdict,
    })
}

fn pick(addr: &str) -> Event {
    Event::Pick(Pick {
        path: PickPath::P2c,
        winner: Candidate {
            addr: addr.parse().unwrap(),
            cost: 1.0,
            tier: Tier::Preferred,
        },
        other: None,
        zone: None,
        passed_over: 0,
    })
}

#[test]
fn the_oldest_are_dropped_and_counted() {
    let record = DecisionRecord::new(3);
    let r = record.recorder("users");
    for i in 0..5 {
        r.record(retry(i, RetryVerdict::BudgetExhausted));
    }
    let kept = record.snapshot();
    assert_eq!(kept.iter().map(|d| d.seq).collect::<Vec<_>>(), [2, 3, 4]);
    assert_eq!(record.dropped(), 2);
    assert_eq!(record.len(), 3);
    assert_eq!(record.next_seq(), 5);
    assert_eq!(&*kept[0].source, "users");
    assert_eq!(
        record.since(4).iter().map(|d| d.seq).collect::<Vec<_>>(),
        [4]
    );
    assert_eq!(record.since(0).len(), 3, "older than kept: all kept");
    assert!(record.since(5).is_empty());
    record.clear();
    assert!(record.is_empty());
    r.record(retry(9, RetryVerdict::Deadline));
    assert_eq!(record.snapshot()[0].seq, 5, "sequence numbers go on");
}

#[test]
fn a_zero_capacity_keeps_one() {
    let record = DecisionRecord::new(0);
    assert_eq!(record.capacity(), 1);
    record.recorder("a").record(pick("10.0.0.1:80"));
    record.recorder("a").record(pick("10.0.0.2:80"));
    assert_eq!(record.len(), 1);
    assert_eq!(record.dropped(), 1);
}

#[test]
fn a_record_resizes_and_switches_off_and_on() {
    let record = DecisionRecord::disabled();
    let r = record.recorder("users");
    assert!(!r.is_enabled());
    r.record(pick("10.0.0.1:80"));
    assert!(record.is_empty());
    assert_eq!(record.next_seq(), 0, "nothing recorded while off");

    record.set_capacity(4);
    assert!(r.is_enabled());
    for i in 0..4 {
        r.record(retry(i, RetryVerdict::Deadline));
    }
    assert_eq!(record.len(), 4);
    // Shrinking drops the oldest, counted.
    record.set_capacity(2);
    assert_eq!(
        record.snapshot().iter().map(|d| d.seq).collect::<Vec<_>>(),
        [2, 3]
    );
    assert_eq!(record.dropped(), 2);
    r.record(pick("10.0.0.2:80"));
    assert_eq!(
        record.snapshot().iter().map(|d| d.seq).collect::<Vec<_>>(),
        [3, 4]
    );
    // Growing keeps what is there.
    record.set_capacity(8);
    r.record(pick("10.0.0.3:80"));
    assert_eq!(record.len(), 3);
    assert!(
        record
            .dump()
            .starts_with("# 3 decisions kept (capacity 8), 3 dropped")
    );
    // Off forgets everything; on again, the sequence goes on.
    record.set_capacity(0);
    assert!(record.is_empty() && !r.is_enabled());
    r.record(pick("10.0.0.4:80"));
    record.set_capacity(1);
    r.record(pick("10.0.0.5:80"));
    assert_eq!(record.snapshot()[0].seq, 6);
}

#[test]
fn filters_by_kind() {
    let record = DecisionRecord::default();
    assert_eq!(record.capacity(), DEFAULT_CAPACITY);
    let r = record.recorder("users");
    r.record(pick("10.0.0.1:80"));
    r.record(retry(
        1,
        RetryVerdict::Retried {
            delay: Duration::from_millis(30),
        },
    ));
    r.record(pick("10.0.0.2:80"));
    let picks = record.of_kind(Kind::Pick);
    assert_eq!(picks.len(), 2);
    assert!(picks.iter().all(|d| d.event.as_pick().is_some()));
    let retries = record.of_kind(Kind::Retry);
    assert!(retries[0].event.as_retry().unwrap().verdict.is_retry());
    assert!(record.of_kind(Kind::Authz).is_empty());
}

#[tokio::test(start_paused = true)]
async fn lines_and_dump() {
    let record = DecisionRecord::new(8);
    let r = record.recorder("users");
    tokio::time::advance(Duration::from_millis(1500)).await;
    r.record(Event::Pick(Pick {
        path: PickPath::P2c,
        winner: Candidate {
            addr: "10.0.0.8:80".parse().unwrap(),
            cost: 30_000_000.0,
            tier: Tier::Preferred,
        },
        other: Some(Candidate {
            addr: "10.0.0.7:80".parse().unwrap(),
            cost: 250_000_000.0,
            tier: Tier::Penalized,
        }),
        zone: None,
        passed_over: 0,
    }));
    r.record(Event::Breaker(BreakerChange {
        endpoint: "10.0.0.7:80".into(),
        from: BreakerPhase::Closed,
        to: BreakerPhase::Ejected,
        cause: BreakerCause::ConsecutiveFailures { failures: 7 },
        ejected_for: Some(Duration::from_secs(1)),
    }));
    r.record(retry(2, RetryVerdict::AttemptsExhausted));
    record.recorder("api").record(Event::Authz(AuthzRecord {
        client: Some("spiffe://example.org/web".parse().unwrap()),
        method: http::Method::POST,
        path: "/admin".parse().ok(),
        policy: "api".into(),
        rule: None,
        verdict: AuthzVerdict::Deny,
    }));
    let dump = record.dump();
    let lines: Vec<&str> = dump.lines().collect();
    assert_eq!(
        lines,
        [
            "# 4 decisions kept (capacity 8), 0 dropped",
            "#0 +1.500s users pick 10.0.0.8:80 (cost 30.000ms, preferred) over 10.0.0.7:80 (cost 250.000ms, penalized)",
            "#1 +1.500s users breaker 10.0.0.7:80 closed -> ejected: 7 consecutive failures (for 1s)",
            "#2 +1.500s users retry GET /a attempt 2 failed with 503: not retried: attempts exhausted",
            "#3 +1.500s api authz deny spiffe://example.org/web POST /admin by api/default",
        ]
    );
}

/// Decisions keep at most `MAX_PATH_LEN` bytes of a path: a full record of requests with
/// long paths stays small.
#[cfg(feature = "authz")]
#[tokio::test]
async fn long_paths_are_cut_in_decisions() {
    use tower::{Layer, ServiceExt};

    let record = DecisionRecord::new(1000);
    let policy = mesh_core::config::AuthorizationPolicy {
        default: mesh_core::config::DefaultAction::Deny,
        ..Default::default()
    };
    let svc = crate::authz::AuthorizeLayer::from_config("api", &policy)
        .unwrap()
        .with_decisions(record.recorder("inbound"))
        .layer(tower::service_fn(|_req: http::Request<()>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(()))
        }));
    let long = "a".repeat(60_000);
    for i in 0..1000 {
        let req = http::Request::get(format!("/{long}{i}?q=1"))
            .body(())
            .unwrap();
        assert_eq!(svc.clone().oneshot(req).await.unwrap().status(), 403);
    }
    let dump = record.dump();
    assert_eq!(record.snapshot().len(), 1000);
    assert!(dump.len() < 1_000_000, "{} bytes", dump.len());
    let last = record.snapshot().pop().unwrap();
    let path = last.event.as_authz().unwrap().path.as_ref().unwrap();
    assert!(path.is_cut());
    assert_eq!(path.as_str().len(), MAX_PATH_LEN);
    assert!(last.to_string().contains("a… by api/default"), "{last}");
}
