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
                match client.send(get()).await {
                    Ok(resp) if resp.status().is_success() => {
                        let _ = resp.into_body().collect().await;
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(resp) => failures.push(format!("status {}", resp.status())),
                    Err(e) => failures.push(e.to_string()),
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
