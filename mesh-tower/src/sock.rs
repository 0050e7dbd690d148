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

/// Sets the mesh's options on `tcp`, connected to `peer`. Failures are ignored (logged at
/// `trace`): an option the platform refuses leaves the connection as it was.
pub(crate) fn tune(tcp: &TcpStream, peer: SocketAddr) {
    if let Err(error) = tcp.set_nodelay(true) {
        tracing::trace!(%peer, %error, "TCP_NODELAY refused");
    }
    if is_local(peer.ip()) {
        return;
    }
    let keepalive = TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL);
    #[cfg(any(target_os = "linux", target_os = "macos", target_os = "windows"))]
    let keepalive = keepalive.with_retries(KEEPALIVE_PROBES);
    let sock = SockRef::from(tcp);
    if let Err(error) = sock.set_tcp_keepalive(&keepalive) {
        tracing::trace!(%peer, %error, "TCP keepalive refused");
    }
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Err(error) = sock.set_tcp_user_timeout(Some(USER_TIMEOUT)) {
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
        tune(&dialled, "10.1.2.3:4143".parse().unwrap());
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
            tune(&other, peer.parse().unwrap());
            assert!(other.nodelay().unwrap());
            assert!(!SockRef::from(&other).keepalive().unwrap(), "{peer}");
            #[cfg(target_os = "linux")]
            assert_eq!(SockRef::from(&other).tcp_user_timeout().unwrap(), None);
        }
        assert!(!is_local("::ffff:10.0.0.1".parse().unwrap()));
        drop(accepted);
    }
}
