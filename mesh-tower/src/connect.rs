//! Per-endpoint connections on hyper 1.
//!
//! An [`EndpointClient`] sends requests to one endpoint. It is a hyper-util pooled client
//! whose connector always dials that endpoint's address — with a connect timeout
//! (default 1 s), then, for mTLS, a SPIFFE handshake that requires the endpoint's expected
//! identity — so the pool, HTTP/1.1 connection reuse and HTTP/2 multiplexing are hyper's:
//!
//! - [`Protocol::Http2`](mesh_core::config::Protocol) (and `Grpc`): one multiplexed HTTP/2
//!   connection;
//! - `Http1`: a pool of HTTP/1.1 connections, reused while idle;
//! - `Auto`: HTTP/2 when ALPN negotiates `h2` over mTLS, HTTP/1.1 otherwise.
//!
//! It is a `tower::Service<http::Request<B>>`, the bottom of each endpoint's stack.
//!
//! **Readiness reflects the connection's state.** Each failed connect pushes the
//! endpoint's [`ConnState`] into back-off (exponential with jitter, 100 ms to 10 s by
//! default), during which `poll_ready` is pending (it wakes when the back-off ends), so the
//! balancer skips the endpoint; the first successful connect clears it. The next request
//! after the back-off reconnects. The server's verified [`PeerIdentity`] is attached to
//! every response as an extension.
//!
//! **Errors say why.** A failed request is a [`SendError`] whose message names the cause
//! itself — a refused server identity, a connect timeout, a reset — not only hyper's
//! "client error (Connect)".

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_core::config::Protocol;
use mesh_spiffe::{MtlsConnector, PeerIdentity, TransportError};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::backoff::Backoff;

/// The default connect timeout (TCP and TLS).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// How to reach one endpoint.
#[derive(Clone)]
pub struct ConnectSettings {
    /// The protocol (default `Auto`).
    pub protocol: Protocol,
    /// mTLS toward the endpoint, expecting the identity the connector was built for;
    /// `None` for plaintext.
    pub tls: Option<MtlsConnector>,
    /// Bound on TCP connect plus TLS handshake (default 1 s).
    pub connect_timeout: Duration,
    /// Back-off after failed connects (default 100 ms to 10 s, jitter 0.5).
    pub backoff: Backoff,
}

impl fmt::Debug for ConnectSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectSettings")
            .field("protocol", &self.protocol)
            .field("tls", &self.tls.is_some())
            .field("connect_timeout", &self.connect_timeout)
            .finish_non_exhaustive()
    }
}

impl ConnectSettings {
    /// Plaintext with the defaults.
    pub fn plaintext() -> Self {
        Self {
            protocol: Protocol::Auto,
            tls: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            backoff: DEFAULT_CONNECT_BACKOFF,
        }
    }

    /// mTLS through `connector` with the defaults.
    pub fn mtls(connector: MtlsConnector) -> Self {
        Self {
            tls: Some(connector),
            ..Self::plaintext()
        }
    }
}

/// The default back-off after failed connects: 100 ms to 10 s, jitter 0.5.
pub const DEFAULT_CONNECT_BACKOFF: Backoff =
    Backoff::constant(Duration::from_millis(100), Duration::from_secs(10), 0.5);

/// An endpoint's connection health, read by the balancer.
#[derive(Debug)]
pub struct ConnState {
    failures: AtomicU32,
    down_until: Mutex<Option<Instant>>,
}

impl ConnState {
    fn new() -> Self {
        Self {
            failures: AtomicU32::new(0),
            down_until: Mutex::new(None),
        }
    }

    /// Whether the endpoint may be picked: not inside a connect back-off.
    pub fn is_ready(&self, now: Instant) -> bool {
        self.backoff_until(now).is_none()
    }

    /// The end of the current connect back-off, if the endpoint is inside one at `now`.
    pub fn backoff_until(&self, now: Instant) -> Option<Instant> {
        if self.failures.load(Ordering::Acquire) == 0 {
            return None;
        }
        self.down_until
            .lock()
            .ok()
            .and_then(|until| *until)
            .filter(|t| now < *t)
    }

    /// Consecutive failed connects.
    pub fn failures(&self) -> u32 {
        self.failures.load(Ordering::Acquire)
    }

    fn connected(&self) {
        if self.failures.swap(0, Ordering::AcqRel) != 0
            && let Ok(mut until) = self.down_until.lock()
        {
            *until = None;
        }
    }

    fn failed(&self, backoff: &Backoff) {
        let attempt = self.failures.fetch_add(1, Ordering::AcqRel);
        let delay = backoff.delay(attempt, &mut fastrand::Rng::new());
        if let Ok(mut until) = self.down_until.lock() {
            *until = Some(Instant::now() + delay);
        }
    }
}

/// Dials one endpoint; the connector of an [`EndpointClient`]'s pool.
#[derive(Clone)]
struct Connector {
    addr: SocketAddr,
    settings: Arc<ConnectSettings>,
    state: Arc<ConnState>,
}

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// TCP connect failed.
    #[error("connecting to {addr}: {source}")]
    Tcp {
        /// The endpoint.
        addr: SocketAddr,
        /// The socket error.
        #[source]
        source: io::Error,
    },
    /// TCP connect and the TLS handshake did not finish within the connect timeout.
    #[error("connecting to {addr}: timed out after {timeout:?}")]
    Timeout {
        /// The endpoint.
        addr: SocketAddr,
        /// The timeout.
        timeout: Duration,
    },
    /// The mTLS handshake failed (a refused identity among others).
    #[error("TLS with {addr}: {source}")]
    Tls {
        /// The endpoint.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: TransportError,
    },
}

impl tower_service::Service<Uri> for Connector {
    type Response = Conn;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Conn, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let timeout = this.settings.connect_timeout;
            let addr = this.addr;
            let result = tokio::time::timeout(timeout, this.dial())
                .await
                .unwrap_or(Err(ConnectError::Timeout { addr, timeout }));
            match &result {
                Ok(_) => this.state.connected(),
                Err(error) => {
                    tracing::debug!(%addr, %error, "connect failed");
                    this.state.failed(&this.settings.backoff);
                }
            }
            result
        })
    }
}

impl Connector {
    async fn dial(&self) -> Result<Conn, ConnectError> {
        let addr = self.addr;
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|source| ConnectError::Tcp { addr, source })?;
        let _ = tcp.set_nodelay(true);
        match &self.settings.tls {
            None => Ok(Conn::Plain(TokioIo::new(tcp), self.settings.protocol)),
            Some(tls) => {
                let (stream, peer) = tls
                    .handshake(addr, tcp)
                    .await
                    .map_err(|source| ConnectError::Tls { addr, source })?;
                let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                Ok(Conn::Tls(Box::new(TokioIo::new(stream)), peer, h2))
            }
        }
    }
}

/// A connection to an endpoint, plaintext or mTLS.
enum Conn {
    Plain(TokioIo<TcpStream>, Protocol),
    Tls(
        Box<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>,
        PeerIdentity,
        bool,
    ),
}

impl Connection for Conn {
    fn connected(&self) -> Connected {
        match self {
            Conn::Plain(_, Protocol::Http2 | Protocol::Grpc) => Connected::new().negotiated_h2(),
            Conn::Plain(..) => Connected::new(),
            Conn::Tls(_, peer, h2) => {
                let c = Connected::new().extra(peer.clone());
                if *h2 { c.negotiated_h2() } else { c }
            }
        }
    }
}

impl hyper::rt::Read for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(io, _) => Pin::new(io).poll_read(cx, buf),
            Conn::Tls(io, ..) => Pin::new(&mut **io).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(io, _) => Pin::new(io).poll_write(cx, buf),
            Conn::Tls(io, ..) => Pin::new(&mut **io).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(io, _) => Pin::new(io).poll_flush(cx),
            Conn::Tls(io, ..) => Pin::new(&mut **io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(io, _) => Pin::new(io).poll_shutdown(cx),
            Conn::Tls(io, ..) => Pin::new(&mut **io).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(io, _) => Pin::new(io).poll_write_vectored(cx, bufs),
            Conn::Tls(io, ..) => Pin::new(&mut **io).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(io, _) => io.is_write_vectored(),
            Conn::Tls(io, ..) => io.is_write_vectored(),
        }
    }
}

/// Sends requests to one endpoint over pooled (HTTP/1.1) or multiplexed (HTTP/2)
/// connections. Cheap to clone: clones share the pool.
pub struct EndpointClient<B> {
    // Shared, so that a clone (one per request, as the balancer picks) is one reference
    // count and the stack's futures stay small.
    shared: Arc<Shared<B>>,
    /// The end of a back-off `poll_ready` waits for.
    backoff: Option<Pin<Box<Sleep>>>,
}

struct Shared<B> {
    addr: SocketAddr,
    authority: http::uri::Authority,
    client: Client<Connector, B>,
    state: Arc<ConnState>,
}

impl<B> Clone for EndpointClient<B> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            backoff: None,
        }
    }
}

impl<B> EndpointClient<B> {
    /// The endpoint's address.
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// The endpoint's connection health.
    pub fn conn_state(&self) -> &Arc<ConnState> {
        &self.shared.state
    }
}

impl<B> fmt::Debug for EndpointClient<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndpointClient")
            .field("addr", &self.shared.addr)
            .field("failures", &self.shared.state.failures())
            .finish()
    }
}

impl<B> EndpointClient<B>
where
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// A client for the endpoint at `addr`.
    pub fn new(addr: SocketAddr, settings: ConnectSettings) -> Self {
        let state = Arc::new(ConnState::new());
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_idle_timeout(Duration::from_secs(90))
            .http2_only(matches!(
                settings.protocol,
                Protocol::Http2 | Protocol::Grpc
            ));
        let connector = Connector {
            addr,
            settings: Arc::new(settings),
            state: state.clone(),
        };
        let authority = http::uri::Authority::try_from(addr.to_string().as_str())
            .unwrap_or_else(|_| http::uri::Authority::from_static("endpoint"));
        Self {
            shared: Arc::new(Shared {
                addr,
                authority,
                client: builder.build(connector),
                state,
            }),
            backoff: None,
        }
    }

    /// Sends `req` to this endpoint, whatever its URI's authority says: the connection is
    /// always to this endpoint. The URI's authority (the logical service, e.g.
    /// `users.prod`) is kept for `Host` / `:authority`; a request with a relative URI gets
    /// the endpoint's address instead.
    pub fn send(&self, mut req: http::Request<B>) -> ResponseFuture {
        if req.uri().authority().is_none() || req.uri().scheme().is_none() {
            let mut parts = req.uri().clone().into_parts();
            parts.scheme.get_or_insert(http::uri::Scheme::HTTP);
            parts
                .authority
                .get_or_insert_with(|| self.shared.authority.clone());
            parts
                .path_and_query
                .get_or_insert_with(|| http::uri::PathAndQuery::from_static("/"));
            if let Ok(uri) = Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
        }
        ResponseFuture {
            inner: self.shared.client.request(req),
            addr: self.shared.addr,
        }
    }
}

impl<B> tower_service::Service<http::Request<B>> for EndpointClient<B>
where
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = http::Response<hyper::body::Incoming>;
    type Error = SendError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), SendError>> {
        loop {
            let Some(until) = self.shared.state.backoff_until(Instant::now()) else {
                self.backoff = None;
                return Poll::Ready(Ok(()));
            };
            match &mut self.backoff {
                Some(sleep) if sleep.deadline() == until => {
                    std::task::ready!(sleep.as_mut().poll(cx));
                    self.backoff = None;
                }
                _ => self.backoff = Some(Box::pin(tokio::time::sleep_until(until))),
            }
        }
    }

    fn call(&mut self, req: http::Request<B>) -> ResponseFuture {
        self.send(req)
    }
}

pin_project_lite::pin_project! {
    /// The response future of an [`EndpointClient`].
    pub struct ResponseFuture {
        #[pin]
        inner: hyper_util::client::legacy::ResponseFuture,
        addr: SocketAddr,
    }
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Future for ResponseFuture {
    type Output = Result<http::Response<hyper::body::Incoming>, SendError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        this.inner.poll(cx).map_err(|source| SendError {
            addr: *this.addr,
            source,
        })
    }
}

/// A request to an endpoint failed: it could not connect, or the connection failed.
/// The message names the cause, down to the deepest one.
#[derive(Debug)]
pub struct SendError {
    addr: SocketAddr,
    source: hyper_util::client::legacy::Error,
}

impl SendError {
    /// Whether no connection could be made (the request never left).
    pub fn is_connect(&self) -> bool {
        self.source.is_connect()
    }

    /// The endpoint.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut message = if self.is_connect() {
            String::new()
        } else {
            format!("request to {} failed", self.addr)
        };
        // hyper's own message ("client error (Connect)") says little: name every cause
        // below it that adds something.
        let mut cause = std::error::Error::source(&self.source);
        while let Some(e) = cause {
            let text = e.to_string();
            if !message.contains(&text) {
                if !message.is_empty() {
                    message.push_str(": ");
                }
                message.push_str(&text);
            }
            cause = e.source();
        }
        if message.is_empty() {
            message = format!("connecting to {}: {}", self.addr, self.source);
        }
        f.write_str(&message)
    }
}

impl std::error::Error for SendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

#[cfg(all(test, feature = "test-util"))]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::mock::{Behavior, MockEndpoint};
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use mesh_spiffe::test_ca::TestCa;
    use mesh_spiffe::{Authorizer, CredentialStore, Mtls, MtlsAcceptor};

    fn request(body: &'static str) -> http::Request<Full<Bytes>> {
        http::Request::post("http://users.prod/echo")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap()
    }

    #[tokio::test]
    async fn plaintext_http1_and_http2() {
        let ep = MockEndpoint::spawn("a", Behavior::default()).await.unwrap();
        for protocol in [Protocol::Auto, Protocol::Http1, Protocol::Http2] {
            let client = EndpointClient::new(
                ep.addr(),
                ConnectSettings {
                    protocol,
                    ..ConnectSettings::plaintext()
                },
            );
            for _ in 0..3 {
                let resp = client.send(request("hello")).await.unwrap();
                let want = if protocol == Protocol::Http2 {
                    http::Version::HTTP_2
                } else {
                    http::Version::HTTP_11
                };
                assert_eq!(resp.version(), want);
                assert_eq!(
                    resp.into_body().collect().await.unwrap().to_bytes(),
                    "hello"
                );
            }
        }
        // One connection per client: reused (HTTP/1.1) or multiplexed (HTTP/2).
        assert_eq!(ep.stats().connections.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn mtls_negotiates_h2_and_attaches_the_server_identity() {
        let mut ca = TestCa::new("example.org").unwrap();
        let server = Mtls::new(CredentialStore::with(
            ca.issue("spiffe://example.org/users").unwrap(),
            ca.bundle_set().unwrap(),
        ));
        let client = Mtls::new(CredentialStore::with(
            ca.issue("spiffe://example.org/web").unwrap(),
            ca.bundle_set().unwrap(),
        ));
        let acceptor = MtlsAcceptor::new(&server, Authorizer::any()).unwrap();
        let ep = MockEndpoint::spawn_mtls("users", Behavior::default(), acceptor)
            .await
            .unwrap();
        let expected = mesh_core::SpiffeId::new("spiffe://example.org/users").unwrap();
        let connector = MtlsConnector::new(&client, expected.clone()).unwrap();
        let c = EndpointClient::new(ep.addr(), ConnectSettings::mtls(connector));
        let resp = c.send(request("hi")).await.unwrap();
        assert_eq!(resp.version(), http::Version::HTTP_2);
        assert_eq!(
            resp.extensions().get::<PeerIdentity>().unwrap().id(),
            &expected
        );

        // A client expecting another identity cannot connect, and says why.
        let wrong = MtlsConnector::new(
            &client,
            mesh_core::SpiffeId::new("spiffe://example.org/billing").unwrap(),
        )
        .unwrap();
        let c = EndpointClient::new(ep.addr(), ConnectSettings::mtls(wrong));
        let err = c.send(request("hi")).await.unwrap_err();
        assert!(err.is_connect());
        let message = err.to_string();
        assert!(
            message.starts_with(&format!("TLS with {}", ep.addr()))
                && message.contains("is not authorized"),
            "{message}"
        );
        let chain: Vec<String> = mesh_core::error::chain(&err)
            .map(|e| e.to_string())
            .collect();
        assert!(
            chain.iter().any(|m| m.contains("is not authorized")),
            "{chain:?}"
        );
        assert!(!c.conn_state().is_ready(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn failed_connects_back_off_and_recover() {
        let ep = MockEndpoint::spawn("a", Behavior::default()).await.unwrap();
        let addr = ep.addr();
        ep.kill();
        drop(ep);
        let client = EndpointClient::new(addr, ConnectSettings::plaintext());
        let state = client.conn_state().clone();
        assert!(state.is_ready(Instant::now()));
        let err = client.send(request("x")).await.unwrap_err();
        assert!(err.is_connect());
        assert!(
            err.to_string()
                .starts_with(&format!("connecting to {addr}: ")),
            "{err}"
        );
        assert!(!state.is_ready(Instant::now()));
        assert_eq!(state.failures(), 1);
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(
            state.is_ready(Instant::now()),
            "back-off over after at most 100 ms"
        );
    }
}
