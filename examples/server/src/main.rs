//! An axum `Router`, unchanged, served to the mesh by `MeshServer`: SPIFFE mTLS, an
//! authorization policy in front of it and a per-client rate limit behind that. The
//! handlers read the caller's verified `PeerIdentity` and the `AuthzDecision` naming the
//! rule that let it in, with axum's own `Extension` extractor.
//!
//! ```text
//! cargo run -p mesh-server-example
//! ```
//!
//! Everything runs in this one process on 127.0.0.1, and it ends by itself: an in-memory
//! test CA (mesh-spiffe's `test-util`) issues the server's and two clients' SVIDs; the
//! server's policy `users` lets `web` read users and post orders and lets `batch` read
//! users only, denying everything else; each client may send 2 requests at once, then one
//! per second (denied requests spend none of it). Each client calls a few routes over mTLS with the mesh's `EndpointClient`
//! and prints what it got — allowed with rule X, denied 403, rate limited 429 with
//! `Retry-After` — then the server shuts down gracefully and prints its report.

// A command-line program: printing is its output.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use axum::Router;
use axum::extract::{Extension, Path};
use axum::routing::{get, post};
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use mesh_core::SpiffeId;
use mesh_core::config::{
    AuthorizationPolicy, AuthorizationRule, DefaultAction, PathMatch, Rate, RateLimitConfig,
    RouteMatch,
};
use mesh_core::error::BoxError;
use mesh_spiffe::test_ca::TestCa;
use mesh_spiffe::{Authorizer, CredentialStore, Mtls, MtlsAcceptor, MtlsConnector, PeerIdentity};
use mesh_tower::authz::{AuthzDecision, Policy};
use mesh_tower::connect::{ConnectSettings, EndpointClient};
use mesh_tower::ratelimit::Limits;
use mesh_tower::server::{MeshServer, ServerLimits};
use tokio::net::TcpListener;

const SERVER: &str = "spiffe://example.org/ns/prod/sa/users";
const WEB: &str = "spiffe://example.org/ns/prod/sa/web";
const BATCH: &str = "spiffe://example.org/ns/batch/sa/jobs";

/// The application: a plain axum router, with nothing of the mesh but two extractors.
fn app() -> Router {
    Router::new()
        .route("/users/{id}", get(user))
        .route("/orders", post(order))
}

async fn user(
    Path(id): Path<u32>,
    Extension(peer): Extension<PeerIdentity>,
    Extension(decision): Extension<AuthzDecision>,
) -> String {
    format!(
        "user {id} for {peer} (rule {})",
        decision.rule().unwrap_or("default")
    )
}

async fn order(
    Extension(peer): Extension<PeerIdentity>,
    Extension(decision): Extension<AuthzDecision>,
    body: String,
) -> (StatusCode, String) {
    (
        StatusCode::CREATED,
        format!("order {body:?} from {peer} (allowed by {decision})"),
    )
}

fn rule(name: &str, client: &str, prefix: &str) -> Result<AuthorizationRule, BoxError> {
    Ok(AuthorizationRule {
        name: name.into(),
        clients: vec![client.parse()?],
        unauthenticated: false,
        routes: vec![RouteMatch {
            path: Some(PathMatch::Prefix(prefix.into())),
            ..RouteMatch::default()
        }],
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), BoxError> {
    let mut ca = TestCa::new("example.org")?;
    let trust_domain = ca.trust_domain().clone();
    let mut mtls = |id: &str| -> Result<Mtls, BoxError> {
        Ok(Mtls::new(CredentialStore::with(
            ca.issue(id)?,
            ca.bundle_set()?,
        )))
    };

    let policy = Policy::new(
        "users",
        &AuthorizationPolicy {
            default: DefaultAction::Deny,
            rules: vec![
                rule("web-orders", WEB, "/orders")?,
                rule("read-users", WEB, "/users")?,
                rule("batch-reads", BATCH, "/users")?,
            ],
        },
    )?;
    let rate_limit = Limits::new(&RateLimitConfig {
        per_client: Some(Rate {
            requests: 1,
            per: Duration::from_secs(1),
            burst: Some(2),
        }),
        ..RateLimitConfig::default()
    });
    let mut limits = ServerLimits::default();
    limits.shutdown_timeout = Duration::from_secs(2);

    let acceptor = MtlsAcceptor::new(&mtls(SERVER)?, Authorizer::trust_domain(trust_domain))?;
    let server = MeshServer::builder()
        .mtls(acceptor)
        .authorization(policy)
        .rate_limit(rate_limit)
        .limits(limits)
        .serve(TcpListener::bind("127.0.0.1:0").await?, app())?;
    let addr = server.local_addr();
    println!("serving an axum Router on {addr} over SPIFFE mTLS\n");

    let server_id = SpiffeId::new(SERVER)?;
    let web = client(addr, MtlsConnector::new(&mtls(WEB)?, server_id.clone())?);
    let batch = client(addr, MtlsConnector::new(&mtls(BATCH)?, server_id)?);

    println!("web ({WEB}):");
    call(&web, "GET", "/users/7", "").await?;
    call(&web, "POST", "/orders", "2 coffees").await?;
    call(&web, "GET", "/admin", "").await?;
    // Its burst of 2 is spent (the 403 spent none): the limiter refuses, with how long to wait.
    call(&web, "GET", "/users/8", "").await?;

    println!("\nbatch ({BATCH}), with a budget of its own:");
    call(&batch, "GET", "/users/7", "").await?;
    call(&batch, "POST", "/orders", "1 tea").await?;
    for id in 1..=3 {
        call(&batch, "GET", &format!("/users/{id}"), "").await?;
    }

    let report = server.shutdown().await;
    println!(
        "\nshut down gracefully: {} connection(s) open at shutdown, {} forced",
        report.open_at_shutdown, report.forced
    );
    Ok(())
}

fn client(addr: SocketAddr, connector: MtlsConnector) -> EndpointClient<Full<Bytes>> {
    EndpointClient::new(addr, ConnectSettings::mtls(connector))
}

/// Sends one request and prints what came back.
async fn call(
    client: &EndpointClient<Full<Bytes>>,
    method: &str,
    path: &str,
    body: &'static str,
) -> Result<(), BoxError> {
    let req = Request::builder()
        .method(method)
        .uri(format!("http://users{path}"))
        .body(Full::new(Bytes::from_static(body.as_bytes())))?;
    let resp = client.send(req).await?;
    let status = resp.status();
    let retry_after = resp
        .headers()
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let text = resp.into_body().collect().await?.to_bytes();
    let text = String::from_utf8_lossy(&text);
    let text = text.trim_end();
    let outcome = match status {
        StatusCode::FORBIDDEN => "denied by the policy".to_owned(),
        StatusCode::TOO_MANY_REQUESTS => format!(
            "rate limited, retry after {}s",
            retry_after.as_deref().unwrap_or("?")
        ),
        _ => text.to_owned(),
    };
    println!("  {method:4} {path:10} -> {} {outcome}", status.as_u16());
    Ok(())
}
