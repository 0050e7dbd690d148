//! SVID and trust-anchor rotation under continuous traffic: nothing fails while the fleet
//! rolls, and once the old anchor is gone its chains are refused.
#![cfg(feature = "test-util")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use mesh_core::identity::SpiffeId;
use mesh_spiffe::test_ca::TestCa;
use mesh_spiffe::{
    Authorizer, CredentialStore, MtlsAcceptor, MtlsConnector, TransportError, VerifyError,
};
use tokio::sync::Mutex;

const API: &str = "spiffe://example.org/api";
const WEB: &str = "spiffe://example.org/web";

/// Counts of what the traffic saw.
#[derive(Default)]
struct Traffic {
    new_conn_ok: AtomicU64,
    reused_ok: AtomicU64,
    failures: Mutex<Vec<String>>,
    stop: AtomicBool,
}

impl Traffic {
    fn total(&self) -> u64 {
        self.new_conn_ok.load(Ordering::Relaxed) + self.reused_ok.load(Ordering::Relaxed)
    }

    /// Waits until at least `n` more requests of each kind succeeded.
    async fn progress(&self, n: u64) {
        let (a, b) = (
            self.new_conn_ok.load(Ordering::Relaxed),
            self.reused_ok.load(Ordering::Relaxed),
        );
        tokio::time::timeout(Duration::from_secs(20), async {
            while self.new_conn_ok.load(Ordering::Relaxed) < a + n
                || self.reused_ok.load(Ordering::Relaxed) < b + n
            {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await
        .unwrap_or_else(|_| {
            panic!(
                "traffic stalled; failures: {:?}",
                self.failures.try_lock().map(|f| f.clone())
            )
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn svid_and_trust_anchor_rotation_under_load_loses_nothing() {
    let mut ca = TestCa::new("example.org").unwrap();
    let server = store(&mut ca, API);
    let client = store(&mut ca, WEB);
    let old_root_client_svid = ca.issue(WEB).unwrap();
    let old_root_server_svid = ca.issue(API).unwrap();

    let acceptor = MtlsAcceptor::new(&mtls(&server), authorizer_any_in(&ca)).unwrap();
    let (addr, mut seen) = echo_server(acceptor).await;
    let server_errors = Arc::new(Mutex::new(Vec::new()));
    let errors = server_errors.clone();
    tokio::spawn(async move {
        while let Some(outcome) = seen.recv().await {
            if let Err(e) = outcome {
                errors.lock().await.push(e.to_string());
            }
        }
    });

    let connector = MtlsConnector::new(&mtls(&client), SpiffeId::new(API).unwrap()).unwrap();
    let traffic = Arc::new(Traffic::default());
    let load = {
        let traffic = traffic.clone();
        let connector = connector.clone();
        tokio::spawn(async move {
            let (mut persistent, _) = connector.connect(addr).await.unwrap();
            let mut n = 0u32;
            while !traffic.stop.load(Ordering::Relaxed) {
                n += 1;
                // A request on a new connection: a full handshake with current credentials.
                match connector.connect(addr).await {
                    Ok((mut fresh, _)) => match ping(&mut fresh, n).await {
                        Ok(()) => _ = traffic.new_conn_ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => traffic.failures.lock().await.push(format!("new conn: {e}")),
                    },
                    Err(e) => traffic.failures.lock().await.push(format!("connect: {e}")),
                }
                // A request on the connection established before any rotation.
                match ping(&mut persistent, n).await {
                    Ok(()) => _ = traffic.reused_ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => traffic
                        .failures
                        .lock()
                        .await
                        .push(format!("persistent: {e}")),
                }
            }
        })
    };

    traffic.progress(10).await;
    // 1. Both SVIDs rotate under the same root.
    server.set_svid(ca.issue(API).unwrap());
    client.set_svid(ca.issue(WEB).unwrap());
    traffic.progress(10).await;
    // 2. A new root joins the bundles: both anchors are trusted during the overlap.
    ca.begin_rotation().unwrap();
    server.set_bundles(ca.bundle_set().unwrap());
    client.set_bundles(ca.bundle_set().unwrap());
    traffic.progress(10).await;
    // 3. Workloads move to SVIDs under the new root, one side at a time.
    server.set_svid(ca.issue(API).unwrap());
    traffic.progress(10).await;
    client.set_svid(ca.issue(WEB).unwrap());
    traffic.progress(10).await;
    // 4. The old root leaves the bundles.
    ca.finish_rotation();
    server.set_bundles(ca.bundle_set().unwrap());
    client.set_bundles(ca.bundle_set().unwrap());
    traffic.progress(10).await;

    traffic.stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    let failures = traffic.failures.lock().await.clone();
    assert!(
        failures.is_empty(),
        "failed requests during rotation: {failures:?}"
    );
    assert!(traffic.total() >= 120, "{}", traffic.total());
    assert!(
        server_errors.lock().await.is_empty(),
        "{:?}",
        server_errors.lock().await
    );

    // After the old anchor is removed, a client still holding an old-chain SVID is refused…
    let stale_client = Arc::new(CredentialStore::with(
        old_root_client_svid,
        ca.bundle_set().unwrap(),
    ));
    let stale = MtlsConnector::new(&mtls(&stale_client), Authorizer::any()).unwrap();
    let outcome = match stale.connect(addr).await {
        Ok((mut stream, _)) => ping(&mut stream, 1).await.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    assert!(
        outcome.is_err(),
        "a client with an old-root SVID was served"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let refused = server_errors.lock().await.clone();
    assert!(
        refused
            .iter()
            .any(|e| e.contains("is not signed by a trusted root of `example.org`")),
        "{refused:?}"
    );

    // …and so is a server still holding one.
    let stale_server = Arc::new(CredentialStore::with(
        old_root_server_svid,
        ca.bundle_set().unwrap(),
    ));
    let (stale_addr, _seen) =
        echo_server(MtlsAcceptor::new(&mtls(&stale_server), Authorizer::any()).unwrap()).await;
    let err = connector.connect(stale_addr).await.unwrap_err();
    assert!(
        matches!(err, TransportError::Verify(VerifyError::UnknownIssuer(_))),
        "{err}"
    );
}

#[tokio::test]
async fn updates_tick_on_every_change() {
    use mesh_spiffe::CredentialSource;
    let mut ca = TestCa::new("example.org").unwrap();
    let store = store(&mut ca, WEB);
    let mut updates = store.updates();
    updates.mark_unchanged();
    store.set_svid(ca.issue(WEB).unwrap());
    assert!(updates.has_changed().unwrap());
    updates.mark_unchanged();
    store.set_bundles(ca.bundle_set().unwrap());
    assert!(updates.has_changed().unwrap());
}
