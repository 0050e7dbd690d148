//! The fault layer: ratios, delays on paused time, aborts, activation by header, the cap.
#![cfg(feature = "fault")]
// The helpers outside `#[test]` functions unwrap too.
#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use mesh_core::config::FaultConfig;
use mesh_tower::fault::{FAULT_HEADER, FaultLayer, InvalidFault};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt, service_fn};

const DELAY: Duration = Duration::from_millis(100);

/// An inner service that counts its calls and answers 200 with a header and a body.
fn inner(
    calls: Arc<AtomicUsize>,
) -> impl Service<Request<()>, Response = Response<Full<Bytes>>, Error = Infallible, Future: Send> + Clone
{
    service_fn(move |_req: Request<()>| {
        calls.fetch_add(1, Ordering::Relaxed);
        async {
            Ok::<_, Infallible>(
                Response::builder()
                    .header("x-inner", "yes")
                    .body(Full::new(Bytes::from_static(b"hello")))
                    .unwrap(),
            )
        }
    })
}

fn faults<B>(response: &Response<B>) -> Vec<&str> {
    response
        .headers()
        .get_all(FAULT_HEADER)
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect()
}

fn grpc_request() -> Request<()> {
    Request::builder()
        .header("content-type", "application/grpc+proto")
        .body(())
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn abort_ratio_holds_over_seeded_requests() {
    let calls = Arc::new(AtomicUsize::new(0));
    let mut svc = FaultLayer::new()
        .abort(StatusCode::SERVICE_UNAVAILABLE, 0.05)
        .seed(1)
        .layer(inner(calls.clone()));
    let mut aborted = 0;
    for _ in 0..10_000 {
        let response = svc
            .ready()
            .await
            .unwrap()
            .call(Request::new(()))
            .await
            .unwrap();
        if response.status() == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(faults(&response), ["abort"]);
            aborted += 1;
        } else {
            assert_eq!(response.status(), StatusCode::OK);
            assert!(faults(&response).is_empty());
        }
    }
    assert!((400..=600).contains(&aborted), "{aborted} aborted");
    assert_eq!(calls.load(Ordering::Relaxed), 10_000 - aborted);
}

#[tokio::test(start_paused = true)]
async fn seeded_decisions_repeat() {
    let run = || async {
        let svc = FaultLayer::new()
            .abort(StatusCode::SERVICE_UNAVAILABLE, 0.3)
            .seed(99)
            .layer(inner(Arc::default()));
        let mut statuses = Vec::new();
        for _ in 0..200 {
            // Clones share the seeded sequence.
            let response = svc.clone().oneshot(Request::new(())).await.unwrap();
            statuses.push(response.status());
        }
        statuses
    };
    let first = run().await;
    assert_eq!(first, run().await);
    assert!(first.contains(&StatusCode::OK));
    assert!(first.contains(&StatusCode::SERVICE_UNAVAILABLE));
}

#[tokio::test(start_paused = true)]
async fn delay_ratio_holds_and_delays_take_exactly_the_delay() {
    let calls = Arc::new(AtomicUsize::new(0));
    let mut svc = FaultLayer::new()
        .delay(DELAY, 0.05)
        .seed(2)
        .layer(inner(calls.clone()));
    let mut delayed = 0;
    for _ in 0..10_000 {
        let start = Instant::now();
        let response = svc
            .ready()
            .await
            .unwrap()
            .call(Request::new(()))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        if faults(&response) == ["delay"] {
            assert_eq!(start.elapsed(), DELAY);
            delayed += 1;
        } else {
            assert!(faults(&response).is_empty());
            assert_eq!(start.elapsed(), Duration::ZERO);
        }
    }
    assert!((400..=600).contains(&delayed), "{delayed} delayed");
    assert_eq!(calls.load(Ordering::Relaxed), 10_000);
}

#[tokio::test(start_paused = true)]
async fn the_delay_comes_before_the_inner_call() {
    let calls = Arc::new(AtomicUsize::new(0));
    let mut svc = FaultLayer::new()
        .delay(DELAY, 1.0)
        .layer(inner(calls.clone()));
    let future = svc.ready().await.unwrap().call(Request::new(()));
    tokio::pin!(future);
    assert!(future.as_mut().now_or_never().is_none());
    tokio::time::advance(DELAY / 2).await;
    assert!(future.as_mut().now_or_never().is_none());
    assert_eq!(calls.load(Ordering::Relaxed), 0);
    let response = future.await.unwrap();
    assert_eq!(calls.load(Ordering::Relaxed), 1);
    assert_eq!(faults(&response), ["delay"]);
}

#[tokio::test(start_paused = true)]
async fn http_abort_answers_with_the_status_and_never_calls_inner() {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = FaultLayer::new()
        .abort(StatusCode::TOO_MANY_REQUESTS, 1.0)
        .layer(inner(calls.clone()));
    let response = svc.oneshot(Request::new(())).await.unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(faults(&response), ["abort"]);
    assert!(response.headers().get("grpc-status").is_none());
    assert!(response.body().is_local());
    assert_eq!(calls.load(Ordering::Relaxed), 0);
}

#[tokio::test(start_paused = true)]
async fn delayed_then_aborted_says_both() {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = FaultLayer::new()
        .delay(DELAY, 1.0)
        .abort(StatusCode::BAD_GATEWAY, 1.0)
        .layer(inner(calls.clone()));
    let start = Instant::now();
    let response = svc.oneshot(Request::new(())).await.unwrap();
    assert_eq!(start.elapsed(), DELAY);
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(faults(&response), ["delay", "abort"]);
    assert_eq!(calls.load(Ordering::Relaxed), 0);
}

#[tokio::test(start_paused = true)]
async fn grpc_abort_is_trailers_only_with_the_mapped_code() {
    for (status, code) in [
        (503, "14"),
        (404, "12"),
        (403, "7"),
        (401, "16"),
        (400, "13"),
        (500, "2"),
    ] {
        let calls = Arc::new(AtomicUsize::new(0));
        let svc = FaultLayer::new()
            .abort(StatusCode::from_u16(status).unwrap(), 1.0)
            .layer(inner(calls.clone()));
        let response = svc.oneshot(grpc_request()).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["grpc-status"], code, "HTTP {status}");
        assert_eq!(response.headers()["content-type"], "application/grpc");
        assert_eq!(faults(&response), ["abort"]);
        let body = response.into_body().collect().await.unwrap();
        assert!(body.trailers().is_none());
        assert!(body.to_bytes().is_empty());
        assert_eq!(calls.load(Ordering::Relaxed), 0);
    }
}

#[tokio::test(start_paused = true)]
async fn grpc_abort_with_an_explicit_code() {
    let layer = FaultLayer::new()
        .abort(StatusCode::SERVICE_UNAVAILABLE, 1.0)
        .abort_grpc_code(4);
    let response = layer
        .layer(inner(Arc::default()))
        .oneshot(grpc_request())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["grpc-status"], "4");
    // Plain HTTP requests still get the status.
    let response = layer
        .layer(inner(Arc::default()))
        .oneshot(Request::new(()))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);

    // A gRPC code alone aborts every request; HTTP ones get 503.
    let layer = FaultLayer::new().abort_grpc_code(8);
    let response = layer
        .layer(inner(Arc::default()))
        .oneshot(grpc_request())
        .await
        .unwrap();
    assert_eq!(response.headers()["grpc-status"], "8");
    let response = layer
        .layer(inner(Arc::default()))
        .oneshot(Request::new(()))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test(start_paused = true)]
async fn faults_apply_only_with_the_header() {
    let name = HeaderName::from_static("x-chaos");
    let with = |value: &'static str| {
        Request::builder()
            .header("x-chaos", value)
            .body(())
            .unwrap()
    };

    let calls = Arc::new(AtomicUsize::new(0));
    let svc = FaultLayer::new()
        .abort(StatusCode::SERVICE_UNAVAILABLE, 1.0)
        .only_with_header(name.clone())
        .layer(inner(calls.clone()));
    let plain = svc.clone().oneshot(Request::new(())).await.unwrap();
    assert_eq!(plain.status(), StatusCode::OK);
    assert!(faults(&plain).is_empty());
    let targeted = svc.clone().oneshot(with("anything")).await.unwrap();
    assert_eq!(targeted.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(calls.load(Ordering::Relaxed), 1);

    let svc = FaultLayer::new()
        .abort(StatusCode::SERVICE_UNAVAILABLE, 1.0)
        .only_with_header_value(name, HeaderValue::from_static("on"))
        .layer(inner(Arc::default()));
    let other = svc.clone().oneshot(with("off")).await.unwrap();
    assert_eq!(other.status(), StatusCode::OK);
    let on = svc.clone().oneshot(with("on")).await.unwrap();
    assert_eq!(on.status(), StatusCode::SERVICE_UNAVAILABLE);
    let plain = svc.oneshot(Request::new(())).await.unwrap();
    assert_eq!(plain.status(), StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn the_cap_lets_excess_requests_pass_and_frees_its_slots() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = FaultLayer::new().delay(DELAY, 1.0).max_active(3);
    let mut svc = layer.layer(inner(calls.clone()));

    let mut delayed = Vec::new();
    for _ in 0..3 {
        delayed.push(svc.ready().await.unwrap().call(Request::new(())));
    }
    assert_eq!(layer.active(), 3);
    // Beyond the cap: passed at once, unfaulted.
    let start = Instant::now();
    for _ in 0..2 {
        let response = svc
            .ready()
            .await
            .unwrap()
            .call(Request::new(()))
            .await
            .unwrap();
        assert!(faults(&response).is_empty());
    }
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(calls.load(Ordering::Relaxed), 2);

    for response in futures_util::future::join_all(delayed).await {
        assert_eq!(faults(&response.unwrap()), ["delay"]);
    }
    assert_eq!(start.elapsed(), DELAY);
    assert_eq!(layer.active(), 0);

    // Free again: the next ones are delayed.
    let mut more = Vec::new();
    for _ in 0..3 {
        more.push(svc.ready().await.unwrap().call(Request::new(())));
    }
    assert_eq!(layer.active(), 3);
    // Dropping a delayed future frees its slot.
    drop(more.pop());
    assert_eq!(layer.active(), 2);
    let again = svc.ready().await.unwrap().call(Request::new(()));
    assert_eq!(layer.active(), 3);
    drop(more);
    drop(again);
    assert_eq!(layer.active(), 0);
}

#[tokio::test(start_paused = true)]
async fn aborts_count_toward_the_cap_only_while_answered() {
    let layer = FaultLayer::new()
        .abort(StatusCode::SERVICE_UNAVAILABLE, 1.0)
        .max_active(1);
    let svc = layer.layer(inner(Arc::default()));
    for _ in 0..3 {
        let response = svc.clone().oneshot(Request::new(())).await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(layer.active(), 0);
    }
    // A cap of zero disables faults.
    let svc = FaultLayer::new()
        .abort(StatusCode::SERVICE_UNAVAILABLE, 1.0)
        .max_active(0)
        .layer(inner(Arc::default()));
    let response = svc.oneshot(Request::new(())).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn a_zero_ratio_never_faults() {
    let calls = Arc::new(AtomicUsize::new(0));
    let mut svc = FaultLayer::new()
        .delay(DELAY, 0.0)
        .abort(StatusCode::SERVICE_UNAVAILABLE, 0.0)
        .layer(inner(calls.clone()));
    let start = Instant::now();
    for _ in 0..1_000 {
        let response = svc
            .ready()
            .await
            .unwrap()
            .call(Request::new(()))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert!(faults(&response).is_empty());
    }
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(calls.load(Ordering::Relaxed), 1_000);
}

#[tokio::test(start_paused = true)]
async fn unfaulted_responses_pass_through_untouched() {
    let svc = FaultLayer::new()
        .abort(StatusCode::SERVICE_UNAVAILABLE, 1.0)
        .only_with_header(HeaderName::from_static("x-chaos"))
        .layer(inner(Arc::default()));
    let response = svc.oneshot(Request::new(())).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers().len(), 1);
    assert_eq!(response.headers()["x-inner"], "yes");
    assert!(!response.body().is_local());
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "hello");
}

#[tokio::test(start_paused = true)]
async fn from_config_compiles_and_refuses_nonsense() {
    let config: FaultConfig =
        toml::from_str("delay = \"100ms\"\nabort_status = 503\nabort_ratio = 0.0").unwrap();
    let svc = FaultLayer::from_config(&config)
        .unwrap()
        .layer(inner(Arc::default()));
    let start = Instant::now();
    let response = svc.oneshot(Request::new(())).await.unwrap();
    assert_eq!(start.elapsed(), DELAY);
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(faults(&response), ["delay"]);

    let config: FaultConfig = toml::from_str("abort_status = 503").unwrap();
    let svc = FaultLayer::from_config(&config)
        .unwrap()
        .layer(inner(Arc::default()));
    let response = svc.oneshot(grpc_request()).await.unwrap();
    assert_eq!(response.headers()["grpc-status"], "14");

    let bad_status: FaultConfig = toml::from_str("abort_status = 99").unwrap();
    assert_eq!(
        FaultLayer::from_config(&bad_status).unwrap_err(),
        InvalidFault::AbortStatus(99)
    );
    let bad_ratio: FaultConfig = toml::from_str("delay = \"1s\"\ndelay_ratio = 1.5").unwrap();
    assert_eq!(
        FaultLayer::from_config(&bad_ratio).unwrap_err(),
        InvalidFault::Ratio {
            field: "delay_ratio",
            value: 1.5
        }
    );
}
