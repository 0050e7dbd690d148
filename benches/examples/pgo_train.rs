//! The training load of a profile-guided build of mesh-proxy (`scripts/release-pgo`):
//! real proxy processes on loopback, carrying the kinds of traffic a sidecar carries, so
//! that the profile the instrumented binary writes at exit weighs the request path the way
//! production does.
//!
//! What it runs, all on 127.0.0.1, every listener on port 0 (each proxy reports its
//! addresses as `listening NAME ADDR` lines on stdout, which the trainer reads):
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
//! streams multiplexed on few connections, gRPC unary and client-streaming calls, opaque
//! TCP through the pair (a second listener on each side, to a TCP echo), a request the
//! pair's policy denies, and a `/metrics` scrape. Every answer is checked, so
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

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io::{BufRead, BufReader};
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
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

type Body = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(proxy) = args.next() else {
        eprintln!("usage: pgo_train MESH_PROXY_BINARY [SCALE]");
        std::process::exit(2);
    };
    let scale = match args.next().map(|s| s.parse::<f64>()) {
        None => 1.0,
        Some(Ok(scale)) if scale > 0.0 && scale.is_finite() => scale,
        Some(_) => {
            eprintln!("pgo_train: SCALE must be a positive number (1.0: about 100,000 requests)");
            std::process::exit(2);
        }
    };
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

async fn train(proxy: PathBuf, scale: f64) -> u64 {
    let upstream = serve_upstream().await;
    let echo = serve_echo().await;
    let dir = std::env::temp_dir().join(format!("mesh-pgo-train-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/config/demo");
    let demo = demo.canonicalize().expect("examples/config/demo");

    // Every listener binds port 0; each proxy reports its addresses on stdout.
    let hop_config = format!(
        "[services.upstream]\ntls = \"plaintext\"\nprotocol = \"http1\"\n\
         discovery = {{ kind = \"static\", endpoints = [{{ addr = \"{upstream}\" }}] }}\n\
         [services.grpc]\ntls = \"plaintext\"\nprotocol = \"grpc\"\n\
         discovery = {{ kind = \"static\", endpoints = [{{ addr = \"{upstream}\" }}] }}\n\
         [[routes]]\nname = \"grpc\"\nmatches = [{{ path = {{ prefix = \"/echo.Echo\" }} }}]\n\
         backends = [{{ service = \"grpc\" }}]\n\
         [[outbound]]\nname = \"app\"\nlisten = \"127.0.0.1:0\"\ndefault_service = \"upstream\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n"
    );
    // Paths quoted as TOML strings: a Windows path's backslashes are escapes in `"..."`.
    let file = |name: &str| toml::Value::String(demo.join(name).display().to_string());
    let identity = |name: &str| {
        format!(
            "drain_timeout = \"2s\"\n[identity]\nsource = \"files\"\n\
             cert = {}\nkey = {}\n[identity.bundles]\n\"example.org\" = {}\n",
            file(&format!("{name}.crt")),
            file(&format!("{name}.key")),
            file("ca.pem"),
        )
    };
    let inbound_config = format!(
        "{}[[inbound]]\nname = \"app\"\nlisten = \"127.0.0.1:0\"\ntarget = \"{upstream}\"\n\
         authorization = \"clients\"\n[authorization.clients]\ndefault = \"deny\"\n\
         [[authorization.clients.rules]]\nname = \"web\"\n\
         clients = [\"spiffe://example.org/demo/web\"]\n\
         routes = [{{ path = {{ prefix = \"/\" }}, methods = [\"GET\", \"POST\"] }}]\n\
         [[inbound]]\nname = \"tcp\"\nlisten = \"127.0.0.1:0\"\ntarget = \"{echo}\"\n\
         protocol = \"opaque\"\nauthorization = \"tcp\"\n[authorization.tcp]\ndefault = \"deny\"\n\
         [[authorization.tcp.rules]]\nname = \"web\"\nclients = [\"spiffe://example.org/demo/web\"]\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n",
        identity("users")
    );

    let mut proxies = Proxies(Vec::new());
    let hop = proxies.start(&proxy, &dir, "hop", hop_config, &["app"]);
    let inbound = proxies.start(&proxy, &dir, "inbound", inbound_config, &["app", "tcp"]);
    // The outbound side of the pair needs the inbound side's addresses.
    let outbound_config = format!(
        "{}[services.users]\n\
         discovery = {{ kind = \"static\", endpoints = [{{ addr = \"{}\" }}] }}\n\
         server_identity = \"spiffe://example.org/demo/users\"\n\
         [[outbound]]\nname = \"egress\"\nlisten = \"127.0.0.1:0\"\ndefault_service = \"users\"\n\
         [services.tcp]\n\
         discovery = {{ kind = \"static\", endpoints = [{{ addr = \"{}\" }}] }}\n\
         server_identity = \"spiffe://example.org/demo/users\"\n\
         [[outbound]]\nname = \"tcp\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"opaque\"\n\
         default_service = \"tcp\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n",
        identity("web"),
        inbound[0],
        inbound[1],
    );
    let outbound = proxies.start(
        &proxy,
        &dir,
        "outbound",
        outbound_config,
        &["egress", "tcp"],
    );
    let (hop, out, out_tcp) = (hop[0], outbound[0], outbound[1]);
    for (name, child, admin) in &mut proxies.0 {
        wait_ready(name, child, *admin).await;
    }

    let failures = Arc::new(AtomicU64::new(0));
    let n = |count: f64| ((count * scale).ceil() as usize).max(1);
    let get = Call::new(Method::GET, "/", None);
    let post_small = Call::new(Method::POST, "/echo", Some(Bytes::from(vec![b'x'; 4096])));
    let post_large = Call::new(
        Method::POST,
        "/echo",
        Some(Bytes::from(vec![b'y'; 32 * 1024])),
    );
    let started = tokio::time::Instant::now();
    // The one hop and the pair (half as much); each phase's connections run at once.
    let mut phases = Vec::new();
    for (target, share) in [(hop, 1.0), (out, 0.5)] {
        let mut load = |version, connections, streams, per_stream: f64, call: &Call| {
            let load = Load {
                target,
                version,
                connections,
                streams,
                per_stream: n(per_stream * share),
            };
            phases.push(tokio::spawn(load.run(call.clone(), failures.clone())));
        };
        load(Version::Http1, 32, 1, 1000.0, &get);
        load(Version::Http1, 8, 1, 600.0, &post_small);
        load(Version::Http1, 4, 1, 150.0, &post_large);
        load(Version::Http2, 4, 32, 200.0, &get);
    }
    // gRPC on the one hop: unary calls, and client streams of 8 messages.
    for (callers, calls, messages) in [(16, 500.0, 1), (4, 100.0, 8)] {
        let load = Load {
            target: hop,
            version: Version::Http2,
            connections: 1,
            streams: callers,
            per_stream: n(calls),
        };
        phases.push(tokio::spawn(
            load.run(Call::grpc(messages), failures.clone()),
        ));
    }
    // Opaque TCP through the pair: 16 KiB out and back, many times per connection.
    phases.push(tokio::spawn(opaque_load(
        out_tcp,
        8,
        n(100.0),
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
        let scrape = http1_once(*admin, Method::GET, "/metrics", None).await;
        if scrape != Some(StatusCode::OK) {
            eprintln!("pgo_train: GET {admin}/metrics: {scrape:?}");
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

impl Proxies {
    /// Starts a proxy on `config` and returns the addresses of its `listeners`, in that
    /// order, as it reports them (`listening NAME ADDR` on stdout); its admin address is
    /// kept for readiness and shutdown.
    fn start(
        &mut self,
        proxy: &Path,
        dir: &Path,
        name: &'static str,
        config: String,
        listeners: &[&str],
    ) -> Vec<SocketAddr> {
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, config).unwrap();
        let mut child = Command::new(proxy)
            .args(["run", "--log", "warn", "--workers", "1", "--config"])
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", proxy.display()));
        let stdout = child.stdout.take().unwrap();
        let mut addrs = HashMap::new();
        let mut lines = BufReader::new(stdout).lines();
        // The proxy prints every listener at once when it starts, or exits (end of
        // output) when it cannot.
        while addrs.len() < listeners.len() + 1 {
            let Some(Ok(line)) = lines.next() else {
                let _ = child.kill();
                panic!("pgo_train: the {name} proxy stopped before it listened (its log is above)");
            };
            let mut words = line.split_whitespace();
            if let (Some("listening"), Some(listener), Some(addr)) =
                (words.next(), words.next(), words.next())
            {
                addrs.insert(listener.to_owned(), addr.parse::<SocketAddr>().unwrap());
            }
        }
        // Nothing else is printed there, but a full pipe must never stall the proxy.
        std::thread::spawn(move || lines.for_each(drop));
        let admin = addrs["admin"];
        self.0.push((name, child, admin));
        listeners.iter().map(|l| addrs[*l]).collect()
    }
}

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

/// A server on a port of its own: `connection` serves each accepted connection.
async fn serve<F, Fut>(connection: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            if let Ok((tcp, _)) = listener.accept().await {
                let _ = tcp.set_nodelay(true);
                tokio::spawn(connection(tcp));
            }
        }
    });
    addr
}

/// The upstream app: HTTP/1.1 and h2c on one port.
async fn serve_upstream() -> SocketAddr {
    serve(|tcp| async move {
        let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        let _ = builder
            .serve_connection(TokioIo::new(tcp), hyper::service::service_fn(answer))
            .await;
    })
    .await
}

/// A TCP echo, for the opaque listeners.
async fn serve_echo() -> SocketAddr {
    serve(|mut tcp| async move {
        let (mut read, mut write) = tcp.split();
        let _ = tokio::io::copy(&mut read, &mut write).await;
    })
    .await
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

/// `connections` opaque connections to `target`, each sending 16 KiB and reading it back
/// `rounds` times; a connection stops at its first failure, and counts it.
async fn opaque_load(
    target: SocketAddr,
    connections: usize,
    rounds: usize,
    failures: Arc<AtomicU64>,
) {
    let payload: Bytes = (0..16 * 1024).map(|i| (i % 251) as u8).collect();
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (payload, failures) = (payload.clone(), failures.clone());
        tasks.push(tokio::spawn(async move {
            let ok = async {
                let mut tcp = TcpStream::connect(target).await?;
                tcp.set_nodelay(true)?;
                let mut back = vec![0; payload.len()];
                for _ in 0..rounds {
                    tcp.write_all(&payload).await?;
                    tcp.read_exact(&mut back).await?;
                    if back != payload {
                        return Err(std::io::Error::other("the echo differs"));
                    }
                }
                Ok::<_, std::io::Error>(())
            };
            if let Err(e) = ok.await {
                eprintln!("pgo_train: opaque connection to {target}: {e}");
                failures.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
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

/// What each request of a load sends, and what its answer must be: 200, the request body
/// echoed when there is one, and `grpc-status: 0` in trailers for gRPC.
#[derive(Clone)]
struct Call {
    method: Method,
    path: &'static str,
    body: Option<Bytes>,
    grpc: bool,
}

impl Call {
    fn new(method: Method, path: &'static str, body: Option<Bytes>) -> Self {
        Call {
            method,
            path,
            body,
            grpc: false,
        }
    }

    /// A gRPC call of `messages` 100-byte request messages (1: unary).
    fn grpc(messages: usize) -> Self {
        let mut body = BytesMut::new();
        for _ in 0..messages {
            body.put_u8(0);
            body.put_u32(100);
            body.put_slice(&[b'g'; 100]);
        }
        let path = if messages == 1 {
            "/echo.Echo/Unary"
        } else {
            "/echo.Echo/Collect"
        };
        Call {
            method: Method::POST,
            path,
            body: Some(body.freeze()),
            grpc: true,
        }
    }

    fn request(&self, target: SocketAddr) -> Request<Full<Bytes>> {
        let mut req = request(target, self.method.clone(), self.path, self.body.clone());
        if self.grpc {
            let headers = req.headers_mut();
            headers.insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
        }
        req
    }

    /// Whether `response` is the answer expected; if not, what was wrong with it.
    async fn check(&self, response: hyper::Result<Response<Incoming>>) -> Result<(), String> {
        let response = response.map_err(|e| format!("no response: {e}"))?;
        if response.status() != StatusCode::OK {
            return Err(format!("status {}", response.status()));
        }
        let got = response.into_body().collect().await;
        let got = got.map_err(|e| format!("the body failed: {e}"))?;
        if self.grpc {
            let status = got.trailers().and_then(|t| t.get("grpc-status")).cloned();
            if status.as_ref().is_none_or(|s| s != "0") {
                return Err(format!("grpc-status {status:?}"));
            }
        }
        match &self.body {
            Some(sent) if got.to_bytes() != *sent => Err("the echo differs".into()),
            _ => Ok(()),
        }
    }
}

#[derive(Clone, Copy)]
enum Version {
    Http1,
    /// h2c with prior knowledge.
    Http2,
}

/// `connections` connections to `target`, `streams` callers on each (HTTP/2; one on an
/// HTTP/1.1 connection), each making `per_stream` calls one after another. A caller stops at its
/// first failure, and counts it.
struct Load {
    target: SocketAddr,
    version: Version,
    connections: usize,
    streams: usize,
    per_stream: usize,
}

/// Either version's request sender.
enum Sender {
    Http1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    Http2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Sender {
    /// Senders for `callers` callers: one for HTTP/1.1, which has no multiplexing.
    fn split(self, callers: usize) -> Vec<Sender> {
        match self {
            Sender::Http1(_) => vec![self],
            Sender::Http2(send) => (0..callers).map(|_| Sender::Http2(send.clone())).collect(),
        }
    }

    async fn send(&mut self, request: Request<Full<Bytes>>) -> hyper::Result<Response<Incoming>> {
        match self {
            Sender::Http1(send) => send.send_request(request).await,
            Sender::Http2(send) => send.send_request(request).await,
        }
    }
}

impl Load {
    async fn run(self, call: Call, failures: Arc<AtomicU64>) {
        let mut callers = Vec::new();
        for _ in 0..self.connections {
            let Some(sender) = self.connect().await else {
                eprintln!("pgo_train: no connection to {}", self.target);
                failures.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            for mut sender in sender.split(self.streams) {
                let (call, failures) = (call.clone(), failures.clone());
                let (target, calls) = (self.target, self.per_stream);
                callers.push(tokio::spawn(async move {
                    for _ in 0..calls {
                        let response = sender.send(call.request(target)).await;
                        if let Err(e) = call.check(response).await {
                            eprintln!("pgo_train: {} {target}{}: {e}", call.method, call.path);
                            failures.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    }
                }));
            }
        }
        for caller in callers {
            caller.await.unwrap();
        }
    }

    async fn connect(&self) -> Option<Sender> {
        let tcp = TcpStream::connect(self.target).await.ok()?;
        let _ = tcp.set_nodelay(true);
        let io = TokioIo::new(tcp);
        Some(match self.version {
            Version::Http1 => {
                let (send, conn) = hyper::client::conn::http1::handshake(io).await.ok()?;
                tokio::spawn(conn);
                Sender::Http1(send)
            }
            Version::Http2 => {
                let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .ok()?;
                tokio::spawn(conn);
                Sender::Http2(send)
            }
        })
    }
}
