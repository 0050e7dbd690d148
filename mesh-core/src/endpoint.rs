//! Endpoints: the addresses a service is reached at, and what the mesh knows of each.
//!
//! An [`Endpoint`] is a socket address (IPv4 or IPv6) with the SPIFFE identity the peer
//! must present, its zone (for zone-aware balancing), a weight and free-form metadata.
//! Discovery keys endpoints by [`EndpointKey`], which is the socket address: two records for
//! the same address are the same endpoint, and a change of identity, zone, weight or
//! metadata at an address is an update (an `Insert` for a key already present), never a
//! second endpoint.
//!
//! In configuration and endpoint files an endpoint is written as a table:
//!
//! ```toml
//! addr = "10.0.0.7:8443"                          # required; IPv6 as "[::1]:8443"
//! identity = "spiffe://example.org/ns/prod/sa/users"  # optional expected server ID
//! zone = "eu-west-1a"                             # optional
//! weight = 1                                      # optional, at least 1 (default 1)
//! metadata = { version = "v2" }                   # optional
//! ```
//!
//! An address that cannot be a peer is rejected when an endpoint is read: port 0, an
//! unspecified address (`0.0.0.0`, `[::]`, which would reach local ports), a multicast or the
//! broadcast address. [`Endpoint::new`] does not check: it is the caller's address.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU32;

use serde::{Deserialize, Deserializer, Serialize};

use crate::identity::SpiffeId;

/// The stable key of an endpoint in discovery: its socket address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointKey(SocketAddr);

impl EndpointKey {
    /// The key of the endpoint at `addr`.
    pub const fn new(addr: SocketAddr) -> Self {
        Self(addr)
    }

    /// The socket address this key stands for.
    pub const fn addr(&self) -> SocketAddr {
        self.0
    }
}

impl From<SocketAddr> for EndpointKey {
    fn from(addr: SocketAddr) -> Self {
        Self(addr)
    }
}

impl fmt::Display for EndpointKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// One address of a service and what the mesh knows about it.
///
/// ```
/// use mesh_core::endpoint::Endpoint;
/// use mesh_core::identity::SpiffeId;
///
/// let ep = Endpoint::new("[::1]:8443".parse()?)
///     .with_identity(SpiffeId::new("spiffe://example.org/users")?)
///     .with_zone("zone-a")
///     .with_metadata("version", "v2");
/// assert_eq!(ep.key().to_string(), "[::1]:8443");
/// assert_eq!(ep.weight().get(), 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    #[serde(deserialize_with = "usable_addr")]
    addr: SocketAddr,
    #[serde(
        default,
        with = "crate::serde_str::option",
        skip_serializing_if = "Option::is_none"
    )]
    identity: Option<SpiffeId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    zone: Option<String>,
    #[serde(default = "default_weight")]
    weight: NonZeroU32,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    metadata: BTreeMap<String, String>,
}

/// Why `ip` cannot be an endpoint's address, if it cannot: an unspecified address would
/// reach local ports; multicast and broadcast addresses are not a peer.
pub(crate) fn unusable_ip(ip: IpAddr) -> Option<&'static str> {
    // `[::ffff:0.0.0.0]` is `0.0.0.0` to the kernel.
    let ip = ip.to_canonical();
    if ip.is_unspecified() {
        Some("an unspecified address")
    } else if ip.is_multicast() {
        Some("a multicast address")
    } else if ip == IpAddr::V4(Ipv4Addr::BROADCAST) {
        Some("the broadcast address")
    } else {
        None
    }
}

/// Deserializes an endpoint's address, rejecting those that cannot be a peer.
fn usable_addr<'de, D: Deserializer<'de>>(deserializer: D) -> Result<SocketAddr, D::Error> {
    use serde::de::Error;
    let addr = SocketAddr::deserialize(deserializer)?;
    if addr.port() == 0 {
        return Err(D::Error::custom(format!(
            "endpoint address {addr} has port 0"
        )));
    }
    if let Some(why) = unusable_ip(addr.ip()) {
        return Err(D::Error::custom(format!(
            "endpoint address {addr} is {why}, which cannot be a peer"
        )));
    }
    Ok(addr)
}

const fn default_weight() -> NonZeroU32 {
    NonZeroU32::MIN
}

impl Endpoint {
    /// An endpoint at `addr` with no expected identity, no zone, weight 1 and no metadata.
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            identity: None,
            zone: None,
            weight: default_weight(),
            metadata: BTreeMap::new(),
        }
    }

    /// Sets the SPIFFE ID the endpoint must present.
    pub fn with_identity(mut self, id: SpiffeId) -> Self {
        self.identity = Some(id);
        self
    }

    /// Sets the endpoint's zone.
    pub fn with_zone(mut self, zone: impl Into<String>) -> Self {
        self.zone = Some(zone.into());
        self
    }

    /// Sets the endpoint's relative weight.
    pub fn with_weight(mut self, weight: NonZeroU32) -> Self {
        self.weight = weight;
        self
    }

    /// Adds one metadata entry, replacing any earlier value for `key`.
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// The endpoint's discovery key.
    pub fn key(&self) -> EndpointKey {
        EndpointKey(self.addr)
    }

    /// The socket address to connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The SPIFFE ID the endpoint must present, if one is known.
    pub fn identity(&self) -> Option<&SpiffeId> {
        self.identity.as_ref()
    }

    /// The endpoint's zone, if known.
    pub fn zone(&self) -> Option<&str> {
        self.zone.as_deref()
    }

    /// The endpoint's relative weight (default 1).
    pub fn weight(&self) -> NonZeroU32 {
        self.weight
    }

    /// Free-form metadata (labels) attached by discovery.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_and_accessors() {
        let ep = Endpoint::new("10.0.0.1:80".parse().unwrap())
            .with_identity(SpiffeId::new("spiffe://td/a").unwrap())
            .with_zone("z1")
            .with_weight(NonZeroU32::new(5).unwrap())
            .with_metadata("k", "v")
            .with_metadata("k", "w");
        assert_eq!(ep.addr().port(), 80);
        assert_eq!(ep.identity().unwrap().path(), "/a");
        assert_eq!(ep.zone(), Some("z1"));
        assert_eq!(ep.weight().get(), 5);
        assert_eq!(ep.metadata()["k"], "w");
        assert_eq!(ep.key(), EndpointKey::from(ep.addr()));
    }

    #[test]
    fn deserializes_ipv4_and_ipv6() {
        #[derive(Deserialize)]
        struct F {
            endpoints: Vec<Endpoint>,
        }
        let f: F = toml::from_str(
            r#"
            [[endpoints]]
            addr = "127.0.0.1:8080"
            [[endpoints]]
            addr = "[::1]:9090"
            identity = "spiffe://example.org/x"
            zone = "b"
            weight = 3
            metadata = { canary = "true" }
            "#,
        )
        .unwrap();
        assert_eq!(
            f.endpoints[0],
            Endpoint::new("127.0.0.1:8080".parse().unwrap())
        );
        assert!(f.endpoints[1].addr().is_ipv6());
        assert_eq!(f.endpoints[1].weight().get(), 3);
        assert_eq!(f.endpoints[1].metadata()["canary"], "true");
    }

    #[test]
    fn rejects_bad_endpoints_with_reasons() {
        for (text, want) in [
            (r#"addr = "localhost:80""#, "invalid socket address"),
            (r#"addr = "1.2.3.4""#, "invalid socket address"),
            ("addr = \"1.2.3.4:1\"\nweight = 0", "nonzero"),
            ("addr = \"1.2.3.4:1\"\nidentity = \"http://x/y\"", "scheme"),
            ("addr = \"1.2.3.4:1\"\nzome = \"a\"", "unknown field `zome`"),
            (r#"addr = "1.2.3.4:0""#, "port 0"),
            (r#"addr = "0.0.0.0:80""#, "unspecified"),
            (r#"addr = "[::]:80""#, "unspecified"),
            (r#"addr = "224.0.0.1:80""#, "multicast"),
            (r#"addr = "[ff02::1]:80""#, "multicast"),
            (r#"addr = "255.255.255.255:80""#, "broadcast"),
            (r#"addr = "[::ffff:0.0.0.0]:80""#, "unspecified"),
            (r#"addr = "[::ffff:224.0.0.1]:80""#, "multicast"),
            (r#"addr = "[::ffff:255.255.255.255]:80""#, "broadcast"),
        ] {
            let err = toml::from_str::<Endpoint>(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
    }
}
