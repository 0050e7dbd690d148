//! Balancer pick cost with 10, 100 and 1,000 endpoints: ours (readiness-tiered power of
//! two choices over peak-EWMA, lock-free snapshot) against tower's `balance::p2c` over
//! `load::PeakEwma`, in the same run.
//!
//! Two groups, no I/O:
//!
//! - `balancer_pick`: ours is one pick (`balance::pick` over the live snapshot) plus the
//!   load bookkeeping of one request (an in-flight guard completed with an RTT sample);
//!   tower's is one request through its balancer, which is where its pick happens.
//! - `balancer_service`: one request through each balancer as a tower service, the same
//!   for both: `poll_ready` (which picks), `call`, and driving the response future of an
//!   immediately ready `service_fn` endpoint wrapped in the load layer (ours:
//!   `mesh_tower::load::PeakEwma`, fed by discovery; tower's: `load::PeakEwma` over a
//!   `ServiceList`). Ours also clones the winner's service (the snapshot is shared, not
//!   owned) and asks it for readiness.
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
use mesh_tower::balance::{self, Balance, ZonePreference};
use mesh_tower::load::PeakEwmaLayer;
use tokio::time::Instant;
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

type Ours = Balance<mesh_tower::load::PeakEwma<tower::util::ServiceFn<fn(Request<()>) -> Ready>>>;
type Theirs = TowerBalance<
    ServiceList<Vec<PeakEwma<tower::util::ServiceFn<fn(Request<()>) -> Ready>>>>,
    Request<()>,
>;

fn balancers(rt: &tokio::runtime::Runtime, n: usize) -> (Ours, Theirs) {
    let _guard = rt.enter();
    let endpoints =
        (0..n).map(|i| Endpoint::new(SocketAddr::from(([127, 0, 0, 1], 10_000 + i as u16))));
    let load = PeakEwmaLayer::new().rtt(RTT, DECAY);
    let f: fn(Request<()>) -> Ready = endpoint;
    let ours = Balance::builder().seed(1).build(
        Box::pin(StaticDiscovery::new(endpoints)),
        move |_: &Endpoint| Some(load.layer(tower::service_fn(f))),
    );
    // Let the discovery task fill the pool.
    rt.block_on(async {
        while ours.endpoints().len() < n {
            tokio::task::yield_now().await;
        }
    });
    let services = (0..n).map(|_| {
        PeakEwma::new(
            tower::service_fn(f),
            RTT,
            DECAY.as_nanos() as f64,
            CompleteOnResponse::default(),
        )
    });
    let theirs = TowerBalance::new(ServiceList::new::<Request<()>>(
        services.collect::<Vec<_>>(),
    ));
    (ours, theirs)
}

fn bench(c: &mut Criterion) {
    let waker = std::task::Waker::noop();
    let mut cx = Context::from_waker(waker);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let mut all: Vec<(usize, Ours, Theirs)> = [10usize, 100, 1000]
        .into_iter()
        .map(|n| {
            let (ours, theirs) = balancers(&rt, n);
            (n, ours, theirs)
        })
        .collect();

    let mut group = c.benchmark_group("balancer_pick");
    for (n, ours, theirs) in &mut all {
        let pool = ours.pool();
        let mut rng = fastrand::Rng::with_seed(1);
        group.bench_with_input(BenchmarkId::new("mesh", *n), n, |b, _| {
            b.iter(|| {
                let i = balance::pick(&pool, ZonePreference::default(), &[], &mut rng).unwrap();
                let in_flight = pool.endpoints[i].service.handle().start();
                in_flight.complete(Instant::now());
            })
        });
        group.bench_with_input(BenchmarkId::new("tower_p2c_peak_ewma", *n), n, |b, _| {
            b.iter(|| drive(theirs, &mut cx))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("balancer_service");
    for (n, ours, theirs) in &mut all {
        group.bench_with_input(BenchmarkId::new("mesh", *n), n, |b, _| {
            b.iter(|| drive(ours, &mut cx))
        });
        group.bench_with_input(BenchmarkId::new("tower_p2c_peak_ewma", *n), n, |b, _| {
            b.iter(|| drive(theirs, &mut cx))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
