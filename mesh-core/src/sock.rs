//! Socket options every TCP connection of the mesh gets, accepted or dialled.
//!
//! - `TCP_NODELAY`: requests and answers leave at once, not after a delayed ACK.
//! - **TCP keepalive**, on connections whose peer is not on this host: after
//!   [`KEEPALIVE_IDLE`] (10 s, as Linkerd's proxy) without a segment the kernel probes the
//!   peer every [`KEEPALIVE_INTERVAL`] (10 s) and resets the connection after
//!   [`KEEPALIVE_PROBES`] (3) unanswered: a peer whose host vanished (powered off, cut off
//!   by a partition) is noticed within about 40 s of silence, instead of the kernel's two
//!   hours, so a pooled connection or a relay does not wait on it.
//! - **`TCP_USER_TIMEOUT`** (Linux), [`USER_TIMEOUT`] (40 s, the same bound): data sent
//!   and not acknowledged for that long resets the connection, where the kernel would
//!   otherwise retransmit for about 15 minutes — keepalive only covers a quiet connection,
//!   not one whose peer vanished while it was sending.
//!
//! These are [`TcpOptions::default`]; each server, client, relay and transparent listener
//! takes other ones from its builder (`tcp(..)`), and mesh-proxy from its `[tcp]` section.
//! Either can be switched off.
//!
//! A loopback peer cannot vanish without its kernel resetting the connection, so loopback
//! connections (a local application's, the local target's) skip these system calls.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

/// Silence before the first keepalive probe: 10 s.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);

/// Time between unanswered keepalive probes: 10 s.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// Unanswered probes before the connection is reset: 3.
pub const KEEPALIVE_PROBES: u32 = 3;

/// How long sent data may go unacknowledged before the connection is reset (Linux): 40 s,
/// the keepalive's own bound.
pub const USER_TIMEOUT: Duration = Duration::from_secs(40);

/// TCP keepalive's timings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    /// Silence before the first probe.
    pub idle: Duration,
    /// Time between unanswered probes.
    pub interval: Duration,
    /// Unanswered probes before the connection is reset (Linux, macOS and Windows; other
    /// systems keep their own count).
    pub probes: u32,
}

impl Default for Keepalive {
    /// [`KEEPALIVE_IDLE`], [`KEEPALIVE_INTERVAL`], [`KEEPALIVE_PROBES`].
    fn default() -> Self {
        Self {
            idle: KEEPALIVE_IDLE,
            interval: KEEPALIVE_INTERVAL,
            probes: KEEPALIVE_PROBES,
        }
    }
}

/// The options set on connections to and from other hosts (`TCP_NODELAY` is set on every
/// connection, whatever these say).
///
/// ```
/// use std::time::Duration;
/// use mesh_core::sock::{Keepalive, TcpOptions};
///
/// // Probe after a minute of silence; leave the retransmission bound to the kernel.
/// let tcp = TcpOptions::default()
///     .keepalive(Some(Keepalive { idle: Duration::from_secs(60), ..Keepalive::default() }))
///     .user_timeout(None);
/// assert_eq!(tcp.keepalive_settings().map(|k| k.probes), Some(3));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpOptions {
    keepalive: Option<Keepalive>,
    user_timeout: Option<Duration>,
}

impl Default for TcpOptions {
    /// Keepalive with [`Keepalive::default`]'s timings, and [`USER_TIMEOUT`].
    fn default() -> Self {
        Self {
            keepalive: Some(Keepalive::default()),
            user_timeout: Some(USER_TIMEOUT),
        }
    }
}

impl TcpOptions {
    /// The options of a configuration's `[tcp]` section: `0s` turns keepalive (by
    /// `keepalive_idle`) or the user timeout off.
    pub fn from_config(config: &crate::config::TcpConfig) -> Self {
        Self {
            keepalive: config.keepalive().then_some(Keepalive {
                idle: config.keepalive_idle,
                interval: config.keepalive_interval,
                probes: config.keepalive_probes,
            }),
            user_timeout: (!config.user_timeout.is_zero()).then_some(config.user_timeout),
        }
    }

    /// Neither keepalive nor a user timeout: the kernel's defaults.
    pub fn off() -> Self {
        Self {
            keepalive: None,
            user_timeout: None,
        }
    }

    /// TCP keepalive with these timings; `None` leaves it off.
    pub fn keepalive(mut self, keepalive: Option<Keepalive>) -> Self {
        self.keepalive = keepalive;
        self
    }

    /// `TCP_USER_TIMEOUT` (Linux; ignored elsewhere); `None` leaves the kernel's.
    pub fn user_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.user_timeout = timeout;
        self
    }

    /// The keepalive timings, if on.
    pub fn keepalive_settings(&self) -> Option<Keepalive> {
        self.keepalive
    }

    /// The user timeout, if set.
    pub fn user_timeout_setting(&self) -> Option<Duration> {
        self.user_timeout
    }
}

/// Sets `options` on `tcp`, connected to `peer` (and `TCP_NODELAY`, always). Failures are
/// ignored (logged at `trace`): an option the platform refuses leaves the connection as it
/// was.
pub fn tune(tcp: &TcpStream, peer: SocketAddr, options: &TcpOptions) {
    if let Err(error) = tcp.set_nodelay(true) {
        tracing::trace!(%peer, %error, "TCP_NODELAY refused");
    }
    if is_local(peer.ip()) {
        return;
    }
    let sock = SockRef::from(tcp);
    if let Some(k) = options.keepalive {
        let keepalive = TcpKeepalive::new()
            .with_time(k.idle)
            .with_interval(k.interval);
        #[cfg(any(target_os = "linux", target_os = "macos", target_os = "windows"))]
        let keepalive = keepalive.with_retries(k.probes);
        if let Err(error) = sock.set_tcp_keepalive(&keepalive) {
            tracing::trace!(%peer, %error, "TCP keepalive refused");
        }
    }
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Some(timeout) = options.user_timeout
        && let Err(error) = sock.set_tcp_user_timeout(Some(timeout))
    {
        tracing::trace!(%peer, %error, "TCP_USER_TIMEOUT refused");
    }
}

/// Whether `ip` is this host's loopback (an IPv4-mapped one included).
fn is_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(v6.is_loopback(), |v4| v4.is_loopback()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dialled = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        (dialled, accepted)
    }

    #[tokio::test]
    async fn remote_peers_get_keepalive_and_loopback_ones_nodelay_only() {
        let (dialled, accepted) = pair().await;
        // As if the peer were another host: keepalive with the mesh's timings.
        tune(
            &dialled,
            "10.1.2.3:4143".parse().unwrap(),
            &TcpOptions::default(),
        );
        let sock = SockRef::from(&dialled);
        assert!(dialled.nodelay().unwrap());
        assert!(sock.keepalive().unwrap());
        #[cfg(any(target_os = "linux", target_os = "macos"))]
        {
            assert_eq!(sock.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
            assert_eq!(sock.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
            assert_eq!(sock.tcp_keepalive_retries().unwrap(), KEEPALIVE_PROBES);
        }
        #[cfg(target_os = "linux")]
        assert_eq!(sock.tcp_user_timeout().unwrap(), Some(USER_TIMEOUT));
        // A loopback peer (IPv4, IPv6, IPv4-mapped): no keepalive.
        for peer in ["127.0.0.1:1", "[::1]:1", "[::ffff:127.0.0.1]:1"] {
            let (other, _accepted) = pair().await;
            tune(&other, peer.parse().unwrap(), &TcpOptions::default());
            assert!(other.nodelay().unwrap());
            assert!(!SockRef::from(&other).keepalive().unwrap(), "{peer}");
            #[cfg(target_os = "linux")]
            assert_eq!(SockRef::from(&other).tcp_user_timeout().unwrap(), None);
        }
        assert!(!is_local("::ffff:10.0.0.1".parse().unwrap()));
        drop(accepted);
    }

    #[test]
    fn the_default_config_gives_the_defaults() {
        use crate::config::TcpConfig;
        assert_eq!(
            TcpOptions::from_config(&TcpConfig::default()),
            TcpOptions::default()
        );
        let off = TcpConfig {
            keepalive_idle: Duration::ZERO,
            user_timeout: Duration::ZERO,
            ..TcpConfig::default()
        };
        assert_eq!(TcpOptions::from_config(&off), TcpOptions::off());
    }

    #[tokio::test]
    async fn other_timings_and_none() {
        let custom = TcpOptions::default()
            .keepalive(Some(Keepalive {
                idle: Duration::from_secs(75),
                interval: Duration::from_secs(15),
                probes: 5,
            }))
            .user_timeout(Some(Duration::from_millis(90_500)));
        let (dialled, _accepted) = pair().await;
        tune(&dialled, "10.1.2.3:4143".parse().unwrap(), &custom);
        let sock = SockRef::from(&dialled);
        assert!(sock.keepalive().unwrap());
        #[cfg(any(target_os = "linux", target_os = "macos"))]
        {
            assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(75));
            assert_eq!(
                sock.tcp_keepalive_interval().unwrap(),
                Duration::from_secs(15)
            );
            assert_eq!(sock.tcp_keepalive_retries().unwrap(), 5);
        }
        #[cfg(target_os = "linux")]
        assert_eq!(
            sock.tcp_user_timeout().unwrap(),
            Some(Duration::from_millis(90_500))
        );
        // Off: the kernel's defaults (no keepalive, no user timeout), nodelay still set.
        let (other, _accepted) = pair().await;
        tune(&other, "10.1.2.3:4143".parse().unwrap(), &TcpOptions::off());
        assert!(other.nodelay().unwrap());
        assert!(!SockRef::from(&other).keepalive().unwrap());
        #[cfg(target_os = "linux")]
        assert_eq!(SockRef::from(&other).tcp_user_timeout().unwrap(), None);
    }
}
