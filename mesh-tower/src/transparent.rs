//! Transparent proxying: connections an iptables `REDIRECT` rule sent to a listener, each
//! proxied by what its original destination means (feature `transparent`).
//!
//! The application dials its peer's address as if there were no mesh (a virtual IP, or
//! what the peer's DNS name resolves to); a `nat` rule on the host redirects the
//! connection to the proxy's listener, and the kernel remembers where it was going. For
//! each accepted connection a [`TransparentListener`]:
//!
//! 1. reads the **original destination** ([`original_dst`]: `SO_ORIGINAL_DST` for IPv4,
//!    `IP6T_SO_ORIGINAL_DST` for IPv6; Linux only — elsewhere every connection fails this
//!    step). A connection that was not redirected has none and is closed, as is one whose
//!    original destination is the listener itself (dialled directly: there is nowhere to
//!    proxy it to);
//! 2. looks the destination up in its [`DestinationTable`], which the owner fills with one
//!    [`Handoff`] per meshed service and may replace at any time (a reload): an exact
//!    address first, then the network with the longest prefix holding it at its port
//!    ([`Destinations`]);
//! 3. **meshed**: hands the connection to that service's server (a
//!    [`MeshServer`](crate::server::MeshServer) started with
//!    [`serve_handed`](crate::server::MeshServerBuilder::serve_handed), typically plaintext
//!    over a `Router` whose default backend is the service, with an opaque fallback to it);
//! 4. **unmatched**: by [`Unmatched`], relays the bytes as they are to the original
//!    destination (`passthrough`, the default: unmeshed traffic keeps working, without
//!    TLS) or closes the connection (`refuse`). The relay dials within the connect timeout
//!    (default 1 s) and relays with [`crate::relay`]: closed after its idle timeout
//!    without a byte either way (default 1 hour), its bytes counted with
//!    [`tunnels`](TransparentBuilder::tunnels).
//!
//! **Loops.** The proxy's own outgoing connections must not be redirected back to it: the
//! iptables rules exempt the proxy's user or group (see `packaging/iptables/`). Should they
//! not, the listener notices a passthrough connection coming back to it (its client
//! address is one of the listener's own outgoing sockets) and refuses it with an error
//! log, rather than relaying in a circle.
//!
//! Outcomes are counted in `mesh_transparent_connections_total{listener, outcome}` with
//! [`TransparentMetrics`]: `meshed`, `passthrough`, `refused` (unmatched under `refuse`,
//! a loop, or dialled directly), `no_destination` (not redirected) and `failed` (the
//! passthrough dial failed, or the service's server is gone).
//!
//! At most `max_connections` (default 10,000) are open at once, and
//! [`Serving::shutdown`] stops accepting and drains passthrough relays as the opaque
//! listeners do; handed-over connections belong to their server and drain with it.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use mesh_core::config::{Destination, Network, Unmatched};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};

use crate::opaque::{BuildError, Serving};
use crate::relay::{ListenerTunnels, Relay};
use crate::server::Handoff;
use crate::sock::TcpOptions;

/// The default time a passthrough relay has to connect to the original destination.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The destination a redirected connection was going to before the `nat` rule sent it
/// here. Fails (with the OS error) for a connection that was not redirected, and on
/// systems other than Linux.
pub fn original_dst(tcp: &TcpStream) -> std::io::Result<SocketAddr> {
    imp::original_dst(tcp)
}

#[cfg(target_os = "linux")]
mod imp {
    use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};

    use nix::sys::socket::{SockaddrIn, SockaddrIn6, getsockopt, sockopt};
    use tokio::net::TcpStream;

    pub(super) fn original_dst(tcp: &TcpStream) -> std::io::Result<SocketAddr> {
        let local = tcp.local_addr()?;
        let dst = if local.is_ipv4() || is_mapped_v4(&local) {
            let addr = getsockopt(tcp, sockopt::OriginalDst)?;
            SocketAddr::V4(SocketAddrV4::from(SockaddrIn::from(addr)))
        } else {
            let addr = getsockopt(tcp, sockopt::Ip6tOriginalDst)?;
            SocketAddr::V6(SocketAddrV6::from(SockaddrIn6::from(addr)))
        };
        Ok(dst)
    }

    /// An IPv4 connection accepted on a dual-stack IPv6 socket.
    fn is_mapped_v4(addr: &SocketAddr) -> bool {
        matches!(addr, SocketAddr::V6(v6) if v6.ip().to_ipv4_mapped().is_some())
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use std::net::SocketAddr;

    use tokio::net::TcpStream;

    pub(super) fn original_dst(_tcp: &TcpStream) -> std::io::Result<SocketAddr> {
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "original destinations (SO_ORIGINAL_DST) are read on Linux only",
        ))
    }
}

/// Meshed destinations, each with the handoff its connections go to: exact addresses, and
/// networks at a port ([`Destination`]). A connection's original destination takes its
/// exact entry, else the network with the longest prefix that holds it.
///
/// A lookup costs one hash lookup for the exact address and one per distinct prefix
/// length among the networks (longest first), however many networks there are.
#[derive(Clone, Debug, Default)]
pub struct Destinations {
    exact: HashMap<SocketAddr, Handoff>,
    networks: HashMap<Network, Handoff>,
    /// The networks' distinct prefix lengths, longest first.
    prefixes: Vec<u8>,
}

impl Destinations {
    /// No destination.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sends `dst`'s connections to `handoff` (replacing what that same destination had).
    pub fn insert(&mut self, dst: Destination, handoff: Handoff) {
        match dst {
            Destination::Addr(addr) => {
                self.exact.insert(addr, handoff);
            }
            Destination::Network(net) => {
                let prefix = net.prefix();
                if let Err(at) = self.prefixes.binary_search_by(|p| prefix.cmp(p)) {
                    self.prefixes.insert(at, prefix);
                }
                self.networks.insert(net, handoff);
            }
        }
    }

    /// The handoff for `dst`, if it is meshed.
    pub fn get(&self, dst: &SocketAddr) -> Option<&Handoff> {
        if let Some(handoff) = self.exact.get(dst) {
            return Some(handoff);
        }
        self.prefixes.iter().find_map(|&prefix| {
            let net = Network::holding(dst, prefix)?;
            self.networks.get(&net)
        })
    }

    /// How many destinations (addresses and networks) there are.
    pub fn len(&self) -> usize {
        self.exact.len() + self.networks.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl From<HashMap<SocketAddr, Handoff>> for Destinations {
    fn from(exact: HashMap<SocketAddr, Handoff>) -> Self {
        Self {
            exact,
            ..Self::default()
        }
    }
}

impl FromIterator<(Destination, Handoff)> for Destinations {
    fn from_iter<I: IntoIterator<Item = (Destination, Handoff)>>(iter: I) -> Self {
        let mut destinations = Self::new();
        for (dst, handoff) in iter {
            destinations.insert(dst, handoff);
        }
        destinations
    }
}

/// Where each meshed destination's connections go ([`Destinations`]); replaceable while
/// serving. Cheap to clone (clones share the table).
#[derive(Clone, Debug, Default)]
pub struct DestinationTable {
    inner: Arc<ArcSwap<Destinations>>,
}

impl DestinationTable {
    /// A table sending each destination of `entries` to its handoff.
    pub fn new(entries: impl Into<Destinations>) -> Self {
        Self {
            inner: Arc::new(ArcSwap::from_pointee(entries.into())),
        }
    }

    /// Replaces every entry at once; connections already handed over stay where they are.
    pub fn replace(&self, entries: impl Into<Destinations>) {
        self.inner.store(Arc::new(entries.into()));
    }

    /// The handoff for `dst`, if it is meshed.
    pub fn get(&self, dst: &SocketAddr) -> Option<Handoff> {
        self.inner.load().get(dst).cloned()
    }

    /// How many destinations are meshed.
    pub fn len(&self) -> usize {
        self.inner.load().len()
    }

    /// Whether no destination is meshed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    listener: String,
    outcome: &'static str,
}

/// `mesh_transparent_connections_total{listener, outcome}`; see the [module docs](self).
#[derive(Clone, Debug, Default)]
pub struct TransparentMetrics {
    family: Family<OutcomeLabels, Counter>,
}

impl TransparentMetrics {
    /// Registers the family in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "mesh_transparent_connections",
            "Connections taken by transparent listeners, by outcome (meshed, passthrough, refused, no_destination, failed)",
            metrics.family.clone(),
        );
        metrics
    }

    fn count(&self, listener: &str, outcome: &'static str) {
        self.family
            .get_or_create(&OutcomeLabels {
                listener: listener.to_owned(),
                outcome,
            })
            .inc();
    }
}

/// How the original destination of a connection is found: [`original_dst`] unless
/// replaced (tests, or another platform's mechanism).
pub type Resolver = Arc<dyn Fn(&TcpStream) -> std::io::Result<SocketAddr> + Send + Sync>;

/// A listener for redirected connections; see the [module docs](self).
#[derive(Debug)]
pub struct TransparentListener;

impl TransparentListener {
    /// Starts configuring one.
    pub fn builder() -> TransparentBuilder {
        TransparentBuilder {
            name: "transparent".into(),
            unmatched: Unmatched::Passthrough,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_connections: crate::opaque::DEFAULT_MAX_CONNECTIONS,
            shutdown_timeout: crate::opaque::DEFAULT_SHUTDOWN_TIMEOUT,
            metrics: None,
            resolver: Arc::new(original_dst),
            relay: Relay::new(),
            tcp: TcpOptions::default(),
        }
    }
}

/// Configures a [`TransparentListener`].
#[must_use]
pub struct TransparentBuilder {
    name: String,
    unmatched: Unmatched,
    connect_timeout: Duration,
    max_connections: usize,
    shutdown_timeout: Duration,
    metrics: Option<TransparentMetrics>,
    resolver: Resolver,
    relay: Relay,
    tcp: TcpOptions,
}

impl std::fmt::Debug for TransparentBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransparentBuilder")
            .field("name", &self.name)
            .field("unmatched", &self.unmatched)
            .field("connect_timeout", &self.connect_timeout)
            .finish_non_exhaustive()
    }
}

impl TransparentBuilder {
    /// The listener's name in logs and metrics (default `transparent`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// What happens to connections no entry of the table takes (default: passthrough).
    pub fn unmatched(mut self, unmatched: Unmatched) -> Self {
        self.unmatched = unmatched;
        self
    }

    /// The time a passthrough relay has to connect (default 1 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The bound on connections open at once (default 10,000).
    pub fn max_connections(mut self, max: usize) -> Self {
        self.max_connections = max;
        self
    }

    /// The time open passthrough relays get to end after a shutdown began (default 30 s).
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// Closes a passthrough connection after this long without a byte either way
    /// (`None`: never; default [`DEFAULT_IDLE_TIMEOUT`](crate::relay::DEFAULT_IDLE_TIMEOUT),
    /// 1 hour).
    pub fn idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.relay = self.relay.idle_timeout(timeout);
        self
    }

    /// Counts passthrough connections and their bytes in `tunnels` (default: not
    /// counted).
    pub fn tunnels(mut self, tunnels: ListenerTunnels) -> Self {
        self.relay = self.relay.metrics(tunnels);
        self
    }

    /// Socket options for redirected connections from other hosts and passthrough
    /// connections to them (default [`TcpOptions::default`]: keepalive after 10 s, a 40 s
    /// user timeout; see [`crate::sock`]). Meshed connections, handed to a server, are set
    /// again with that server's options; what those leave unset (`None`) stays as set here.
    pub fn tcp(mut self, options: TcpOptions) -> Self {
        self.tcp = options;
        self
    }

    /// Counts each connection's outcome (default: not counted).
    pub fn metrics(mut self, metrics: &TransparentMetrics) -> Self {
        self.metrics = Some(metrics.clone());
        self
    }

    /// Replaces how the original destination is read (default: [`original_dst`]).
    pub fn resolver(mut self, resolver: Resolver) -> Self {
        self.resolver = resolver;
        self
    }

    /// Serves `listener`, sending connections by `table`, in a task of the current Tokio
    /// runtime.
    pub fn serve(
        self,
        listener: TcpListener,
        table: DestinationTable,
    ) -> Result<Serving, BuildError> {
        let addr = listener.local_addr().map_err(BuildError::Listener)?;
        let shared = Arc::new(Shared {
            addr,
            name: self.name,
            unmatched: self.unmatched,
            connect_timeout: self.connect_timeout,
            metrics: self.metrics,
            resolver: self.resolver,
            relay: self.relay,
            tcp: self.tcp,
            table,
            outgoing: Mutex::new(HashSet::new()),
        });
        let limits = crate::opaque::Limits {
            max_connections: self.max_connections,
            shutdown_timeout: self.shutdown_timeout,
            tcp: self.tcp,
        };
        tracing::debug!(%addr, "serving redirected connections");
        // A redirected connection is handed over (or relayed) at once: it is established
        // (its newcomer standing dropped) from its accept.
        crate::opaque::spawn(listener, limits, move |tcp, remote, _| {
            let shared = shared.clone();
            async move { shared.connection(tcp, remote).await }
        })
    }
}

struct Shared {
    addr: SocketAddr,
    name: String,
    unmatched: Unmatched,
    connect_timeout: Duration,
    metrics: Option<TransparentMetrics>,
    resolver: Resolver,
    relay: Relay,
    tcp: TcpOptions,
    table: DestinationTable,
    /// The local addresses of this listener's passthrough connections, to notice one of
    /// them redirected back here.
    outgoing: Mutex<HashSet<SocketAddr>>,
}

impl Shared {
    fn count(&self, outcome: &'static str) {
        if let Some(m) = &self.metrics {
            m.count(&self.name, outcome);
        }
    }

    fn outgoing(&self) -> std::sync::MutexGuard<'_, HashSet<SocketAddr>> {
        self.outgoing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether `dst` is where `tcp` landed: the listener itself, dialled directly rather
    /// than redirected. A redirected connection lands on the listener's port at an
    /// address of the redirecting interface, never at its original destination. Only the
    /// accepted socket tells: a listener bound to a wildcard address also proxies
    /// connections redirected from other hosts' addresses at its own port.
    fn is_self(&self, tcp: &TcpStream, dst: SocketAddr) -> bool {
        let landed = tcp.local_addr().unwrap_or(self.addr);
        canonical(landed) == canonical(dst)
    }

    async fn connection(&self, tcp: TcpStream, remote: SocketAddr) {
        let dst = match (self.resolver)(&tcp) {
            Ok(dst) => dst,
            Err(error) => {
                tracing::debug!(listener = %self.name, %remote, %error, "no original destination: not a redirected connection; closed");
                self.count("no_destination");
                return;
            }
        };
        // A dual-stack listener sees an IPv4 peer as `::ffff:a.b.c.d`; the registered
        // address is the socket's own, IPv4. (A connection redirected back before its
        // dialler registered it, on another worker, goes one more round; the next one's
        // dialler has registered long before: the loop ends.)
        if self.outgoing().contains(&canonical(remote)) {
            tracing::error!(listener = %self.name, %dst, "a passthrough connection of this proxy was redirected back to it: exempt the proxy's own traffic from the redirect rules; refused");
            self.count("refused");
            return;
        }
        if self.is_self(&tcp, dst) {
            tracing::debug!(listener = %self.name, %remote, "dialled directly, not redirected: nothing to proxy to; closed");
            self.count("refused");
            return;
        }
        if let Some(handoff) = self.table.get(&dst) {
            match handoff.hand(tcp, remote).await {
                Ok(()) => self.count("meshed"),
                Err(_closed) => {
                    tracing::debug!(listener = %self.name, %remote, %dst, "the service's server is gone; closed");
                    self.count("failed");
                }
            }
            return;
        }
        if self.unmatched == Unmatched::Refuse {
            tracing::debug!(listener = %self.name, %remote, %dst, "no service at the original destination; refused");
            self.count("refused");
            return;
        }
        self.passthrough(tcp, remote, dst).await;
    }

    async fn passthrough(&self, mut tcp: TcpStream, remote: SocketAddr, dst: SocketAddr) {
        let upstream = match tokio::time::timeout(self.connect_timeout, TcpStream::connect(dst))
            .await
        {
            Ok(Ok(upstream)) => upstream,
            Ok(Err(error)) => {
                tracing::debug!(listener = %self.name, %remote, %dst, %error, "passthrough connect failed; closed");
                self.count("failed");
                return;
            }
            Err(_) => {
                tracing::debug!(listener = %self.name, %remote, %dst, timeout = ?self.connect_timeout, "passthrough connect timed out; closed");
                self.count("failed");
                return;
            }
        };
        self.count("passthrough");
        crate::sock::tune(&upstream, dst, &self.tcp);
        let mut upstream = Outgoing::new(self, upstream);
        match self.relay.run(&mut tcp, &mut upstream.tcp).await {
            Ok(relayed) => {
                tracing::debug!(listener = %self.name, %remote, %dst, bytes_up = relayed.client_to_upstream, bytes_down = relayed.upstream_to_client, "passthrough connection closed")
            }
            Err(error) => {
                let relayed = error.relayed();
                tracing::debug!(listener = %self.name, %remote, %dst, %error, bytes_up = relayed.client_to_upstream, bytes_down = relayed.upstream_to_client, "passthrough connection ended");
                error.pass_on(&tcp, &upstream.tcp);
            }
        }
    }
}

/// `addr` with an IPv4-mapped IPv6 address as the IPv4 address it maps (a dual-stack
/// socket reports the one, the original destination the other).
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

/// A passthrough connection, its local address registered for loop detection while open.
struct Outgoing<'a> {
    shared: &'a Shared,
    local: Option<SocketAddr>,
    tcp: TcpStream,
}

impl<'a> Outgoing<'a> {
    fn new(shared: &'a Shared, tcp: TcpStream) -> Self {
        let local = tcp.local_addr().ok().map(canonical);
        if let Some(local) = local {
            shared.outgoing().insert(local);
        }
        Self { shared, local, tcp }
    }
}

impl Drop for Outgoing<'_> {
    fn drop(&mut self) {
        if let Some(local) = self.local {
            self.shared.outgoing().remove(&local);
        }
    }
}

#[cfg(test)]
mod tests;
