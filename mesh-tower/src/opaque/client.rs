//! The outbound half: an endpoint picked by P2C over open connections, dialled with
//! failover, then relayed.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use mesh_core::discover::BoxDiscover;
use mesh_core::identity::IdentityPattern;
use mesh_spiffe::{Mtls, PeerIdentity};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::endpoints::{Endpoints, MakeTarget, Open, Pick, Target, follow};
use super::{BuildError, DEFAULT_MAX_CONNECT_ATTEMPTS, Limits, OpaqueError, Serving};
use crate::backoff::Backoff;
use crate::balance::DEFAULT_FAIL_FAST;
use crate::connect::{
    ConnectError, DEFAULT_CONNECT_BACKOFF, DEFAULT_CONNECT_TIMEOUT, DialedIo, Dialer,
};
use crate::relay::{ListenerTunnels, Relay};

/// Relays local connections to a service's endpoints; see the [module docs](super).
/// Cheap to clone: clones share the endpoints and their connection counts.
///
/// [`replace`](OpaqueClient::replace) swaps what a client and its clones relay with, while
/// they serve (a configuration reload).
#[derive(Clone)]
pub struct OpaqueClient {
    current: Arc<ArcSwap<Shared>>,
}

/// One relay's view of its client: what was current when it began.
struct Current {
    shared: Arc<Shared>,
}

/// Configures an [`OpaqueClient`]; see the [module docs](super).
#[must_use]
pub struct OpaqueClientBuilder {
    discovery: BoxDiscover,
    transport: Option<Option<Mtls>>,
    server_identity: Option<IdentityPattern>,
    service: String,
    settings: Settings,
    limits: Limits,
    relay: Relay,
    seed: Option<u64>,
    dialer: Option<Dialer>,
}

impl fmt::Debug for OpaqueClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpaqueClientBuilder")
            .field("service", &self.service)
            .field("mtls", &matches!(self.transport, Some(Some(_))))
            .field("settings", &self.settings)
            .field("dialer", &self.dialer.is_some())
            .finish_non_exhaustive()
    }
}

/// How a relay picks and dials.
#[derive(Clone, Copy, Debug)]
struct Settings {
    connect_timeout: Duration,
    max_attempts: usize,
    fail_fast: Duration,
    backoff: Backoff,
}

/// What a finished relay did.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelayStats {
    /// The endpoint it was relayed to.
    pub endpoint: SocketAddr,
    /// The endpoint's verified identity (mTLS), or `None` in plaintext.
    pub peer: Option<PeerIdentity>,
    /// Endpoints tried, the one that connected included.
    pub attempts: usize,
    /// Bytes from the local connection to the endpoint.
    pub sent: u64,
    /// Bytes from the endpoint to the local connection.
    pub received: u64,
}

impl OpaqueClient {
    /// Starts configuring a client for the endpoints `discovery` gives.
    pub fn builder(discovery: BoxDiscover) -> OpaqueClientBuilder {
        OpaqueClientBuilder {
            discovery,
            transport: None,
            server_identity: None,
            service: String::from("opaque"),
            settings: Settings {
                connect_timeout: DEFAULT_CONNECT_TIMEOUT,
                max_attempts: DEFAULT_MAX_CONNECT_ATTEMPTS,
                fail_fast: DEFAULT_FAIL_FAST,
                backoff: DEFAULT_CONNECT_BACKOFF,
            },
            limits: Limits::default(),
            relay: Relay::new(),
            seed: None,
            dialer: None,
        }
    }
}

impl OpaqueClientBuilder {
    /// Dials endpoints with SPIFFE mTLS, requiring the identity discovery gives for each
    /// or, when it gives none, one [`server_identity`](Self::server_identity) matches (an
    /// endpoint with neither is refused: the client fails closed).
    pub fn mtls(mut self, mtls: Mtls) -> Self {
        self.transport = Some(Some(mtls));
        self
    }

    /// Dials endpoints in plaintext.
    pub fn plaintext(mut self) -> Self {
        self.transport = Some(None);
        self
    }

    /// The identity endpoints must present when discovery names none for them.
    pub fn server_identity(mut self, pattern: IdentityPattern) -> Self {
        self.server_identity = Some(pattern);
        self
    }

    /// The service's name, for logs and errors (default `opaque`).
    pub fn service_name(mut self, name: impl Into<String>) -> Self {
        self.service = name.into();
        self
    }

    /// Counts connections relayed and their bytes in `tunnels` (default: not counted).
    pub fn tunnels(mut self, tunnels: ListenerTunnels) -> Self {
        self.relay = self.relay.metrics(tunnels);
        self
    }

    /// Closes a connection after this long without a byte either way (`None`: never;
    /// default [`DEFAULT_IDLE_TIMEOUT`](crate::relay::DEFAULT_IDLE_TIMEOUT), 1 hour).
    pub fn idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.relay = self.relay.idle_timeout(timeout);
        self
    }

    /// Bounds TCP connect plus TLS handshake to one endpoint (default 1 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.settings.connect_timeout = timeout;
        self
    }

    /// Distinct endpoints a connection tries before it fails (default 3, at least 1).
    pub fn max_connect_attempts(mut self, attempts: usize) -> Self {
        self.settings.max_attempts = attempts.max(1);
        self
    }

    /// How long a connection waits for an endpoint to pick when there is none, or none
    /// out of back-off (default 3 s).
    pub fn fail_fast(mut self, timeout: Duration) -> Self {
        self.settings.fail_fast = timeout;
        self
    }

    /// The back-off of an endpoint after a failed connect (default 100 ms to 10 s).
    pub fn connect_backoff(mut self, backoff: Backoff) -> Self {
        self.settings.backoff = backoff;
        self
    }

    /// Bounds the connections [`OpaqueClient::serve`] has open at once (default 10,000).
    pub fn max_connections(mut self, max: usize) -> Self {
        self.limits.max_connections = max;
        self
    }

    /// How long [`OpaqueClient::serve`]'s connections may go on after a shutdown began
    /// (default 30 s).
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.limits.shutdown_timeout = timeout;
        self
    }

    /// Socket options for the connections to and from other hosts, accepted and dialled (default
    /// [`TcpOptions::default`](crate::sock::TcpOptions::default): keepalive after 10 s, a
    /// 40 s user timeout; see [`crate::sock`]).
    pub fn tcp(mut self, options: crate::sock::TcpOptions) -> Self {
        self.limits.tcp = options;
        self
    }

    /// Opens the byte streams to endpoints with `dialer` instead of TCP (a simulated
    /// network, an in-memory pipe, a tunnel), as
    /// [`MeshClientBuilder::dialer`](crate::client::MeshClientBuilder::dialer) does for
    /// HTTP. The connect timeout, mTLS with its identity checks, failover and back-off
    /// apply as they do to TCP: a dial that fails is a connect failure of the endpoint.
    pub fn dialer(mut self, dialer: Dialer) -> Self {
        self.dialer = Some(dialer);
        self
    }

    /// Seeds the random picks (default: a random seed).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Builds the client and starts following discovery, in a task of the current Tokio
    /// runtime (it ends when the last clone of the client is dropped).
    pub fn build(self) -> Result<OpaqueClient, BuildError> {
        let transport = self.transport.ok_or(BuildError::NoTransport)?;
        let endpoints = Arc::new(Endpoints {
            set: ArcSwap::from_pointee(Vec::new()),
            changed: watch::Sender::new(()),
            ended: AtomicBool::new(false),
        });
        let make = MakeTarget {
            transport,
            server_identity: self.server_identity,
            service: self.service.clone(),
        };
        let task = tokio::spawn(follow(self.discovery, endpoints.clone(), make));
        Ok(OpaqueClient {
            current: Arc::new(ArcSwap::from_pointee(Shared {
                endpoints,
                service: self.service,
                settings: self.settings,
                limits: self.limits,
                relay: self.relay,
                rng: Mutex::new(match self.seed {
                    Some(seed) => fastrand::Rng::with_seed(seed),
                    None => fastrand::Rng::new(),
                }),
                discovery: task.abort_handle(),
                dialer: self.dialer,
            })),
        })
    }
}

struct Shared {
    endpoints: Arc<Endpoints>,
    service: String,
    settings: Settings,
    limits: Limits,
    relay: Relay,
    rng: Mutex<fastrand::Rng>,
    discovery: AbortHandle,
    dialer: Option<Dialer>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.discovery.abort();
    }
}

/// A connection to an endpoint.
enum Remote {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// Opened by a [`Dialer`].
    Dialed(Box<dyn DialedIo>),
    DialedTls(Box<tokio_rustls::client::TlsStream<Box<dyn DialedIo>>>),
}

impl fmt::Debug for OpaqueClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpaqueClient")
            .field("service", &self.current.load().service)
            .field("endpoints", &self.endpoint_count())
            .finish_non_exhaustive()
    }
}

impl OpaqueClient {
    /// The endpoints discovery currently gives (those left out for a TLS configuration
    /// error excepted).
    pub fn endpoint_count(&self) -> usize {
        self.current.load().endpoints.set.load().len()
    }

    /// Waits until discovery has given at least one endpoint: `true` then, `false` if
    /// discovery ended without any. Not bounded: wrap it in a timeout.
    pub async fn discovered(&self) -> bool {
        let endpoints = self.current.load().endpoints.clone();
        let mut changed = endpoints.changed.subscribe();
        loop {
            changed.mark_unchanged();
            if !endpoints.set.load().is_empty() {
                return true;
            }
            if endpoints.ended.load(std::sync::atomic::Ordering::Acquire)
                || changed.changed().await.is_err()
            {
                return !endpoints.set.load().is_empty();
            }
        }
    }

    /// From now on, this client and its clones relay new connections as `other` does:
    /// its discovery, transport, identity checks, connect settings and relay settings.
    /// Open relays go on as they began. [`serve`](Self::serve)'s bound on connections and
    /// its shutdown timeout stay those it started with.
    pub fn replace(&self, other: &OpaqueClient) {
        self.current.store(other.current.load_full());
    }

    /// Relays `local` to an endpoint of the service until both directions end; see the
    /// [module docs](super).
    pub async fn relay(&self, mut local: TcpStream) -> Result<RelayStats, OpaqueError> {
        use crate::relay::Abort;
        let _ = local.set_nodelay(true);
        let relayed = Current {
            shared: self.current.load_full(),
        }
        .relay_io(&mut local)
        .await;
        if resets_local(&relayed) {
            local.abort_on_drop();
        }
        relayed
    }

    /// [`relay`](Self::relay) for a local connection of any kind: a simulated or
    /// in-memory stream, a Unix socket, one already wrapped.
    pub async fn relay_io<L>(&self, mut local: L) -> Result<RelayStats, OpaqueError>
    where
        L: AsyncRead + AsyncWrite + Unpin,
    {
        Current {
            shared: self.current.load_full(),
        }
        .relay_io(&mut local)
        .await
    }

    /// Relays every connection of `listener`, in a task of the current Tokio runtime.
    pub fn serve(&self, listener: TcpListener) -> Result<Serving, BuildError> {
        let current = self.current.load();
        let serving = super::spawn(listener, current.limits, self.handler())?;
        tracing::debug!(addr = %serving.local_addr(), service = %current.service, "serving opaque TCP");
        Ok(serving)
    }

    /// Relays every connection handed over through `connections`' [`Handoff`](
    /// crate::server::Handoff) (a transparent listener's, for a service that speaks no
    /// HTTP: no protocol detection, so a protocol whose server speaks first is not held
    /// up), in a task of the current Tokio runtime.
    #[cfg(feature = "server")]
    pub fn serve_handed(&self, connections: crate::server::HandedConnections) -> Serving {
        let current = self.current.load();
        let crate::server::HandedConnections { addr, rx } = connections;
        let source = crate::accept::Source::Handed(rx, current.limits.tcp);
        tracing::debug!(%addr, service = %current.service, "serving opaque TCP handed over");
        super::spawn_from(source, addr, current.limits, self.handler())
    }

    /// What relays each accepted connection.
    fn handler(
        &self,
    ) -> impl Fn(
        TcpStream,
        SocketAddr,
        crate::accept::Newcomer,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
    + Send
    + 'static {
        let client = self.clone();
        // A local client's connection is relayed at once: plaintext has nothing to wait
        // for, so it is established (its newcomer standing dropped) from its accept.
        move |tcp, remote, _| {
            let client = client.clone();
            Box::pin(async move {
                match client.relay(tcp).await {
                    Ok(stats) => {
                        tracing::debug!(%remote, endpoint = %stats.endpoint, sent = stats.sent, received = stats.received, "opaque connection closed")
                    }
                    Err(error @ OpaqueError::Relay { .. }) => {
                        tracing::debug!(%remote, %error, "opaque connection ended");
                    }
                    Err(error) => tracing::info!(%remote, %error, "opaque connection refused"),
                }
            })
        }
    }
}

/// A connection reset when dropped while `cut` (see `Current::relay_io`).
struct ResetIfCut<T: crate::relay::Abort> {
    io: T,
    cut: bool,
}

impl<T: crate::relay::Abort> Drop for ResetIfCut<T> {
    fn drop(&mut self) {
        if self.cut {
            self.io.abort_on_drop();
        }
    }
}

impl Current {
    /// Relays `local`; a failure of the local side resets the endpoint's connection (see
    /// `RelayError::pass_on`), while resetting `local` is its owner's part.
    async fn relay_io<L>(&self, local: &mut L) -> Result<RelayStats, OpaqueError>
    where
        L: AsyncRead + AsyncWrite + Unpin,
    {
        // Boxed: the dial's states (TLS handshake included) are large and short-lived; a
        // relay's task keeps only what the relay needs for the connection's life.
        let (open, remote, peer, attempts) = Box::pin(self.connect()).await?;
        let addr = open.0.addr;
        let relay = &self.shared.relay;
        let connected = tokio::time::Instant::now();
        // The local side failed: the endpoint's connection is reset, when it can be.
        let local_failed = |relayed: &Result<_, crate::relay::RelayError>| matches!(relayed, Err(error) if error.side() == Some(crate::relay::Side::Client));
        // A relay cut short (its future dropped: a replaced policy closing it, a drain's
        // deadline) resets the endpoint's connection too, as a failed local side does:
        // its application must not take the cut for the end of the transfer.
        let relayed = match remote {
            Remote::Plain(tcp) => {
                let mut tcp = ResetIfCut { io: tcp, cut: true };
                let relayed = relay.run(local, &mut tcp.io).await;
                tcp.cut = local_failed(&relayed);
                relayed
            }
            Remote::Tls(tls) => {
                let mut tls = ResetIfCut { io: tls, cut: true };
                let relayed = relay.run(local, &mut *tls.io).await;
                tls.cut = local_failed(&relayed);
                relayed
            }
            Remote::Dialed(mut io) => relay.run(local, &mut *io).await,
            Remote::DialedTls(mut tls) => relay.run(local, &mut *tls).await,
        };
        // The endpoint took the connection and then failed it without a byte back, soon
        // (its proxy could not reach its application): backed off like a refused
        // connect. Any byte back ends a run of such refusals.
        let state = &open.0.state;
        match &relayed {
            Err(error)
                if error.side() == Some(crate::relay::Side::Upstream)
                    && error.relayed().upstream_to_client == 0
                    // Within its own connect bound and its proxy's (another 1 s, and
                    // more): soon after the handshake, not hours into a connection.
                    && connected.elapsed() < self.shared.settings.connect_timeout * 3 =>
            {
                tracing::debug!(service = %self.shared.service, endpoint = %addr, %error, "the endpoint failed the connection before answering: backed off");
                state.refused(&self.shared.settings.backoff, error);
            }
            // It went well: a clean end, bytes back, or a life longer than a refusal's.
            Ok(_) => state.served(),
            Err(error)
                if error.relayed().upstream_to_client > 0
                    || connected.elapsed() >= self.shared.settings.connect_timeout * 3 =>
            {
                state.served();
            }
            Err(_) => {}
        }
        drop(open);
        let relayed = relayed.map_err(|source| OpaqueError::Relay { addr, source })?;
        Ok(RelayStats {
            endpoint: addr,
            peer,
            attempts,
            sent: relayed.client_to_upstream,
            received: relayed.upstream_to_client,
        })
    }

    /// Picks and dials endpoints until one connects, within the attempt bound.
    async fn connect(&self) -> Result<(Open, Remote, Option<PeerIdentity>, usize), OpaqueError> {
        let settings = &self.shared.settings;
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut last = None;
        while tried.len() < settings.max_attempts {
            let target = match self.pick(&tried).await {
                Ok(target) => target,
                // Nothing left to fail over to: the connect failure says more.
                Err(error) => {
                    return Err(match last {
                        Some(last) => self.connect_error(tried.len(), last),
                        None => error,
                    });
                }
            };
            tried.push(target.addr);
            let open = Open::new(target);
            let started = open.0.state.attempt();
            match self.dial(&open.0).await {
                Ok((remote, peer)) => {
                    open.0.state.connected();
                    return Ok((open, remote, peer, tried.len()));
                }
                Err(error) => {
                    // A local shortage (file descriptors, buffers) is not the endpoint's.
                    if error.is_local() {
                        tracing::warn!(service = %self.shared.service, %error, "connect failed for want of local resources: the endpoint is not backed off");
                    } else {
                        open.0.state.note_error(&error);
                        open.0.state.failed(&settings.backoff, started);
                        tracing::debug!(service = %self.shared.service, %error, "connect failed; trying another endpoint");
                    }
                    last = Some(error);
                }
            }
        }
        match last {
            Some(last) => Err(self.connect_error(tried.len(), last)),
            // Unreachable: at least one attempt is made, and each failure is kept.
            None => Err(OpaqueError::NoEndpoints {
                service: self.shared.service.clone(),
            }),
        }
    }

    fn connect_error(&self, attempts: usize, last: ConnectError) -> OpaqueError {
        OpaqueError::Connect {
            service: self.shared.service.clone(),
            attempts,
            last,
        }
    }

    /// An endpoint not in `tried`: at once after a failed attempt, else waiting for one
    /// up to the fail-fast timeout.
    async fn pick(&self, tried: &[SocketAddr]) -> Result<Arc<Target>, OpaqueError> {
        let endpoints = &self.shared.endpoints;
        let fail_fast = self.shared.settings.fail_fast;
        let start = Instant::now();
        let deadline = start + fail_fast;
        let mut changed = endpoints.changed.subscribe();
        loop {
            changed.mark_unchanged();
            let now = Instant::now();
            let wake = match endpoints.pick(tried, now, &self.shared.rng) {
                Pick::Picked(target) => return Ok(target),
                _ if !tried.is_empty() => {
                    return Err(OpaqueError::NoEndpoints {
                        service: self.shared.service.clone(),
                    });
                }
                // Discovery stores its last endpoints before it sets `ended`: an empty pick
                // from a set read before that is tried again on the final set.
                Pick::Empty
                    if endpoints.ended.load(Ordering::Acquire)
                        && !endpoints.set.load().is_empty()
                        && now < deadline =>
                {
                    continue;
                }
                Pick::Empty if endpoints.ended.load(Ordering::Acquire) || now >= deadline => {
                    return Err(OpaqueError::NoEndpoints {
                        service: self.shared.service.clone(),
                    });
                }
                Pick::BackingOff(_) if now >= deadline => {
                    let set = endpoints.set.load();
                    let causes = crate::balance::error::capped(set.iter().filter_map(|t| {
                        t.state
                            .unready_reason(now)
                            .map(|reason| format!("{}: {reason}", t.addr))
                    }));
                    return Err(OpaqueError::NoReadyEndpoints {
                        service: self.shared.service.clone(),
                        waited: now.saturating_duration_since(start),
                        causes,
                    });
                }
                Pick::BackingOff(Some(until)) => until.min(deadline),
                Pick::BackingOff(None) | Pick::Empty => deadline,
            };
            tokio::select! {
                biased;
                _ = changed.changed() => {}
                () = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    /// Dials `target`: TCP (or the [`Dialer`]), then mTLS when configured, within the
    /// connect timeout.
    async fn dial(&self, target: &Target) -> Result<(Remote, Option<PeerIdentity>), ConnectError> {
        let addr = target.addr;
        let timeout = self.shared.settings.connect_timeout;
        if let Some(dialer) = &self.shared.dialer {
            let dial = async {
                let io = dialer
                    .dial(addr)
                    .await
                    .map_err(|source| ConnectError::Tcp { addr, source })?;
                match &target.tls {
                    None => Ok((Remote::Dialed(io), None)),
                    Some(connector) => {
                        let (tls, peer) = connector
                            .handshake(addr, io)
                            .await
                            .map_err(|source| ConnectError::Tls { addr, source })?;
                        Ok((Remote::DialedTls(Box::new(tls)), Some(peer)))
                    }
                }
            };
            return tokio::time::timeout(timeout, dial)
                .await
                .map_err(|_| ConnectError::Timeout { addr, timeout })?;
        }
        let dial = async {
            let tcp = TcpStream::connect(addr)
                .await
                .map_err(|source| ConnectError::Tcp { addr, source })?;
            crate::sock::tune(&tcp, addr, &self.shared.limits.tcp);
            match &target.tls {
                None => Ok((Remote::Plain(tcp), None)),
                Some(connector) => {
                    let (tls, peer) = connector
                        .handshake(addr, tcp)
                        .await
                        .map_err(|source| ConnectError::Tls { addr, source })?;
                    Ok((Remote::Tls(Box::new(tls)), Some(peer)))
                }
            }
        };
        tokio::time::timeout(timeout, dial)
            .await
            .map_err(|_| ConnectError::Timeout { addr, timeout })?
    }
}

/// Whether the local side of a relay that ended so should read a reset: the endpoint's
/// side failed, or no endpoint could be reached, and the application should see a failure,
/// as it would from a refused or failed connection, not a clean end.
pub(crate) fn resets_local(relayed: &Result<RelayStats, OpaqueError>) -> bool {
    match relayed {
        Err(OpaqueError::Relay { source, .. }) => {
            source.side() == Some(crate::relay::Side::Upstream)
        }
        Err(_) => true,
        Ok(_) => false,
    }
}
