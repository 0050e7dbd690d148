//! The decision record through the mock mesh: picks, authorization decisions, and none
//! for a client built without it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use http::StatusCode;
use mesh_core::config::AuthorizationPolicy;
use mesh_test::MockMesh;
use mesh_tower::MeshClient;
use mesh_tower::decision::{AuthzVerdict, Kind, PickPath};

fn get(path: &str) -> http::Request<http_body_util::Empty<bytes::Bytes>> {
    http::Request::get(format!("http://users{path}"))
        .body(http_body_util::Empty::new())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_client_records_its_picks_and_endpoints_their_denials() {
    let mesh = MockMesh::builder().seed(3).build().unwrap();
    let policy: AuthorizationPolicy = toml::from_str(
        r#"default = "deny"
           [[rules]]
           name = "public"
           clients = ["*"]
           routes = [{ path = { prefix = "/public" } }]"#,
    )
    .unwrap();
    let users = mesh
        .service("users")
        .endpoints(2)
        .policy(policy)
        .spawn()
        .await
        .unwrap();
    let client = mesh.client(&users).unwrap();
    for _ in 0..20 {
        let resp = client.send(get("/public/a")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    }
    let resp = client.send(get("/private")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);

    let record = mesh.decisions();
    let picks = record.of_kind(Kind::Pick);
    assert!(picks.len() >= 21, "{}", record.dump());
    let addrs: Vec<_> = users.endpoints().iter().map(|e| e.addr()).collect();
    for d in &picks {
        assert_eq!(&*d.source, "users");
        let pick = d.event.as_pick().unwrap();
        assert!(addrs.contains(&pick.winner.addr), "{d}");
        if pick.path == PickPath::P2c
            && let Some(other) = pick.other
        {
            assert_ne!(other.addr, pick.winner.addr);
            assert!(
                pick.winner.tier < other.tier || pick.winner.cost <= other.cost,
                "{d}"
            );
        }
    }
    let authz = record.of_kind(Kind::Authz);
    let verdicts: Vec<_> = authz
        .iter()
        .map(|d| d.event.as_authz().unwrap().verdict)
        .collect();
    assert!(
        verdicts
            .iter()
            .filter(|v| **v == AuthzVerdict::Allow)
            .count()
            >= 20
    );
    let deny = authz
        .iter()
        .find(|d| d.event.as_authz().unwrap().verdict == AuthzVerdict::Deny)
        .unwrap();
    let line = deny.to_string();
    assert!(
        line.ends_with(
            "users authz deny spiffe://example.org/client GET /private by users/default"
        ),
        "{line}"
    );
    // Sequence numbers increase along the record.
    let all = record.snapshot();
    assert!(all.windows(2).all(|w| w[1].seq == w[0].seq + 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_built_without_the_record_records_nothing() {
    let mesh = MockMesh::new().unwrap();
    let users = mesh.service("users").endpoints(2).spawn().await.unwrap();
    let client = MeshClient::builder(users.discovery())
        .service_name("users")
        .mtls(mesh.mtls("client").unwrap())
        .server_identity(users.id().to_string().parse().unwrap())
        .build()
        .unwrap();
    for _ in 0..5 {
        let resp = client.send(get("/")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    }
    assert_eq!(
        mesh.decisions().next_seq(),
        0,
        "{}",
        mesh.decisions().dump()
    );
}
