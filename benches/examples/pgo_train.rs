//! The training load of a profile-guided build of mesh-proxy (`scripts/release-pgo`):
//! real proxy processes on loopback, carrying the kinds of traffic a sidecar carries, so
//! that the profile the instrumented binary writes at exit weighs the request path the way
//! production does.
//!
//! What it runs, all on 127.0.0.1 with ports the system picks:
//!
//! - an upstream app (hyper, HTTP/1.1 and h2c on one port): `GET` answers 1 KiB, `POST
//!   /echo` echoes its body, `/echo.Echo/*` answers gRPC (each request message echoed,
//!   then `grpc-status: 0` in trailers);
//! - a one-hop proxy (plaintext outbound listener, balancing, breaker, retries, metrics;
//!   a route sends `/echo.Echo/` to a `protocol = "grpc"` service);
//! - a meshed pair: an outbound proxy sending to an inbound one as HTTP/2 over SPIFFE
//!   mTLS (the demo identities of `examples/config/demo`), which authorizes the caller and
//!   forwards to the app.
//!
//! Through them: HTTP/1.1 `GET`s on many connections, `POST`s of 4 and 32 KiB, HTTP/2
//! streams multiplexed on few connections, gRPC unary and client-streaming calls, a
//! request the pair's policy denies, and a `/metrics` scrape. Every answer is checked, so
//! a run doubles as a smoke test of the proxy: the trainer exits non-zero when any
//! request failed or a proxy did not exit 0 after `POST /shutdown` on its admin listener
//! (the instrumented binary writes its profile only on a clean exit).
//!
//! ```text
//! cargo build --release -p mesh-benches --example pgo_train
//! target/release/examples/pgo_train MESH_PROXY_BINARY [SCALE]   (SCALE 1.0: about 100,000 requests)
//! ```
#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stderr
)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::stream;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

type Body = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(proxy) = args.next() else {
        eprintln!("usage: pgo_train MESH_PROXY_BINARY [SCALE]");
        std::process::exit(2);
    };
    let scale: f64 = args
        .next()
        .map_or(1.0, |s| s.parse().expect("SCALE: a number"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let failures = runtime.block_on(train(PathBuf::from(proxy), scale));
    if failures > 0 {
        eprintln!("pgo_train: {failures} failure(s)");
        std::process::exit(1);
    }
}

/// A port free at the time of asking, for a proxy's config.
fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

async fn train(proxy: PathBuf, scale: f64) -> u64 {
    let upstream = serve_upstream().await;
    let dir = std::env::temp_dir().join(format!("mesh-pgo-train-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/config/demo");
    let demo = demo.canonicalize().expect("examples/config/demo");
    let demo = demo.display();

    let (hop, hop_admin) = (free_port(), free_port());
    let hop_config = format!(
        "[services.upstream]\ntls = \"plaintext\"\nprotocol = \"http1\"\n\
         discovery = {{ kind = \"static\", endpoints = [{{ addr = \"{upstream}\" }}] }}\n\
         [services.grpc]\ntls = \"plaintext\"\nprotocol = \"grpc\"\n\
         discovery = {{ kind = \"static\", endpoints = [{{ addr = \"{upstream}\" }}] }}\n\
         [[routes]]\nname = \"grpc\"\nmatches = [{{ path = {{ prefix = \"/echo.Echo\" }} }}]\n\
         backends = [{{ service = \"grpc\" }}]\n\
         [[outbound]]\nname = \"app\"\nlisten = \"{hop}\"\ndefault_service = \"upstream\"\n\
         [admin]\nlisten = \"{hop_admin}\"\n"
    );
    let (out, out_admin, inb, inb_admin) = (free_port(), free_port(), free_port(), free_port());
    let identity = |name: &str| {
        format!(
            "drain_timeout = \"2s\"\n[identity]\nsource = \"files\"\n\
             cert = \"{demo}/{name}.crt\"\nkey = \"{demo}/{name}.key\"\n\
             [identity.bundles]\n\"example.org\" = \"{demo}/ca.pem\"\n"
        )
    };
    let inbound_config = format!(
        "{}[[inbound]]\nname = \"app\"\nlisten = \"{inb}\"\ntarget = \"{upstream}\"\n\
         authorization = \"clients\"\n[authorization.clients]\ndefault = \"deny\"\n\
         [[authorization.clients.rules]]\nname = \"web\"\n\
         clients = [\"spiffe://example.org/demo/web\"]\n\
         routes = [{{ path = {{ prefix = \"/\" }}, methods = [\"GET\", \"POST\"] }}]\n\
         [admin]\nlisten = \"{inb_admin}\"\n",
        identity("users")
    );
    let outbound_config = format!(
        "{}[services.users]\n\
         discovery = {{ kind = \"static\", endpoints = [{{ addr = \"{inb}\" }}] }}\n\
         server_identity = \"spiffe://example.org/demo/users\"\n\
         [[outbound]]\nname = \"egress\"\nlisten = \"{out}\"\ndefault_service = \"users\"\n\
         [admin]\nlisten = \"{out_admin}\"\n",
        identity("web")
    );

    let mut proxies = Proxies(Vec::new());
    for (name, config, admin) in [
        ("hop", hop_config, hop_admin),
        ("inbound", inbound_config, inb_admin),
        ("outbound", outbound_config, out_admin),
    ] {
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, config).unwrap();
        let child = Command::new(&proxy)
            .args(["run", "--log", "warn", "--workers", "1", "--config"])
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", proxy.display()));
        proxies.0.push((name, child, admin));
    }
    for (name, child, admin) in &mut proxies.0 {
        wait_ready(name, child, *admin).await;
    }

    let failures = Arc::new(AtomicU64::new(0));
    let n = |count: f64| ((count * scale).ceil() as usize).max(1);
    let small = Bytes::from(vec![b'x'; 4096]);
    let large = Bytes::from(vec![b'y'; 32 * 1024]);
    let started = tokio::time::Instant::now();
    // The one hop, then the pair; each phase's connections run at once.
    let mut phases = Vec::new();
    for target in [hop, out] {
        let share = if target == hop { 1.0 } else { 0.5 };
        phases.push(tokio::spawn(http1_load(
            target,
            32,
            n(1000.0 * share),
            None,
            failures.clone(),
        )));
        phases.push(tokio::spawn(http1_load(
            target,
            8,
            n(600.0 * share),
            Some(small.clone()),
            failures.clone(),
        )));
        phases.push(tokio::spawn(http1_load(
            target,
            4,
            n(150.0 * share),
            Some(large.clone()),
            failures.clone(),
        )));
        phases.push(tokio::spawn(http2_load(
            target,
            4,
            32,
            n(200.0 * share),
            failures.clone(),
        )));
    }
    phases.push(tokio::spawn(grpc_load(
        hop,
        16,
        n(500.0),
        1,
        failures.clone(),
    )));
    phases.push(tokio::spawn(grpc_load(
        hop,
        4,
        n(100.0),
        8,
        failures.clone(),
    )));
    for phase in phases {
        phase.await.unwrap();
    }
    // The pair's policy admits GET and POST only.
    let denied = http1_once(out, Method::DELETE, "/", None).await;
    if denied != Some(StatusCode::FORBIDDEN) {
        eprintln!("pgo_train: DELETE through the pair: {denied:?}, expected 403");
        failures.fetch_add(1, Ordering::Relaxed);
    }
    for (_, _, admin) in &proxies.0 {
        if http1_once(*admin, Method::GET, "/metrics", None).await != Some(StatusCode::OK) {
            failures.fetch_add(1, Ordering::Relaxed);
        }
    }
    eprintln!("pgo_train: load done in {:?}", started.elapsed());

    for (name, child, admin) in &mut proxies.0 {
        let status = http1_once(*admin, Method::POST, "/shutdown", None).await;
        if !matches!(status, Some(s) if s.is_success()) || !exited_cleanly(child).await {
            eprintln!("pgo_train: the {name} proxy did not shut down cleanly ({status:?})");
            failures.fetch_add(1, Ordering::Relaxed);
        }
    }
    drop(proxies);
    let _ = std::fs::remove_dir_all(&dir);
    failures.load(Ordering::Relaxed)
}

/// The proxy processes, killed when the trainer ends before they exit (a panic included).
struct Proxies(Vec<(&'static str, Child, SocketAddr)>);

impl Drop for Proxies {
    fn drop(&mut self) {
        for (_, child, _) in &mut self.0 {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

async fn exited_cleanly(child: &mut Child) -> bool {
    for _ in 0..200 {
        match child.try_wait() {
            Ok(Some(status)) => return status.success(),
            Ok(None) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(_) => return false,
        }
    }
    false
}

async fn wait_ready(name: &str, child: &mut Child, admin: SocketAddr) {
    for _ in 0..300 {
        if http1_once(admin, Method::GET, "/ready", None).await == Some(StatusCode::OK) {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("pgo_train: the {name} proxy exited before it was ready: {status}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("pgo_train: the {name} proxy was not ready after 15 s");
}

/// The upstream app: HTTP/1.1 and h2c on one port.
async fn serve_upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let _ = builder
                    .serve_connection(TokioIo::new(tcp), hyper::service::service_fn(answer))
                    .await;
            });
        }
    });
    addr
}

async fn answer(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let body = match req.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => return Ok(status(StatusCode::BAD_REQUEST)),
    };
    if path.starts_with("/echo.Echo/") {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let frames = [Ok(Frame::data(body)), Ok(Frame::trailers(trailers))];
        let body = StreamBody::new(stream::iter(frames)).boxed();
        let mut response = Response::new(body);
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        return Ok(response);
    }
    let body = if path == "/echo" {
        body
    } else {
        Bytes::from_static(&[b'a'; 1024])
    };
    Ok(Response::new(
        Full::new(body).map_err(|e| match e {}).boxed(),
    ))
}

fn status(code: StatusCode) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::new()).map_err(|e| match e {}).boxed());
    *response.status_mut() = code;
    response
}

fn request(
    target: SocketAddr,
    method: Method,
    path: &str,
    body: Option<Bytes>,
) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(format!("http://{target}{path}"))
        .header(http::header::HOST, target.to_string())
        .body(Full::new(body.unwrap_or_default()))
        .unwrap()
}

/// One request on a connection of its own; `None` when it failed.
async fn http1_once(
    target: SocketAddr,
    method: Method,
    path: &str,
    body: Option<Bytes>,
) -> Option<StatusCode> {
    let tcp = TcpStream::connect(target).await.ok()?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .ok()?;
    tokio::spawn(conn);
    let response = send
        .send_request(request(target, method, path, body))
        .await
        .ok()?;
    let status = response.status();
    response.into_body().collect().await.ok()?;
    Some(status)
}

/// `connections` keep-alive HTTP/1.1 connections, `per_connection` requests each: `GET /`,
/// or `POST /echo` of `body`, whose echo is checked.
async fn http1_load(
    target: SocketAddr,
    connections: usize,
    per_connection: usize,
    body: Option<Bytes>,
    failures: Arc<AtomicU64>,
) {
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let body = body.clone();
        let failures = failures.clone();
        tasks.push(tokio::spawn(async move {
            let Ok(tcp) = TcpStream::connect(target).await else {
                failures.fetch_add(per_connection as u64, Ordering::Relaxed);
                return;
            };
            let _ = tcp.set_nodelay(true);
            let Ok((mut send, conn)) =
                hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await
            else {
                failures.fetch_add(per_connection as u64, Ordering::Relaxed);
                return;
            };
            tokio::spawn(conn);
            for _ in 0..per_connection {
                let (method, path) = match body {
                    Some(_) => (Method::POST, "/echo"),
                    None => (Method::GET, "/"),
                };
                let ok = match send
                    .send_request(request(target, method, path, body.clone()))
                    .await
                {
                    Ok(response) if response.status() == StatusCode::OK => {
                        match response.into_body().collect().await {
                            Ok(got) => body.as_ref().is_none_or(|sent| got.to_bytes() == *sent),
                            Err(_) => false,
                        }
                    }
                    _ => false,
                };
                if !ok {
                    failures.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

/// `connections` h2c connections (prior knowledge), `streams` requests in flight on each,
/// `per_stream` after one another.
async fn http2_load(
    target: SocketAddr,
    connections: usize,
    streams: usize,
    per_stream: usize,
    failures: Arc<AtomicU64>,
) {
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let Ok(tcp) = TcpStream::connect(target).await else {
            failures.fetch_add((streams * per_stream) as u64, Ordering::Relaxed);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let Ok((send, conn)) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await
        else {
            failures.fetch_add((streams * per_stream) as u64, Ordering::Relaxed);
            continue;
        };
        tokio::spawn(conn);
        for _ in 0..streams {
            let mut send = send.clone();
            let failures = failures.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..per_stream {
                    let ok = match send
                        .send_request(request(target, Method::GET, "/", None))
                        .await
                    {
                        Ok(response) => {
                            response.status() == StatusCode::OK
                                && response.into_body().collect().await.is_ok()
                        }
                        Err(_) => false,
                    };
                    if !ok {
                        failures.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
            }));
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
}

/// gRPC calls over h2c: `concurrency` at a time on one connection, `messages` request
/// messages each (1: unary), every message echoed and `grpc-status: 0` checked.
async fn grpc_load(
    target: SocketAddr,
    concurrency: usize,
    per_caller: usize,
    messages: usize,
    failures: Arc<AtomicU64>,
) {
    let Ok(tcp) = TcpStream::connect(target).await else {
        failures.fetch_add((concurrency * per_caller) as u64, Ordering::Relaxed);
        return;
    };
    let _ = tcp.set_nodelay(true);
    let Ok((send, conn)) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await
    else {
        failures.fetch_add((concurrency * per_caller) as u64, Ordering::Relaxed);
        return;
    };
    tokio::spawn(conn);
    let mut message = BytesMut::new();
    for _ in 0..messages {
        message.put_u8(0);
        message.put_u32(100);
        message.put_slice(&[b'g'; 100]);
    }
    let message = message.freeze();
    let path = if messages == 1 {
        "/echo.Echo/Unary"
    } else {
        "/echo.Echo/Collect"
    };
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let mut send = send.clone();
        let failures = failures.clone();
        let message = message.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..per_caller {
                let mut req = request(target, Method::POST, path, Some(message.clone()));
                let headers = req.headers_mut();
                headers.insert(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/grpc"),
                );
                headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
                let ok = match send.send_request(req).await {
                    Ok(response) if response.status() == StatusCode::OK => {
                        match response.into_body().collect().await {
                            Ok(got) => {
                                let status =
                                    got.trailers().and_then(|t| t.get("grpc-status")).cloned();
                                got.to_bytes() == message
                                    && status.as_ref().is_some_and(|s| s == "0")
                            }
                            Err(_) => false,
                        }
                    }
                    _ => false,
                };
                if !ok {
                    failures.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}
