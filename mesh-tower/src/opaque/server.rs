//! The inbound half: mTLS, connection-level authorization, relay to the target.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mesh_spiffe::{MtlsAcceptor, PeerIdentity, TransportError};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

use super::{BuildError, Limits, Serving};
use crate::accept::Newcomer;
use crate::authz::{Client, Policy, PolicyHandle};
use crate::connect::DEFAULT_CONNECT_TIMEOUT;
use crate::metrics::server::ListenerMetrics;
use crate::ratelimit::{Limits as RateLimits, LimitsHandle};
use crate::relay::{ListenerTunnels, Relay};
use prometheus_client::metrics::counter::Counter;

/// Serves opaque TCP to a target; see the [module docs](super).
#[derive(Debug)]
pub struct OpaqueServer;

impl OpaqueServer {
    /// Starts configuring a server.
    pub fn builder() -> OpaqueServerBuilder {
        OpaqueServerBuilder {
            transport: None,
            policy: None,
            metrics: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            limits: Limits::default(),
            rate_limit: None,
            relay: Relay::new(),
        }
    }
}

/// Configures an [`OpaqueServer`]; see the [module docs](super).
#[must_use]
pub struct OpaqueServerBuilder {
    transport: Option<Option<MtlsAcceptor>>,
    policy: Option<Policy>,
    metrics: Option<ListenerMetrics>,
    connect_timeout: Duration,
    limits: Limits,
    rate_limit: Option<RateLimits>,
    relay: Relay,
}

impl fmt::Debug for OpaqueServerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpaqueServerBuilder")
            .field("mtls", &matches!(self.transport, Some(Some(_))))
            .field("policy", &self.policy.as_ref().map(Policy::name))
            .field("connect_timeout", &self.connect_timeout)
            .field("limits", &self.limits)
            .field("idle_timeout", &self.relay.idle_timeout_value())
            .finish_non_exhaustive()
    }
}

impl OpaqueServerBuilder {
    /// Accepts SPIFFE mTLS only: clients `acceptor` refuses never get past the handshake,
    /// and the policy judges the identity of the others.
    pub fn mtls(mut self, acceptor: MtlsAcceptor) -> Self {
        self.transport = Some(Some(acceptor));
        self
    }

    /// Accepts plaintext: every peer is unauthenticated to the policy.
    pub fn plaintext(mut self) -> Self {
        self.transport = Some(None);
        self
    }

    /// Authorizes each connection by `policy` (default: every peer the transport let in).
    pub fn authorization(mut self, policy: Policy) -> Self {
        self.policy = Some(policy);
        self
    }

    /// Counts authorization decisions and refused handshakes in `metrics` (default: none).
    pub fn metrics(mut self, metrics: ListenerMetrics) -> Self {
        self.metrics = Some(metrics);
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

    /// Bounds connecting to the target (default 1 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Limits new connections, per client identity and in total, as
    /// [`crate::ratelimit`] limits requests (default: no limit). A connection over it is
    /// closed before the target is dialled.
    pub fn rate_limit(mut self, limits: RateLimits) -> Self {
        self.rate_limit = Some(limits);
        self
    }

    /// Bounds the connections open at once (default 10,000); beyond, accepting waits.
    pub fn max_connections(mut self, max: usize) -> Self {
        self.limits.max_connections = max;
        self
    }

    /// How long open connections may go on after a shutdown began (default 30 s).
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.limits.shutdown_timeout = timeout;
        self
    }

    /// Socket options for the connections to and from other hosts (default
    /// [`TcpOptions::default`](crate::sock::TcpOptions::default): keepalive after 10 s, a
    /// 40 s user timeout; see [`crate::sock`]).
    pub fn tcp(mut self, options: crate::sock::TcpOptions) -> Self {
        self.limits.tcp = options;
        self
    }

    /// Starts relaying the connections of `listener` to `target`, in a task of the current
    /// Tokio runtime.
    pub fn serve(self, listener: TcpListener, target: SocketAddr) -> Result<Serving, BuildError> {
        let tls = self.transport.ok_or(BuildError::NoTransport)?;
        // A handle without decision counters: this server counts its own.
        let policy = crate::authz::AuthorizeLayer::new(
            self.policy.unwrap_or_else(|| Policy::allow_all("default")),
        )
        .handle()
        .clone();
        let rate_limit = crate::ratelimit::RateLimitLayer::new(
            self.rate_limit
                .unwrap_or_else(|| RateLimits::new(&Default::default())),
        )
        .handle()
        .clone();
        let refused = self.metrics.as_ref().map(|m| {
            [
                m.rate_limited_counter("client"),
                m.rate_limited_counter("total"),
            ]
        });
        let inbound = Arc::new(Inbound {
            tls,
            policy: policy.clone(),
            rate_limit: rate_limit.clone(),
            refused,
            metrics: self.metrics,
            target,
            connect_timeout: self.connect_timeout,
            tcp: self.limits.tcp,
            relay: self.relay,
        });
        let mut serving = super::spawn(listener, self.limits, move |tcp, remote, newcomer| {
            let inbound = inbound.clone();
            async move { inbound.connection(tcp, remote, newcomer).await }
        })?;
        serving.policy = Some(policy);
        serving.rate_limit = Some(rate_limit);
        tracing::debug!(addr = %serving.local_addr(), %target, "serving opaque TCP");
        Ok(serving)
    }
}

/// What every inbound connection shares.
struct Inbound {
    tls: Option<MtlsAcceptor>,
    /// Replaceable while serving; each connection is judged by the policy current when
    /// its handshake completed, and again by each that replaces it.
    policy: PolicyHandle,
    /// Replaceable while serving, as the policy is.
    rate_limit: LimitsHandle,
    /// Refusals by the client's limit and by the total.
    refused: Option<[Counter; 2]>,
    metrics: Option<ListenerMetrics>,
    target: SocketAddr,
    connect_timeout: Duration,
    tcp: crate::sock::TcpOptions,
    relay: Relay,
}

impl Inbound {
    /// One connection: a newcomer (shed when the listener is full) until its handshake
    /// verified a peer; a plaintext one is established at once.
    async fn connection(&self, tcp: TcpStream, remote: SocketAddr, newcomer: Newcomer) {
        match &self.tls {
            None => {
                // Plaintext: established at once (it might have been shed before this
                // task first ran: then it closes, as the accept loop counted on).
                if !newcomer.proven() {
                    return;
                }
                drop(newcomer);
                self.authorized(tcp, None, remote).await;
            }
            // Boxed: the handshake's state is large and short-lived, and would otherwise
            // stay in the connection's task for its whole life.
            Some(acceptor) => match newcomer.unless_shed(Box::pin(acceptor.accept(tcp))).await {
                None => {
                    tracing::debug!(%remote, "listener full: a connection still in its TLS handshake closed to make room");
                    if let Some(metrics) = &self.metrics {
                        metrics.connection_closed("shed");
                    }
                }
                Some(Ok((tls, peer))) if newcomer.proven() => {
                    drop(newcomer);
                    self.authorized(tls, Some(peer), remote).await;
                }
                Some(Ok(_)) => {
                    tracing::debug!(%remote, "listener full: a connection just through its TLS handshake closed to make room");
                    if let Some(metrics) = &self.metrics {
                        metrics.connection_closed("shed");
                    }
                }
                Some(Err(error)) => {
                    tracing::debug!(%remote, %error, "TLS handshake refused");
                    if let Some(metrics) = &self.metrics {
                        metrics.tls_failure(failure_reason(&error));
                    }
                }
            },
        }
    }

    /// Judges the connection, then relays it to the target.
    async fn authorized<IO>(&self, mut io: IO, peer: Option<PeerIdentity>, remote: SocketAddr)
    where
        IO: AsyncRead + AsyncWrite + Unpin + crate::relay::Abort,
    {
        let client = peer.as_ref().map(PeerIdentity::id);
        // Before the decision: a policy replaced from here on judges the connection again.
        let replaced = self.policy.subscribe();
        if !judge_connection(
            &self.policy.current(),
            client,
            remote,
            self.metrics.as_ref(),
        ) {
            return;
        }
        if let Err(refused) = self.rate_limit.current().admit(peer.as_ref()) {
            tracing::debug!(%remote, client = %Client(client), limit = refused.limit, wait = ?refused.wait, "connection refused by the rate limit: closed");
            if let Some(counters) = &self.refused {
                counters[usize::from(refused.limit == "total")].inc();
            }
            return;
        }
        let connect = tokio::time::timeout(self.connect_timeout, TcpStream::connect(self.target));
        let mut target = match connect.await {
            Ok(Ok(tcp)) => tcp,
            // The client's connection is reset, not closed: the application at its end
            // sees a failure, as it would were the target refusing it directly.
            Ok(Err(error)) => {
                static FAILED: crate::throttle::Throttle = crate::throttle::Throttle::new();
                match FAILED.due() {
                    Some(held) => {
                        tracing::info!(%remote, target = %self.target, %error, more_at_debug = held, "connecting to the target failed")
                    }
                    None => {
                        tracing::debug!(%remote, target = %self.target, %error, "connecting to the target failed")
                    }
                }
                io.abort_on_drop();
                return;
            }
            Err(_) => {
                static TIMED_OUT: crate::throttle::Throttle = crate::throttle::Throttle::new();
                let timeout = self.connect_timeout;
                match TIMED_OUT.due() {
                    Some(held) => {
                        tracing::info!(%remote, target = %self.target, ?timeout, more_at_debug = held, "connecting to the target timed out")
                    }
                    None => {
                        tracing::debug!(%remote, target = %self.target, ?timeout, "connecting to the target timed out")
                    }
                }
                io.abort_on_drop();
                return;
            }
        };
        crate::sock::tune(&target, self.target, &self.tcp);
        // A replaced policy judges the open connection again: one it denies is closed (as
        // linkerd closes them), whatever the old one said.
        let outcome = self
            .policy
            .until_denied(self.relay.run(&mut io, &mut target), replaced, client, |current| {
                tracing::info!(%remote, client = %Client(client), policy = current.name(), "open connection denied by a replaced policy: closed");
                if let Some(metrics) = &self.metrics {
                    metrics.authz_counter(current.name(), None, "deny").inc();
                }
            })
            .await;
        match outcome {
            Some(Ok(relayed)) => {
                tracing::debug!(%remote, client = %Client(client), bytes_up = relayed.client_to_upstream, bytes_down = relayed.upstream_to_client, "opaque connection closed");
            }
            Some(Err(error)) => {
                let relayed = error.relayed();
                tracing::debug!(%remote, client = %Client(client), %error, bytes_up = relayed.client_to_upstream, bytes_down = relayed.upstream_to_client, "opaque connection ended");
                error.pass_on(&io, &target);
            }
            // Closed by a replaced policy: both sides reset, so that neither application
            // takes the cut for the end of its transfer.
            None => {
                io.abort_on_drop();
                crate::relay::Abort::abort_on_drop(&target);
            }
        }
    }
}

/// Judges a new opaque connection of `client` (`None`: unauthenticated) by `policy`:
/// whether it may go on. An audit-mode allow is logged at info, a deny at debug; each
/// decision is counted in `metrics`. The opaque server and a plaintext `MeshServer`'s
/// opaque fallback judge their connections alike.
pub(crate) fn judge_connection(
    policy: &Policy,
    client: Option<&mesh_core::SpiffeId>,
    remote: SocketAddr,
    metrics: Option<&ListenerMetrics>,
) -> bool {
    let name = policy.name();
    match policy.decide_connection(client) {
        Ok(decision) => {
            let outcome = if decision.is_audit() {
                tracing::info!(
                    %remote,
                    client = %Client(client),
                    policy = name,
                    "authorization audit: no rule allows this connection; allowed by the audit default"
                );
                "audit"
            } else {
                "allow"
            };
            if let Some(metrics) = metrics {
                metrics.authz_counter(name, decision.rule(), outcome).inc();
            }
            true
        }
        Err(_) => {
            tracing::debug!(%remote, client = %Client(client), policy = name, "opaque connection denied: closed");
            if let Some(metrics) = metrics {
                metrics.authz_counter(name, None, "deny").inc();
            }
            false
        }
    }
}

/// A handshake failure's `reason` label, as `MeshServer` counts it.
fn failure_reason(error: &TransportError) -> &'static str {
    match error {
        TransportError::Io(_) => "io",
        TransportError::Verify(_) => "certificate_refused",
        TransportError::Tls(_) => "tls",
        TransportError::Timeout(_) => "timeout",
        TransportError::NoPeerIdentity => "no_client_certificate",
        _ => "other",
    }
}
