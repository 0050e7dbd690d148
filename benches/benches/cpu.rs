//! CPU time per request of the whole `MeshClient` stack against a bare hyper-util client,
//! both sending HTTP/1.1 in plaintext (with `TCP_NODELAY`) to the same loopback server,
//! in the same run.
//!
//! Latency on a shared machine depends on wake-ups; CPU time does not. The server runs in
//! a child process (this binary, re-executed), so the figure is the client's own CPU:
//! the sum of the on-CPU nanoseconds of this process's threads (`/proc/self/task/*/
//! schedstat`) over `N` sequential requests. Rounds alternate between the two clients;
//! the median of each is reported, with their ratio.
//!
//! ```text
//! cargo bench -p mesh-benches --bench cpu
//! benches/instructions.sh client     # the same, counted in instructions under callgrind
//! ```
//!
//! With `MESH_CPU_BENCH_ONLY=bare` or `=mesh` (and `MESH_CPU_BENCH_REQUESTS=N`) it runs
//! only that client, for N requests after the warm-up, and prints nothing: the mode
//! `benches/instructions.sh client` counts under callgrind, where timing would mean nothing.
#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout
)]

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use mesh_core::Endpoint;
use mesh_core::config::Protocol;
use mesh_core::discover::StaticDiscovery;
use mesh_tower::MeshClient;
use mesh_tower::mock::{Behavior, MockEndpoint};

mod common;

use common::{cpu_ns, median};

const SERVER_ENV: &str = "MESH_CPU_BENCH_SERVER";
const REQUESTS: u64 = 20_000;
const ROUNDS: usize = 11;

fn serve() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let server = MockEndpoint::spawn("cpu", Behavior::default())
            .await
            .unwrap();
        println!("{}", server.addr());
        // Serve until the parent closes our stdin.
        tokio::task::spawn_blocking(|| {
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
        })
        .await
        .unwrap();
    });
}

fn main() {
    if std::env::var_os(SERVER_ENV).is_some() {
        return serve();
    }
    // `cargo bench` passes `--bench`; any other filter argument is ignored.
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env(SERVER_ENV, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr: std::net::SocketAddr = line.trim().parse().unwrap();
    let uri: http::Uri = format!("http://{addr}/").parse().unwrap();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    let bare: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    let mesh = {
        let _guard = rt.enter();
        MeshClient::builder(Box::pin(StaticDiscovery::new([Endpoint::new(addr)])))
            .plaintext()
            .protocol(Protocol::Http1)
            .metrics(&mut prometheus_client::registry::Registry::default())
            .build()
            .unwrap()
    };

    let run_bare = |n: u64| {
        rt.block_on(async {
            for _ in 0..n {
                let resp = bare.get(uri.clone()).await.unwrap();
                resp.into_body().collect().await.unwrap();
            }
        })
    };
    let run_mesh = |n: u64| {
        rt.block_on(async {
            for _ in 0..n {
                let req = http::Request::get(uri.clone())
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                let resp = mesh.send(req).await.unwrap();
                resp.into_body().collect().await.unwrap();
            }
        })
    };
    run_bare(REQUESTS / 10);
    run_mesh(REQUESTS / 10);
    if let Some(only) = std::env::var_os("MESH_CPU_BENCH_ONLY") {
        let n = std::env::var("MESH_CPU_BENCH_REQUESTS")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(2_000);
        if only == "bare" {
            run_bare(n);
        } else {
            run_mesh(n);
        }
        drop(child.stdin.take());
        let _ = child.wait();
        return;
    }
    let (mut bare_ns, mut mesh_ns, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let (mut bare_wall, mut mesh_wall) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let (t, w) = (cpu_ns(), tokio::time::Instant::now());
        run_bare(REQUESTS);
        let b = (cpu_ns() - t) as f64 / REQUESTS as f64;
        bare_wall.push(w.elapsed().as_nanos() as f64 / REQUESTS as f64);
        let (t, w) = (cpu_ns(), tokio::time::Instant::now());
        run_mesh(REQUESTS);
        let m = (cpu_ns() - t) as f64 / REQUESTS as f64;
        mesh_wall.push(w.elapsed().as_nanos() as f64 / REQUESTS as f64);
        bare_ns.push(b);
        mesh_ns.push(m);
        ratios.push(m / b);
    }
    let (bw, mw) = (median(bare_wall), median(mesh_wall));
    let ratio = median(ratios);
    let (b, m) = (median(bare_ns), median(mesh_ns));
    println!(
        "cpu per request (client process, {REQUESTS} sequential requests, median of {ROUNDS} rounds):"
    );
    println!("  bare_hyper   {b:>8.0} ns");
    println!("  mesh_client  {m:>8.0} ns");
    println!("  ratio        {ratio:>8.3}x (median of the rounds' ratios)");
    println!(
        "wall time per request (sequential, one thread): bare {bw:.0} ns, mesh {mw:.0} ns, {:.3}x",
        mw / bw
    );
    drop(child.stdin.take());
    let _ = child.wait();
}
