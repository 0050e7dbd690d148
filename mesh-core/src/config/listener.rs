//! Listeners: inbound (peers to the local application), outbound (the local application to
//! services) and admin.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::serde_str::duration;

/// Transport security on a listener or toward a service.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum TlsMode {
    /// Mutual TLS with SPIFFE identities (the default).
    #[default]
    Mtls,
    /// No TLS. Must be asked for explicitly; peers have no verified identity.
    Plaintext,
}

/// The application protocol on a listener or toward a service.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Protocol {
    /// HTTP/2 or HTTP/1.1: negotiated by ALPN over TLS, detected from the connection
    /// preface in plaintext (the default).
    #[default]
    Auto,
    /// HTTP/1.1 only.
    Http1,
    /// HTTP/2 only (gRPC included).
    Http2,
    /// gRPC: HTTP/2 with gRPC classification and status codes.
    Grpc,
    /// Opaque TCP: bytes relayed as they are, with connection-level authorization only.
    Opaque,
}

/// An inbound listener: accepts connections from mesh peers and forwards them to the
/// local application after authorization and rate limiting.
///
/// ```toml
/// [[inbound]]
/// name = "api"
/// listen = "0.0.0.0:4143"
/// target = "127.0.0.1:8080"
/// authorization = "api-policy"   # a key of [authorization]; default: any verified peer
/// rate_limit = "api-limits"      # a key of [rate_limits]; default: none
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundConfig {
    /// A name for logs and metrics; unique among listeners.
    pub name: String,
    /// The address to accept connections on.
    pub listen: SocketAddr,
    /// The local application's address.
    pub target: SocketAddr,
    /// Transport security. Default: `mtls`.
    #[serde(default)]
    pub tls: TlsMode,
    /// The protocol. Default: `auto`.
    #[serde(default)]
    pub protocol: Protocol,
    /// The authorization policy applied. Default: none, which admits any peer with a
    /// verified identity from a trusted domain (and, on a plaintext listener, anyone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization: Option<String>,
    /// The local rate limit applied: to each request, or on an opaque listener to each
    /// new connection (one over the limit is closed before the target is dialled).
    /// Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<String>,
    /// The request header the application reads the peer's verified SPIFFE ID from; the
    /// proxy always overwrites it (and removes it when the peer has none), so a client
    /// cannot set it. Default: `x-mesh-client-id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_header: Option<String>,
    /// Protective limits on the listener's clients. Default: the server's defaults.
    #[serde(default, skip_serializing_if = "ListenerLimits::is_default")]
    pub limits: ListenerLimits,
    /// Bounds on the HTTP/1.1 connections to the application. Default: see
    /// [`PoolConfig`](super::PoolConfig). HTTP listeners only; a change needs a restart.
    #[serde(default, skip_serializing_if = "super::PoolConfig::is_default")]
    pub pool: super::PoolConfig,
    /// Log every request, when its response ends, as one event on the `mesh_access`
    /// target (client address and identity, method, target, status, bytes, duration,
    /// outcome). Default: `false`. HTTP listeners only; a reload may switch it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub access_log: bool,
}

/// An outbound listener: accepts plaintext from the local application and sends each
/// request along the route that takes it (the most specific, see [`RouteConfig`](super::RouteConfig); if
/// none, to the `default_service`).
///
/// ```toml
/// [[outbound]]
/// name = "egress"
/// listen = "127.0.0.1:4140"
/// default_service = "users"
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboundConfig {
    /// A name for logs and metrics; unique among listeners.
    pub name: String,
    /// The address to accept connections on; should be a loopback address.
    pub listen: SocketAddr,
    /// The protocol the application speaks. Default: `auto`: each connection's first
    /// bytes decide — HTTP/1.x and HTTP/2 are routed, and, when `default_service` is
    /// set, anything else (or a client silent for 1 s) is relayed to it as opaque TCP.
    #[serde(default)]
    pub protocol: Protocol,
    /// Where requests that match no route go. Default: none (they get 404). Required for
    /// `protocol = "opaque"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_service: Option<String>,
    /// Transparent mode (Linux): the listener receives connections an iptables `REDIRECT`
    /// rule sent it, reads each one's original destination (`SO_ORIGINAL_DST`) and
    /// proxies it to the service whose [`addresses`](super::ServiceConfig::addresses)
    /// hold that destination, as an outbound listener with that service as its
    /// `default_service` would. Default: `false`. Needs no `default_service` (it picks
    /// one per connection).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub transparent: bool,
    /// What a transparent listener does with a connection whose original destination is
    /// no service's: `passthrough` (the default: relayed as bytes, in the clear, to where
    /// it was going, so unmeshed traffic keeps working) or `refuse` (closed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unmatched: Option<Unmatched>,
    /// Protective limits on the listener's clients. Default: the server's defaults.
    #[serde(default, skip_serializing_if = "ListenerLimits::is_default")]
    pub limits: ListenerLimits,
    /// Terminate TLS with this certificate instead of accepting plaintext: an edge
    /// listener for clients outside the mesh (HTTPS, HTTP/2 by ALPN), which are not
    /// authenticated. The files are watched: a rewritten valid pair is presented from the
    /// next handshake, an invalid or expired one keeps the last good pair. Default: none
    /// (plaintext). Not with `opaque` or `transparent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertificateFiles>,
    /// Log every request, when its response ends, as one event on the `mesh_access`
    /// target (client address, the answering peer's identity, method, target, status,
    /// bytes, duration, outcome). Default: `false`. HTTP listeners only (not `opaque`; on a
    /// transparent listener, its meshed HTTP connections); a reload may switch it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub access_log: bool,
}

/// A certificate chain and its private key, PEM files (relative paths are taken from the
/// configuration file's directory).
///
/// ```toml
/// certificate = { cert = "/etc/mesh/edge.crt", key = "/etc/mesh/edge.key" }
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateFiles {
    /// The chain, leaf first.
    pub cert: std::path::PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: std::path::PathBuf,
}

/// Protective limits of an HTTP listener; each unset one keeps the server's default
/// (given in brackets).
///
/// ```toml
/// [inbound.limits]
/// header_read_timeout = "5s"       # [10s] a client slower to send its headers is closed
/// max_header_list_size = 32768     # [64 KiB] larger header blocks get 431 (at most 1 MiB; HTTP/1.1 takes at least 8 KiB)
/// max_headers = 100                # [100] more HTTP/1.1 headers get 431
/// max_request_body_size = 1048576  # [64 MiB] a larger declared body gets 413
/// max_connections = 10000          # [10,000] beyond, the oldest connection still in its
///                                  # handshake or without a request closes; none: accepting waits
/// max_concurrent_streams = 256     # [256] HTTP/2 streams per connection
/// idle_timeout = "120s"            # [120s] idle this long: shut down; a client not reading this long: closed
/// tunnel_idle_timeout = "10m"      # [1h] a relayed connection without a byte either way this long: closed ("0s": never)
/// max_cancelled_requests = 20      # [20] a client cancelling this many requests more than it lets finish: GOAWAY
/// premature_cancel_window = "1s"   # [1s] HTTP/2 cancellations later than this after a request began do not count ("0s": none does)
/// ```
///
/// An opaque listener relays bytes, not requests: of these it takes `max_connections` and
/// `tunnel_idle_timeout` only, and refuses the others.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerLimits {
    /// Bound on reading a request's headers, from their first byte (and on a new
    /// connection's wait for its first request).
    #[serde(
        default,
        with = "duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub header_read_timeout: Option<Duration>,
    /// Bound on a request's header block, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_header_list_size: Option<u32>,
    /// Bound on the number of headers of an HTTP/1.1 request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_headers: Option<usize>,
    /// Bound on a request body's declared size, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_request_body_size: Option<u64>,
    /// Bound on open connections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    /// Bound on concurrent HTTP/2 streams per connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_streams: Option<u32>,
    /// How long a connection may have no request or response in flight (the header-read
    /// bound starts at a head's first byte, so it does not shorten this); then it shuts
    /// down. One whose client stops reading (a full socket, or a closed HTTP/2 window)
    /// for as long is closed.
    #[serde(
        default,
        with = "duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub idle_timeout: Option<Duration>,
    /// How long a relayed connection may go without a byte either way; then both its
    /// sides are closed. Relayed are: every connection of an opaque listener, what an
    /// `auto` or transparent listener relays as opaque TCP (and a transparent listener's
    /// passthrough), and a switched HTTP connection (WebSocket, CONNECT) on any listener.
    /// `0s` turns it off.
    #[serde(
        default,
        with = "duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub tunnel_idle_timeout: Option<Duration>,
    /// Bound on the requests a connection's client may cancel (reset, or hang up on) once
    /// they outnumber those it let finish: rapid reset of accepted streams. The connection
    /// is shut down with `GOAWAY`, and closed once it cancels as many more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cancelled_requests: Option<usize>,
    /// How soon after its start an HTTP/2 request's cancellation must come to count toward
    /// `max_cancelled_requests`: a peer proxy timing out slow requests on a connection all
    /// its callers share is not taken for an attacker. `0s`: none counts, and the bound is
    /// off for HTTP/2.
    #[serde(
        default,
        with = "duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub premature_cancel_window: Option<Duration>,
}

impl ListenerLimits {
    /// The limits that only HTTP connections have (set, with their keys): an opaque
    /// listener refuses them.
    pub fn http_only(&self) -> Vec<&'static str> {
        let mut set = Vec::new();
        for (key, is_set) in [
            ("header_read_timeout", self.header_read_timeout.is_some()),
            ("max_header_list_size", self.max_header_list_size.is_some()),
            ("max_headers", self.max_headers.is_some()),
            (
                "max_request_body_size",
                self.max_request_body_size.is_some(),
            ),
            (
                "max_concurrent_streams",
                self.max_concurrent_streams.is_some(),
            ),
            ("idle_timeout", self.idle_timeout.is_some()),
            (
                "max_cancelled_requests",
                self.max_cancelled_requests.is_some(),
            ),
            (
                "premature_cancel_window",
                self.premature_cancel_window.is_some(),
            ),
        ] {
            if is_set {
                set.push(key);
            }
        }
        set
    }

    /// Whether every limit is left at the server's default.
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// What a transparent listener does with connections to destinations no service claims.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Unmatched {
    /// Relay the bytes to the original destination, without TLS (the default).
    #[default]
    Passthrough,
    /// Close the connection.
    Refuse,
}

/// The admin listener.
///
/// ```toml
/// [admin]
/// listen = "127.0.0.1:9990"
/// decisions = 1024   # keep the latest 1,024 decisions for GET /decisions; default 0: off
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// The address to serve `/metrics`, `/ready`, `/live` and `/config` on.
    pub listen: SocketAddr,
    /// How many recent decisions (balancer picks, circuit-breaker changes, retry and
    /// authorization decisions) to keep for `GET /decisions`, at most
    /// [`MAX_DECISIONS`]. Default: 0, no record kept.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub decisions: usize,
}

/// The largest [`AdminConfig::decisions`]: 100,000 decisions (some tens of MB).
pub const MAX_DECISIONS: usize = 100_000;

fn is_zero(n: &usize) -> bool {
    *n == 0
}
