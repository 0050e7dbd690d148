//! HTTP upgrades through a proxy: WebSocket, or any other protocol a request switches to
//! with `Upgrade` (but `h2c`), and HTTP/2 CONNECT, spliced between the client's
//! connection and the upstream's.
//!
//! After `101 Switching Protocols` the bytes on a connection are no longer HTTP, so a
//! proxy that forwards requests one by one cannot carry them. [`Tunnel`] (the layer
//! [`TunnelLayer`]), above a proxy's forwarding stack, does:
//!
//! 1. A request that asks to switch — HTTP/1.1 with `Upgrade` and a `Connection` naming
//!    `upgrade` (RFC 9110 §7.8), or `CONNECT` (HTTP/2, extended with `:protocol` as in
//!    RFC 8441 or not, or HTTP/1.1) — has the client connection's half of the switch
//!    (hyper's [`OnUpgrade`]) taken off and goes down the stack as any request does:
//!    routing, authorization, balancing, retries and timeouts apply to it.
//! 2. An answer that accepts — `101` to HTTP/1.1, `2xx` to `CONNECT`, or a `2xx` to an
//!    HTTP/1.1 upgrade that crossed the mesh as extended CONNECT (below), which becomes
//!    the client's `101` — brings the upstream connection's half in its extensions
//!    (hyper's client puts it there). Once both connections have switched, a task
//!    copies bytes both ways until each side has closed (a side's end shuts the other's
//!    write half), either fails, or both stay quiet for the idle timeout. An answer that accepts with no upstream half to
//!    splice (a stack that dropped it), or a `101` to a request that did not ask to
//!    switch, becomes `502`: a client told it switched would otherwise wait on a
//!    connection nobody serves.
//! 3. Any other answer goes back as it is; the client's connection stays HTTP.
//!
//! A request with `Upgrade: h2c` (RFC 9113 deprecates it, and it is a hop's own business)
//! or `Upgrade` without `Connection: upgrade` is an ordinary request: the proxy strips
//! both fields ([`crate::forward::strip_hop_by_hop`]). HTTP/1.0 cannot switch (RFC 9110
//! §7.8: its `Upgrade` is ignored).
//!
//! **Across the mesh** ([`crate::forward`]): between two proxies every request travels
//! over one multiplexed HTTP/2 connection, where `Upgrade` does not exist. An HTTP/1.1
//! `GET` that asks to switch goes as an extended CONNECT (RFC 8441) with the `Upgrade`
//! token as `:protocol` — the way HTTP/2 carries WebSocket — and the peer restores it to
//! HTTP/1.1 with `Upgrade` for the application. The application's `101` crosses back as
//! `200` (a successful CONNECT), which [`Tunnel`] turns into the client's `101` (the
//! application's other fields, `Sec-WebSocket-Accept` say, kept). Upgrades with
//! other methods than `GET` (rare: RFC 8441 defines none) cross as ordinary requests, the
//! upgrade stripped. Policies and route matches see an extended CONNECT as the `GET` it
//! stands for ([`request_method`]).
//!
//! `Upgrade` with a list of protocols crosses as an ordinary request too, since
//! `:protocol` is one token.
//!
//! A tunnel's bytes are not HTTP: no request timeout, no limit but the connections' own,
//! and no per-request metric applies to them once switched (the switch itself is a
//! request in the metrics and the access log: `101` where the client asked over
//! HTTP/1.1, a `CONNECT` answered `200` on the inbound side of the mesh). They are
//! relayed by [`crate::relay`]: a tunnel ends when both sides have closed, either fails,
//! no byte moves either way for its idle timeout (default 1 hour,
//! [`TunnelLayer::idle_timeout`]), or the proxy exits; [`TunnelMetrics`] counts tunnels
//! and their bytes per listener, as they move. Through the [`Hold`] its `MeshServer`
//! lends, a tunnel counts as its client connection's work: the connection's idle and
//! stall checks leave a quiet tunnel alone (its own idle timeout applies), a switched
//! HTTP/1.1 connection stays counted against `max_connections`, and a drain waits for
//! tunnels up to its timeout, then cuts them. Towards an endpoint known to speak HTTP/2
//! (configured, or learned from an earlier connection's ALPN) each tunnel has a
//! connection of its own ([`crate::connect`]), so that many do not exhaust the streams of
//! the connection the requests share.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tower::Layer;
use tower_service::Service;

use crate::relay::Relay;

/// The method a request stands for: `GET` for an HTTP/2 extended CONNECT (RFC 8441,
/// `:protocol`), which opens what an HTTP/1.1 `GET` with `Upgrade` opens; its own
/// otherwise. Route matches and authorization policies judge requests by it.
pub fn request_method<B>(req: &Request<B>) -> &Method {
    if req.method() == Method::CONNECT && req.extensions().get::<hyper::ext::Protocol>().is_some() {
        &Method::GET
    } else {
        req.method()
    }
}

/// The protocol an HTTP/1.1 message's headers ask to switch to: its `Upgrade` value,
/// when a `Connection` field names `upgrade` and the value is not `h2c`.
pub(crate) fn requested(headers: &HeaderMap) -> Option<HeaderValue> {
    let protocol = headers.get(header::UPGRADE)?;
    let named = headers.get_all(header::CONNECTION).iter().any(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"upgrade"))
    });
    let h2c = protocol
        .as_bytes()
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"h2c"));
    (named && !h2c && !protocol.is_empty()).then(|| protocol.clone())
}

/// Sets the two fields of an HTTP/1.1 upgrade: `Connection: upgrade` and `Upgrade`.
pub(crate) fn set_upgrade_fields(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, protocol);
}

/// A server connection's part in the tunnels that leave it: what it puts in a request
/// that may switch, and [`Tunnel`] keeps for as long as the request's tunnel lives.
///
/// `MeshServer` gives one to every request that may switch; [`Tunnel`] keeps it, and so
/// should an application that switches by itself (taking it out of the request's
/// extensions into the task that serves the switched connection). While a tunnel holds
/// it, the connection counts as busy (its idle and stall checks leave a quiet tunnel on
/// an HTTP/2 stream alone) and stays counted against `max_connections` and by a drain (a
/// switched HTTP/1.1 connection too). When the server ends the connection first (a
/// drain's timeout, the stall check), [`Hold::cut`] ends the tunnel with it. Cheap to
/// clone; the tunnel is counted until the last clone is dropped.
#[derive(Clone)]
pub struct Hold(std::sync::Arc<dyn Held>);

impl Hold {
    /// A hold on `connection`.
    pub fn new(connection: impl Held) -> Self {
        Self(std::sync::Arc::new(connection))
    }

    /// Resolves when the server ends the connection that lent this hold (see above).
    pub async fn cut(&self) {
        self.0.cut().await;
    }
}

impl fmt::Debug for Hold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hold").finish_non_exhaustive()
    }
}

/// What a server connection lends its tunnels through a [`Hold`]: its count of them
/// goes down when the value is dropped.
pub trait Held: Send + Sync + 'static {
    /// Resolves when the server ends the connection.
    fn cut(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

/// How a request asked to switch, as it reached [`Tunnel`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Asked {
    /// HTTP/1.1 `Upgrade`: accepted by `101`.
    Upgrade,
    /// `CONNECT` (HTTP/2, extended or not, or HTTP/1.1): accepted by any `2xx`.
    Connect,
}

impl Asked {
    fn of<B>(req: &Request<B>) -> Option<Self> {
        if req.method() == Method::CONNECT {
            Some(Self::Connect)
        } else if req.version() == Version::HTTP_11 && requested(req.headers()).is_some() {
            Some(Self::Upgrade)
        } else {
            None
        }
    }

    fn accepted(self, status: StatusCode) -> bool {
        match self {
            Self::Upgrade => status == StatusCode::SWITCHING_PROTOCOLS,
            Self::Connect => status.is_success(),
        }
    }
}

pub use crate::relay::{ListenerTunnels, TunnelMetrics};

/// Splices upgraded connections; see the [module docs](self).
#[derive(Clone, Debug, Default)]
pub struct TunnelLayer {
    relay: Relay,
}

impl TunnelLayer {
    /// The layer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts its tunnels in `metrics` (default: not counted).
    pub fn metrics(mut self, metrics: ListenerTunnels) -> Self {
        self.relay = self.relay.metrics(metrics);
        self
    }

    /// Closes a tunnel after this long without a byte either way (`None`: never;
    /// default [`DEFAULT_IDLE_TIMEOUT`](crate::relay::DEFAULT_IDLE_TIMEOUT), 1 hour).
    pub fn idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.relay = self.relay.idle_timeout(timeout);
        self
    }
}

impl<S> Layer<S> for TunnelLayer {
    type Service = Tunnel<S>;

    fn layer(&self, inner: S) -> Tunnel<S> {
        Tunnel {
            inner,
            relay: self.relay.clone(),
        }
    }
}

/// Splices upgraded connections; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct Tunnel<S> {
    inner: S,
    relay: Relay,
}

impl<S> Tunnel<S> {
    /// `inner` with upgrades spliced (and not counted: see [`TunnelLayer::metrics`]).
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            relay: Relay::new(),
        }
    }
}

impl<S, B, RB> Service<Request<B>> for Tunnel<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = TunnelFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        // hyper's server puts a half in every request that may switch: an HTTP/1.x one
        // with `Upgrade` or CONNECT, an HTTP/2 CONNECT.
        let may_switch = req.version() < Version::HTTP_2 || req.method() == Method::CONNECT;
        let half = if may_switch {
            req.extensions_mut().remove::<OnUpgrade>()
        } else {
            None
        };
        let client = match half {
            None => None,
            // Boxed: a rare case should not grow every request's future.
            Some(half) => Asked::of(&req).map(|asked| {
                Box::new(ClientHalf {
                    half,
                    asked,
                    protocol: protocol_name(&req),
                    hold: req.extensions_mut().remove::<Hold>(),
                    relay: self.relay.clone(),
                })
            }),
        };
        TunnelFuture {
            inner: self.inner.call(req),
            client,
        }
    }
}

/// The name a tunnel is logged by: the upgrade's protocol, or `CONNECT`.
fn protocol_name<B>(req: &Request<B>) -> HeaderValue {
    if let Some(p) = req.extensions().get::<hyper::ext::Protocol>() {
        return HeaderValue::from_str(p.as_str())
            .unwrap_or(HeaderValue::from_static("extended-connect"));
    }
    match req.headers().get(header::UPGRADE) {
        Some(p) if req.method() != Method::CONNECT => p.clone(),
        _ => HeaderValue::from_static("CONNECT"),
    }
}

/// The client connection's half of a switch, waiting for the answer.
struct ClientHalf {
    half: OnUpgrade,
    asked: Asked,
    protocol: HeaderValue,
    /// The client connection's, when its server lends one.
    hold: Option<Hold>,
    relay: Relay,
}

pin_project_lite::pin_project! {
    /// The response future of a [`Tunnel`].
    pub struct TunnelFuture<F> {
        #[pin]
        inner: F,
        client: Option<Box<ClientHalf>>,
    }
}

impl<F> fmt::Debug for TunnelFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TunnelFuture")
            .field("switching", &self.client.is_some())
            .finish_non_exhaustive()
    }
}

impl<F, RB, E> Future for TunnelFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
{
    type Output = Result<Response<RB>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut resp = std::task::ready!(this.inner.poll(cx))?;
        let client = this.client.take();
        let status = resp.status();
        match client {
            Some(client) if client.asked.accepted(status) || crossed(&client, &resp) => {
                match resp.extensions_mut().remove::<OnUpgrade>() {
                    Some(upstream) => {
                        if client.asked == Asked::Upgrade
                            && status != StatusCode::SWITCHING_PROTOCOLS
                        {
                            // Switched across the mesh: the client waits for its `101`.
                            *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                            *resp.version_mut() = Version::HTTP_11;
                            resp.headers_mut().remove(header::CONTENT_LENGTH);
                            set_upgrade_fields(resp.headers_mut(), client.protocol.clone());
                        }
                        let ClientHalf {
                            half,
                            protocol,
                            hold,
                            relay,
                            ..
                        } = *client;
                        tokio::spawn(splice(half, upstream, protocol, hold, relay));
                    }
                    None => {
                        tracing::warn!(protocol = ?client.protocol, %status, "the upstream accepted the switch, but no upgraded connection came with its answer: answered 502");
                        refuse(&mut resp);
                    }
                }
            }
            // A `101` it did not accept: to a request that did not ask, or to a CONNECT
            // (HTTP/2 has no 101 at all, RFC 9113 §8.6).
            _ if status == StatusCode::SWITCHING_PROTOCOLS => {
                tracing::warn!(
                    "the upstream answered 101 to a request that did not ask to switch to it: answered 502"
                );
                refuse(&mut resp);
                resp.extensions_mut().remove::<OnUpgrade>();
            }
            // Not accepted: the client's half is dropped, its connection stays HTTP.
            _ => {}
        }
        Poll::Ready(Ok(resp))
    }
}

/// Whether `resp` accepts an HTTP/1.1 upgrade that crossed to a peer proxy as an HTTP/2
/// extended CONNECT ([`crate::forward::ToMesh`]): a `2xx` with the switched stream's
/// half, which hyper's HTTP/2 client puts only in a successful CONNECT's answer.
fn crossed<RB>(client: &ClientHalf, resp: &Response<RB>) -> bool {
    client.asked == Asked::Upgrade
        && resp.status().is_success()
        && resp.extensions().get::<OnUpgrade>().is_some()
}

/// Turns an answer that cannot be kept into a `502` (its body, empty for a switch, kept).
fn refuse<RB>(resp: &mut Response<RB>) {
    *resp.status_mut() = StatusCode::BAD_GATEWAY;
    let headers = resp.headers_mut();
    headers.remove(header::UPGRADE);
    headers.remove(header::CONNECTION);
}

/// Copies bytes both ways between the two switched connections, once both have switched,
/// until both sides have closed, either fails or stays idle for the relay's idle timeout,
/// or the client connection's server cuts it.
async fn splice(
    client: OnUpgrade,
    upstream: OnUpgrade,
    protocol: HeaderValue,
    hold: Option<Hold>,
    relay: Relay,
) {
    let work = async {
        let (client, upstream) = match futures_util::future::try_join(client, upstream).await {
            Ok(both) => both,
            Err(error) => {
                tracing::debug!(?protocol, %error, "a connection did not switch: tunnel closed");
                return;
            }
        };
        let mut client = TokioIo::new(client);
        let mut upstream = TokioIo::new(upstream);
        tracing::debug!(?protocol, "tunnel open");
        match relay.run(&mut client, &mut upstream).await {
            Ok(relayed) => tracing::debug!(
                ?protocol,
                bytes_up = relayed.client_to_upstream,
                bytes_down = relayed.upstream_to_client,
                "tunnel closed"
            ),
            Err(error) => {
                let relayed = error.relayed();
                tracing::debug!(
                    ?protocol,
                    %error,
                    bytes_up = relayed.client_to_upstream,
                    bytes_down = relayed.upstream_to_client,
                    "tunnel failed"
                );
            }
        }
    };
    match &hold {
        Some(hold) => {
            tokio::select! {
                () = work => {}
                () = hold.cut() => {
                    tracing::debug!(?protocol, "the server ended the client's connection: tunnel cut");
                }
            }
        }
        None => work.await,
    }
    // The connection's count of its tunnels goes down only now.
    drop(hold);
}

#[cfg(all(test, feature = "server"))]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::net::SocketAddr;

    use hyper::body::Incoming;
    use mesh_core::config::Protocol;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tower::ServiceExt;

    use super::*;
    use crate::connect::{ConnectSettings, EndpointClient};
    use crate::forward::ToMeshLayer;
    use crate::server::MeshServer;

    /// Reads an HTTP/1.1 head (through its blank line) from `io`, byte by byte so that
    /// nothing after it is consumed.
    async fn read_head(io: &mut TcpStream) -> String {
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0];
            if io.read(&mut byte).await.unwrap() == 0 {
                break;
            }
            head.push(byte[0]);
        }
        String::from_utf8(head).unwrap()
    }

    /// An application that switches every request asking for `test-proto` and then
    /// echoes bytes until the client's end, answering others 426. Each head it read goes
    /// to `heads`.
    async fn switching_app() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, heads) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (mut io, _) = listener.accept().await.unwrap();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let head = read_head(&mut io).await;
                    let switch = head.to_ascii_lowercase().contains("upgrade: test-proto");
                    let _ = tx.send(head);
                    if !switch {
                        let _ = io
                            .write_all(
                                b"HTTP/1.1 426 Upgrade Required\r\ncontent-length: 0\r\n\r\n",
                            )
                            .await;
                        return;
                    }
                    io.write_all(
                        b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: test-proto\r\n\r\n",
                    )
                    .await
                    .unwrap();
                    let (mut r, mut w) = io.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        (addr, heads)
    }

    /// A proxy hop: `MeshServer` in plaintext, `Tunnel` over an HTTP/1.1 client to `app`.
    async fn proxy(app: SocketAddr) -> crate::server::Server {
        proxy_with(app, TunnelLayer::new()).await
    }

    /// [`proxy`] with the tunnel layer given.
    async fn proxy_with(app: SocketAddr, tunnels: TunnelLayer) -> crate::server::Server {
        let client = EndpointClient::<Incoming>::new(
            app,
            ConnectSettings {
                protocol: Protocol::Http1,
                ..ConnectSettings::plaintext()
            },
        );
        let stack = tunnels.layer(ToMeshLayer::passthrough().layer(client));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        MeshServer::builder()
            .plaintext()
            .serve(listener, stack)
            .unwrap()
    }

    #[tokio::test]
    async fn an_http1_upgrade_is_spliced_through_a_proxy_hop() {
        let (app, mut heads) = switching_app().await;
        let server = proxy(app).await;
        let mut io = TcpStream::connect(server.local_addr()).await.unwrap();
        io.write_all(
            b"GET /chat HTTP/1.1\r\nhost: chat.example\r\nconnection: keep-alive, Upgrade, x-secret\r\n\
              x-secret: 1\r\nupgrade: test-proto\r\nsec-test-key: abc\r\n\r\n",
        )
        .await
        .unwrap();
        let head = read_head(&mut io).await;
        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
        let lower = head.to_ascii_lowercase();
        assert!(lower.contains("upgrade: test-proto"), "{head}");
        assert!(lower.contains("connection: upgrade"), "{head}");
        // The application got the upgrade's fields, and none of the hop's own.
        let seen = heads.recv().await.unwrap().to_ascii_lowercase();
        assert!(seen.starts_with("get /chat http/1.1"), "{seen}");
        assert!(seen.contains("connection: upgrade\r\n"), "{seen}");
        assert!(seen.contains("upgrade: test-proto"), "{seen}");
        assert!(seen.contains("sec-test-key: abc"), "{seen}");
        assert!(!seen.contains("x-secret"), "{seen}");

        // Switched: bytes both ways, any size, then each side's end reaches the other.
        let blob: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let (mut r, mut w) = io.into_split();
        let send = blob.clone();
        let writer = tokio::spawn(async move {
            w.write_all(&send).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let mut echoed = Vec::new();
        r.read_to_end(&mut echoed).await.unwrap();
        writer.await.unwrap();
        assert_eq!(echoed.len(), blob.len());
        assert!(echoed == blob, "the tunnel changed the bytes");
        server.shutdown().await;
    }

    #[tokio::test]
    async fn a_refused_or_unasked_switch_leaves_the_connection_http() {
        let (app, mut heads) = switching_app().await;
        let server = proxy(app).await;
        let mut io = TcpStream::connect(server.local_addr()).await.unwrap();
        // `h2c` is a hop's own: not passed on, so the application answers 426, and the
        // client's connection goes on with HTTP.
        io.write_all(
            b"GET /a HTTP/1.1\r\nhost: x\r\nconnection: Upgrade, HTTP2-Settings\r\n\
              upgrade: h2c\r\nhttp2-settings: AAMAAABkAAQAAP__\r\n\r\n",
        )
        .await
        .unwrap();
        let head = read_head(&mut io).await;
        assert!(head.starts_with("HTTP/1.1 426 "), "{head}");
        let seen = heads.recv().await.unwrap().to_ascii_lowercase();
        assert!(!seen.contains("upgrade"), "{seen}");
        assert!(!seen.contains("http2-settings"), "{seen}");
        // `Upgrade` without `Connection: upgrade` asks for nothing (RFC 9110 §7.8).
        io.write_all(b"GET /b HTTP/1.1\r\nhost: x\r\nupgrade: test-proto\r\n\r\n")
            .await
            .unwrap();
        let head = read_head(&mut io).await;
        assert!(head.starts_with("HTTP/1.1 426 "), "{head}");
        let seen = heads.recv().await.unwrap().to_ascii_lowercase();
        assert!(seen.starts_with("get /b "), "{seen}");
        assert!(!seen.contains("upgrade"), "{seen}");
        server.shutdown().await;
    }

    /// An in-process application that switches by itself: it takes the request's
    /// `OnUpgrade` and echoes what the switched connection brings.
    fn echoing_app(
        mut req: Request<Incoming>,
    ) -> std::future::Ready<Result<Response<String>, std::convert::Infallible>> {
        if req.extensions().get::<OnUpgrade>().is_none() {
            return std::future::ready(Ok(Response::new("ok".to_owned())));
        }
        let half = hyper::upgrade::on(&mut req);
        // The connection's hold, kept by the tunnel while it lives.
        let hold = req.extensions_mut().remove::<Hold>();
        tokio::spawn(async move {
            let echo = async {
                let mut io = TokioIo::new(half.await.unwrap());
                let mut buf = [0; 64];
                loop {
                    let n = io.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    io.write_all(&buf[..n]).await.unwrap();
                }
            };
            // Ended by the client, or by the server cutting its connection.
            let hold = hold.unwrap();
            tokio::select! {
                () = echo => {}
                () = hold.cut() => {}
            }
        });
        let status = if req.method() == Method::CONNECT {
            StatusCode::OK
        } else {
            StatusCode::SWITCHING_PROTOCOLS
        };
        let mut resp = Response::new(String::new());
        *resp.status_mut() = status;
        if status == StatusCode::SWITCHING_PROTOCOLS {
            set_upgrade_fields(resp.headers_mut(), HeaderValue::from_static("test-proto"));
        }
        std::future::ready(Ok(resp))
    }

    #[tokio::test]
    async fn mesh_server_lets_an_application_switch_over_http1_and_http2() {
        let server = echo_server(crate::server::ServerLimits::default()).await;
        // HTTP/1.1 Upgrade.
        let mut h1 = switched(server.local_addr()).await;
        echoes(&mut h1).await;
        // HTTP/2 extended CONNECT (RFC 8441): the server announced it in its settings.
        let (sender, mut h2) = h2_tunnel(server.local_addr()).await;
        echoes(&mut h2).await;
        // Each tunnel held its connection; closed, they let a drain end at once.
        drop((h1, h2, sender));
        let report = server.shutdown().await;
        assert_eq!(report.forced, 0);
    }

    /// `MeshServer` in plaintext with `limits`, serving [`echoing_app`].
    async fn echo_server(limits: crate::server::ServerLimits) -> crate::server::Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        MeshServer::builder()
            .plaintext()
            .limits(limits)
            .serve(listener, tower::service_fn(echoing_app))
            .unwrap()
    }

    /// An HTTP/1.1 connection to `addr`, switched to `test-proto`.
    async fn switched(addr: SocketAddr) -> TcpStream {
        let mut io = TcpStream::connect(addr).await.unwrap();
        io.write_all(
            b"GET / HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: test-proto\r\n\r\n",
        )
        .await
        .unwrap();
        let head = read_head(&mut io).await;
        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
        io
    }

    /// An extended CONNECT (RFC 8441) to `test-proto`.
    fn extended_connect() -> Request<http_body_util::Empty<bytes::Bytes>> {
        let mut req = Request::builder()
            .method(Method::CONNECT)
            .uri("http://x/chat")
            .body(http_body_util::Empty::new())
            .unwrap();
        req.extensions_mut()
            .insert(hyper::ext::Protocol::from_static("test-proto"));
        req
    }

    /// An HTTP/2 connection to `addr` and a tunnel on it (extended CONNECT).
    async fn h2_tunnel(
        addr: SocketAddr,
    ) -> (
        hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
        TokioIo<hyper::upgrade::Upgraded>,
    ) {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            TokioIo::new(tcp),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let mut resp = sender.send_request(extended_connect()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let io = TokioIo::new(hyper::upgrade::on(&mut resp).await.unwrap());
        (sender, io)
    }

    async fn echoes<IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(io: &mut IO) {
        io.write_all(b"still there?").await.unwrap();
        let mut buf = [0; 12];
        io.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"still there?");
    }

    #[tokio::test(start_paused = true)]
    async fn a_tunnel_is_counted_as_bytes_move_and_closed_when_quiet_for_its_idle_timeout() {
        let (app, _heads) = switching_app().await;
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = TunnelMetrics::register(&mut registry);
        let idle = std::time::Duration::from_secs(30);
        let tunnels = TunnelLayer::new()
            .idle_timeout(Some(idle))
            .metrics(metrics.listener("out"));
        let server = proxy_with(app, tunnels).await;
        let mut io = TcpStream::connect(server.local_addr()).await.unwrap();
        io.write_all(
            b"GET /chat HTTP/1.1\r\nhost: chat.example\r\nconnection: upgrade\r\nupgrade: test-proto\r\n\r\n",
        )
        .await
        .unwrap();
        let head = read_head(&mut io).await;
        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
        io.write_all(b"hello").await.unwrap();
        let mut back = [0; 5];
        io.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"hello");
        // Counted while the tunnel is open.
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for series in [
            "mesh_tunnels_open{listener=\"out\"} 1\n",
            "mesh_tunnel_bytes_total{listener=\"out\",direction=\"client_to_upstream\"} 5\n",
            "mesh_tunnel_bytes_total{listener=\"out\",direction=\"upstream_to_client\"} 5\n",
        ] {
            assert!(text.contains(series), "{series} in {text}");
        }
        // Quiet: closed at the idle timeout (not the server's 120 s), both ways.
        let quiet = tokio::time::Instant::now();
        assert_eq!(io.read(&mut [0; 16]).await.unwrap(), 0);
        let waited = tokio::time::Instant::now() - quiet;
        assert!(waited >= idle && waited <= idle + idle / 8, "{waited:?}");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("mesh_tunnels_open{listener=\"out\"} 0\n"),
            "{text}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_tunnel_outlives_its_connections_idle_timeout() {
        let limits = crate::server::ServerLimits {
            idle_timeout: std::time::Duration::from_secs(1),
            ..Default::default()
        };
        let server = echo_server(limits).await;
        let (_sender, mut io) = h2_tunnel(server.local_addr()).await;
        echoes(&mut io).await;
        // Three idle timeouts without a byte: the tunnel's connection stays.
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        echoes(&mut io).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_switched_connection_counts_until_its_tunnel_ends_and_a_drain_cuts_it() {
        let limits = crate::server::ServerLimits {
            max_connections: 1,
            shutdown_timeout: std::time::Duration::from_secs(2),
            ..Default::default()
        };
        let server = echo_server(limits).await;
        let addr = server.local_addr();
        let mut tunnel = switched(addr).await;
        echoes(&mut tunnel).await;
        // The one connection allowed is the tunnel's: another is not served meanwhile.
        let get = async move {
            let mut io = TcpStream::connect(addr).await.unwrap();
            io.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
                .await
                .unwrap();
            read_head(&mut io).await
        };
        let mut get = Box::pin(get);
        let waited = tokio::time::timeout(std::time::Duration::from_secs(5), &mut get).await;
        assert!(waited.is_err(), "served beside the tunnel: {waited:?}");
        // The tunnel ends: the waiting connection is served.
        tunnel.shutdown().await.unwrap();
        let mut rest = Vec::new();
        tunnel.read_to_end(&mut rest).await.unwrap();
        let head = get.await;
        assert!(head.starts_with("HTTP/1.1 200 "), "{head}");

        // A drain waits for a tunnel up to its timeout, then cuts it.
        let mut tunnel = switched(addr).await;
        echoes(&mut tunnel).await;
        let report = server.shutdown().await;
        assert_eq!(report.forced, 1);
        let mut rest = Vec::new();
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            tunnel.read_to_end(&mut rest),
        )
        .await;
        assert!(
            matches!(read, Ok(Ok(0))),
            "the tunnel was not cut: {read:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_gone_before_the_answer_frees_its_connection() {
        // An application that never answers an upgrade, keeping the request (and with it
        // the connection's hold).
        let app = tower::service_fn(|req: Request<Incoming>| async move {
            if req.headers().contains_key(header::UPGRADE) {
                let _kept = req;
                std::future::pending::<()>().await;
            }
            Ok::<_, std::convert::Infallible>(Response::new("ok".to_owned()))
        });
        let limits = crate::server::ServerLimits {
            max_connections: 1,
            ..Default::default()
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = MeshServer::builder()
            .plaintext()
            .limits(limits)
            .serve(listener, app)
            .unwrap();
        let addr = server.local_addr();
        let mut io = TcpStream::connect(addr).await.unwrap();
        io.write_all(
            b"GET / HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: test-proto\r\n\r\n",
        )
        .await
        .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        drop(io);
        // The one connection allowed is free again: the next is served.
        let mut io = TcpStream::connect(addr).await.unwrap();
        io.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let head = tokio::time::timeout(std::time::Duration::from_secs(5), read_head(&mut io))
            .await
            .expect("the first connection still holds the only place");
        assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
        let report = server.shutdown().await;
        assert_eq!(report.forced, 0);
    }

    #[tokio::test]
    async fn tunnels_to_an_http2_endpoint_leave_its_shared_connection_free() {
        // One stream per connection: a tunnel on the shared connection would block the
        // next request until it ended.
        let limits = crate::server::ServerLimits {
            max_concurrent_streams: 1,
            ..Default::default()
        };
        let server = echo_server(limits).await;
        let client = EndpointClient::<http_body_util::Empty<bytes::Bytes>>::new(
            server.local_addr(),
            ConnectSettings {
                protocol: Protocol::Http2,
                ..ConnectSettings::plaintext()
            },
        );
        let tunnel = |client: EndpointClient<_>| async move {
            let mut resp = client.send(extended_connect()).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            TokioIo::new(hyper::upgrade::on(&mut resp).await.unwrap())
        };
        let wait = std::time::Duration::from_secs(5);
        let mut first = tunnel(client.clone()).await;
        let mut second = tokio::time::timeout(wait, tunnel(client.clone()))
            .await
            .expect("a tunnel waited behind another");
        let get = Request::get("http://x/")
            .body(http_body_util::Empty::new())
            .unwrap();
        let resp = tokio::time::timeout(wait, client.send(get))
            .await
            .expect("a request waited behind the tunnels")
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        echoes(&mut first).await;
        echoes(&mut second).await;
    }

    #[tokio::test]
    async fn a_switch_nobody_asked_for_is_answered_502() {
        let switching = tower::service_fn(|_req: Request<()>| async {
            let resp = Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header(header::UPGRADE, "test-proto")
                .header(header::CONNECTION, "upgrade")
                .body(())
                .unwrap();
            Ok::<_, std::convert::Infallible>(resp)
        });
        let resp = Tunnel::new(switching)
            .oneshot(Request::new(()))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
        assert!(resp.headers().get(header::UPGRADE).is_none());
    }

    #[test]
    fn an_extended_connect_stands_for_get() {
        let mut req = Request::builder()
            .method(Method::CONNECT)
            .uri("http://chat.example/ws")
            .body(())
            .unwrap();
        assert_eq!(request_method(&req), Method::CONNECT);
        req.extensions_mut()
            .insert(hyper::ext::Protocol::from_static("websocket"));
        assert_eq!(request_method(&req), Method::GET);
        let post = Request::post("/").body(()).unwrap();
        assert_eq!(request_method(&post), Method::POST);
    }

    #[test]
    fn only_a_connection_naming_upgrade_asks_for_one() {
        let headers = |pairs: &[(&str, &str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.append(
                    http::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            h
        };
        let ws = [("connection", "keep-alive"), ("connection", " UPGRADE ")];
        let mut h = headers(&ws);
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        assert_eq!(requested(&h).unwrap(), "websocket");
        assert!(requested(&headers(&[("upgrade", "websocket")])).is_none());
        assert!(requested(&headers(&[("connection", "upgrade"), ("upgrade", "h2c")])).is_none());
        assert!(
            requested(&headers(&[
                ("connection", "upgrade"),
                ("upgrade", "foo, H2C")
            ]))
            .is_none()
        );
        assert!(requested(&headers(&[("connection", "upgraded"), ("upgrade", "x")])).is_none());
    }
}
