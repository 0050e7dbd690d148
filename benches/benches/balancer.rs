//! Balancer pick cost with 10, 100 and 1,000 endpoints: ours (readiness-tiered power of
//! two choices over peak-EWMA, lock-free snapshot) against tower's `balance::p2c` over
//! `load::PeakEwma`, in the same run.
//!
//! Each iteration is one pick plus the load bookkeeping of one request: ours picks,
//! starts an in-flight guard and completes it with an RTT sample; tower's polls the
//! balancer ready (which picks), calls it, and drives the response future (an immediately
//! ready `service_fn`) so that `PeakEwma` records the RTT. No I/O.
//!
//! ```text
//! cargo bench -p mesh-benches --bench balancer
//! ```
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use mesh_core::Endpoint;
use mesh_tower::balance::load::EndpointLoad;
use mesh_tower::balance::pool::{Pool, Slot};
use mesh_tower::balance::{self, ZonePreference};
use mesh_tower::client::body::RequestBody;
use mesh_tower::connect::{ConnectSettings, EndpointClient};
use tokio::time::Instant;
use tower::Service;
use tower::balance::p2c::Balance;
use tower::discover::ServiceList;
use tower::load::{CompleteOnResponse, PeakEwma};

const RTT: Duration = Duration::from_millis(30);
const DECAY: Duration = Duration::from_secs(10);

fn our_pool(n: usize) -> Pool<RequestBody> {
    let mut pool = Pool::default();
    for i in 0..n {
        let addr = SocketAddr::from(([127, 0, 0, 1], 10_000 + i as u16));
        let slot = Slot {
            endpoint: Endpoint::new(addr),
            client: EndpointClient::new(addr, ConnectSettings::plaintext()),
            load: EndpointLoad::new(RTT, DECAY),
            breaker: None,
            label: Arc::from(addr.to_string()),
            metrics: None,
        };
        pool.endpoints.push(Arc::new(slot));
        pool.all.push(i);
        pool.remote.push(i);
    }
    pool
}

fn bench(c: &mut Criterion) {
    let waker = futures_util::task::noop_waker();
    let mut group = c.benchmark_group("balancer_pick");
    for n in [10usize, 100, 1000] {
        // A runtime context for hyper's client handles; nothing is spawned.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let pool = our_pool(n);
        let mut rng = fastrand::Rng::with_seed(1);
        group.bench_with_input(BenchmarkId::new("mesh", n), &n, |b, _| {
            b.iter(|| {
                let slot = balance::pick(&pool, ZonePreference::default(), &mut rng).unwrap();
                let in_flight = slot.load.start();
                in_flight.complete(Instant::now());
            })
        });

        let services = (0..n).map(|_| {
            PeakEwma::new(
                tower::service_fn(|()| async { Ok::<_, std::convert::Infallible>(()) }),
                RTT,
                DECAY.as_nanos() as f64,
                CompleteOnResponse::default(),
            )
        });
        let mut tower_balance = Balance::new(ServiceList::new::<()>(services.collect::<Vec<_>>()));
        let mut cx = Context::from_waker(&waker);
        group.bench_with_input(BenchmarkId::new("tower_p2c_peak_ewma", n), &n, |b, _| {
            b.iter(|| {
                match tower_balance.poll_ready(&mut cx) {
                    Poll::Ready(Ok(())) => {}
                    other => panic!("tower balancer not ready: {other:?}"),
                }
                let mut fut = pin!(tower_balance.call(()));
                match fut.as_mut().poll(&mut cx) {
                    Poll::Ready(Ok(())) => {}
                    _ => panic!("service_fn future not ready"),
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
