//! `MeshServer`: serves any `tower::Service<http::Request<Incoming>>` (an axum `Router`,
//! a tonic server, a `service_fn`) to the mesh.
//!
//! Each connection walks the inbound stack once, top to bottom:
//!
//! ```text
//! accept                  at most `max_connections` open; beyond, the oldest connection
//!                         still in its handshake (or without a first request) is closed
//!                         to make room, and with none accepting waits
//! mTLS handshake          SPIFFE, bounded (mesh-spiffe); refused: closed, nothing served
//! HTTP/1.1 or HTTP/2      by the client's first bytes (ALPN over TLS, h2c prior
//!                         knowledge in plaintext); the limits of [`ServerLimits`]
//! per request:
//!   PeerIdentity, ClientAddr   extensions from the connection only (a client cannot set them)
//!   metrics::server            duration, status, sizes (when `metrics` is set); the access
//!                              log's line when its response ends (when switched on)
//!   body limit                 413 past `max_request_body_size` declared, 400 for a bad
//!                              Host (gRPC: RESOURCE_EXHAUSTED, INTERNAL)
//!   authz::Authorize           the policy (default: allow every caller the TLS layer let in)
//!   ratelimit::RateLimit       GCRA per client and in total (default: none)
//!   the application
//! ```
//!
//! **Upgrades.** An application may switch a request's connection (WebSocket over
//! HTTP/1.1, or over HTTP/2 with extended CONNECT, RFC 8441, offered unless
//! [`MeshServerBuilder::extended_connect`] turns it off): it takes hyper's `OnUpgrade`
//! (`hyper::upgrade::on`) and should keep the request's
//! [`Hold`](crate::upgrade::Hold) in the task that serves the switched connection, so that
//! the connection's idle checks, `max_connections` and drains count the tunnel. A proxy
//! puts [`Tunnel`](crate::upgrade::Tunnel) in front of its forwarding stack instead.
//!
//! **Certificate lifetime.** An mTLS connection is shut down gracefully (as at its idle
//! timeout) once the client certificate its handshake verified expires, looked for with
//! the idle checks, and closed when streams outlive that by the shutdown timeout (a gRPC
//! watch, say): the identity is vouched for no longer, and the client reconnects with its
//! current SVID, verified against the current bundles. So an HTTP connection outlives its
//! peer's SVID (an hour or so from SPIRE; a root removed from the bundles or an identity
//! withdrawn included) by the shutdown timeout at most. An HTTP/1.1 connection switched to
//! a tunnel (a WebSocket) is not bounded so: the tunnel is the application's.
//!
//! Plaintext is served only when chosen with [`MeshServerBuilder::plaintext`]; requests
//! then carry no [`PeerIdentity`](mesh_spiffe::PeerIdentity) and are unauthenticated to
//! the policy.
//!
//! **Graceful shutdown.** [`Server::shutdown`] stops accepting, asks every connection to
//! finish (HTTP/1.1: close after the response in progress; HTTP/2: `GOAWAY`, then the
//! streams in flight finish), waits up to [`ServerLimits::shutdown_timeout`], then closes
//! what is left, and reports how many it had to force.
//!
//! **Connections accepted elsewhere.** [`MeshServerBuilder::serve_handed`] serves the
//! connections given to a [`Handoff`] instead of a listener's: a transparent listener
//! (`mesh_tower::transparent`, feature `transparent`) accepts, picks a server by each
//! connection's original destination and hands the connection over; limits, drain and
//! metrics are the same.
//! [`MeshServerBuilder::serve_incoming`] serves byte streams of any kind (a Unix socket's,
//! an in-memory pipe's, a simulated network's) from a stream the caller feeds.
//!
//! ```no_run
//! use mesh_spiffe::{Authorizer, CredentialStore, Mtls, MtlsAcceptor};
//! use mesh_tower::server::MeshServer;
//!
//! # async fn run(credentials: CredentialStore) -> Result<(), Box<dyn std::error::Error>> {
//! let acceptor = MtlsAcceptor::new(&Mtls::new(credentials), Authorizer::any())?;
//! let app = tower::service_fn(|_req: http::Request<hyper::body::Incoming>| async {
//!     Ok::<_, std::convert::Infallible>(http::Response::new(String::from("hello")))
//! });
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:4143").await?;
//! let server = MeshServer::builder().mtls(acceptor).serve(listener, app)?;
//! // ... on SIGTERM:
//! let report = server.shutdown().await;
//! assert_eq!(report.forced, 0);
//! # Ok(()) }
//! ```

mod body_limit;
mod conn;
mod head_timer;
mod limits;
mod streams;

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use mesh_core::config::{InboundConfig, MeshConfig, Protocol, TlsMode};
use mesh_core::error::BoxError;
use mesh_spiffe::{Authorizer, Mtls, MtlsAcceptor, ServerTlsAcceptor};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tower_service::Service;

use crate::access_log::{AccessLogHandle, AccessLogLayer};
use crate::authz::{Authorize, AuthorizeLayer, Policy};
use crate::body::ResponseBody;
use crate::metrics::server::{InboundMetrics, ListenerMetrics, MeteredBody};
use crate::ratelimit::{Limits, RateLimit, RateLimitLayer};

#[doc(hidden)]
pub use self::body_limit::host_problem;
pub use self::limits::ServerLimits;

/// How many handed-over connections wait for a server before [`Handoff::hand`] waits.
const HANDOFF_QUEUE: usize = 128;

/// Hands connections accepted elsewhere to a server started with
/// [`MeshServerBuilder::serve_handed`]. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Handoff {
    tx: tokio::sync::mpsc::Sender<(tokio::net::TcpStream, SocketAddr)>,
}

impl Handoff {
    /// Gives `tcp` (from client `remote`) to the server, waiting while its queue is full;
    /// gives it back when the server is gone (shut down).
    pub async fn hand(
        &self,
        tcp: tokio::net::TcpStream,
        remote: SocketAddr,
    ) -> Result<(), tokio::net::TcpStream> {
        self.tx.send((tcp, remote)).await.map_err(|e| (e.0).0)
    }
}

/// The receiving end of a [`Handoff`], for [`MeshServerBuilder::serve_handed`].
#[derive(Debug)]
pub struct HandedConnections {
    pub(crate) addr: SocketAddr,
    pub(crate) rx: tokio::sync::mpsc::Receiver<(tokio::net::TcpStream, SocketAddr)>,
}

/// A [`Handoff`] and the connections it hands over, which a server reports as accepted on
/// `addr` (the listener that really accepted them).
pub fn handoff(addr: SocketAddr) -> (Handoff, HandedConnections) {
    let (tx, rx) = tokio::sync::mpsc::channel(HANDOFF_QUEUE);
    (Handoff { tx }, HandedConnections { addr, rx })
}

/// The client's address, as a request extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientAddr(pub SocketAddr);

/// Where the streams of an HTTP/2 connection run ([`MeshServerBuilder::h2_streams`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum StreamTasks {
    /// Each stream in a task of its own, as hyper and tonic run them: the streams of one
    /// connection run on every worker thread, so handlers that compute do so in parallel
    /// even when all calls share one connection (as gRPC clients' do). The default.
    #[default]
    Spawned,
    /// Every stream in its connection's task: no task of its own (a stream is still a
    /// box and a node of the connection's set) and no cross-thread wake-up per request,
    /// and a connection's streams stay on one thread
    /// (measured on the proxy bench: 0.98x the instructions and about 0.92x the CPU per
    /// request of `Spawned`). For handlers that mostly wait, such as a proxy's (mesh-proxy
    /// uses it on every listener): a handler that computes or blocks holds up the other
    /// streams of its connection. As with tasks, a handler that panics resets only its
    /// stream, and one that panics as it is dropped is caught too (its siblings are still
    /// dropped when their connection ends).
    InConnection,
}

/// Configures a [`MeshServer`]; see the [module docs](self).
#[must_use]
pub struct MeshServerBuilder {
    transport: Option<conn::Transport>,
    limits: ServerLimits,
    tcp: crate::sock::TcpOptions,
    policy: Option<Policy>,
    rate_limit: Option<Limits>,
    metrics: Option<ListenerMetrics>,
    protocol: Protocol,
    streams: StreamTasks,
    date_header: bool,
    extended_connect: bool,
    #[cfg(feature = "opaque")]
    opaque: Option<crate::opaque::OpaqueClient>,
    /// The decision record, and the listener's name in it (`from_config`'s; else the
    /// address).
    decisions: Option<crate::decision::DecisionRecord>,
    name: Option<String>,
    access_log: Option<AccessLogLayer>,
}

impl fmt::Debug for MeshServerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshServerBuilder")
            .field(
                "transport",
                &match &self.transport {
                    None => "unset",
                    Some(conn::Transport::Plain) => "plaintext",
                    Some(conn::Transport::Mtls(_)) => "mtls",
                    Some(conn::Transport::Tls(_)) => "tls",
                },
            )
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// Serves the mesh; see the [module docs](self).
#[derive(Debug)]
pub struct MeshServer;

impl MeshServer {
    /// Starts configuring a server.
    pub fn builder() -> MeshServerBuilder {
        MeshServerBuilder {
            transport: None,
            limits: ServerLimits::default(),
            tcp: crate::sock::TcpOptions::default(),
            policy: None,
            rate_limit: None,
            metrics: None,
            protocol: Protocol::Auto,
            streams: StreamTasks::Spawned,
            date_header: true,
            extended_connect: true,
            #[cfg(feature = "opaque")]
            opaque: None,
            decisions: None,
            name: None,
            access_log: None,
        }
    }
}

/// Why a server cannot start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// Neither `mtls` nor `plaintext` was chosen.
    #[error(
        "choose the transport: `mtls(acceptor)`, `server_tls(acceptor)`, or `plaintext()` explicitly"
    )]
    NoTransport,
    /// The listener's address could not be read.
    #[error("reading the listener's address: {0}")]
    Listener(#[source] std::io::Error),
    /// The configuration does not describe a server this can run.
    #[error("{key}: {message}")]
    Config {
        /// The key at fault (`inbound[0].authorization`).
        key: String,
        /// What is wrong.
        message: String,
    },
    /// The mTLS acceptor could not be built from the credentials.
    #[error("mTLS: {0}")]
    Tls(#[source] tokio_rustls::rustls::Error),
}

impl MeshServerBuilder {
    /// A server for the `[[inbound]]` listener `inbound` of `config`: its transport
    /// (`plaintext` is taken as asked; for `mtls`, add the acceptor with
    /// [`mtls`](Self::mtls) or [`mtls_credentials`](Self::mtls_credentials)), protocol,
    /// authorization policy and rate limit by name, its `limits`, and the configuration's
    /// `drain_timeout` as the shutdown timeout. `index` is the listener's position, for
    /// error keys.
    pub fn from_config(
        index: usize,
        inbound: &InboundConfig,
        config: &MeshConfig,
    ) -> Result<Self, ServerError> {
        let key = |field: &str| format!("inbound[{index}].{field}");
        let mut builder = MeshServer::builder();
        if inbound.tls == TlsMode::Plaintext {
            builder = builder.plaintext();
        }
        builder.protocol = match inbound.protocol {
            Protocol::Opaque => {
                return Err(ServerError::Config {
                    key: key("protocol"),
                    message: "an opaque TCP listener is not an HTTP server".into(),
                });
            }
            other => other,
        };
        if let Some(name) = &inbound.authorization {
            let policy = config
                .authorization
                .get(name)
                .ok_or_else(|| ServerError::Config {
                    key: key("authorization"),
                    message: format!("no authorization policy named `{name}`"),
                })?;
            builder.policy = Some(Policy::new(name, policy).map_err(|e| ServerError::Config {
                key: format!("authorization.{name}"),
                message: e.to_string(),
            })?);
        }
        if let Some(name) = &inbound.rate_limit {
            let limits = config
                .rate_limits
                .get(name)
                .ok_or_else(|| ServerError::Config {
                    key: key("rate_limit"),
                    message: format!("no rate limit named `{name}`"),
                })?;
            builder.rate_limit = Some(Limits::new(limits));
        }
        builder.limits = builder.limits.with_config(&inbound.limits);
        builder.limits.shutdown_timeout = config.drain_timeout;
        builder.tcp = crate::sock::TcpOptions::from_config(&config.tcp);
        builder.name = Some(inbound.name.clone());
        Ok(builder)
    }

    /// On a plaintext server, detects each connection's protocol from its first bytes
    /// ([`crate::detect`], waiting at most
    /// [`DEFAULT_PEEK_TIMEOUT`](crate::detect::DEFAULT_PEEK_TIMEOUT)): HTTP/1.x and
    /// HTTP/2 are served, anything else is relayed as opaque TCP by `client` — one
    /// outbound port for every protocol an application speaks. Ignored over mTLS. The
    /// server's authorization policy and rate limit judge each relayed connection as an
    /// opaque inbound port's do, its client without an identity.
    #[cfg(feature = "opaque")]
    pub fn opaque_fallback(mut self, client: crate::opaque::OpaqueClient) -> Self {
        self.opaque = Some(client);
        self
    }

    /// Serves over SPIFFE mTLS with `mtls`'s credentials, admitting any client with a
    /// verified identity from a trusted domain (authorization then decides per request).
    pub fn mtls_credentials(self, mtls: &Mtls) -> Result<Self, ServerError> {
        let acceptor = MtlsAcceptor::new(mtls, Authorizer::any()).map_err(ServerError::Tls)?;
        Ok(self.mtls(acceptor))
    }

    /// Serves over SPIFFE mTLS: only clients `acceptor` authorizes get past the
    /// handshake, and their identity reaches each request as
    /// [`PeerIdentity`](mesh_spiffe::PeerIdentity).
    pub fn mtls(mut self, acceptor: MtlsAcceptor) -> Self {
        self.transport = Some(conn::Transport::Mtls(acceptor));
        self
    }

    /// Serves over TLS with a certificate of the listener's own, asking clients for none
    /// (an edge listener for clients outside the mesh; see
    /// [`mesh_spiffe::server_tls`]). Requests carry no `PeerIdentity`: to the policy,
    /// every client is unauthenticated.
    pub fn server_tls(mut self, acceptor: ServerTlsAcceptor) -> Self {
        self.transport = Some(conn::Transport::Tls(acceptor));
        self
    }

    /// Serves in plaintext: no identities, every caller unauthenticated.
    pub fn plaintext(mut self) -> Self {
        self.transport = Some(conn::Transport::Plain);
        self
    }

    /// The limits (default: [`ServerLimits::default`]).
    pub fn limits(mut self, limits: ServerLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Socket options for accepted TCP connections from other hosts (default
    /// [`TcpOptions::default`](crate::sock::TcpOptions::default): keepalive after 10 s, a
    /// 40 s user timeout; see [`crate::sock`]).
    pub fn tcp(mut self, options: crate::sock::TcpOptions) -> Self {
        self.tcp = options;
        self
    }

    /// Authorizes every request by `policy` (default: allow every caller).
    pub fn authorization(mut self, policy: Policy) -> Self {
        self.policy = Some(policy);
        self
    }

    /// Limits the requests authorization admits (default: no limit).
    pub fn rate_limit(mut self, limits: Limits) -> Self {
        self.rate_limit = Some(limits);
        self
    }

    /// Records the inbound metrics of this listener (default: none): requests, authorization
    /// decisions, rate-limit refusals and TLS handshake failures.
    pub fn metrics(mut self, metrics: ListenerMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Where HTTP/2 streams run (default: [`StreamTasks::Spawned`], each in a task of its
    /// own).
    pub fn h2_streams(mut self, streams: StreamTasks) -> Self {
        self.streams = streams;
        self
    }

    /// Whether a response without a `Date` header gets one (default: yes, as RFC 9110
    /// asks of an origin server with a clock). hyper reads the system clock for it, at
    /// most once a second: a deterministic simulation turns it off, as nothing else in
    /// the server reads the real clock.
    pub fn date_header(mut self, enabled: bool) -> Self {
        self.date_header = enabled;
        self
    }

    /// Whether HTTP/2 clients may open tunnels with extended CONNECT (RFC 8441, the
    /// `SETTINGS_ENABLE_CONNECT_PROTOCOL` setting; default: yes): WebSocket over HTTP/2
    /// for an application that serves it, and upgrades from peer proxies (see
    /// [`crate::upgrade`]). Off, a browser opens its WebSockets over HTTP/1.1: for a
    /// proxy whose upstreams may speak HTTP/1.1 only.
    pub fn extended_connect(mut self, enabled: bool) -> Self {
        self.extended_connect = enabled;
        self
    }

    /// Records every authorization decision in `record` (default: none; see
    /// [`crate::decision`]), under the listener's name from
    /// [`from_config`](Self::from_config), or else its address.
    pub fn decisions(mut self, record: &crate::decision::DecisionRecord) -> Self {
        self.decisions = Some(record.clone());
        self
    }

    /// Logs every request with `layer`'s log (default: a disabled one, which
    /// [`Server::access_log`] can switch on); see [`access_log`](crate::access_log). The
    /// line is written by the outermost layer (the inbound metrics, which wrap each
    /// request already), so what authorization, rate limiting and the body limit answer
    /// is logged too.
    pub fn access_log(mut self, layer: AccessLogLayer) -> Self {
        self.access_log = Some(layer);
        self
    }

    /// Starts serving `app` on `listener`, in a task of the current Tokio runtime.
    ///
    /// Each connection is one task, which holds a clone of `app` and calls it in place
    /// whenever it is ready at once; a request that finds it not ready drives a clone of
    /// its own to readiness. HTTP/2 streams run as [`h2_streams`](Self::h2_streams) says.
    pub fn serve<S, B>(self, listener: TcpListener, app: S) -> Result<Server, ServerError>
    where
        S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let addr = listener.local_addr().map_err(ServerError::Listener)?;
        let source = crate::accept::Source::Listener(listener, self.tcp);
        self.serve_from(conn::Accepted::Tcp(source), addr, app)
    }

    /// Starts serving `app` on the connections handed over by the [`Handoff`] of
    /// `connections`, in a task of the current Tokio runtime. The server stops taking
    /// connections at shutdown or once every `Handoff` is dropped, and then drains.
    pub fn serve_handed<S, B>(
        self,
        connections: HandedConnections,
        app: S,
    ) -> Result<Server, ServerError>
    where
        S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let HandedConnections { addr, rx } = connections;
        let source = crate::accept::Source::Handed(rx, self.tcp);
        self.serve_from(conn::Accepted::Tcp(source), addr, app)
    }

    /// Starts serving `app` on byte streams of any kind (a Unix socket's, an in-memory
    /// pipe's, a simulated network's), each given with the client's address, in a task of
    /// the current Tokio runtime.
    ///
    /// - `addr` is only a label: what [`Server::local_addr`] reports, and the listener's
    ///   name in the decision record and the access log's default unless its
    ///   configuration names it.
    /// - Each stream's client address becomes its requests' [`ClientAddr`] and the access
    ///   log's `client.addr` (for a Unix socket, say, a placeholder of your choice).
    /// - The server stops taking connections at shutdown or when `incoming` ends; in the
    ///   second case the open ones run to their end, and a later shutdown drains them.
    /// - An error from `incoming` is logged and waited out (50 ms), as a listener's accept
    ///   error is.
    /// - A `TcpStream` given here is served as it is: set `TCP_NODELAY` on it yourself
    ///   ([`serve`](Self::serve) does).
    ///
    /// Everything but the transport is as on TCP: TLS or mTLS over the stream, limits,
    /// drain, metrics. The opaque fallback needs TCP (it peeks at a connection's first
    /// bytes), so a server with one is refused here.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// use mesh_tower::server::MeshServer;
    ///
    /// let listener = tokio::net::UnixListener::bind("/run/app/mesh.sock")?;
    /// let incoming = futures_util::stream::unfold(listener, |listener| async move {
    ///     let accepted = listener.accept().await;
    ///     let accepted = accepted.map(|(stream, _)| (stream, ([127, 0, 0, 1], 0).into()));
    ///     Some((accepted, listener))
    /// });
    /// let app = tower::service_fn(|_req: http::Request<hyper::body::Incoming>| async {
    ///     Ok::<_, std::convert::Infallible>(http::Response::new(String::from("hello")))
    /// });
    /// let addr = ([127, 0, 0, 1], 0).into();
    /// let server = MeshServer::builder().plaintext().serve_incoming(addr, incoming, app)?;
    /// # Ok(()) }
    /// ```
    pub fn serve_incoming<I, IO, S, B>(
        self,
        addr: SocketAddr,
        incoming: I,
        app: S,
    ) -> Result<Server, ServerError>
    where
        I: futures_util::Stream<Item = std::io::Result<(IO, SocketAddr)>> + Send + 'static,
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        #[cfg(feature = "opaque")]
        if self.opaque.is_some() {
            return Err(ServerError::Config {
                key: "opaque_fallback".into(),
                message: "the opaque fallback needs TCP connections (it peeks at their first bytes); serve a listener instead".into(),
            });
        }
        let source = crate::accept::Streams::new(incoming);
        self.serve_from(conn::Accepted::Streams(source), addr, app)
    }

    fn serve_from<S, B>(
        self,
        source: conn::Accepted,
        addr: SocketAddr,
        app: S,
    ) -> Result<Server, ServerError>
    where
        S: conn::App<B>,
        B: conn::AppBody,
    {
        let tls = self.transport.ok_or(ServerError::NoTransport)?;
        let policy = self.policy.unwrap_or_else(|| Policy::allow_all("default"));
        let limits = self
            .rate_limit
            .unwrap_or_else(|| Limits::new(&Default::default()));
        let mut authorize = AuthorizeLayer::new(policy);
        let mut rate_limit = RateLimitLayer::new(limits);
        if let Some(metrics) = &self.metrics {
            authorize = authorize.with_metrics(metrics);
            rate_limit = rate_limit.with_metrics(metrics);
        }
        let name = self.name.unwrap_or_else(|| addr.to_string());
        if let Some(record) = &self.decisions {
            authorize = authorize.with_decisions(record.recorder(name.clone()));
        }
        let access_log = self
            .access_log
            .unwrap_or_else(|| AccessLogLayer::disabled(name));
        let policy = authorize.handle().clone();
        let limits = rate_limit.handle().clone();
        let inner = tower::ServiceBuilder::new()
            .layer(authorize)
            .layer(rate_limit)
            .service(app);
        let inner = body_limit::BodyLimit {
            inner,
            max: self.limits.max_request_body_size,
        };
        // The access log is written by the metrics layer, at the same points: a layer of
        // its own would cost every request a move of its whole future and response.
        let app = match &self.metrics {
            Some(metrics) => tower::Layer::layer(metrics, inner),
            None => InboundMetrics::disabled(inner),
        }
        .with_access_log(access_log.recorder());
        let shared = Arc::new(conn::Shared {
            protocol: self.protocol,
            streams: self.streams,
            date_header: self.date_header,
            extended_connect: self.extended_connect,
            app,
            tls,
            limits: self.limits,
            metrics: self.metrics,
            #[cfg(feature = "opaque")]
            opaque: self.opaque.map(|client| conn::OpaqueFallback {
                client,
                policy: policy.clone(),
                limits: limits.clone(),
            }),
        });
        let (stop, stopping) = watch::channel(false);
        let task = tokio::spawn(conn::accept_loop::<
            InboundMetrics<body_limit::BodyLimit<Authorize<RateLimit<S>>>>,
            MeteredBody<ResponseBody<ResponseBody<ResponseBody<B>>>>,
        >(source, shared, stopping));
        tracing::debug!(%addr, "serving");
        Ok(Server {
            addr,
            stop,
            task,
            policy,
            limits,
            access_log: access_log.handle().clone(),
        })
    }
}

/// A running server. Dropping it starts a graceful shutdown without waiting for it.
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<ShutdownReport>,
    policy: crate::authz::PolicyHandle,
    limits: crate::ratelimit::LimitsHandle,
    access_log: AccessLogHandle,
}

pub use crate::accept::ShutdownReport;

impl Server {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces the authorization policy at run time (allow-all when none was set).
    pub fn policy(&self) -> &crate::authz::PolicyHandle {
        &self.policy
    }

    /// Replaces the rate limits at run time (none when none were set).
    pub fn rate_limit(&self) -> &crate::ratelimit::LimitsHandle {
        &self.limits
    }

    /// Switches the access log on or off at run time (see
    /// [`MeshServerBuilder::access_log`]).
    pub fn access_log(&self) -> &AccessLogHandle {
        &self.access_log
    }

    /// Stops accepting, lets requests in flight finish (up to the shutdown timeout) and
    /// closes every connection.
    pub async fn shutdown(mut self) -> ShutdownReport {
        let _ = self.stop.send(true);
        let task = &mut self.task;
        match task.await {
            Ok(report) => report,
            Err(error) => {
                tracing::warn!(%error, "the server task ended abnormally");
                ShutdownReport {
                    open_at_shutdown: 0,
                    forced: 0,
                }
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use mesh_core::sock::{Keepalive, TcpOptions, USER_TIMEOUT};
    use socket2::SockRef;
    use tokio::net::TcpStream;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dialled = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        (dialled, accepted)
    }

    /// A server applies its builder's options to the connections it is handed (and, by
    /// the same code, to those it accepts): the client address decides, not the socket.
    #[tokio::test]
    async fn a_server_sets_its_builders_options() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let custom = TcpOptions::default().keepalive(Some(Keepalive {
            idle: Duration::from_secs(33),
            interval: Duration::from_secs(7),
            probes: 2,
        }));
        let (handoff, connections) = super::handoff("127.0.0.1:1".parse().unwrap());
        let app = tower::service_fn(|_req: http::Request<hyper::body::Incoming>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(String::from("ok")))
        });
        let server = super::MeshServer::builder()
            .plaintext()
            .tcp(custom)
            .serve_handed(connections, app)
            .unwrap();
        let (mut client, accepted) = pair().await;
        // The same socket, through another descriptor: its options as the server set them.
        let watch = SockRef::from(&accepted).try_clone().unwrap();
        handoff
            .hand(accepted, "10.9.8.7:5000".parse().unwrap())
            .await
            .unwrap();
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        assert!(answer.ends_with("ok"), "{answer}");
        assert!(watch.keepalive().unwrap());
        #[cfg(any(target_os = "linux", target_os = "macos"))]
        {
            assert_eq!(watch.tcp_keepalive_time().unwrap(), Duration::from_secs(33));
            assert_eq!(
                watch.tcp_keepalive_interval().unwrap(),
                Duration::from_secs(7)
            );
            assert_eq!(watch.tcp_keepalive_retries().unwrap(), 2);
        }
        #[cfg(target_os = "linux")]
        assert_eq!(watch.tcp_user_timeout().unwrap(), Some(USER_TIMEOUT));
        server.shutdown().await;
    }
}
