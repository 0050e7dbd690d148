//! The floor under mesh-proxy's CPU per request: how much of it hyper and our connection
//! pool cost, and how much each half of the mesh's tower stack adds, measured beside
//! mesh-proxy and nginx by `benches/proxy/floor.sh`.
//!
//! One current-thread runtime (as mesh-proxy's default) serves HTTP/1.1 on `LISTEN` and
//! forwards every request to the HTTP/1.1 upstream at `UPSTREAM`, in one of four modes:
//!
//! - `raw`: a bare hyper server calling an [`EndpointClient`] (pooled HTTP/1.1
//!   connections to one address): no layer at all;
//! - `server`: `MeshServer` (authorization, rate limit, body limit, inbound metrics)
//!   instead of the bare server;
//! - `client`: the bare server calling a `MeshClient` (retries, balancing, breaker, load,
//!   timeouts, client metrics) for the bench's `upstream` service instead;
//! - `both`: `MeshServer` and `MeshClient`: mesh-proxy's outbound hop without its router.
//!
//! ```text
//! cargo build --release -p mesh-benches --example proxy_floor
//! target/release/examples/proxy_floor MODE [LISTEN] [UPSTREAM]   (127.0.0.1:19480, 127.0.0.1:18080)
//! ```
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;

use http_body_util::Either;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use mesh_core::config::{Protocol, ServiceConfig};
use mesh_core::error::BoxError;
use mesh_tower::connect::{ConnectSettings, EndpointClient};
use tower::{Service, ServiceExt};

fn main() {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "raw".into());
    let (server, mesh) = match mode.as_str() {
        "raw" => (false, false),
        "server" => (true, false),
        "client" => (false, true),
        "both" => (true, true),
        other => panic!("mode `{other}`: raw, server, client or both"),
    };
    let listen: SocketAddr = args
        .next()
        .as_deref()
        .unwrap_or("127.0.0.1:19480")
        .parse()
        .unwrap();
    let upstream: SocketAddr = args
        .next()
        .as_deref()
        .unwrap_or("127.0.0.1:18080")
        .parse()
        .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // Local tasks: the bare server's connections need no `Send`.
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, serve(listen, upstream, server, mesh));
}

async fn serve(listen: SocketAddr, upstream: SocketAddr, server: bool, mesh: bool) {
    let listener = tokio::net::TcpListener::bind(listen).await.unwrap();
    let mut settings = ConnectSettings::plaintext();
    settings.protocol = Protocol::Http1;
    let endpoint: EndpointClient<Incoming> = EndpointClient::new(upstream, settings);
    // As benches/proxy/bench.toml's `upstream` service: defaults, metrics on.
    let mut registry = prometheus_client::registry::Registry::default();
    let service: ServiceConfig = toml::from_str(&format!(
        "tls = \"plaintext\"\nprotocol = \"http1\"\n\
         discovery = {{ kind = \"static\", endpoints = [{{ addr = \"{upstream}\" }}] }}\n"
    ))
    .unwrap();
    let discovery = mesh_core::discover::from_config(&service.discovery)
        .await
        .unwrap();
    let client = mesh_tower::MeshClientBuilder::from_config("upstream", &service, discovery)
        .metrics(&mut registry)
        .build()
        .unwrap();
    let server_metrics = mesh_tower::metrics::server::ServerMetrics::register(&mut registry);
    let app = tower::service_fn(move |req: hyper::Request<Incoming>| {
        let endpoint = endpoint.clone();
        let mut client = client.clone();
        async move {
            let resp: Result<_, BoxError> = if mesh {
                match ServiceExt::<hyper::Request<Incoming>>::ready(&mut client).await {
                    Ok(c) => c.call(req).await.map(|r| r.map(Either::Left)),
                    Err(e) => Err(e),
                }
            } else {
                endpoint
                    .send(req)
                    .await
                    .map(|r| r.map(Either::Right))
                    .map_err(BoxError::from)
            };
            resp
        }
    });
    if server {
        let _server = mesh_tower::server::MeshServer::builder()
            .plaintext()
            .metrics(server_metrics.listener("h1"))
            .serve(listener, app)
            .unwrap();
        return std::future::pending::<()>().await;
    }
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let conn = http1::Builder::new().serve_connection(TokioIo::new(tcp), service);
        tokio::task::spawn_local(async move {
            let _ = conn.await;
        });
    }
}
