//! `MeshServer` on loopback: SPIFFE mTLS with the test CA, authorization per rule for
//! HTTP and gRPC, plaintext, graceful shutdown, and hostile clients on raw sockets.
#![cfg(feature = "test-util")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use mesh_core::SpiffeId;
use mesh_core::config::{
    AuthorizationPolicy, AuthorizationRule, DefaultAction, GrpcMatch, PathMatch, Protocol,
    RouteMatch,
};
use mesh_spiffe::test_ca::TestCa;
use mesh_spiffe::{Authorizer, CredentialStore, Mtls, MtlsAcceptor, MtlsConnector, PeerIdentity};
use mesh_tower::authz::{AuthzDecision, Policy};
use mesh_tower::connect::{ConnectSettings, EndpointClient};
use mesh_tower::server::{ClientAddr, MeshServer, Server, ServerLimits};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SERVER_ID: &str = "spiffe://example.org/ns/prod/sa/users";
const WEB: &str = "spiffe://example.org/ns/prod/sa/web";
const BATCH: &str = "spiffe://example.org/ns/batch/sa/jobs";

/// Answers with what the mesh told it: the peer, the rule, the client address.
async fn echo_identity(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let peer = req
        .extensions()
        .get::<PeerIdentity>()
        .map_or("none".to_owned(), ToString::to_string);
    let decision = req
        .extensions()
        .get::<AuthzDecision>()
        .map_or("none".to_owned(), ToString::to_string);
    let addr = req.extensions().get::<ClientAddr>().is_some();
    Ok(Response::new(Full::new(Bytes::from(format!(
        "peer={peer} decision={decision} addr={addr}"
    )))))
}

fn rule(name: &str, clients: &[&str], routes: Vec<RouteMatch>) -> AuthorizationRule {
    AuthorizationRule {
        name: name.into(),
        clients: clients.iter().map(|c| c.parse().unwrap()).collect(),
        unauthenticated: false,
        routes,
    }
}

fn prefix(p: &str) -> RouteMatch {
    RouteMatch {
        path: Some(PathMatch::Prefix(p.into())),
        ..RouteMatch::default()
    }
}

fn grpc(service: &str, method: &str) -> RouteMatch {
    RouteMatch {
        grpc: Some(GrpcMatch {
            service: service.into(),
            method: Some(method.into()),
        }),
        ..RouteMatch::default()
    }
}

struct Pki {
    ca: TestCa,
}

/// Serves `app` with `builder` on in-memory pipes (deterministic in paused time, which
/// races real sockets' handshakes), and a dialer that opens one to it per connection,
/// counting them.
fn piped<S, B>(
    builder: mesh_tower::server::MeshServerBuilder,
    app: S,
) -> (
    Server,
    mesh_tower::connect::Dialer,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
)
where
    S: tower::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<mesh_core::error::BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<mesh_core::error::BoxError>,
{
    type Piped = std::io::Result<(tokio::io::DuplexStream, SocketAddr)>;
    let (tx, rx) = tokio::sync::mpsc::channel::<Piped>(4);
    let incoming = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|next| (next, rx))
    });
    let addr: SocketAddr = "10.0.0.1:4143".parse().unwrap();
    let server = builder.serve_incoming(addr, incoming, app).unwrap();
    let dials = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = dials.clone();
    let dialer = mesh_tower::connect::Dialer::new(move |_addr| {
        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let tx = tx.clone();
        async move {
            let (client, served) = tokio::io::duplex(64 << 10);
            tx.send(Ok((served, "10.0.0.2:5555".parse().unwrap())))
                .await
                .map_err(|_| std::io::Error::other("server gone"))?;
            Ok(client)
        }
    });
    (server, dialer, dials)
}

impl Pki {
    fn new() -> Self {
        Self {
            ca: TestCa::new("example.org").unwrap(),
        }
    }

    fn mtls(&mut self, id: &str) -> Mtls {
        let svid = self.ca.issue(id).unwrap();
        Mtls::new(CredentialStore::with(svid, self.ca.bundle_set().unwrap()))
    }

    async fn server(&mut self, default: DefaultAction) -> Server {
        let acceptor = MtlsAcceptor::new(
            &self.mtls(SERVER_ID),
            Authorizer::trust_domain(self.ca.trust_domain().clone()),
        )
        .unwrap();
        let policy = Policy::new(
            "users",
            &AuthorizationPolicy {
                default,
                rules: vec![
                    rule("web-users", &[WEB], vec![prefix("/users")]),
                    rule("web-grpc", &[WEB], vec![grpc("users.v1.Users", "GetUser")]),
                ],
            },
        )
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        MeshServer::builder()
            .mtls(acceptor)
            .authorization(policy)
            .serve(listener, tower::service_fn(echo_identity))
            .unwrap()
    }

    /// An HTTP/2 client as `id`, whose certificate expires `left` from now by the wall
    /// clock.
    fn expiring_client(
        &mut self,
        id: &str,
        addr: SocketAddr,
        left: Duration,
        dialer: mesh_tower::connect::Dialer,
    ) -> EndpointClient<Full<Bytes>> {
        let now = std::time::SystemTime::now();
        let svid = self
            .ca
            .leaf()
            .uri(id)
            .validity(now - Duration::from_secs(3600), now + left)
            .build()
            .unwrap();
        let mtls = Mtls::new(CredentialStore::with(svid, self.ca.bundle_set().unwrap()));
        let connector = MtlsConnector::new(&mtls, SpiffeId::new(SERVER_ID).unwrap()).unwrap();
        EndpointClient::new(
            addr,
            ConnectSettings {
                protocol: Protocol::Http2,
                dialer: Some(dialer),
                ..ConnectSettings::mtls(connector)
            },
        )
    }

    fn client(
        &mut self,
        id: &str,
        addr: SocketAddr,
        protocol: Protocol,
    ) -> EndpointClient<Full<Bytes>> {
        let connector =
            MtlsConnector::new(&self.mtls(id), SpiffeId::new(SERVER_ID).unwrap()).unwrap();
        EndpointClient::new(
            addr,
            ConnectSettings {
                protocol,
                ..ConnectSettings::mtls(connector)
            },
        )
    }
}

async fn send(
    client: &EndpointClient<Full<Bytes>>,
    path: &str,
    grpc: bool,
) -> (StatusCode, http::HeaderMap, String) {
    let mut req = Request::post(format!("http://users{path}"));
    if grpc {
        req = req.header("content-type", "application/grpc");
    }
    let resp = client
        .send(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

#[tokio::test]
async fn mtls_peers_reach_handlers_with_their_identity_and_the_deciding_rule() {
    let mut pki = Pki::new();
    let server = pki.server(DefaultAction::Deny).await;
    for protocol in [Protocol::Http1, Protocol::Http2] {
        let web = pki.client(WEB, server.local_addr(), protocol);
        let (status, _, body) = send(&web, "/users/42", false).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body,
            format!("peer={WEB} decision=users/web-users addr=true")
        );
        let (status, _, body) = send(&web, "/billing", false).await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::FORBIDDEN, "forbidden\n")
        );
        // Another workload of the trust domain passes TLS but no rule.
        let batch = pki.client(BATCH, server.local_addr(), protocol);
        assert_eq!(
            send(&batch, "/users/42", false).await.0,
            StatusCode::FORBIDDEN
        );
    }
    assert_eq!(server.shutdown().await.forced, 0);
}

#[tokio::test]
async fn denied_grpc_calls_get_a_trailers_only_permission_denied() {
    let mut pki = Pki::new();
    let server = pki.server(DefaultAction::Deny).await;
    let web = pki.client(WEB, server.local_addr(), Protocol::Http2);
    let (status, _, body) = send(&web, "/users.v1.Users/GetUser", true).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        format!("peer={WEB} decision=users/web-grpc addr=true")
    );
    let (status, headers, body) = send(&web, "/users.v1.Users/DeleteUser", true).await;
    assert_eq!(status, StatusCode::OK, "gRPC errors travel as grpc-status");
    assert_eq!(headers["grpc-status"], "7");
    assert_eq!(headers["content-type"], "application/grpc");
    assert!(body.is_empty(), "trailers-only: no message");
}

#[tokio::test]
async fn audit_lets_requests_in_and_marks_them() {
    let mut pki = Pki::new();
    let server = pki.server(DefaultAction::Audit).await;
    let batch = pki.client(BATCH, server.local_addr(), Protocol::Http2);
    let (status, _, body) = send(&batch, "/billing", false).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        format!("peer={BATCH} decision=users/default (audit) addr=true")
    );
    let web = pki.client(WEB, server.local_addr(), Protocol::Http2);
    assert!(
        send(&web, "/users", false)
            .await
            .2
            .contains("decision=users/web-users")
    );
}

#[tokio::test]
async fn clients_from_another_trust_domain_are_refused_at_the_handshake() {
    let mut pki = Pki::new();
    let server = pki.server(DefaultAction::Allow).await;
    let mut other = TestCa::new("other.org").unwrap();
    let svid = other.issue("spiffe://other.org/ns/prod/sa/web").unwrap();
    // The client trusts the server's domain; the server does not trust the client's.
    let mut bundles = other.bundle_set().unwrap();
    let local = pki.ca.trust_domain().clone();
    bundles.insert(
        local.clone(),
        pki.ca.bundle_set().unwrap().get(&local).unwrap().clone(),
    );
    let mtls = Mtls::new(CredentialStore::with(svid, bundles));
    let connector = MtlsConnector::new(&mtls, SpiffeId::new(SERVER_ID).unwrap()).unwrap();
    let client: EndpointClient<Full<Bytes>> =
        EndpointClient::new(server.local_addr(), ConnectSettings::mtls(connector));
    let err = client
        .send(
            Request::get("http://users/")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap_err();
    // TLS 1.3: the client finishes its side first; the server's refusal arrives as an
    // alert on the first read. Either way nothing is served.
    assert!(
        err.is_connect() || err.to_string().contains("fatal alert"),
        "{err}"
    );
}

async fn plaintext(policy: Option<Policy>, limits: ServerLimits) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut builder = MeshServer::builder().plaintext().limits(limits);
    if let Some(policy) = policy {
        builder = builder.authorization(policy);
    }
    builder
        .serve(listener, tower::service_fn(echo_identity))
        .unwrap()
}

#[tokio::test]
async fn plaintext_callers_are_unauthenticated_and_h2c_works() {
    let policy = Policy::new(
        "api",
        &AuthorizationPolicy {
            default: DefaultAction::Deny,
            rules: vec![AuthorizationRule {
                name: "health".into(),
                clients: vec![],
                unauthenticated: true,
                routes: vec![RouteMatch {
                    path: Some(PathMatch::Exact("/healthz".into())),
                    ..RouteMatch::default()
                }],
            }],
        },
    )
    .unwrap();
    let server = plaintext(Some(policy), ServerLimits::default()).await;
    for protocol in [Protocol::Http1, Protocol::Http2] {
        let client = EndpointClient::new(
            server.local_addr(),
            ConnectSettings {
                protocol,
                ..ConnectSettings::plaintext()
            },
        );
        let (status, _, body) = send(&client, "/healthz", false).await;
        assert_eq!(status, StatusCode::OK, "{protocol:?}");
        assert_eq!(body, "peer=none decision=api/health addr=true");
        assert_eq!(
            send(&client, "/users", false).await.0,
            StatusCode::FORBIDDEN
        );
    }
}

/// Authorization judges the request the application gets: a header the client names in
/// `Connection` is removed before the application sees it, so it must not grant access
/// either.
#[tokio::test]
async fn fields_named_in_connection_do_not_reach_authorization() {
    let policy = Policy::new(
        "api",
        &AuthorizationPolicy {
            default: DefaultAction::Deny,
            rules: vec![AuthorizationRule {
                name: "admins".into(),
                clients: vec![],
                unauthenticated: true,
                routes: vec![RouteMatch {
                    headers: vec![toml::from_str("name = \"x-role\"\nexact = \"admin\"").unwrap()],
                    ..RouteMatch::default()
                }],
            }],
        },
    )
    .unwrap();
    let server = plaintext(Some(policy), ServerLimits::default()).await;
    let mut tcp = TcpStream::connect(server.local_addr()).await.unwrap();
    for (connection, status) in [("", "200"), ("connection: x-role\r\n", "403")] {
        let request = format!("GET / HTTP/1.1\r\nhost: a\r\n{connection}x-role: admin\r\n\r\n");
        tcp.write_all(request.as_bytes()).await.unwrap();
        let response = read_response(&mut tcp).await;
        assert!(
            response.starts_with(&format!("HTTP/1.1 {status} ")),
            "{connection:?}: {response}"
        );
    }
}

#[tokio::test]
async fn a_server_needs_its_transport_chosen() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = MeshServer::builder()
        .serve(listener, tower::service_fn(echo_identity))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "choose the transport: `mtls(acceptor)`, `server_tls(acceptor)`, or `plaintext()` explicitly"
    );
}

/// A handler that takes `delay` (paused time makes it instant in wall-clock terms).
fn slow(
    delay: Duration,
) -> impl tower::Service<
    Request<Incoming>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
+ Send
+ Sync
+ 'static {
    tower::service_fn(move |_req: Request<Incoming>| async move {
        tokio::time::sleep(delay).await;
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"done"))))
    })
}

#[tokio::test(start_paused = true)]
async fn graceful_shutdown_finishes_requests_in_flight() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = MeshServer::builder()
        .plaintext()
        .serve(listener, slow(Duration::from_secs(2)))
        .unwrap();
    let addr = server.local_addr();
    let mut inflight = Vec::new();
    for protocol in [Protocol::Http1, Protocol::Http2] {
        let client: EndpointClient<Full<Bytes>> = EndpointClient::new(
            addr,
            ConnectSettings {
                protocol,
                ..ConnectSettings::plaintext()
            },
        );
        for _ in 0..4 {
            let client = client.clone();
            inflight.push(tokio::spawn(async move {
                let resp = client
                    .send(
                        Request::get("http://x/")
                            .body(Full::new(Bytes::new()))
                            .unwrap(),
                    )
                    .await?;
                let body = resp.into_body().collect().await?.to_bytes();
                Ok::<_, mesh_core::error::BoxError>(body)
            }));
        }
    }
    // Let every request reach the handler.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let report = server.shutdown().await;
    for request in inflight {
        assert_eq!(request.await.unwrap().unwrap(), "done");
    }
    assert_eq!(report.forced, 0);
    assert!(report.open_at_shutdown >= 2, "{report:?}");
    // No longer accepting.
    assert!(TcpStream::connect(addr).await.is_err());
}

#[tokio::test(start_paused = true)]
async fn shutdown_closes_what_outlives_its_timeout() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut limits = ServerLimits::default();
    limits.shutdown_timeout = Duration::from_secs(1);
    let server = MeshServer::builder()
        .plaintext()
        .limits(limits)
        .serve(listener, slow(Duration::from_secs(3600)))
        .unwrap();
    let client: EndpointClient<Full<Bytes>> =
        EndpointClient::new(server.local_addr(), ConnectSettings::plaintext());
    let request = tokio::spawn(async move {
        client
            .send(
                Request::get("http://x/")
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let report = server.shutdown().await;
    assert_eq!(report.forced, 1);
    assert!(
        request.await.unwrap().is_err(),
        "the hung request's connection was closed"
    );
}

/// Reads what the server sends until it closes the connection.
async fn read_to_close(tcp: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tcp.read_to_end(&mut out).await;
    out
}

#[tokio::test(start_paused = true)]
async fn slow_clients_are_cut_off_at_the_header_read_timeout() {
    let server = plaintext(None, ServerLimits::default()).await;
    // Silent from the start.
    let mut silent = TcpStream::connect(server.local_addr()).await.unwrap();
    let started = tokio::time::Instant::now();
    assert!(read_to_close(&mut silent).await.is_empty());
    assert!(started.elapsed() >= Duration::from_secs(10));
    assert!(
        started.elapsed() < Duration::from_secs(12),
        "{:?}",
        started.elapsed()
    );
    // Headers begun and never finished.
    let mut slowloris = TcpStream::connect(server.local_addr()).await.unwrap();
    slowloris
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nx-a: ")
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let answer = read_to_close(&mut slowloris).await;
    assert!(
        started.elapsed() < Duration::from_secs(12),
        "{:?}",
        started.elapsed()
    );
    assert!(
        answer.is_empty() || answer.starts_with(b"HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
}

#[tokio::test]
async fn oversized_headers_get_431() {
    let server = plaintext(None, ServerLimits::default()).await;
    let mut tcp = TcpStream::connect(server.local_addr()).await.unwrap();
    let big = "a".repeat(80 * 1024);
    let request = format!("GET / HTTP/1.1\r\nhost: x\r\nx-big: {big}\r\n\r\n");
    let _ = tcp.write_all(request.as_bytes()).await;
    let answer = read_to_close(&mut tcp).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 431"),
        "{}",
        String::from_utf8_lossy(&answer[..answer.len().min(200)])
    );
    // The server is unharmed.
    let client: EndpointClient<Full<Bytes>> =
        EndpointClient::new(server.local_addr(), ConnectSettings::plaintext());
    assert_eq!(send(&client, "/", false).await.0, StatusCode::OK);
}

#[tokio::test]
async fn request_smuggling_shapes_are_refused_or_defused() {
    let server = plaintext(None, ServerLimits::default()).await;
    for request in [
        // Two different lengths.
        "POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\ncontent-length: 5\r\n\r\nabcde",
        // A length that is not a number.
        "POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 4x\r\n\r\nabcd",
        // A malformed request line, a header without a colon.
        "GET  HTTP/1.1\r\nhost: x\r\n\r\n",
        "GET / HTTP/1.1\r\nhost: x\r\nbroken header\r\n\r\n",
        // A transfer coding other than a final chunked.
        "POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
    ] {
        let mut tcp = TcpStream::connect(server.local_addr()).await.unwrap();
        tcp.write_all(request.as_bytes()).await.unwrap();
        let answer = read_to_close(&mut tcp).await;
        assert!(
            answer.starts_with(b"HTTP/1.1 400"),
            "{request:?}: {}",
            String::from_utf8_lossy(&answer)
        );
    }
    // Both framings: processed by Transfer-Encoding alone, Content-Length dropped, and the
    // connection closed after the answer (RFC 9112 6.3), so nothing can be smuggled after
    // the chunked body.
    let mut tcp = TcpStream::connect(server.local_addr()).await.unwrap();
    tcp.write_all(
        b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 30\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n",
    )
    .await
    .unwrap();
    let answer = String::from_utf8_lossy(&read_to_close(&mut tcp).await).into_owned();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
    assert_eq!(
        answer.matches("HTTP/1.1").count(),
        1,
        "the smuggled request was not served: {answer}"
    );
}

#[tokio::test]
async fn plaintext_and_garbage_on_the_mtls_port_get_nothing() {
    let mut pki = Pki::new();
    let server = pki.server(DefaultAction::Allow).await;
    for junk in [
        &b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"[..],
        &[0x16, 0x03, 0x01, 0xff, 0xff, 0, 0][..],
    ] {
        let mut tcp = TcpStream::connect(server.local_addr()).await.unwrap();
        let _ = tcp.write_all(junk).await;
        let answer = read_to_close(&mut tcp).await;
        assert!(
            !answer.starts_with(b"HTTP"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
    }
    // And it still serves real clients.
    let web = pki.client(WEB, server.local_addr(), Protocol::Http2);
    assert_eq!(send(&web, "/users", false).await.0, StatusCode::OK);
}

/// What a test's log said (this thread's, at warn and above).
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Self;

    fn make_writer(&'a self) -> Self {
        self.clone()
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[tokio::test(start_paused = true)]
async fn connections_beyond_the_limit_wait() {
    let captured = Captured::default();
    let _log = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_writer(captured.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .finish(),
    );
    let mut limits = ServerLimits::default();
    limits.max_connections = 1;
    let server = plaintext(None, limits).await;
    let first: EndpointClient<Full<Bytes>> =
        EndpointClient::new(server.local_addr(), ConnectSettings::plaintext());
    assert_eq!(send(&first, "/", false).await.0, StatusCode::OK);
    // The first connection stays open (pooled): a second one is not served...
    let second: EndpointClient<Full<Bytes>> =
        EndpointClient::new(server.local_addr(), ConnectSettings::plaintext());
    let waiting = tokio::spawn(async move { send(&second, "/", false).await.0 });
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!waiting.is_finished());
    // The wait is said, not silent.
    let log = captured.text();
    assert!(
        log.contains("at its connection limit") && log.contains("max_connections=1"),
        "{log}"
    );
    // ...until the first closes.
    drop(first);
    assert_eq!(waiting.await.unwrap(), StatusCode::OK);
}

/// Reads until the peer closes; `None` when it is still open after a while (a bound
/// that only catches a failure: the close comes at once when it comes).
async fn closes(tcp: &mut TcpStream) -> Option<Vec<u8>> {
    tokio::time::timeout(Duration::from_secs(20), read_to_close(tcp))
        .await
        .ok()
}

/// Clients that connect and send nothing (or stall in their TLS handshake) cannot hold
/// every slot of a full listener: the oldest such newcomer is closed to accept the next
/// connection, well before the header-read timeout (here a minute) would have closed it.
/// Established connections (one request served, kept alive) are never closed for this.
#[tokio::test]
async fn a_full_listener_sheds_silent_newcomers_not_established_connections() {
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = mesh_tower::metrics::server::ServerMetrics::register(&mut registry);
    let mut limits = ServerLimits::default();
    limits.max_connections = 3;
    limits.header_read_timeout = Duration::from_secs(60);
    let server = MeshServer::builder()
        .plaintext()
        .limits(limits)
        .metrics(metrics.listener("in"))
        .serve(
            TcpListener::bind("127.0.0.1:0").await.unwrap(),
            tower::service_fn(echo_identity),
        )
        .unwrap();
    let addr = server.local_addr();
    // An established connection: one request answered, kept open.
    let mut established = TcpStream::connect(addr).await.unwrap();
    let request = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n";
    established.write_all(request).await.unwrap();
    assert!(
        read_response(&mut established)
            .await
            .starts_with("HTTP/1.1 200")
    );
    // Two silent newcomers fill the listener.
    let mut oldest = TcpStream::connect(addr).await.unwrap();
    let mut newer = TcpStream::connect(addr).await.unwrap();
    // The next client is served: the oldest newcomer made room.
    let mut third = TcpStream::connect(addr).await.unwrap();
    third.write_all(request).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(20), read_response(&mut third))
        .await
        .expect("a full listener shed no newcomer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(closes(&mut oldest).await, Some(Vec::new()));
    // Another: the newer silent one goes now, not the two established ones.
    let mut fourth = TcpStream::connect(addr).await.unwrap();
    fourth.write_all(request).await.unwrap();
    assert!(read_response(&mut fourth).await.starts_with("HTTP/1.1 200"));
    assert_eq!(closes(&mut newer).await, Some(Vec::new()));
    for tcp in [&mut established, &mut third] {
        tcp.write_all(request).await.unwrap();
        assert!(read_response(tcp).await.starts_with("HTTP/1.1 200"));
    }
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains("mesh_server_connections_closed_total{listener=\"in\",reason=\"shed\"} 2\n"),
        "{text}"
    );
    // Full of established connections, a newcomer waits (and nothing is shed).
    let mut fifth = TcpStream::connect(addr).await.unwrap();
    fifth.write_all(request).await.unwrap();
    let mut buf = [0u8; 64];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), fifth.read(&mut buf))
            .await
            .is_err()
    );
    drop(fourth);
    assert!(read_response(&mut fifth).await.starts_with("HTTP/1.1 200"));
}

/// On an mTLS port a newcomer is a connection whose handshake has not verified a client
/// certificate: stalled handshakes are shed for a real peer, who is then never shed
/// though it sends no request (its certificate vouches for it).
#[tokio::test]
async fn stalled_handshakes_are_shed_for_real_peers() {
    let mut pki = Pki::new();
    let acceptor = MtlsAcceptor::new(
        &pki.mtls(SERVER_ID),
        Authorizer::trust_domain(pki.ca.trust_domain().clone()),
    )
    .unwrap();
    let mut limits = ServerLimits::default();
    limits.max_connections = 2;
    let server = MeshServer::builder()
        .mtls(acceptor)
        .limits(limits)
        .serve(
            TcpListener::bind("127.0.0.1:0").await.unwrap(),
            tower::service_fn(echo_identity),
        )
        .unwrap();
    let addr = server.local_addr();
    // One stalls before its ClientHello, the other halfway through one.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let mut partial = TcpStream::connect(addr).await.unwrap();
    partial
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .unwrap();
    // Two real peers, each on a connection of its own: both shed a stalled one.
    let web = pki.client(WEB, addr, Protocol::Http2);
    let batch = pki.client(BATCH, addr, Protocol::Http2);
    for client in [&web, &batch] {
        let (status, _, _) =
            tokio::time::timeout(Duration::from_secs(20), send(client, "/", false))
                .await
                .expect("the stalled handshakes held the listener");
        assert_eq!(status, StatusCode::OK);
    }
    assert!(closes(&mut silent).await.is_some());
    assert!(closes(&mut partial).await.is_some());
    // Full of verified peers (idle, but vouched for): a third waits.
    let mut third = TcpStream::connect(addr).await.unwrap();
    third.write_all(&[0x16]).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), read_to_close(&mut third))
            .await
            .is_err()
    );
    assert_eq!(send(&web, "/", false).await.0, StatusCode::OK);
}

/// A connection whose client certificate expires is shut down then (as at the idle
/// timeout, gracefully): the identity its handshake verified is vouched for no longer,
/// and the client's next request reconnects with its current SVID.
#[tokio::test(start_paused = true)]
async fn connections_end_when_the_client_certificate_expires() {
    let mut pki = Pki::new();
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = mesh_tower::metrics::server::ServerMetrics::register(&mut registry);
    let acceptor = MtlsAcceptor::new(
        &pki.mtls(SERVER_ID),
        Authorizer::trust_domain(pki.ca.trust_domain().clone()),
    )
    .unwrap();
    let builder = MeshServer::builder()
        .mtls(acceptor)
        .metrics(metrics.listener("in"));
    let (server, dialer, _) = piped(builder, tower::service_fn(echo_identity));
    // A client SVID with 60 s left (by the wall clock; the server counts it on its own).
    let client = pki.expiring_client(WEB, server.local_addr(), Duration::from_secs(60), dialer);
    assert_eq!(send(&client, "/", false).await.0, StatusCode::OK);
    let closed = |registry: &prometheus_client::registry::Registry| {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
        text.contains(
            "mesh_server_connections_closed_total{listener=\"in\",reason=\"peer_certificate_expired\"} 1\n",
        )
    };
    // Kept alive by traffic until then...
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(send(&client, "/", false).await.0, StatusCode::OK);
    }
    assert!(!closed(&registry));
    // ...and shut down once it expired, busy or not.
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(closed(&registry));
    assert_eq!(server.shutdown().await.open_at_shutdown, 0);
}

/// A stream that would outlive an expired client certificate (a watch that never ends)
/// does not keep the connection: it closes after the shutdown timeout.
#[tokio::test(start_paused = true)]
async fn streams_outliving_an_expired_client_certificate_end_after_the_shutdown_timeout() {
    let mut pki = Pki::new();
    let acceptor = MtlsAcceptor::new(
        &pki.mtls(SERVER_ID),
        Authorizer::trust_domain(pki.ca.trust_domain().clone()),
    )
    .unwrap();
    let mut limits = ServerLimits::default();
    limits.shutdown_timeout = Duration::from_secs(10);
    // A watch: its response body never ends.
    let app = tower::service_fn(|_req: Request<Incoming>| async {
        let never =
            futures_util::stream::pending::<Result<hyper::body::Frame<Bytes>, Infallible>>();
        Ok::<_, Infallible>(Response::new(http_body_util::StreamBody::new(never)))
    });
    let (server, dialer, _) = piped(MeshServer::builder().mtls(acceptor).limits(limits), app);
    let client = pki.expiring_client(WEB, server.local_addr(), Duration::from_secs(60), dialer);
    let resp = client
        .send(
            Request::get("http://users/watch")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    // Past the expiry and the shutdown timeout (and the check's step), the watch ends.
    let end = tokio::time::timeout(Duration::from_secs(120), body.frame())
        .await
        .expect("the watch outlived its client's certificate");
    assert!(!matches!(end, Some(Ok(_))), "{end:?}");
}

/// A client takes no new request onto a connection whose server certificate expired: the
/// next request dials a connection of its own, verified against the current credentials.
/// (In-memory pipes: paused time would race real sockets' handshakes.)
#[tokio::test(start_paused = true)]
async fn clients_leave_connections_whose_server_certificate_expired() {
    let mut pki = Pki::new();
    let now = std::time::SystemTime::now();
    let svid = pki
        .ca
        .leaf()
        .uri(SERVER_ID)
        .validity(
            now - Duration::from_secs(3600),
            now + Duration::from_secs(60),
        )
        .build()
        .unwrap();
    let server_mtls = Mtls::new(CredentialStore::with(svid, pki.ca.bundle_set().unwrap()));
    let acceptor = MtlsAcceptor::new(
        &server_mtls,
        Authorizer::trust_domain(pki.ca.trust_domain().clone()),
    )
    .unwrap();
    let (server, dialer, dials) = piped(
        MeshServer::builder().mtls(acceptor),
        tower::service_fn(echo_identity),
    );
    let addr = server.local_addr();
    let connector = MtlsConnector::new(&pki.mtls(WEB), SpiffeId::new(SERVER_ID).unwrap()).unwrap();
    let client: EndpointClient<Full<Bytes>> = EndpointClient::new(
        addr,
        ConnectSettings {
            protocol: Protocol::Http2,
            dialer: Some(dialer),
            ..ConnectSettings::mtls(connector)
        },
    );
    let dialled = || dials.load(std::sync::atomic::Ordering::SeqCst);
    // One connection until the expiry (60 s, and the second verification still allows),
    // a second one after it.
    for second in (0..=80).step_by(10) {
        assert_eq!(send(&client, "/", false).await.0, StatusCode::OK);
        let want = if second <= 60 { 1 } else { 2 };
        assert_eq!(dialled(), want, "at {second} s");
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn idle_connections_are_closed_at_the_idle_timeout() {
    let mut limits = ServerLimits::default();
    limits.idle_timeout = Duration::from_secs(30);
    let server = plaintext(None, limits).await;
    let mut tcp = TcpStream::connect(server.local_addr()).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = tcp.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let started = tokio::time::Instant::now();
    let rest = read_to_close(&mut tcp).await;
    assert!(rest.is_empty());
    let idle = started.elapsed();
    // The header-read timeout (10 s) bounds a head from its first byte, not the silence
    // between keep-alive requests. Activity is looked for every eighth of the idle
    // timeout (3.75 s here).
    assert!(
        idle >= Duration::from_secs(30) && idle < Duration::from_millis(33_800),
        "{idle:?}"
    );
}

/// A server whose one client (over mTLS when `tls`) asked for a response too long for the
/// sockets' buffers and stopped reading after its head (idle timeout 30 s). The second
/// value keeps the client's connection open.
async fn stalled_reader(tls: bool) -> (Server, Box<dyn Send>) {
    let mut limits = ServerLimits::default();
    limits.idle_timeout = Duration::from_secs(30);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let big = Bytes::from(vec![b'x'; 64 << 20]);
    let app = tower::service_fn(move |_req: Request<Incoming>| {
        let big = big.clone();
        async move { Ok::<_, Infallible>(Response::new(Full::new(big))) }
    });
    let mut pki = Pki::new();
    let builder = MeshServer::builder().limits(limits);
    let builder = if tls {
        let acceptor = MtlsAcceptor::new(
            &pki.mtls(SERVER_ID),
            Authorizer::trust_domain(pki.ca.trust_domain().clone()),
        )
        .unwrap();
        builder.mtls(acceptor)
    } else {
        builder.plaintext()
    };
    let server = builder.serve(listener, app).unwrap();
    let tcp = TcpStream::connect(server.local_addr()).await.unwrap();
    let request = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n";
    let mut buf = [0u8; 1024];
    if tls {
        let connector =
            MtlsConnector::new(&pki.mtls(WEB), SpiffeId::new(SERVER_ID).unwrap()).unwrap();
        let (mut stream, _) = connector.handshake(server.local_addr(), tcp).await.unwrap();
        stream.write_all(request).await.unwrap();
        let n = stream.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        (server, Box::new(stream))
    } else {
        let mut tcp = tcp;
        tcp.write_all(request).await.unwrap();
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        (server, Box::new(tcp))
    }
}

/// A client that stops reading a long response, in plaintext and over mTLS (where the
/// TLS stream meets the full socket when flushing): a write waits on the client; with no
/// progress for the idle timeout, the connection is closed. Before, the idle check took it
/// for idle and shut it down gracefully, which the stalled write never let finish, and
/// the closing connection was bounded only after another idle timeout.
///
/// Time is paused once the client has its response's head (a TLS handshake on a paused
/// clock would meet its own timeout as the clock jumps).
#[tokio::test]
async fn a_client_that_stops_reading_is_closed_after_the_idle_timeout() {
    for (tls, wait, open) in [
        // Still open within the idle timeout.
        (false, 25, 1),
        (true, 25, 1),
        // Closed once it made no progress for the idle timeout (30 s, looked at every
        // 3.75 s, from the first look that saw no progress).
        (false, 40, 0),
        (true, 40, 0),
    ] {
        let (server, _client) = stalled_reader(tls).await;
        tokio::time::pause();
        tokio::time::sleep(Duration::from_secs(wait)).await;
        assert_eq!(
            server.shutdown().await.open_at_shutdown,
            open,
            "tls: {tls}, after {wait} s"
        );
        tokio::time::resume();
    }
}

/// A plaintext server of `app` with `limits`, on a loopback port.
async fn serve_plain<S, B>(limits: ServerLimits, app: S) -> Server
where
    S: tower::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    MeshServer::builder()
        .plaintext()
        .limits(limits)
        .serve(listener, app)
        .unwrap()
}

/// A server whose responses are streamed: a frame after each of `pauses` (in seconds),
/// with an idle timeout of 30 s.
async fn streaming_server(pauses: &'static [u64]) -> Server {
    let mut limits = ServerLimits::default();
    limits.idle_timeout = Duration::from_secs(30);
    let app = tower::service_fn(move |_req: Request<Incoming>| async move {
        let frames =
            futures_util::StreamExt::then(futures_util::stream::iter(pauses), |pause| async move {
                tokio::time::sleep(Duration::from_secs(*pause)).await;
                Ok::<_, Infallible>(http_body::Frame::data(Bytes::from_static(b"tick;")))
            });
        Ok::<_, Infallible>(Response::new(http_body_util::StreamBody::new(frames)))
    });
    serve_plain(limits, app).await
}

/// One client connection of either HTTP version.
enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Sender {
    async fn send(&mut self, req: Request<Full<Bytes>>) -> hyper::Result<Response<Incoming>> {
        match self {
            Sender::H1(sender) => {
                sender.ready().await?;
                sender.send_request(req).await
            }
            Sender::H2(sender) => {
                sender.ready().await?;
                sender.send_request(req).await
            }
        }
    }
}

/// A streamed response is in flight until its last frame: its connection is not idle
/// meanwhile, whether frames come every 20 s or after 200 s of silence (idle timeout
/// 30 s), and serves the next request afterwards. Before, the connection was taken for
/// idle once the head was out: HTTP/1.1 closed after the response, and HTTP/2 sent
/// `GOAWAY` mid-stream, so the next request needed a new connection.
#[tokio::test(start_paused = true)]
async fn a_streamed_response_keeps_its_connection_busy_until_it_ends() {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    const PACED: &[u64] = &[0, 20, 20, 20, 20, 20];
    const QUIET: &[u64] = &[0, 200];
    for (pauses, http2) in [(PACED, false), (PACED, true), (QUIET, false), (QUIET, true)] {
        let server = streaming_server(pauses).await;
        let tcp = TokioIo::new(TcpStream::connect(server.local_addr()).await.unwrap());
        let mut sender = if http2 {
            let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), tcp)
                .await
                .unwrap();
            tokio::spawn(conn);
            Sender::H2(sender)
        } else {
            let (sender, conn) = hyper::client::conn::http1::handshake(tcp).await.unwrap();
            tokio::spawn(conn);
            Sender::H1(sender)
        };
        let request = || {
            Request::get(format!("http://{}/", server.local_addr()))
                .body(Full::default())
                .unwrap()
        };
        let started = tokio::time::Instant::now();
        let body = sender
            .send(request())
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let ticks = body.to_bytes().len() / b"tick;".len();
        let case = format!("pauses {pauses:?}, HTTP/2: {http2}");
        assert_eq!(ticks, pauses.len(), "{case}");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(pauses.iter().sum()),
            "{case}: {took:?}"
        );
        // The same connection serves again.
        let again = sender.send(request()).await;
        assert_eq!(again.map(|r| r.status()).unwrap(), StatusCode::OK, "{case}");
        drop(sender);
        server.shutdown().await;
    }
}

/// An HTTP/2 client of `addr` that grants the server these flow-control windows (and
/// opens them only as its caller reads), its connection driven in a task.
async fn h2_client(
    addr: SocketAddr,
    stream_window: u32,
    connection_window: u32,
) -> (
    hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    tokio::task::JoinHandle<hyper::Result<()>>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let tcp = TokioIo::new(TcpStream::connect(addr).await.unwrap());
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(stream_window)
        .initial_connection_window_size(connection_window)
        .handshake(tcp)
        .await
        .unwrap();
    (sender, tokio::spawn(conn))
}

/// An HTTP/2 client that takes a response's head and never opens its window for the body
/// (while it answers the server's pings, which move bytes every 20 s) holds the
/// connection only for the idle timeout:
/// - a large body has a piece taken and is not asked for the next: closed by 40 s;
/// - a small one is handed whole to h2 and ends, so the connection idles out into a
///   graceful shutdown (about 34 s), and with nothing of the application's left and no
///   progress, it is closed an idle timeout later.
///
/// Before, the connection idled out into a graceful shutdown that the stream never let
/// finish.
#[tokio::test(start_paused = true)]
async fn an_http2_client_that_opens_no_window_is_closed_after_the_idle_timeout() {
    for (size, wait, open) in [
        (1 << 20, 25, 1),
        (1 << 20, 40, 0),
        (32 << 10, 60, 1),
        (32 << 10, 80, 0),
    ] {
        let mut limits = ServerLimits::default();
        limits.idle_timeout = Duration::from_secs(30);
        let app = tower::service_fn(move |_req: Request<Incoming>| async move {
            let big = Bytes::from(vec![b'x'; size]);
            Ok::<_, Infallible>(Response::new(Full::new(big)))
        });
        let server = serve_plain(limits, app).await;
        let (mut sender, conn) = h2_client(server.local_addr(), 1024, 1024).await;
        let request = Request::get(format!("http://{}/", server.local_addr()))
            .body(Full::<Bytes>::default())
            .unwrap();
        // The head, and a body never read: the window stays closed.
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        tokio::time::sleep(Duration::from_secs(wait)).await;
        let case = format!("{size} bytes, after {wait} s");
        assert_eq!(conn.is_finished(), open == 0, "{case}");
        assert_eq!(server.shutdown().await.open_at_shutdown, open, "{case}");
        drop(response);
    }
}

/// A client reading a long response slowly but steadily (1 MiB every 5 s, idle timeout
/// 60 s) gets it whole, over 160 s, although hyper, writing one 32 MiB frame out, asks
/// the body for nothing meanwhile: bytes moving are progress. (Slower readers show their
/// progress later: the kernel's buffers, several MB on loopback, let a write through only
/// once they have drained enough.)
#[tokio::test(start_paused = true)]
async fn a_slow_steady_reader_gets_its_response_whole() {
    let mut limits = ServerLimits::default();
    limits.idle_timeout = Duration::from_secs(60);
    let app = tower::service_fn(|_req: Request<Incoming>| async {
        let frames = [
            Bytes::from(vec![b'x'; 32 << 20]),
            Bytes::from_static(b"end"),
        ]
        .map(|data| Ok::<_, Infallible>(http_body::Frame::data(data)));
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
        Ok::<_, Infallible>(Response::new(body))
    });
    let server = serve_plain(limits, app).await;
    let mut tcp = TcpStream::connect(server.local_addr()).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let mut buf = vec![0u8; 1 << 20];
    let mut got: Vec<u8> = Vec::new();
    while !got.ends_with(b"end\r\n0\r\n\r\n") {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let mut read = 0;
        while read < buf.len() && !buf[..read].ends_with(b"0\r\n\r\n") {
            let n = tcp.read(&mut buf[read..]).await.unwrap();
            assert!(n > 0, "closed after {} bytes", got.len() + read);
            read += n;
        }
        got.extend_from_slice(&buf[..read]);
    }
    assert!(got.len() > 32 << 20);
    assert!(
        started.elapsed() >= Duration::from_secs(160),
        "{:?}",
        started.elapsed()
    );
    server.shutdown().await;
}

/// A response body handed to HTTP/2 in pieces (see the stall check) arrives whole, in
/// order, with its length declared and its trailers after its data.
#[tokio::test]
async fn large_http2_bodies_arrive_whole_with_their_length_and_trailers() {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let data = Bytes::from((0..300_001u32).map(|i| (i % 251) as u8).collect::<Vec<_>>());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sent = data.clone();
    let app = tower::service_fn(move |req: Request<Incoming>| {
        let sent = sent.clone();
        async move {
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
            let frames = [
                http_body::Frame::data(sent.clone()),
                http_body::Frame::data(sent),
                http_body::Frame::trailers(trailers),
            ];
            let body = if req.uri().path() == "/trailers" {
                http_body_util::StreamBody::new(futures_util::stream::iter(
                    frames.into_iter().map(Ok::<_, Infallible>),
                ))
                .boxed()
            } else {
                Full::new(frames[0].data_ref().unwrap().clone())
                    .map_err(|e| match e {})
                    .boxed()
            };
            Ok::<_, Infallible>(Response::new(body))
        }
    });
    let server = MeshServer::builder()
        .plaintext()
        .serve(listener, app)
        .unwrap();
    let tcp = TokioIo::new(TcpStream::connect(server.local_addr()).await.unwrap());
    let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), tcp)
        .await
        .unwrap();
    tokio::spawn(conn);
    let get = |path: &str| {
        Request::get(format!("http://{}{path}", server.local_addr()))
            .body(Full::<Bytes>::default())
            .unwrap()
    };
    let response = sender.send_request(get("/")).await.unwrap();
    assert_eq!(response.headers()["content-length"], "300001");
    let got = response.collect().await.unwrap().to_bytes();
    assert!(got == data, "{} bytes", got.len());

    let response = sender.send_request(get("/trailers")).await.unwrap();
    let got = response.collect().await.unwrap();
    assert_eq!(got.trailers().unwrap()["grpc-status"], "0");
    let got = got.to_bytes();
    assert_eq!(got.len(), 2 * data.len());
    assert!(got[..data.len()] == data && got[data.len()..] == data);
}

/// Reads one response of `Content-Length` framing from a keep-alive connection.
async fn read_response(tcp: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed after {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text[..end]
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .unwrap_or(0);
            if got.len() >= end + 4 + length {
                return text;
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_keep_alive_connection_quiet_past_the_header_read_timeout_still_serves() {
    let server = plaintext(None, ServerLimits::default()).await;
    let mut tcp = TcpStream::connect(server.local_addr()).await.unwrap();
    for quiet in [0, 25, 60] {
        tokio::time::sleep(Duration::from_secs(quiet)).await;
        tcp.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let answer = read_response(&mut tcp).await;
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "after {quiet}s: {answer}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_later_head_is_bounded_from_its_first_byte() {
    let server = plaintext(None, ServerLimits::default()).await;
    let mut tcp = TcpStream::connect(server.local_addr()).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(read_response(&mut tcp).await.starts_with("HTTP/1.1 200"));
    // Quiet for longer than the header-read timeout: still open.
    tokio::time::sleep(Duration::from_secs(15)).await;
    // Then a head trickles in, a byte a second, never finished.
    let started = tokio::time::Instant::now();
    let trickle = b"GET / HTTP/1.1\r\nhost: x\r\nx-slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut closed = None;
    for byte in trickle {
        if tcp.write_all(&[*byte]).await.is_err() {
            closed = Some(started.elapsed());
            break;
        }
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_secs(1), tcp.read(&mut buf)).await {
            Err(_) => {}
            Ok(Ok(n)) => {
                // A 408, or the close itself.
                assert!(
                    n == 0 || buf[..n].starts_with(b"HTTP/1.1 408"),
                    "{}",
                    String::from_utf8_lossy(&buf[..n])
                );
                closed = Some(started.elapsed());
                break;
            }
            Ok(Err(_)) => {
                closed = Some(started.elapsed());
                break;
            }
        }
    }
    let closed = closed.expect("the trickling head was never cut off");
    assert!(
        closed >= Duration::from_secs(10) && closed < Duration::from_secs(12),
        "{closed:?}"
    );
}

mod rate_limits {
    use super::*;
    use mesh_core::Endpoint;
    use mesh_core::config::{Rate, RateLimitConfig};
    use mesh_core::discover::StaticDiscovery;
    use mesh_tower::MeshClient;
    use mesh_tower::ratelimit::Limits;

    fn per_client(requests: u32, per: Duration) -> Limits {
        Limits::new(&RateLimitConfig {
            per_client: Some(Rate {
                requests,
                per,
                burst: Some(1),
            }),
            ..RateLimitConfig::default()
        })
    }

    /// A server that counts the requests reaching its application.
    async fn limited_server(
        pki: &mut Pki,
        limits: Option<Limits>,
    ) -> (Server, std::sync::Arc<std::sync::atomic::AtomicU64>) {
        let acceptor = MtlsAcceptor::new(
            &pki.mtls(SERVER_ID),
            Authorizer::trust_domain(pki.ca.trust_domain().clone()),
        )
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut builder = MeshServer::builder().mtls(acceptor);
        if let Some(limits) = limits {
            builder = builder.rate_limit(limits);
        }
        let served = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let count = served.clone();
        let app = tower::service_fn(move |req: Request<Incoming>| {
            count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            echo_identity(req)
        });
        (builder.serve(listener, app).unwrap(), served)
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_carry_retry_after_and_ratelimit_fields_and_the_wait_is_enough() {
        let mut pki = Pki::new();
        let (server, _) =
            limited_server(&mut pki, Some(per_client(1, Duration::from_secs(3)))).await;
        let web = pki.client(WEB, server.local_addr(), Protocol::Http2);
        assert_eq!(send(&web, "/", false).await.0, StatusCode::OK);
        let (status, headers, body) = send(&web, "/", false).await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::TOO_MANY_REQUESTS, "rate limited\n")
        );
        assert_eq!(headers["retry-after"], "3");
        assert_eq!(headers["ratelimit-policy"], "\"client\";q=1;w=3");
        assert_eq!(headers["ratelimit"], "\"client\";r=0;t=3");
        // Another client has its own budget.
        let batch = pki.client(BATCH, server.local_addr(), Protocol::Http2);
        assert_eq!(send(&batch, "/", false).await.0, StatusCode::OK);
        // gRPC: trailers-only RESOURCE_EXHAUSTED with pushback.
        let (status, headers, body) = send(&web, "/users.v1.Users/GetUser", true).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["grpc-status"], "8");
        let pushback: u64 = headers["grpc-retry-pushback-ms"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((2_900..=3_000).contains(&pushback), "{pushback}");
        assert!(body.is_empty());
        // Waiting as told is enough.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(send(&web, "/", false).await.0, StatusCode::OK);
    }

    #[tokio::test(start_paused = true)]
    async fn the_mesh_client_steers_away_from_a_server_whose_limiter_refuses_it() {
        let mut pki = Pki::new();
        let (limited, by_limited) =
            limited_server(&mut pki, Some(per_client(2, Duration::from_secs(1)))).await;
        let (open, by_open) = limited_server(&mut pki, None).await;
        let client = MeshClient::builder(Box::pin(StaticDiscovery::new([
            Endpoint::new(limited.local_addr()),
            Endpoint::new(open.local_addr()),
        ])))
        .mtls(pki.mtls(WEB))
        .server_identity(SERVER_ID.parse().unwrap())
        .build()
        .unwrap();
        let mut refused = 0;
        for _ in 0..200 {
            let resp = client
                .send(
                    Request::get("http://users/")
                        .body(Full::new(Bytes::new()))
                        .unwrap(),
                )
                .await
                .unwrap();
            if resp.status() == StatusCode::TOO_MANY_REQUESTS {
                refused += 1;
            }
            resp.into_body().collect().await.unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (limited_n, open_n) = (
            by_limited.load(std::sync::atomic::Ordering::Relaxed),
            by_open.load(std::sync::atomic::Ordering::Relaxed),
        );
        assert_eq!(refused, 0, "every 429 was retried on the open server");
        // Over 2 s the limited server admits at most ~5; the penalty keeps the client away.
        assert!(
            limited_n <= 6 && open_n >= 194,
            "limited {limited_n}, open {open_n}"
        );
    }
}

mod inbound_metrics {
    use super::*;
    use http_body_util::StreamBody;
    use hyper::body::Frame;
    use mesh_core::config::{Rate, RateLimitConfig};
    use mesh_tower::metrics::server::ServerMetrics;
    use mesh_tower::ratelimit::Limits;
    use prometheus_client::registry::Registry;

    type Frames = StreamBody<
        futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>,
    >;

    /// HTTP answers 200 with 5 bytes; a gRPC call answers a message and `grpc-status: 5`
    /// in its trailers.
    async fn app(req: Request<Incoming>) -> Result<Response<Frames>, Infallible> {
        let grpc = req.uri().path().starts_with("/users.v1.Users/");
        let mut frames = vec![Ok(Frame::data(Bytes::from_static(b"hello")))];
        if grpc {
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static("5"));
            frames.push(Ok(Frame::trailers(trailers)));
        }
        let mut resp = Response::new(StreamBody::new(futures_util::stream::iter(frames)));
        if grpc {
            resp.headers_mut().insert(
                "content-type",
                http::HeaderValue::from_static("application/grpc"),
            );
        }
        Ok(resp)
    }

    fn line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(prefix))
    }

    /// `mesh_server_connections` counts each connection from its accept to its end.
    #[tokio::test]
    async fn open_connections_are_a_gauge() {
        let mut registry = Registry::default();
        let metrics = ServerMetrics::register(&mut registry).listener("in");
        let server = MeshServer::builder()
            .plaintext()
            .metrics(metrics)
            .serve(
                TcpListener::bind("127.0.0.1:0").await.unwrap(),
                tower::service_fn(app),
            )
            .unwrap();
        let gauge = |registry: &Registry| {
            let mut text = String::new();
            prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
            line(&text, "mesh_server_connections{listener=\"in\"} ")
                .map(str::to_owned)
                .unwrap_or_default()
        };
        let mut tcps = Vec::new();
        for _ in 0..2 {
            let mut tcp = TcpStream::connect(server.local_addr()).await.unwrap();
            tcp.write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
                .await
                .unwrap();
            let response = read_response(&mut tcp).await;
            assert!(response.starts_with("HTTP/1.1 200"), "{response}");
            tcps.push(tcp);
        }
        assert_eq!(
            gauge(&registry),
            "mesh_server_connections{listener=\"in\"} 2"
        );
        drop(tcps);
        let mut now = String::new();
        for _ in 0..100 {
            now = gauge(&registry);
            if now.ends_with(" 0") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(now, "mesh_server_connections{listener=\"in\"} 0");
        server.shutdown().await;
    }

    #[tokio::test]
    async fn requests_decisions_refusals_and_handshake_failures_are_counted() {
        let mut pki = Pki::new();
        let mut registry = Registry::default();
        let metrics = ServerMetrics::register(&mut registry).listener("inbound");
        let acceptor = MtlsAcceptor::new(
            &pki.mtls(SERVER_ID),
            Authorizer::trust_domain(pki.ca.trust_domain().clone()),
        )
        .unwrap();
        let policy = Policy::new(
            "users",
            &AuthorizationPolicy {
                default: DefaultAction::Deny,
                rules: vec![
                    rule("web", &[WEB], vec![]),
                    rule("batch-users", &[BATCH], vec![prefix("/users")]),
                ],
            },
        )
        .unwrap();
        let limits = Limits::new(&RateLimitConfig {
            per_client: Some(Rate {
                requests: 3,
                per: Duration::from_secs(60),
                burst: None,
            }),
            ..RateLimitConfig::default()
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = MeshServer::builder()
            .mtls(acceptor)
            .authorization(policy)
            .rate_limit(limits)
            .metrics(metrics)
            .serve(listener, tower::service_fn(app))
            .unwrap();
        let web = pki.client(WEB, server.local_addr(), Protocol::Http2);
        let batch = pki.client(BATCH, server.local_addr(), Protocol::Http2);
        assert_eq!(send(&web, "/a", false).await.0, StatusCode::OK);
        assert_eq!(
            send(&web, "/users.v1.Users/GetUser", true).await.0,
            StatusCode::OK
        );
        assert_eq!(send(&web, "/b", false).await.0, StatusCode::OK);
        assert_eq!(
            send(&web, "/c", false).await.0,
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(
            send(&batch, "/billing", false).await.0,
            StatusCode::FORBIDDEN
        );
        assert_eq!(send(&batch, "/users", false).await.0, StatusCode::OK);
        // Plaintext on the mTLS port.
        let mut tcp = TcpStream::connect(server.local_addr()).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let _ = tcp.read_to_end(&mut Vec::new()).await;
        server.shutdown().await;

        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let http = r#"http_server_request_duration_seconds_count{listener="inbound",http_request_method="POST",http_response_status_code="#;
        assert!(
            line(
                &text,
                &format!("{http}\"200\",network_protocol_version=\"2\"}} 3")
            )
            .is_some(),
            "{text}"
        );
        assert!(
            line(
                &text,
                &format!("{http}\"429\",network_protocol_version=\"2\"}} 1")
            )
            .is_some(),
            "{text}"
        );
        assert!(
            line(
                &text,
                &format!("{http}\"403\",network_protocol_version=\"2\"}} 1")
            )
            .is_some(),
            "{text}"
        );
        assert!(
            line(&text, r#"rpc_server_duration_seconds_count{listener="inbound",rpc_system="grpc",rpc_service="users.v1.Users",rpc_method="GetUser",rpc_grpc_status_code="5"} 1"#).is_some(),
            "{text}"
        );
        for (rule, outcome, n) in [
            ("web", "allow", 4),
            ("batch-users", "allow", 1),
            ("default", "deny", 1),
        ] {
            let want = format!(
                r#"mesh_server_authz_total{{listener="inbound",policy="users",rule="{rule}",outcome="{outcome}"}} {n}"#
            );
            assert!(line(&text, &want).is_some(), "{want}\n{text}");
        }
        assert!(
            line(
                &text,
                r#"mesh_server_rate_limited_total{listener="inbound",limit="client"} 1"#
            )
            .is_some(),
            "{text}"
        );
        assert!(
            line(
                &text,
                r#"mesh_server_tls_handshake_failures_total{listener="inbound",reason="#
            )
            .is_some(),
            "{text}"
        );
        // Response bodies of 5 bytes, counted whole.
        assert!(text.contains(r#"http_server_response_body_size_bytes_sum{listener="inbound",http_request_method="POST"}"#), "{text}");
    }

    /// `/pkg.Svc/*` answers a message and `grpc-status` from the `status` header of the
    /// request in its trailers, or the HTTP status of its `http-status` header with
    /// neither; `/svc*` answers trailers-only UNIMPLEMENTED; anything else is 404.
    async fn grpc_app(req: Request<Incoming>) -> Result<Response<Frames>, Infallible> {
        let path = req.uri().path();
        let http_status = req
            .headers()
            .get("http-status")
            .and_then(|s| StatusCode::from_bytes(s.as_bytes()).ok());
        let mut resp = if let Some(status) = http_status {
            let mut resp = Response::new(StreamBody::new(futures_util::stream::iter(vec![])));
            *resp.status_mut() = status;
            resp
        } else if path.starts_with("/pkg.Svc/") {
            let mut trailers = http::HeaderMap::new();
            let status = req.headers().get("status").cloned();
            trailers.insert(
                "grpc-status",
                status.unwrap_or(http::HeaderValue::from_static("0")),
            );
            Response::new(StreamBody::new(futures_util::stream::iter(vec![
                Ok(Frame::data(Bytes::from_static(b"hello"))),
                Ok(Frame::trailers(trailers)),
            ])))
        } else {
            let mut resp = Response::new(StreamBody::new(futures_util::stream::iter(vec![])));
            if path.starts_with("/svc") {
                resp.headers_mut()
                    .insert("grpc-status", http::HeaderValue::from_static("12"));
            } else {
                *resp.status_mut() = StatusCode::NOT_FOUND;
            }
            resp
        };
        resp.headers_mut().insert(
            "content-type",
            http::HeaderValue::from_static("application/grpc"),
        );
        Ok(resp)
    }

    async fn grpc_server(registry: &mut Registry) -> (Server, EndpointClient<Full<Bytes>>) {
        let metrics = ServerMetrics::register(registry).listener("edge");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = MeshServer::builder()
            .plaintext()
            .metrics(metrics)
            .serve(listener, tower::service_fn(grpc_app))
            .unwrap();
        let client = EndpointClient::new(
            server.local_addr(),
            ConnectSettings {
                protocol: Protocol::Http2,
                ..ConnectSettings::plaintext()
            },
        );
        (server, client)
    }

    async fn call(client: &EndpointClient<Full<Bytes>>, path: &str, status: Option<&str>) {
        call_with(client, path, status, None).await;
    }

    /// [`call`], asking for an answer with HTTP status `http_status` and no `grpc-status`.
    async fn call_with(
        client: &EndpointClient<Full<Bytes>>,
        path: &str,
        status: Option<&str>,
        http_status: Option<u16>,
    ) {
        let mut req =
            Request::post(format!("http://users{path}")).header("content-type", "application/grpc");
        if let Some(status) = status {
            req = req.header("status", status);
        }
        if let Some(http_status) = http_status {
            req = req.header("http-status", http_status);
        }
        let resp = client
            .send(req.body(Full::new(Bytes::new())).unwrap())
            .await
            .unwrap();
        resp.into_body().collect().await.unwrap();
    }

    #[tokio::test]
    async fn grpc_paths_become_labels_only_once_an_answer_shows_the_method() {
        let mut registry = Registry::default();
        let (server, client) = grpc_server(&mut registry).await;
        // Long paths answered 404 (UNIMPLEMENTED to a gRPC client), and short ones
        // answered UNIMPLEMENTED: none is named, and none takes a place of the 1,000.
        let long = "a".repeat(2000);
        for i in 0..1000 {
            call(&client, &format!("/{long}{i}/m"), None).await;
            call(&client, &format!("/svc{i}/m"), None).await;
        }
        call(&client, "/pkg.Svc/Get", Some("0")).await;
        server.shutdown().await;

        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.len() < 100_000, "{} bytes", text.len());
        assert!(!text.contains(&"a".repeat(200)));
        assert!(!text.contains(r#"rpc_service="svc"#), "{text}");
        let other = r#"rpc_server_duration_seconds_count{listener="edge",rpc_system="grpc",rpc_service="_OTHER",rpc_method="_OTHER",rpc_grpc_status_code="#;
        assert!(
            line(&text, &format!("{other}\"12\"}} 2000")).is_some(),
            "{text}"
        );
        assert!(
            line(&text, r#"rpc_server_duration_seconds_count{listener="edge",rpc_system="grpc",rpc_service="pkg.Svc",rpc_method="Get",rpc_grpc_status_code="0"} 1"#).is_some(),
            "{text}"
        );
    }

    /// An answer with no `grpc-status` counts with the code a gRPC client makes of its
    /// HTTP status: UNAVAILABLE for a 503 or a 429, UNIMPLEMENTED for a 404, UNKNOWN for
    /// a 200 (or a status the mapping does not name).
    #[tokio::test]
    async fn answers_without_a_grpc_status_count_as_their_http_status_maps() {
        let mut registry = Registry::default();
        let (server, client) = grpc_server(&mut registry).await;
        // Named first, by a call that shows the method.
        call(&client, "/pkg.Svc/Get", Some("0")).await;
        for http_status in [503, 429, 404, 200, 500] {
            call_with(&client, "/pkg.Svc/Get", None, Some(http_status)).await;
        }
        server.shutdown().await;

        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let get = r#"rpc_server_duration_seconds_count{listener="edge",rpc_system="grpc",rpc_service="pkg.Svc",rpc_method="Get",rpc_grpc_status_code="#;
        for (code, n) in [(0, 1), (14, 2), (12, 1), (2, 2)] {
            assert!(
                line(&text, &format!("{get}\"{code}\"}} {n}")).is_some(),
                "code {code}: {text}"
            );
        }
    }

    #[tokio::test]
    async fn grpc_statuses_outside_the_codes_count_as_unknown() {
        let mut registry = Registry::default();
        let (server, client) = grpc_server(&mut registry).await;
        call(&client, "/pkg.Svc/Get", Some("60000")).await;
        call(&client, "/pkg.Svc/Get", Some("x")).await;
        server.shutdown().await;

        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            line(&text, r#"rpc_server_duration_seconds_count{listener="edge",rpc_system="grpc",rpc_service="pkg.Svc",rpc_method="Get",rpc_grpc_status_code="2"} 2"#).is_some(),
            "{text}"
        );
        assert!(!text.contains("60000"), "{text}");
    }
}

mod from_config {
    use super::*;
    use mesh_core::config::MeshConfig;
    use mesh_tower::server::{MeshServerBuilder, ServerError};

    const CONFIG: &str = r#"
drain_timeout = "5s"

[[inbound]]
name = "api"
listen = "127.0.0.1:0"
target = "127.0.0.1:8080"
tls = "plaintext"
authorization = "api"
rate_limit = "api"

[authorization.api]
default = "deny"

[[authorization.api.rules]]
name = "health"
unauthenticated = true
routes = [{ path = { exact = "/healthz" } }]

[rate_limits.api]
per_client = { requests = 2, per = "1m" }
"#;

    #[tokio::test]
    async fn an_inbound_section_with_its_policy_and_limit_makes_a_server() {
        let config = MeshConfig::from_toml(CONFIG).unwrap();
        let builder = MeshServerBuilder::from_config(0, &config.inbound[0], &config).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = builder
            .serve(listener, tower::service_fn(echo_identity))
            .unwrap();
        let client: EndpointClient<Full<Bytes>> =
            EndpointClient::new(server.local_addr(), ConnectSettings::plaintext());
        let (status, _, body) = send(&client, "/healthz", false).await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::OK, "peer=none decision=api/health addr=true")
        );
        assert_eq!(
            send(&client, "/users", false).await.0,
            StatusCode::FORBIDDEN
        );
        assert_eq!(send(&client, "/healthz", false).await.0, StatusCode::OK);
        assert_eq!(
            send(&client, "/healthz", false).await.0,
            StatusCode::TOO_MANY_REQUESTS
        );
    }

    #[test]
    fn bad_references_name_their_key() {
        let mut config = MeshConfig::from_toml(CONFIG).unwrap();
        config.inbound[0].authorization = Some("nope".into());
        let err = MeshServerBuilder::from_config(0, &config.inbound[0], &config).unwrap_err();
        assert_eq!(
            err.to_string(),
            "inbound[0].authorization: no authorization policy named `nope`"
        );
        config.inbound[0].authorization = None;
        config.inbound[0].rate_limit = Some("nope".into());
        let err = MeshServerBuilder::from_config(0, &config.inbound[0], &config).unwrap_err();
        assert_eq!(
            err.to_string(),
            "inbound[0].rate_limit: no rate limit named `nope`"
        );
        config.inbound[0].rate_limit = None;
        config.inbound[0].protocol = Protocol::Opaque;
        let err = MeshServerBuilder::from_config(0, &config.inbound[0], &config).unwrap_err();
        assert!(matches!(err, ServerError::Config { .. }), "{err}");
    }

    #[tokio::test]
    async fn an_mtls_section_needs_its_acceptor() {
        let mut config = MeshConfig::from_toml(CONFIG).unwrap();
        config.inbound[0].tls = mesh_core::config::TlsMode::Mtls;
        let builder = MeshServerBuilder::from_config(0, &config.inbound[0], &config).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        assert!(matches!(
            builder.serve(listener, tower::service_fn(echo_identity)),
            Err(ServerError::NoTransport)
        ));
        let mut pki = Pki::new();
        let builder = MeshServerBuilder::from_config(0, &config.inbound[0], &config)
            .unwrap()
            .mtls_credentials(&pki.mtls(SERVER_ID))
            .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = builder
            .serve(listener, tower::service_fn(echo_identity))
            .unwrap();
        let web = pki.client(WEB, server.local_addr(), Protocol::Http2);
        let (status, _, body) = send(&web, "/healthz", false).await;
        assert_eq!(
            (status, body.as_str()),
            (
                StatusCode::OK,
                format!("peer={WEB} decision=api/health addr=true").as_str()
            )
        );
    }
}

#[tokio::test]
async fn bodies_declared_over_the_limit_get_413() {
    let mut limits = ServerLimits::default();
    limits.max_request_body_size = Some(1024);
    let server = plaintext(None, limits).await;
    let mut tcp = TcpStream::connect(server.local_addr()).await.unwrap();
    tcp.write_all(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 100000000\r\n\r\n")
        .await
        .unwrap();
    let answer = String::from_utf8_lossy(&read_to_close(&mut tcp).await).into_owned();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer.contains("request body of 100000000 bytes exceeds the limit of 1024"),
        "{answer}"
    );
    // Within the limit: served.
    let client: EndpointClient<Full<Bytes>> =
        EndpointClient::new(server.local_addr(), ConnectSettings::plaintext());
    let resp = client
        .send(
            Request::post("http://x/")
                .body(Full::new(Bytes::from(vec![b'a'; 1024])))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

/// A `Host` whose name is percent-encoded is refused with 400: `http` takes no such
/// authority, so the name the request was routed by could not reach the application
/// (it would get the endpoint's address instead). Clients send punycode, which is served.
#[tokio::test]
async fn a_percent_encoded_host_gets_400() {
    let server = plaintext(None, ServerLimits::default()).await;
    for (host, status) in [
        ("caf%C3%A9.example", "HTTP/1.1 400"),
        ("xn--caf-dma.example", "HTTP/1.1 200"),
    ] {
        let mut tcp = TcpStream::connect(server.local_addr()).await.unwrap();
        let head = format!("GET / HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
        tcp.write_all(head.as_bytes()).await.unwrap();
        let answer = String::from_utf8_lossy(&read_to_close(&mut tcp).await).into_owned();
        assert!(answer.starts_with(status), "{host}: {answer}");
        if status.ends_with("400") {
            assert!(
                answer.contains("a Host that is not host[:port]"),
                "{answer}"
            );
        }
    }
    server.shutdown().await;
}

/// gRPC calls the server refuses itself get a trailers-only gRPC status, as every other
/// refusal of the mesh: RESOURCE_EXHAUSTED for a body declared over the limit, INTERNAL
/// (what a gRPC client makes of a 400) for a `Host` it must refuse.
#[tokio::test]
async fn grpc_calls_refused_by_the_server_get_a_grpc_status() {
    let mut limits = ServerLimits::default();
    limits.max_request_body_size = Some(1024);
    let server = plaintext(None, limits).await;
    let (mut sender, conn) = h2_client(server.local_addr(), 65_535, 65_535).await;
    let call = |host: &'static str, size: usize| {
        Request::post("http://users/pkg.Svc/Get")
            .header("content-type", "application/grpc")
            .header("host", host)
            .header("content-length", size)
            .body(Full::new(Bytes::from(vec![0; size])))
            .unwrap()
    };
    for (req, code, message) in [
        (
            call("users", 2048),
            "8",
            "request body over the server's limit",
        ),
        (call("a b", 16), "13", "a Host that is not host[:port]"),
    ] {
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let headers = resp.headers();
        assert_eq!(headers["content-type"], "application/grpc");
        assert_eq!(headers["grpc-status"], code);
        assert_eq!(headers["grpc-message"], message);
        assert_eq!(headers["x-mesh-error"], "true");
    }
    // Within the limit, with a good Host: served.
    let resp = sender.send_request(call("users", 1024)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().get("grpc-status").is_none());
    drop(sender);
    conn.abort();
    server.shutdown().await;
}

/// curl, a client nobody here wrote: HTTP/1.1, h2c prior knowledge, and oversized headers.
#[tokio::test]
async fn curl_is_served_and_refused_as_it_should_be() {
    let server = plaintext(None, ServerLimits::default()).await;
    let url = format!("http://{}/hello", server.local_addr());
    let curl = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            let out = std::process::Command::new("curl")
                .args([
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code} %{http_version}",
                    "--max-time",
                    "10",
                ])
                .args(args)
                .output()
                .expect("curl is installed (the CI machine has it)");
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
    };
    assert_eq!(curl(vec![url.clone()]).await.unwrap(), "200 1.1");
    assert_eq!(
        curl(vec!["--http2-prior-knowledge".into(), url.clone()])
            .await
            .unwrap(),
        "200 2"
    );
    let big = format!("x-big: {}", "a".repeat(80 * 1024));
    assert_eq!(curl(vec!["-H".into(), big, url]).await.unwrap(), "431 1.1");
}

/// An application that counts its clones and, when `late` is set, is not ready at the
/// first `poll_ready` of each instance (it asks to be polled again); with `broken`, its
/// readiness fails.
#[derive(Debug)]
struct Counted {
    clones: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    late: bool,
    broken: bool,
    polled: bool,
}

impl Clone for Counted {
    fn clone(&self) -> Self {
        self.clones
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self {
            clones: self.clones.clone(),
            late: self.late,
            broken: self.broken,
            polled: false,
        }
    }
}

impl tower::Service<Request<Incoming>> for Counted {
    type Response = Response<Full<Bytes>>;
    type Error = std::io::Error;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        if self.broken {
            return std::task::Poll::Ready(Err(std::io::Error::other("not today")));
        }
        if self.late && !self.polled {
            self.polled = true;
            cx.waker().wake_by_ref();
            return std::task::Poll::Pending;
        }
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: Request<Incoming>) -> Self::Future {
        // Readiness is used once: the next call needs another `poll_ready`.
        self.polled = false;
        std::future::ready(Ok(Response::new(Full::new(Bytes::from_static(b"ok")))))
    }
}

/// A plaintext server of a [`Counted`] application, and its clone count.
async fn serve_counted(
    late: bool,
    broken: bool,
) -> (Server, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let clones = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let app = Counted {
        clones: clones.clone(),
        late,
        broken,
        polled: false,
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = MeshServer::builder()
        .plaintext()
        .serve(listener, app)
        .unwrap();
    (server, clones)
}

#[tokio::test]
async fn a_ready_application_is_called_in_place_and_a_late_one_is_waited_for() {
    for (late, protocol) in [
        (false, Protocol::Http1),
        (false, Protocol::Http2),
        (true, Protocol::Http1),
        (true, Protocol::Http2),
    ] {
        let (server, clones) = serve_counted(late, false).await;
        let client = EndpointClient::new(
            server.local_addr(),
            ConnectSettings {
                protocol,
                ..ConnectSettings::plaintext()
            },
        );
        for _ in 0..5 {
            let (status, _, body) = send(&client, "/", false).await;
            assert_eq!(
                (status, body.as_str()),
                (StatusCode::OK, "ok"),
                "{protocol:?}"
            );
        }
        let clones = clones.load(std::sync::atomic::Ordering::Relaxed);
        if late {
            // Not ready at once: a request that finds it so drives a clone of its own to
            // readiness (every other one here: the connection's instance is ready at its
            // second poll).
            assert!(clones >= 3, "{protocol:?} late: {clones} clones");
        } else {
            // Ready at once: the connection's own instance serves every request.
            assert!(clones <= 2, "{protocol:?}: {clones} clones for 5 requests");
        }
    }
}

#[tokio::test]
async fn an_application_whose_readiness_fails_fails_the_request_not_the_server() {
    let (server, _) = serve_counted(false, true).await;
    for _ in 0..2 {
        let client: EndpointClient<Full<Bytes>> =
            EndpointClient::new(server.local_addr(), ConnectSettings::plaintext());
        let result = client
            .send(
                Request::get("http://users/")
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await;
        assert!(
            result.is_err(),
            "answered: {:?}",
            result.map(|r| r.status())
        );
    }
    // The server is still accepting.
    TcpStream::connect(server.local_addr()).await.unwrap();
}

/// `serve_incoming`: byte streams of any kind. In-memory pipes over mTLS (the peer's
/// identity reaches the handler, an error from the stream is waited out, the stream's
/// end stops the accepting and a shutdown drains), and a Unix socket served to curl.
#[tokio::test]
async fn byte_streams_of_any_kind_are_served() {
    use hyper_util::rt::TokioIo;
    let mut pki = Pki::new();
    let acceptor = MtlsAcceptor::new(
        &pki.mtls(SERVER_ID),
        Authorizer::trust_domain(pki.ca.trust_domain().clone()),
    )
    .unwrap();
    type Piped = std::io::Result<(tokio::io::DuplexStream, SocketAddr)>;
    let (tx, rx) = tokio::sync::mpsc::channel::<Piped>(4);
    let incoming = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|next| (next, rx))
    });
    let addr: SocketAddr = "10.0.0.1:4143".parse().unwrap();
    let server = MeshServer::builder()
        .mtls(acceptor)
        .serve_incoming(addr, incoming, tower::service_fn(echo_identity))
        .unwrap();
    assert_eq!(server.local_addr(), addr);
    tx.send(Err(std::io::Error::other("a failing accept")))
        .await
        .unwrap();
    let connector = MtlsConnector::new(&pki.mtls(WEB), SpiffeId::new(SERVER_ID).unwrap()).unwrap();
    let mut senders = Vec::new();
    for _ in 0..2 {
        let (client, served) = tokio::io::duplex(64 << 10);
        tx.send(Ok((served, "10.0.0.2:5555".parse().unwrap())))
            .await
            .unwrap();
        let (tls, peer) = connector.handshake(addr, client).await.unwrap();
        assert_eq!(peer.to_string(), SERVER_ID);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        let request = Request::get("/users/1")
            .header("host", "users")
            .body(Full::<Bytes>::default())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.collect().await.unwrap().to_bytes();
        assert_eq!(
            body,
            format!("peer={WEB} decision=default/default addr=true").as_bytes()
        );
        senders.push(sender);
    }
    // No more streams: the server takes no more, and its shutdown closes the two open.
    drop(tx);
    let report = server.shutdown().await;
    assert_eq!((report.open_at_shutdown, report.forced), (2, 0));

    // A Unix socket, to curl (where there are Unix sockets).
    #[cfg(unix)]
    {
        let path = std::env::temp_dir().join(format!("mesh-server-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let incoming = futures_util::stream::unfold(listener, |listener| async move {
            let accepted = listener
                .accept()
                .await
                .map(|(stream, _)| (stream, SocketAddr::from(([127, 0, 0, 1], 0))));
            Some((accepted, listener))
        });
        let server = MeshServer::builder()
            .plaintext()
            .serve_incoming(addr, incoming, tower::service_fn(echo_identity))
            .unwrap();
        let socket = path.to_string_lossy().into_owned();
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new("curl")
                .args(["-s", "--max-time", "10", "--unix-socket", &socket])
                .arg("http://users/hello")
                .output()
                .expect("curl is installed (the CI machine has it)")
        })
        .await
        .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "peer=none decision=default/default addr=true"
        );
        server.shutdown().await;
        let _ = std::fs::remove_file(&path);
    }
}

/// When the stream of connections ends, the open ones run to their own end (here past
/// the shutdown timeout), and a shutdown later drains them. Before, they were waited on
/// for the shutdown timeout and then cut.
#[tokio::test(start_paused = true)]
async fn connections_outlive_the_end_of_their_stream() {
    use hyper_util::rt::TokioIo;
    let (client, served) = tokio::io::duplex(64 << 10);
    let remote: SocketAddr = "10.0.0.2:5555".parse().unwrap();
    let incoming = futures_util::stream::iter([Ok::<_, std::io::Error>((served, remote))]);
    let mut limits = ServerLimits::default();
    limits.shutdown_timeout = Duration::from_secs(1);
    let server = MeshServer::builder()
        .plaintext()
        .limits(limits)
        .serve_incoming(
            "10.0.0.1:80".parse().unwrap(),
            incoming,
            tower::service_fn(echo_identity),
        )
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(client))
        .await
        .unwrap();
    tokio::spawn(conn);
    for wait in [0, 5] {
        tokio::time::sleep(Duration::from_secs(wait)).await;
        sender.ready().await.unwrap();
        let request = Request::get("/")
            .header("host", "10.0.0.1")
            .body(Full::<Bytes>::default())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "after {wait} s");
        response.collect().await.unwrap();
    }
    let report = server.shutdown().await;
    assert_eq!((report.open_at_shutdown, report.forced), (1, 0));
}

/// One HTTP/2 stream whose reader keeps its window shut does not take down a sibling
/// that waits on the application: the connection stays while the sibling works, serves
/// its answer, and is closed an idle timeout after only the stalled stream is left.
#[tokio::test(start_paused = true)]
async fn a_stalled_stream_waits_for_its_siblings_to_end() {
    let mut limits = ServerLimits::default();
    limits.idle_timeout = Duration::from_secs(30);
    let app = tower::service_fn(|req: Request<Incoming>| async move {
        let body = if req.uri().path() == "/slow" {
            // Its head at once, its one message after 60 s.
            let late = futures_util::stream::once(async {
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok::<_, Infallible>(http_body::Frame::data(Bytes::from_static(b"late")))
            });
            http_body_util::StreamBody::new(late).boxed()
        } else {
            Full::new(Bytes::from(vec![b'x'; 1 << 20]))
                .map_err(|e| match e {})
                .boxed()
        };
        Ok::<_, Infallible>(Response::new(body))
    });
    let server = serve_plain(limits, app).await;
    let (mut sender, conn) = h2_client(server.local_addr(), 1024, 1 << 20).await;
    let get = |path: &str| {
        Request::get(format!("http://{}{path}", server.local_addr()))
            .body(Full::<Bytes>::default())
            .unwrap()
    };
    // Never read: its window stays shut.
    let stalled = sender.send_request(get("/big")).await.unwrap();
    let slow = sender.send_request(get("/slow")).await.unwrap();
    let started = tokio::time::Instant::now();
    let late = slow.collect().await.unwrap().to_bytes();
    assert_eq!(late, "late");
    assert!(started.elapsed() >= Duration::from_secs(60));
    assert!(!conn.is_finished());
    tokio::time::sleep(Duration::from_secs(45)).await;
    assert!(
        conn.is_finished(),
        "closed once only the stalled stream was left"
    );
    drop(stalled);
    server.shutdown().await;
}

/// A `Date` header by default, on HTTP/1.1 and HTTP/2; none when switched off (as the
/// deterministic simulation does: hyper reads the real clock for it).
#[tokio::test]
async fn the_date_header_can_be_switched_off() {
    for date in [true, false] {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = MeshServer::builder()
            .plaintext()
            .date_header(date)
            .serve(listener, tower::service_fn(echo_identity))
            .unwrap();
        let mut tcp = TcpStream::connect(server.local_addr()).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let answer = read_response(&mut tcp).await.to_ascii_lowercase();
        assert_eq!(answer.contains("\r\ndate: "), date, "HTTP/1.1: {answer}");
        let (mut sender, _conn) = h2_client(server.local_addr(), 65_535, 65_535).await;
        let request = Request::get(format!("http://{}/", server.local_addr()))
            .body(Full::<Bytes>::default())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.headers().contains_key("date"), date, "HTTP/2");
        server.shutdown().await;
    }
}
