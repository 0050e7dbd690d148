//! Credentials under load: SVID and trust-anchor rotation with zero failed requests, and
//! the fake Workload API following rotations.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{get, load};
use mesh_spiffe::spire::SpireSource;
use mesh_spiffe::{CredentialSource, CredentialStore, Mtls, Svid};
use mesh_test::events::{CredentialEvent, Event};
use mesh_test::{MockMesh, Script};
use mesh_tower::MeshClient;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn svid_and_trust_anchor_rotation_under_load_fail_no_request() {
    let mesh = MockMesh::new().unwrap();
    let users = mesh
        .service("users")
        .endpoints(3)
        .script(Script::latency(Duration::from_millis(2)))
        .spawn()
        .await
        .unwrap();
    let client = mesh.client(&users).unwrap();
    // Credentials frozen before any rotation, which the mesh does not rotate.
    let frozen = {
        let store = mesh.credentials("frozen").unwrap();
        let svid = store.svid().unwrap();
        let copy = Svid::new(svid.chain().to_vec(), svid.key().clone_key()).unwrap();
        CredentialStore::with(copy, (*store.bundles()).clone())
    };

    let run = tokio::spawn({
        let client = client.clone();
        async move { load(&client, 8, Duration::from_millis(2500)).await }
    });
    let step = Duration::from_millis(400);
    tokio::time::sleep(step).await;
    mesh.rotate_svids().unwrap();
    // New connections must handshake with the new credentials.
    users.endpoint(0).unwrap().kill();
    users.endpoint(0).unwrap().restart().await.unwrap();
    tokio::time::sleep(step).await;
    mesh.begin_trust_rotation().unwrap();
    users.endpoint(1).unwrap().kill();
    users.endpoint(1).unwrap().restart().await.unwrap();
    tokio::time::sleep(step).await;
    mesh.finish_trust_rotation().unwrap();
    users.endpoint(2).unwrap().kill();
    users.endpoint(2).unwrap().restart().await.unwrap();
    let run = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the load hung")
        .unwrap();
    assert_eq!(
        run.failed,
        0,
        "{} of {} failed: {:?}",
        run.failed,
        run.ok + run.failed,
        run.failures
    );
    assert!(run.ok > 200, "{}", run.ok);

    // A fresh client handshakes with the new root; one still on the old root cannot.
    let fresh = mesh.client(&users).unwrap();
    let hang = Duration::from_secs(20);
    let answer = tokio::time::timeout(hang, fresh.send(get())).await;
    assert!(
        answer
            .expect("the fresh client hung")
            .unwrap()
            .status()
            .is_success()
    );
    let stale = MeshClient::builder(users.discovery())
        .mtls(Mtls::new(frozen))
        .server_identity(users.id().to_string().parse().unwrap())
        .build()
        .unwrap();
    let err = tokio::time::timeout(hang, stale.send(get()))
        .await
        .expect("the stale client hung")
        .unwrap_err();
    assert!(!err.to_string().is_empty());

    let rotations: Vec<_> = mesh
        .events()
        .events()
        .filter_map(|e| match e {
            Event::Credentials(c) => Some(c.clone()),
            _ => None,
        })
        .collect();
    assert!(matches!(rotations[0], CredentialEvent::SvidsRotated { workloads } if workloads == 4)); // 3 endpoints and the client;
    assert_eq!(rotations[1], CredentialEvent::TrustRotationBegun);
    assert_eq!(rotations[2], CredentialEvent::TrustRotationFinished);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fake_workload_api_serves_the_mesh_identity_and_its_rotations() {
    let mesh = MockMesh::new().unwrap();
    let agent = mesh.workload_api("web").unwrap();
    // A Unix socket where there are Unix sockets, else loopback TCP.
    let scheme = if cfg!(unix) {
        "unix://"
    } else {
        "tcp://127.0.0.1:"
    };
    assert!(agent.endpoint().starts_with(scheme), "{}", agent.endpoint());
    assert_eq!(agent.socket_path().is_some(), cfg!(unix));
    // What code reading SPIFFE_ENDPOINT_SOCKET does, with the address given explicitly.
    let source = SpireSource::builder()
        .endpoint(agent.endpoint())
        .build()
        .await
        .unwrap();
    let first = source.svid().unwrap();
    assert_eq!(first.id().to_string(), "spiffe://example.org/web");
    let mut updates = source.updates();
    updates.borrow_and_update();
    mesh.rotate_svids().unwrap();
    tokio::time::timeout(Duration::from_secs(5), updates.changed())
        .await
        .unwrap()
        .unwrap();
    let second = source.svid().unwrap();
    assert_ne!(first.chain()[0], second.chain()[0], "not rotated");

    // Its identity works in the mesh: a client over the Workload API's credentials.
    let users = mesh.service("users").spawn().await.unwrap();
    let client = MeshClient::builder(users.discovery())
        .mtls(Mtls::new(source))
        .server_identity(users.id().to_string().parse().unwrap())
        .build()
        .unwrap();
    assert!(client.send(get()).await.unwrap().status().is_success());
    let peer = mesh.events().requests("users").next().unwrap().peer.clone();
    assert_eq!(peer.unwrap().to_string(), "spiffe://example.org/web");
}
