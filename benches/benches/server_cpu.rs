//! CPU time per request of the serving process: `MeshServer` (authorization with 100
//! rules, a per-client rate limit, inbound metrics) against a bare hyper server, both
//! answering the same handler over HTTP/1.1 in plaintext on loopback, in the same run.
//!
//! The load comes from a child process (this binary, re-executed) sending `N` sequential
//! requests, so the figure is the server's own CPU: the on-CPU nanoseconds of this
//! process's threads (`/proc/self/task/*/schedstat`) while the child runs. Rounds
//! alternate between the two servers; the median of each is reported, with the median of
//! the rounds' ratios.
//!
//! ```text
//! cargo bench -p mesh-benches --bench server_cpu
//! benches/instructions.sh server     # the same, counted in instructions under callgrind
//! ```
#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout
)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_core::config::{
    AuthorizationPolicy, AuthorizationRule, DefaultAction, PathMatch, Rate, RateLimitConfig,
    RouteMatch,
};
use mesh_tower::authz::Policy;
use mesh_tower::metrics::server::ServerMetrics;
use mesh_tower::ratelimit::Limits;
use mesh_tower::server::MeshServer;

mod common;

use common::{cpu_ns, median, workload_rules};

const LOAD_ENV: &str = "MESH_SERVER_BENCH_LOAD";
const REQUESTS: u64 = 10_000;
const ROUNDS: usize = 9;

async fn handler(_req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::new(Full::new(Bytes::from_static(b"hello"))))
}

/// The child: `n` sequential GETs to `addr`.
fn load(addr: SocketAddr, n: u64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_nodelay(true);
        let client: Client<_, Empty<Bytes>> =
            Client::builder(TokioExecutor::new()).build(connector);
        let uri: http::Uri = format!("http://{addr}/api/v1/items/42").parse().unwrap();
        for _ in 0..n {
            let resp = client.get(uri.clone()).await.unwrap();
            assert!(resp.status().is_success(), "{}", resp.status());
            resp.into_body().collect().await.unwrap();
        }
    });
}

/// 99 rules for other clients and routes, then one that admits this traffic.
fn policy() -> Policy {
    let mut rules = workload_rules(99);
    rules.push(AuthorizationRule {
        name: "bench".into(),
        clients: vec![],
        unauthenticated: true,
        routes: vec![RouteMatch {
            path: Some(PathMatch::Prefix("/api/v1/items".into())),
            methods: vec![http::Method::GET],
            ..RouteMatch::default()
        }],
    });
    Policy::new(
        "bench",
        &AuthorizationPolicy {
            default: DefaultAction::Deny,
            rules,
        },
    )
    .unwrap()
}

fn main() {
    if let Ok(target) = std::env::var(LOAD_ENV) {
        let (addr, n) = target.split_once(',').unwrap();
        return load(addr.parse().unwrap(), n.parse().unwrap());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (bare_addr, mesh_addr) = rt.block_on(async {
        // The bare server: hyper-util's auto builder over the same handler.
        let bare = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let bare_addr = bare.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = bare.accept().await.unwrap();
                let _ = tcp.set_nodelay(true);
                tokio::spawn(async move {
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let _ = builder
                        .serve_connection(TokioIo::new(tcp), hyper::service::service_fn(handler))
                        .await;
                });
            }
        });
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = ServerMetrics::register(&mut registry).listener("bench");
        let limits = Limits::new(&RateLimitConfig {
            per_client: Some(Rate {
                requests: 1_000_000,
                per: Duration::from_secs(1),
                burst: None,
            }),
            ..RateLimitConfig::default()
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = MeshServer::builder()
            .plaintext()
            .authorization(policy())
            .rate_limit(limits)
            .metrics(metrics)
            .serve(listener, tower::service_fn(handler))
            .unwrap();
        let mesh_addr = server.local_addr();
        std::mem::forget(server);
        (bare_addr, mesh_addr)
    });
    // Serve on a thread of its own while the main thread waits for the load.
    let runtime = std::thread::spawn(move || rt.block_on(std::future::pending::<()>()));
    let _ = runtime;
    let exe = std::env::current_exe().unwrap();
    let run = |addr: SocketAddr, n: u64| {
        let t = cpu_ns();
        let status = Command::new(&exe)
            .env(LOAD_ENV, format!("{addr},{n}"))
            .status()
            .unwrap();
        assert!(status.success());
        (cpu_ns() - t) as f64 / n as f64
    };
    run(bare_addr, REQUESTS / 10);
    run(mesh_addr, REQUESTS / 10);
    // One server only, for N requests, printing nothing: what `benches/instructions.sh server`
    // counts under callgrind (the load child is not traced).
    if let Ok(only) = std::env::var("MESH_SERVER_BENCH_ONLY") {
        let n = std::env::var("MESH_SERVER_BENCH_REQUESTS")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(2_000);
        if n > 0 {
            run(if only == "bare" { bare_addr } else { mesh_addr }, n);
        }
        std::process::exit(0);
    }
    let (mut bare, mut mesh, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let b = run(bare_addr, REQUESTS);
        let m = run(mesh_addr, REQUESTS);
        bare.push(b);
        mesh.push(m);
        ratios.push(m / b);
    }
    println!(
        "cpu per request (server process, {REQUESTS} sequential requests, median of {ROUNDS} rounds):"
    );
    println!("  bare_hyper_server  {:>8.0} ns", median(bare));
    println!(
        "  mesh_server        {:>8.0} ns  (authz 100 rules, rate limit, metrics)",
        median(mesh)
    );
    println!(
        "  ratio              {:>8.3}x (median of the rounds' ratios)",
        median(ratios)
    );
    std::process::exit(0);
}
