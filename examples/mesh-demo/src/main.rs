//! The mesh demo: a `MeshClient` balancing traffic over four backends with SPIFFE mTLS.
//!
//! ```text
//! cargo run -p mesh-demo            # about 10 seconds
//! cargo run -p mesh-demo -- 30      # run for 30 seconds instead
//! ```
//!
//! An in-memory CA issues SVIDs to four mock backends on 127.0.0.1 and to the client:
//!
//! | backend | behaviour |
//! |---|---|
//! | `healthy` | answers in ~5 ms |
//! | `slow` | answers in ~120 ms |
//! | `failing` | answers 503 to everything |
//! | `limited` | answers 429 with `Retry-After: 2` to half the requests |
//!
//! Eight workers send requests for the run's duration. Every second a table shows, per
//! backend, its share of the traffic, its load score (peak-EWMA cost), its circuit
//! breaker's state and the 429s and errors it sent, with the client's retries. Watch the
//! failing backend get ejected after 7 consecutive failures (and probed now and then), the
//! limited one get sidelined for each Retry-After period, and the slow one get only what
//! the healthy one cannot take. The last line sums up requests, failures and the success
//! rate callers saw: retries hide most of the backends' failures.

// A command-line program: printing is its output.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Empty};
use mesh_core::Endpoint;
use mesh_core::discover::StaticDiscovery;
use mesh_spiffe::test_ca::TestCa;
use mesh_spiffe::{Authorizer, CredentialStore, Mtls, MtlsAcceptor};
use mesh_tower::MeshClient;
use mesh_tower::breaker::GateState;
use mesh_tower::load::Load;
use mesh_tower::mock::{Behavior, Latency, MockEndpoint};
use tokio::time::Instant;

const SERVER_ID: &str = "spiffe://demo.mesh/ns/shop/sa/catalog";

type DemoError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> ExitCode {
    let seconds = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10u64);
    match run(Duration::from_secs(seconds)).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-demo: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(duration: Duration) -> Result<(), DemoError> {
    let mut ca = TestCa::new("demo.mesh")?;
    let mut backends = Vec::new();
    let jitter = |ms: u64| {
        Latency::Uniform(
            Duration::from_millis(ms * 4 / 5),
            Duration::from_millis(ms * 6 / 5),
        )
    };
    for (name, behavior) in [
        (
            "healthy",
            Behavior {
                latency: jitter(5),
                ..Behavior::default()
            },
        ),
        (
            "slow",
            Behavior {
                latency: jitter(120),
                ..Behavior::default()
            },
        ),
        (
            "failing",
            Behavior {
                latency: jitter(5),
                ..Behavior::failing(StatusCode::SERVICE_UNAVAILABLE)
            },
        ),
        (
            "limited",
            Behavior {
                latency: jitter(5),
                rate_limited: 0.5,
                retry_after: Some(2),
                ..Behavior::default()
            },
        ),
    ] {
        let svid = ca.issue(SERVER_ID)?;
        let mtls = Mtls::new(CredentialStore::with(svid, ca.bundle_set()?));
        let acceptor =
            MtlsAcceptor::new(&mtls, Authorizer::trust_domain(ca.trust_domain().clone()))?;
        backends.push(MockEndpoint::spawn_mtls(name, behavior, acceptor).await?);
    }

    let client_svid = ca.issue("spiffe://demo.mesh/ns/shop/sa/frontend")?;
    let client_mtls = Mtls::new(CredentialStore::with(client_svid, ca.bundle_set()?));
    let mut registry = prometheus_client::registry::Registry::default();
    let discovery = StaticDiscovery::new(backends.iter().map(|b| Endpoint::new(b.addr())));
    let client = MeshClient::builder(Box::pin(discovery))
        .service_name("catalog")
        .mtls(client_mtls)
        .server_identity(SERVER_ID.parse()?)
        .metrics(&mut registry)
        .build()?;

    println!(
        "mesh demo: 8 workers -> 4 backends over mTLS ({SERVER_ID}), {} s\n",
        duration.as_secs()
    );
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + duration;
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (client, ok, failed) = (client.clone(), ok.clone(), failed.clone());
        workers.push(tokio::spawn(async move {
            while Instant::now() < until {
                let req = http::Request::get("http://catalog/items").body(Empty::<Bytes>::new());
                let Ok(req) = req else { continue };
                match client.send(req).await {
                    Ok(resp) if resp.status().is_success() => {
                        let _ = resp.into_body().collect().await;
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }

    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    let mut elapsed = 0;
    while Instant::now() < until {
        ticker.tick().await;
        elapsed += 1;
        print_table(elapsed, &client, &backends, &ok, &failed);
    }
    for w in workers {
        w.await?;
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    let total = ok + failed;
    let rate = if total == 0 {
        0.0
    } else {
        100.0 * ok as f64 / total as f64
    };
    println!("\nrequests: {total}  failures: {failed}  success rate: {rate:.2}%");
    Ok(())
}

fn print_table(
    second: u64,
    client: &MeshClient,
    backends: &[MockEndpoint],
    ok: &AtomicU64,
    failed: &AtomicU64,
) {
    let slots = client.endpoints();
    let tries: u64 = backends.iter().map(|b| b.stats().requests()).sum();
    println!(
        "t={second:>2}s  requests ok {}  failed {}  retries {}",
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        client.metrics().map_or(0, |m| m.retries()),
    );
    println!(
        "  {:<8} {:>6} {:>10} {:>9} {:>6} {:>6}",
        "backend", "share", "load (ms)", "breaker", "429s", "5xx"
    );
    let now = Instant::now();
    for b in backends {
        let slot = slots.iter().find(|s| s.endpoint.addr() == b.addr());
        let cost = slot.map(|s| s.service.load(now));
        let load = cost.map_or(0.0, |c| c.cost / 1e6);
        let breaker = match slot
            .and_then(|s| s.service.handle())
            .map(|b| b.gate().state())
        {
            Some(GateState::Open) | None => "closed",
            Some(GateState::Ejected) => "EJECTED",
            Some(GateState::Probation) => "probing",
        };
        let penalized = cost.is_some_and(|c| c.penalized);
        let share = if tries == 0 {
            0.0
        } else {
            100.0 * b.stats().requests() as f64 / tries as f64
        };
        println!(
            "  {:<8} {:>5.1}% {:>10.1} {:>9} {:>6} {:>6}{}",
            b.name(),
            share,
            load,
            breaker,
            b.stats().rate_limited.load(Ordering::Relaxed),
            b.stats().errors.load(Ordering::Relaxed),
            if penalized {
                "  (rate-limit penalty)"
            } else {
                ""
            },
        );
    }
    println!();
}
