//! Balancer pick cost with 10, 100 and 1,000 endpoints: ours (readiness-tiered power of
//! two choices over peak-EWMA, lock-free snapshot) against tower's `balance::p2c` over
//! `load::PeakEwma`, in the same run.
//!
//! Each iteration is one request through the balancer as a tower service, the same for
//! both: `poll_ready` (which picks), `call`, and driving the response future of an
//! immediately ready `service_fn` endpoint wrapped in the load layer (ours:
//! `mesh_tower::load::PeakEwma`, fed by discovery; tower's: `load::PeakEwma` over a
//! `ServiceList`), so the RTT is recorded. No I/O.
//!
//! ```text
//! cargo bench -p mesh-benches --bench balancer
//! ```
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::task::{Context, Poll};
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use http::{Request, Response};
use mesh_core::Endpoint;
use mesh_core::discover::StaticDiscovery;
use mesh_tower::balance::Balance;
use mesh_tower::load::PeakEwmaLayer;
use tower::balance::p2c::Balance as TowerBalance;
use tower::discover::ServiceList;
use tower::load::{CompleteOnResponse, PeakEwma};
use tower::{Layer, Service};

const RTT: Duration = Duration::from_millis(30);
const DECAY: Duration = Duration::from_secs(10);

type Ready = std::future::Ready<Result<Response<()>, Infallible>>;

fn endpoint(_: Request<()>) -> Ready {
    std::future::ready(Ok(Response::new(())))
}

fn drive<S: Service<Request<()>>>(svc: &mut S, cx: &mut Context<'_>)
where
    S::Error: std::fmt::Debug,
{
    match svc.poll_ready(cx) {
        Poll::Ready(Ok(())) => {}
        Poll::Ready(Err(e)) => panic!("balancer failed: {e:?}"),
        Poll::Pending => panic!("balancer not ready"),
    }
    let mut fut = pin!(svc.call(Request::new(())));
    match fut.as_mut().poll(cx) {
        Poll::Ready(Ok(_)) => {}
        _ => panic!("endpoint future not ready"),
    }
}

fn bench(c: &mut Criterion) {
    let waker = std::task::Waker::noop();
    let mut cx = Context::from_waker(waker);
    let mut group = c.benchmark_group("balancer_pick");
    for n in [10usize, 100, 1000] {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let endpoints =
            (0..n).map(|i| Endpoint::new(SocketAddr::from(([127, 0, 0, 1], 10_000 + i as u16))));
        let load = PeakEwmaLayer::new().rtt(RTT, DECAY);
        let mut ours = Balance::builder().seed(1).build(
            Box::pin(StaticDiscovery::new(endpoints)),
            move |_: &Endpoint| Some(load.layer(tower::service_fn(endpoint))),
        );
        // Let the discovery task fill the pool.
        rt.block_on(async {
            while ours.endpoints().len() < n {
                tokio::task::yield_now().await;
            }
        });
        group.bench_with_input(BenchmarkId::new("mesh", n), &n, |b, _| {
            b.iter(|| drive(&mut ours, &mut cx))
        });

        let services = (0..n).map(|_| {
            PeakEwma::new(
                tower::service_fn(endpoint),
                RTT,
                DECAY.as_nanos() as f64,
                CompleteOnResponse::default(),
            )
        });
        let mut theirs = TowerBalance::new(ServiceList::new::<Request<()>>(
            services.collect::<Vec<_>>(),
        ));
        group.bench_with_input(BenchmarkId::new("tower_p2c_peak_ewma", n), &n, |b, _| {
            b.iter(|| drive(&mut theirs, &mut cx))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
