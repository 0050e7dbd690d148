//! Opaque TCP: bytes relayed as they are, over SPIFFE mTLS between proxies, with
//! authorization by the peer's identity per connection.
//!
//! Two halves, each usable alone:
//!
//! ```text
//! app ──plaintext──> OpaqueClient ══mTLS══> OpaqueServer ──plaintext──> target app
//!                    picks an endpoint      PeerIdentity -> Policy::decide_connection
//! ```
//!
//! # Inbound: [`OpaqueServer`]
//!
//! For each accepted connection: the mTLS handshake (with [`mtls`](OpaqueServerBuilder::mtls);
//! plaintext only when chosen with [`plaintext`](OpaqueServerBuilder::plaintext), and then
//! every peer is unauthenticated), then the [`Policy`](crate::authz::Policy) judges the
//! connection with [`decide_connection`](crate::authz::Policy::decide_connection) on the
//! peer's verified [`PeerIdentity`](mesh_spiffe::PeerIdentity) — only the rules that hold
//! for every route apply, since there is no request to match. A denied connection is
//! closed before the target is dialled, so not a byte reaches it; the denial is logged at
//! `debug` and counted in `mesh_server_authz_total{outcome="deny"}` when
//! [`metrics`](OpaqueServerBuilder::metrics) are given (refused handshakes in
//! `mesh_server_tls_handshake_failures_total`, as for `MeshServer`). A
//! [`rate_limit`](OpaqueServerBuilder::rate_limit) then limits new connections as
//! [`crate::ratelimit`] limits requests, per client identity and in total: one over it is
//! closed before the target is dialled (logged at `debug`, counted in
//! `mesh_server_rate_limited_total`). An admitted connection dials the target (bounded by the connect timeout, default 1 s; a target that
//! is down resets the connection) and the bytes are relayed both ways by
//! [`crate::relay`]. When the policy is replaced (a reload), every open connection is
//! judged again by the new one: one it denies is closed at once (logged at `info`,
//! counted as a `deny`), as a request on it would now be refused.
//!
//! # Outbound: [`OpaqueClient`]
//!
//! For each local (plaintext) connection, an endpoint of the service is picked from
//! discovery by **power of two choices over open connections** (divided by the
//! endpoint's weight), among endpoints not in connect back-off: the lighter of two random
//! ones. Opaque connections are long-lived and carry no requests to time, so the number
//! open is the load that matters. It is dialled — plaintext or SPIFFE mTLS requiring the
//! identity discovery gives for the endpoint or else the
//! [`server_identity`](OpaqueClientBuilder::server_identity) pattern, TCP and TLS within
//! the connect timeout (default 1 s). A failed connect puts the endpoint in back-off
//! (100 ms doubling to 10 s, as the HTTP client does) and another endpoint is tried, up to
//! [`max_connect_attempts`](OpaqueClientBuilder::max_connect_attempts) (default 3) distinct
//! endpoints. When no endpoint can be picked (discovery has none yet, or all are backing
//! off), the connection waits for one up to the fail-fast timeout (default 3 s, as the
//! balancer), then fails. A [`Dialer`](crate::connect::Dialer)
//! ([`dialer`](OpaqueClientBuilder::dialer)) opens the byte streams instead of TCP, as it
//! does for the HTTP client, and [`relay_io`](OpaqueClient::relay_io) takes a local
//! connection of any kind: together they run the outbound half on a simulated network or
//! in memory, mTLS and failover included.
//!
//! # Half-close, idle connections and shutdown
//!
//! When one side finishes sending (a TCP FIN, or TLS `close_notify`), the relay finishes
//! sending to the other side the same way and keeps relaying the other direction until it
//! ends too: a client may shut its write side and still read the whole answer. A
//! connection without a byte either way for the idle timeout (`idle_timeout`, default 1
//! hour, as Envoy's TCP proxy) is closed on both sides, so that one whose peer vanished
//! without a FIN does not hold its place forever. With `tunnels`
//! ([`TunnelMetrics`](crate::relay::TunnelMetrics)) the connections relayed and their
//! bytes are counted per listener, the bytes as they move.
//!
//! Both halves serve a listener in a task that returns a [`Serving`] handle.
//! [`Serving::shutdown`] stops accepting, lets open connections end on their own for up to
//! the shutdown timeout (default 30 s, as `MeshServer`; opaque bytes have no message
//! boundary at which to stop them earlier), then closes the rest and reports how many it
//! had to force. At most `max_connections` (default 10,000) are open at once; beyond,
//! the oldest connection still in its mTLS handshake is closed to make room, and with none
//! accepting waits (see `accept`'s shedding of newcomers).
//!
//! ```no_run
//! use mesh_core::{Endpoint, discover::StaticDiscovery};
//! use mesh_spiffe::{Authorizer, CredentialStore, Mtls, MtlsAcceptor};
//! use mesh_tower::opaque::{OpaqueClient, OpaqueServer};
//!
//! # async fn run(credentials: CredentialStore) -> Result<(), Box<dyn std::error::Error>> {
//! let mtls = Mtls::new(credentials);
//! // Inbound: peers over mTLS to the local database.
//! let acceptor = MtlsAcceptor::new(&mtls, Authorizer::any())?;
//! let inbound = OpaqueServer::builder()
//!     .mtls(acceptor)
//!     .serve(tokio::net::TcpListener::bind("0.0.0.0:4143").await?, "127.0.0.1:5432".parse()?)?;
//! // Outbound: the local application to the service's endpoints.
//! let discovery = StaticDiscovery::new([Endpoint::new("10.0.0.7:4143".parse()?)]);
//! let client = OpaqueClient::builder(Box::pin(discovery))
//!     .mtls(mtls)
//!     .server_identity("spiffe://example.org/ns/prod/sa/db".parse()?)
//!     .build()?;
//! let outbound = client.serve(tokio::net::TcpListener::bind("127.0.0.1:4140").await?)?;
//! // ... on SIGTERM:
//! let (a, b) = (inbound.shutdown().await, outbound.shutdown().await);
//! # let _ = (a, b);
//! # Ok(()) }
//! ```

mod client;
mod endpoints;
mod error;
mod server;
#[cfg(all(test, feature = "test-util"))]
mod tests;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub(crate) use self::client::resets_local;
pub use self::client::{OpaqueClient, OpaqueClientBuilder, RelayStats};
pub use self::error::{BuildError, OpaqueError};
pub(crate) use self::server::judge_connection;
pub use self::server::{OpaqueServer, OpaqueServerBuilder};
pub use crate::accept::ShutdownReport;

/// The default bound on open connections per listener.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

/// The default time open connections get to end after a shutdown began.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// The default number of distinct endpoints an outbound connection tries.
pub const DEFAULT_MAX_CONNECT_ATTEMPTS: usize = 3;

/// How a listener accepts and drains.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub(crate) max_connections: usize,
    pub(crate) shutdown_timeout: Duration,
    /// Options for accepted and dialled connections.
    pub(crate) tcp: crate::sock::TcpOptions,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            tcp: crate::sock::TcpOptions::default(),
        }
    }
}

/// A listener being served. Dropping it starts a shutdown without waiting for it.
#[derive(Debug)]
pub struct Serving {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<ShutdownReport>,
    policy: Option<crate::authz::PolicyHandle>,
    rate_limit: Option<crate::ratelimit::LimitsHandle>,
}

impl Serving {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// An [`OpaqueServer`]'s authorization policy, replaceable while it serves (new
    /// connections are judged by the new one, and so are open ones: one it denies is
    /// closed); `None` for other listeners.
    pub fn policy(&self) -> Option<&crate::authz::PolicyHandle> {
        self.policy.as_ref()
    }

    /// An [`OpaqueServer`]'s connection rate limit, replaceable while it serves (the new
    /// limiters start full); `None` for other listeners.
    pub fn rate_limit(&self) -> Option<&crate::ratelimit::LimitsHandle> {
        self.rate_limit.as_ref()
    }

    /// Stops accepting, lets open connections end (up to the shutdown timeout), then
    /// closes the rest.
    pub async fn shutdown(mut self) -> ShutdownReport {
        let _ = self.stop.send(true);
        match (&mut self.task).await {
            Ok(report) => report,
            Err(error) => {
                tracing::warn!(%error, "the opaque listener's task ended abnormally");
                ShutdownReport {
                    open_at_shutdown: 0,
                    forced: 0,
                }
            }
        }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Serves `listener` in a task: `handle` for each connection, within `limits`.
pub(crate) fn spawn<F, Fut>(
    listener: TcpListener,
    limits: Limits,
    handle: F,
) -> Result<Serving, BuildError>
where
    F: Fn(TcpStream, SocketAddr, crate::accept::Newcomer) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let addr = listener.local_addr().map_err(BuildError::Listener)?;
    let tcp = limits.tcp;
    Ok(spawn_from(
        crate::accept::Source::Listener(listener, tcp),
        addr,
        limits,
        handle,
    ))
}

/// [`spawn`] for connections from any source, reported as accepted on `addr`.
pub(crate) fn spawn_from<F, Fut>(
    source: crate::accept::Source,
    addr: SocketAddr,
    limits: Limits,
    handle: F,
) -> Serving
where
    F: Fn(TcpStream, SocketAddr, crate::accept::Newcomer) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (stop, stopping) = watch::channel(false);
    let task = tokio::spawn(crate::accept::accept_loop(
        source,
        limits.max_connections,
        limits.shutdown_timeout,
        stopping,
        move |tcp, remote, _, newcomer| handle(tcp, remote, newcomer),
    ));
    Serving {
        addr,
        stop,
        task,
        policy: None,
        rate_limit: None,
    }
}
