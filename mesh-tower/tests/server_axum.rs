//! An axum `Router`, unchanged, served by `MeshServer` over SPIFFE mTLS: its handlers read
//! the peer's identity and the deciding authorization rule with axum's own extractors.
#![cfg(feature = "test-util")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use axum::extract::{Extension, Path};
use axum::routing::{get, post};
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use mesh_core::SpiffeId;
use mesh_core::config::{
    AuthorizationPolicy, AuthorizationRule, DefaultAction, PathMatch, Protocol, RouteMatch,
};
use mesh_spiffe::test_ca::TestCa;
use mesh_spiffe::{Authorizer, CredentialStore, Mtls, MtlsAcceptor, MtlsConnector, PeerIdentity};
use mesh_tower::authz::{AuthzDecision, Policy};
use mesh_tower::connect::{ConnectSettings, EndpointClient};
use mesh_tower::server::{MeshServer, Server};
use tokio::net::TcpListener;

const SERVER_ID: &str = "spiffe://example.org/ns/prod/sa/users";
const WEB: &str = "spiffe://example.org/ns/prod/sa/web";
const BATCH: &str = "spiffe://example.org/ns/batch/sa/jobs";

async fn user(
    Path(id): Path<u32>,
    Extension(peer): Extension<PeerIdentity>,
    Extension(decision): Extension<AuthzDecision>,
) -> String {
    format!(
        "user={id} peer={peer} rule={}",
        decision.rule().unwrap_or("none")
    )
}

/// A request body streams through from hyper's `Incoming` to axum's extractor.
async fn echo(Extension(decision): Extension<AuthzDecision>, body: String) -> String {
    format!("{decision}: {body}")
}

/// Without a verified identity, the extension is absent (not forged, not defaulted).
async fn whoami(peer: Option<Extension<PeerIdentity>>) -> String {
    peer.map_or("unauthenticated".to_owned(), |Extension(p)| p.to_string())
}

fn router() -> axum::Router {
    axum::Router::new()
        .route("/users/{id}", get(user))
        .route("/echo", post(echo))
        .route("/whoami", get(whoami))
}

fn rule(name: &str, clients: &[&str], path: &str) -> AuthorizationRule {
    AuthorizationRule {
        name: name.into(),
        clients: clients.iter().map(|c| c.parse().unwrap()).collect(),
        unauthenticated: clients.is_empty(),
        routes: vec![RouteMatch {
            path: Some(PathMatch::Prefix(path.into())),
            ..RouteMatch::default()
        }],
    }
}

fn policy() -> Policy {
    Policy::new(
        "users",
        &AuthorizationPolicy {
            default: DefaultAction::Deny,
            rules: vec![
                rule("web-users", &[WEB], "/users"),
                rule("web-echo", &[WEB], "/echo"),
                rule("anyone-whoami", &[], "/whoami"),
            ],
        },
    )
    .unwrap()
}

struct Pki {
    ca: TestCa,
}

impl Pki {
    fn mtls(&mut self, id: &str) -> Mtls {
        let svid = self.ca.issue(id).unwrap();
        Mtls::new(CredentialStore::with(svid, self.ca.bundle_set().unwrap()))
    }

    async fn server(&mut self) -> Server {
        let acceptor = MtlsAcceptor::new(
            &self.mtls(SERVER_ID),
            Authorizer::trust_domain(self.ca.trust_domain().clone()),
        )
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        MeshServer::builder()
            .mtls(acceptor)
            .authorization(policy())
            .serve(listener, router())
            .unwrap()
    }

    fn client(&mut self, id: &str, server: &Server, protocol: Protocol) -> Client {
        let connector =
            MtlsConnector::new(&self.mtls(id), SpiffeId::new(SERVER_ID).unwrap()).unwrap();
        Client(EndpointClient::new(
            server.local_addr(),
            ConnectSettings {
                protocol,
                ..ConnectSettings::mtls(connector)
            },
        ))
    }
}

struct Client(EndpointClient<Full<Bytes>>);

impl Client {
    async fn send(&self, method: &str, path: &str, body: &'static str) -> (StatusCode, String) {
        let req = Request::builder()
            .method(method)
            .uri(format!("http://users{path}"))
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap();
        let resp = self.0.send(req).await.unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }
}

#[tokio::test]
async fn an_axum_router_sees_the_peer_and_the_deciding_rule_over_mtls() {
    let mut pki = Pki {
        ca: TestCa::new("example.org").unwrap(),
    };
    let server = pki.server().await;
    for protocol in [Protocol::Http1, Protocol::Http2] {
        let web = pki.client(WEB, &server, protocol);
        assert_eq!(
            web.send("GET", "/users/42", "").await,
            (StatusCode::OK, format!("user=42 peer={WEB} rule=web-users")),
            "{protocol:?}"
        );
        assert_eq!(
            web.send("POST", "/echo", "hello").await,
            (StatusCode::OK, "users/web-echo: hello".to_owned()),
            "{protocol:?}"
        );
        assert_eq!(
            web.send("GET", "/whoami", "").await,
            (StatusCode::OK, WEB.to_owned())
        );
        // Authorized, but no such route: axum's own 404 and 405.
        assert_eq!(
            web.send("GET", "/users/42/extra", "").await.0,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            web.send("GET", "/echo", "").await.0,
            StatusCode::METHOD_NOT_ALLOWED
        );
        // Refused before the router: the policy's 403.
        let batch = pki.client(BATCH, &server, protocol);
        assert_eq!(
            batch.send("GET", "/users/42", "").await,
            (StatusCode::FORBIDDEN, "forbidden\n".to_owned())
        );
        assert_eq!(
            batch.send("GET", "/whoami", "").await,
            (StatusCode::OK, BATCH.to_owned())
        );
    }
    assert_eq!(server.shutdown().await.forced, 0);
}

#[tokio::test]
async fn over_plaintext_an_axum_handler_sees_no_identity() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = MeshServer::builder()
        .plaintext()
        .authorization(policy())
        .serve(listener, router())
        .unwrap();
    for protocol in [Protocol::Http1, Protocol::Http2] {
        let client = Client(EndpointClient::new(
            server.local_addr(),
            ConnectSettings {
                protocol,
                ..ConnectSettings::plaintext()
            },
        ));
        assert_eq!(
            client.send("GET", "/whoami", "").await,
            (StatusCode::OK, "unauthenticated".to_owned()),
            "{protocol:?}"
        );
        assert_eq!(
            client.send("GET", "/users/1", "").await.0,
            StatusCode::FORBIDDEN
        );
    }
    assert_eq!(server.shutdown().await.forced, 0);
}
