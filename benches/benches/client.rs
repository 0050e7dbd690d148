//! Per-request overhead of the whole `MeshClient` stack (balancer, load tracking, breaker,
//! retry bookkeeping, classification, metrics) against a bare hyper-util client, both
//! sending HTTP/1.1 in plaintext (with `TCP_NODELAY`) to the same loopback server, in the
//! same run.
//!
//! - `latency/*`: one request at a time; compare the medians.
//! - `throughput_32/*`: 32 concurrent requests per iteration; the ratio of times is the
//!   inverse ratio of throughputs.
//!
//! ```text
//! cargo bench -p mesh-benches --bench client
//! ```
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use mesh_core::Endpoint;
use mesh_core::config::Protocol;
use mesh_core::discover::StaticDiscovery;
use mesh_tower::MeshClient;
use mesh_tower::mock::{Behavior, MockEndpoint};

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = rt
        .block_on(MockEndpoint::spawn("bench", Behavior::default()))
        .unwrap();
    let uri: http::Uri = format!("http://{}/", server.addr()).parse().unwrap();
    // Like ours, the baseline disables Nagle's algorithm (hyper-util leaves it on).
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    let bare: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    let mesh = {
        let _guard = rt.enter();
        MeshClient::builder(Box::pin(StaticDiscovery::new([Endpoint::new(
            server.addr(),
        )])))
        .plaintext()
        .protocol(Protocol::Http1)
        .metrics(&mut prometheus_registry())
        .build()
        .unwrap()
    };

    let bare_once = |bare: Client<_, Empty<Bytes>>, uri: http::Uri| async move {
        let resp = bare.get(uri).await.unwrap();
        resp.into_body().collect().await.unwrap();
    };
    let mesh_once = |mesh: MeshClient, uri: http::Uri| async move {
        let req = http::Request::get(uri).body(Empty::<Bytes>::new()).unwrap();
        let resp = mesh.send(req).await.unwrap();
        resp.into_body().collect().await.unwrap();
    };

    let mut group = c.benchmark_group("latency");
    group.bench_function("bare_hyper", |b| {
        b.to_async(&rt)
            .iter(|| bare_once(bare.clone(), uri.clone()))
    });
    group.bench_function("mesh_client", |b| {
        b.to_async(&rt)
            .iter(|| mesh_once(mesh.clone(), uri.clone()))
    });
    group.finish();

    let mut group = c.benchmark_group("throughput_32");
    group.bench_function("bare_hyper", |b| {
        b.to_async(&rt).iter(|| {
            futures_util::future::join_all((0..32).map(|_| bare_once(bare.clone(), uri.clone())))
        })
    });
    group.bench_function("mesh_client", |b| {
        b.to_async(&rt).iter(|| {
            futures_util::future::join_all((0..32).map(|_| mesh_once(mesh.clone(), uri.clone())))
        })
    });
    group.finish();
}

fn prometheus_registry() -> prometheus_client::registry::Registry {
    prometheus_client::registry::Registry::default()
}

criterion_group!(benches, bench);
criterion_main!(benches);
