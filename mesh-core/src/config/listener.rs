//! Listeners: inbound (peers to the local application), outbound (the local application to
//! services) and admin.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

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
    /// The local rate limit applied. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<String>,
    /// The request header the application reads the peer's verified SPIFFE ID from; the
    /// proxy always overwrites it (and removes it when the peer has none), so a client
    /// cannot set it. Default: `x-mesh-client-id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_header: Option<String>,
}

/// An outbound listener: accepts plaintext from the local application and sends each
/// request along the first matching route (or, if none, the `default_service`).
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
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// The address to serve `/metrics`, `/ready`, `/live` and `/config` on.
    pub listen: SocketAddr,
}
