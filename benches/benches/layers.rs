//! What one layer costs: each of mesh-tower's layers alone over an immediately ready
//! `service_fn`, against the bare `service_fn`, in the same run. One iteration is
//! `poll_ready`, `call` and driving the response future once; no I/O, no runtime wake-ups.
//!
//! ```text
//! cargo bench -p mesh-benches --bench layers
//! ```
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{Request, Response};
use http_body_util::Empty;
use mesh_core::classify::Classifier;
use mesh_tower::breaker::BreakerLayer;
use mesh_tower::load::PeakEwmaLayer;
use mesh_tower::metrics::ClientMetrics;
use mesh_tower::retry::RetryLayer;
use mesh_tower::timeout::TimeoutLayer;
use tower::{Layer, Service};

fn ok<B>(_: Request<B>) -> std::future::Ready<Result<Response<()>, Infallible>> {
    std::future::ready(Ok(Response::new(())))
}

fn once<S>(svc: &mut S, cx: &mut Context<'_>)
where
    S: Service<Request<Empty<Bytes>>>,
    S::Error: std::fmt::Debug,
{
    assert!(matches!(svc.poll_ready(cx), Poll::Ready(Ok(()))));
    let mut fut = pin!(svc.call(Request::new(Empty::new())));
    assert!(matches!(fut.as_mut().poll(cx), Poll::Ready(Ok(_))));
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let mut group = c.benchmark_group("layer");

    let mut bare = tower::service_fn(ok::<Empty<Bytes>>);
    group.bench_function("service_fn", |b| b.iter(|| once(&mut bare, &mut cx)));

    let mut timeout =
        TimeoutLayer::per_try(Some(Duration::from_secs(1))).layer(tower::service_fn(ok));
    group.bench_function("timeout", |b| b.iter(|| once(&mut timeout, &mut cx)));

    let mut load = PeakEwmaLayer::new().layer(tower::service_fn(ok));
    group.bench_function("load", |b| b.iter(|| once(&mut load, &mut cx)));

    let mut breaker = BreakerLayer::default().layer(tower::service_fn(ok));
    group.bench_function("breaker", |b| b.iter(|| once(&mut breaker, &mut cx)));

    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = ClientMetrics::register(&mut registry, "bench");
    let mut metered = metrics
        .endpoint("127.0.0.1:80".into(), Classifier::default())
        .layer(tower::service_fn(ok));
    group.bench_function("metrics", |b| b.iter(|| once(&mut metered, &mut cx)));

    let mut retry = RetryLayer::default().layer(tower::service_fn(ok));
    group.bench_function("retry", |b| b.iter(|| once(&mut retry, &mut cx)));
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
