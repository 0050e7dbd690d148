//! Load helpers shared by the tests.
#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use mesh_tower::MeshClient;
use tokio::time::Instant;

pub fn get() -> Request<Empty<Bytes>> {
    Request::get("http://users/").body(Empty::new()).unwrap()
}

/// What a load run saw.
#[derive(Debug, Default)]
pub struct Run {
    pub ok: u64,
    pub failed: u64,
    pub failures: Vec<String>,
}

/// How long one request of [`load`] may take before it counts as hung.
const HANG: Duration = Duration::from_secs(20);

/// `workers` loops of GETs for `duration`.
pub async fn load(client: &MeshClient, workers: usize, duration: Duration) -> Run {
    let ok = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + duration;
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (client, ok) = (client.clone(), ok.clone());
        tasks.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            while Instant::now() < until {
                // A hang is a failure that says where, not a test stuck until nextest's
                // timeout.
                let sent = tokio::time::timeout(HANG, client.send(get())).await;
                match sent {
                    Ok(Ok(resp)) if resp.status().is_success() => {
                        let body = tokio::time::timeout(HANG, resp.into_body().collect()).await;
                        if body.is_err() {
                            failures.push(format!("response body not ended within {HANG:?}"));
                            break;
                        }
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Ok(resp)) => failures.push(format!("status {}", resp.status())),
                    Ok(Err(e)) => failures.push(e.to_string()),
                    Err(_) => {
                        failures.push(format!("no response within {HANG:?}"));
                        break;
                    }
                }
            }
            failures
        }));
    }
    let mut run = Run::default();
    for t in tasks {
        run.failures.extend(t.await.unwrap());
    }
    run.ok = ok.load(Ordering::Relaxed);
    run.failed = run.failures.len() as u64;
    run
}
