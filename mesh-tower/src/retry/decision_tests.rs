//! Retry decisions in the decision record.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::Full;
use mesh_core::error::BoxError;
use tower::{Service, ServiceBuilder, ServiceExt};

use super::{ReplayBody, RetryBudget, RetryLayer, RetryPolicy};
use crate::decision::{DecisionRecord, Kind, RetryVerdict, TryOutcome};

/// A server answering `statuses` in turn (the last repeats), through `layer`.
fn client(
    layer: RetryLayer,
    statuses: &'static [u16],
) -> impl Service<Request<Full<Bytes>>, Response = Response<()>, Error = BoxError> {
    let n = Arc::new(AtomicU32::new(0));
    ServiceBuilder::new()
        .layer(layer)
        .service_fn(move |_req: Request<ReplayBody>| {
            let i = n.fetch_add(1, Ordering::Relaxed) as usize;
            let status = statuses[i.min(statuses.len() - 1)];
            async move { Ok::<_, BoxError>(Response::builder().status(status).body(())?) }
        })
}

fn request(method: Method) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri("http://users/42?q=1")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

fn verdicts(record: &DecisionRecord) -> Vec<(u32, TryOutcome, RetryVerdict)> {
    record
        .of_kind(Kind::Retry)
        .iter()
        .map(|d| {
            let r = d.event.as_retry().unwrap();
            (r.attempt, r.outcome, r.verdict)
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_retry_the_budget_refuses_is_recorded() {
    let record = DecisionRecord::new(16);
    let layer = RetryLayer::new(
        RetryPolicy::default(),
        RetryBudget::new(0.0, 0, Duration::from_secs(10)),
    )
    .decisions(record.recorder("users"));
    let resp = client(layer, &[503])
        .oneshot(request(Method::GET))
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(
        verdicts(&record),
        [(1, TryOutcome::Failed(503), RetryVerdict::BudgetExhausted)]
    );
    let line = record.snapshot()[0].to_string();
    assert!(
        line.ends_with(
            "users retry GET /42 attempt 1 failed with 503: not retried: retry budget exhausted"
        ),
        "{line}"
    );
}

#[tokio::test(start_paused = true)]
async fn retries_then_exhausted_attempts_and_no_record_of_successes() {
    let record = DecisionRecord::new(16);
    let layer = RetryLayer::default().decisions(record.recorder("users"));
    let resp = client(layer.clone(), &[503])
        .oneshot(request(Method::GET))
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    let got = verdicts(&record);
    assert_eq!(got.len(), 3, "{got:?}");
    assert!(matches!(got[0], (1, _, RetryVerdict::Retried { .. })));
    assert!(matches!(got[1], (2, _, RetryVerdict::Retried { .. })));
    assert_eq!(got[2].2, RetryVerdict::AttemptsExhausted);
    assert_eq!(got[2].0, 3);

    record.clear();
    let ok = client(layer.clone(), &[503, 200])
        .oneshot(request(Method::GET))
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(verdicts(&record).len(), 1, "the success is not a decision");

    record.clear();
    client(layer, &[503])
        .oneshot(request(Method::POST))
        .await
        .unwrap();
    assert_eq!(
        verdicts(&record),
        [(1, TryOutcome::Failed(503), RetryVerdict::NotIdempotent)]
    );
}

/// A server answering 503 with `retry_after` on its first try and 200 after; counts tries.
fn pushing_back(
    retry_after: &'static str,
    tries: Arc<AtomicU32>,
) -> impl Service<Request<Full<Bytes>>, Response = Response<()>, Error = BoxError> {
    ServiceBuilder::new()
        .layer(RetryLayer::default())
        .service_fn(move |_req: Request<ReplayBody>| {
            let first = tries.fetch_add(1, Ordering::Relaxed) == 0;
            async move {
                let resp = if first {
                    Response::builder()
                        .status(503)
                        .header("retry-after", retry_after)
                        .body(())?
                } else {
                    Response::new(())
                };
                Ok::<_, BoxError>(resp)
            }
        })
}

#[tokio::test(start_paused = true)]
async fn a_server_asking_for_a_longer_wait_than_max_pushback_gets_its_answer_passed_on() {
    // Within the bound: retried after exactly the server's wait.
    let tries = Arc::new(AtomicU32::new(0));
    let started = tokio::time::Instant::now();
    let resp = pushing_back("3", tries.clone())
        .oneshot(request(Method::GET))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(tries.load(Ordering::Relaxed), 2);
    assert!(started.elapsed() >= Duration::from_secs(3));
    // Longer than MAX_PUSHBACK, or too large for any clock, with or without a deadline:
    // the 503 at once, never a panic or a request held for the server's whole wait.
    for retry_after in ["11", "99999999999999999999", "18446744073709551615"] {
        for deadline in [None, Some(Duration::from_secs(5))] {
            let tries = Arc::new(AtomicU32::new(0));
            let mut req = request(Method::GET);
            if let Some(left) = deadline {
                req.extensions_mut()
                    .insert(crate::timeout::Deadline(tokio::time::Instant::now() + left));
            }
            let started = tokio::time::Instant::now();
            let resp = pushing_back(retry_after, tries.clone())
                .oneshot(req)
                .await
                .unwrap();
            assert_eq!(resp.status(), 503, "{retry_after} {deadline:?}");
            assert_eq!(resp.headers()["retry-after"], retry_after);
            assert_eq!(tries.load(Ordering::Relaxed), 1, "{retry_after}");
            assert_eq!(started.elapsed(), Duration::ZERO, "{retry_after}");
        }
    }
}

/// A try never sent because the endpoint's pool was full is retried whatever the method,
/// as a failed connect is: the request never left.
#[tokio::test(start_paused = true)]
async fn a_try_the_pool_refused_is_retried_even_for_a_post() {
    let record = DecisionRecord::new(16);
    let tries = Arc::new(AtomicU32::new(0));
    let seen = tries.clone();
    let svc = ServiceBuilder::new()
        .layer(RetryLayer::default().decisions(record.recorder("users")))
        .service_fn(move |_req: Request<ReplayBody>| {
            let first = seen.fetch_add(1, Ordering::Relaxed) == 0;
            async move {
                if first {
                    return Err::<Response<()>, BoxError>(
                        crate::connect::PoolOverflow {
                            addr: "10.0.0.1:80".parse().unwrap(),
                            connections: 1,
                            pending: 0,
                        }
                        .into(),
                    );
                }
                Ok(Response::new(()))
            }
        });
    let resp = svc.oneshot(request(Method::POST)).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(tries.load(Ordering::Relaxed), 2);
    assert!(matches!(
        verdicts(&record)[..],
        [(1, TryOutcome::NotSent, RetryVerdict::Retried { .. })]
    ));
    let line = record.snapshot()[0].to_string();
    assert!(
        line.contains("attempt 1 found no free connection"),
        "{line}"
    );
}
