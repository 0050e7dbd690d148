//! `MeshChannel` against tonic's own `transport::Channel`, both calling the same loopback
//! tonic server (mesh-tonic's `Echo` served by `GrpcServer` over a plaintext
//! `MeshServer`, HTTP/2 with prior knowledge) in a child process, in the same run:
//!
//! - unary latency: sequential calls, p50 and p99 of each client;
//! - throughput: 32 tasks calling at once for a fixed time, calls per second;
//! - client CPU per call: the on-CPU time of this process over sequential calls
//!   (`/proc/self/task/*/schedstat`, as `benches/cpu.rs`).
//!
//! Rounds alternate between the two clients; medians are reported with their ratios. The
//! CPU figure also gives the generated client straight over a `MeshClient` (an error type
//! tonic maps to `UNKNOWN`), so that what `MeshChannel` itself adds can be told apart
//! from the mesh-tower stack.
//!
//! ```text
//! cargo bench -p mesh-benches --bench grpc
//! ```
#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout
)]

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use mesh_core::Endpoint;
use mesh_core::discover::StaticDiscovery;
use mesh_tonic::MeshChannel;
use mesh_tonic::server::GrpcServer;
use mesh_tonic::test_util::EchoService;
use mesh_tonic::test_util::echo::EchoRequest;
use mesh_tonic::test_util::echo::echo_client::EchoClient;
use mesh_tower::server::MeshServer;
use tokio::time::Instant;

mod common;

use common::{cpu_ns, median};

const SERVER_ENV: &str = "MESH_GRPC_BENCH_SERVER";
const LATENCY_CALLS: usize = 5_000;
const CPU_CALLS: u64 = 10_000;
const ROUNDS: usize = 7;
const CONCURRENCY: usize = 32;
const THROUGHPUT_TIME: Duration = Duration::from_secs(2);

fn serve() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = GrpcServer::builder(MeshServer::builder().plaintext())
            .add_service(EchoService::new("bench").server())
            .serve(listener)
            .await
            .unwrap();
        println!("{}", server.local_addr());
        tokio::task::spawn_blocking(|| {
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
        })
        .await
        .unwrap();
    });
}

fn request() -> EchoRequest {
    EchoRequest {
        message: "hello".into(),
        count: 0,
    }
}

#[derive(Clone)]
enum Client {
    Tonic(EchoClient<tonic::transport::Channel>),
    Mesh(EchoClient<MeshChannel>),
    /// The same generated client straight over a `MeshClient`: what `MeshChannel` itself
    /// adds (statuses, deadlines, the URI) is the difference.
    Raw(Box<EchoClient<mesh_tower::MeshClient>>),
}

impl Client {
    async fn call(&mut self) {
        match self {
            Client::Tonic(c) => c.unary(request()).await.unwrap(),
            Client::Mesh(c) => c.unary(request()).await.unwrap(),
            Client::Raw(c) => c.unary(request()).await.unwrap(),
        };
    }
}

async fn latencies(client: &mut Client, n: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        client.call().await;
        out.push(start.elapsed().as_nanos() as f64);
    }
    out.sort_by(f64::total_cmp);
    out
}

async fn throughput(client: &Client) -> f64 {
    let calls = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + THROUGHPUT_TIME;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CONCURRENCY {
        let (mut client, calls) = (client.clone(), calls.clone());
        tasks.spawn(async move {
            while Instant::now() < until {
                client.call().await;
                calls.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    calls.load(Ordering::Relaxed) as f64 / THROUGHPUT_TIME.as_secs_f64()
}

fn clients(rt: &tokio::runtime::Runtime, addr: std::net::SocketAddr) -> (Client, Client, Client) {
    rt.block_on(async {
        let tonic = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .tcp_nodelay(true)
            .connect()
            .await
            .unwrap();
        let mesh = MeshChannel::builder(Box::pin(StaticDiscovery::new([Endpoint::new(addr)])))
            .service_name("echo")
            .plaintext()
            .metrics(&mut prometheus_client::registry::Registry::default())
            .build()
            .unwrap();
        let raw =
            mesh_tower::MeshClient::builder(Box::pin(StaticDiscovery::new([Endpoint::new(addr)])))
                .service_name("echo")
                .plaintext()
                .protocol(mesh_core::config::Protocol::Grpc)
                .metrics(&mut prometheus_client::registry::Registry::default())
                .build()
                .unwrap();
        (
            Client::Tonic(EchoClient::new(tonic)),
            Client::Mesh(EchoClient::new(mesh)),
            Client::Raw(Box::new(EchoClient::new(raw))),
        )
    })
}

fn main() {
    if std::env::var_os(SERVER_ENV).is_some() {
        return serve();
    }
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

    // Latency and CPU: one client thread, sequential calls.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (mut tonic, mut mesh, mut raw) = clients(&rt, addr);
    rt.block_on(async {
        latencies(&mut tonic, 1_000).await;
        latencies(&mut mesh, 1_000).await;
        latencies(&mut raw, 1_000).await;
    });
    let mut cpu_raw = Vec::new();
    let (mut p50, mut p99) = ((Vec::new(), Vec::new()), (Vec::new(), Vec::new()));
    let (mut cpu_tonic, mut cpu_mesh, mut cpu_ratio) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        rt.block_on(async {
            let t = latencies(&mut tonic, LATENCY_CALLS).await;
            let m = latencies(&mut mesh, LATENCY_CALLS).await;
            p50.0.push(t[t.len() / 2]);
            p50.1.push(m[m.len() / 2]);
            p99.0.push(t[t.len() * 99 / 100]);
            p99.1.push(m[m.len() * 99 / 100]);
            let start = cpu_ns();
            for _ in 0..CPU_CALLS {
                tonic.call().await;
            }
            let t = (cpu_ns() - start) as f64 / CPU_CALLS as f64;
            let start = cpu_ns();
            for _ in 0..CPU_CALLS {
                mesh.call().await;
            }
            let m = (cpu_ns() - start) as f64 / CPU_CALLS as f64;
            let start = cpu_ns();
            for _ in 0..CPU_CALLS {
                raw.call().await;
            }
            cpu_raw.push((cpu_ns() - start) as f64 / CPU_CALLS as f64);
            cpu_tonic.push(t);
            cpu_mesh.push(m);
            cpu_ratio.push(m / t);
        });
    }
    drop((tonic, mesh, raw));

    // Throughput: 32 tasks on two worker threads.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (tonic, mesh, _) = clients(&rt, addr);
    let (mut tput_tonic, mut tput_mesh, mut tput_ratio) = (Vec::new(), Vec::new(), Vec::new());
    rt.block_on(async {
        throughput(&tonic).await;
        throughput(&mesh).await;
        for _ in 0..3 {
            let t = throughput(&tonic).await;
            let m = throughput(&mesh).await;
            tput_tonic.push(t);
            tput_mesh.push(m);
            tput_ratio.push(m / t);
        }
    });

    let us = |v: Vec<f64>| median(v) / 1_000.0;
    let (t50, m50) = (us(p50.0), us(p50.1));
    let (t99, m99) = (us(p99.0), us(p99.1));
    println!("unary latency, sequential ({LATENCY_CALLS} calls, median of {ROUNDS} rounds):");
    println!("  tonic Channel  p50 {t50:>7.1} us  p99 {t99:>7.1} us");
    println!(
        "  MeshChannel    p50 {m50:>7.1} us  p99 {m99:>7.1} us   ratio p50 {:.3}x, p99 {:.3}x",
        m50 / t50,
        m99 / t99
    );
    println!(
        "throughput, {CONCURRENCY} concurrent tasks, 2 worker threads (median of 3 x {THROUGHPUT_TIME:?}):"
    );
    println!("  tonic Channel  {:>9.0} calls/s", median(tput_tonic));
    println!(
        "  MeshChannel    {:>9.0} calls/s   ratio {:.3}x",
        median(tput_mesh),
        median(tput_ratio)
    );
    println!("client CPU per call ({CPU_CALLS} sequential calls, median of {ROUNDS} rounds):");
    let tonic_cpu = median(cpu_tonic);
    println!("  tonic Channel  {tonic_cpu:>8.0} ns");
    let raw_cpu = median(cpu_raw);
    println!(
        "  MeshClient     {raw_cpu:>8.0} ns   {:.3}x (no MeshChannel: the mesh-tower stack alone)",
        raw_cpu / tonic_cpu
    );
    println!(
        "  MeshChannel    {:>8.0} ns   ratio {:.3}x",
        median(cpu_mesh),
        median(cpu_ratio)
    );
    drop(child.stdin.take());
    let _ = child.wait();
}
