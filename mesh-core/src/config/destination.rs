//! What a transparent listener's connections may be headed to: one address, or every
//! address of a network at one port.
//!
//! ```toml
//! addresses = [
//!     "10.96.0.20:80",         # one IP and port (IPv6: "[2001:db8::20]:80")
//!     "10.1.2.0/24:5432",      # any IP of 10.1.2.0/24, port 5432
//!     "[2001:db8:5::/64]:443", # IPv6: the network in brackets, then the port
//! ]
//! ```
//!
//! A connection's original destination matches an exact address first; otherwise the
//! network with the longest prefix that holds its IP at its port (as IP routing picks a
//! route). A network is written with its host bits clear (`10.1.2.0/24`, not
//! `10.1.2.7/24`): anything else is refused as a likely typo.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One destination of a service: an address, or a network at a port.
///
/// ```toml
/// addresses = [
///     "10.96.0.20:80",         # one IP and port (IPv6: "[2001:db8::20]:80")
///     "10.1.2.0/24:5432",      # any IP of 10.1.2.0/24, port 5432
///     "[2001:db8:5::/64]:443", # IPv6: the network in brackets, then the port
/// ]
/// ```
///
/// A connection's original destination matches an exact address first; otherwise the
/// network with the longest prefix that holds its IP at its port (as IP routing picks a
/// route). A network is written with its host bits clear (`10.1.2.0/24`, not
/// `10.1.2.7/24`): anything else is refused as a likely typo.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Destination {
    /// Exactly this IP and port.
    Addr(SocketAddr),
    /// Any IP of a network, at one port.
    Network(Network),
}

/// Every IP of `addr/prefix`, at `port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
    port: u16,
}

impl Network {
    /// The network `addr/prefix` at `port`: `None` when the prefix is longer than the
    /// address or `addr` has host bits set.
    pub fn new(addr: IpAddr, prefix: u8, port: u16) -> Option<Self> {
        let bits = bits(addr);
        if u32::from(prefix) > bits || masked(addr, prefix) != addr {
            return None;
        }
        Some(Self { addr, prefix, port })
    }

    /// The network's first address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// Its prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The network of `prefix` bits holding `dst`, at its port: `None` when the prefix is
    /// longer than the address.
    pub fn holding(dst: &SocketAddr, prefix: u8) -> Option<Self> {
        if u32::from(prefix) > bits(dst.ip()) {
            return None;
        }
        Some(Self {
            addr: masked(dst.ip(), prefix),
            prefix,
            port: dst.port(),
        })
    }

    /// Whether `dst` is one of its addresses at its port (an IPv4 address in an IPv6
    /// network, or the reverse, is not).
    pub fn contains(&self, dst: &SocketAddr) -> bool {
        dst.port() == self.port
            && bits(dst.ip()) == bits(self.addr)
            && masked(dst.ip(), self.prefix) == self.addr
    }
}

fn bits(addr: IpAddr) -> u32 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

/// `addr` with every bit past `prefix` cleared.
fn masked(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4((u32::from(a) & mask).into())
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6((u128::from(a) & mask).into())
        }
    }
}

impl Destination {
    /// The port.
    pub fn port(&self) -> u16 {
        match self {
            Self::Addr(a) => a.port(),
            Self::Network(n) => n.port,
        }
    }

    /// Whether `dst` is this destination.
    pub fn matches(&self, dst: &SocketAddr) -> bool {
        match self {
            Self::Addr(a) => a == dst,
            Self::Network(n) => n.contains(dst),
        }
    }
}

impl From<SocketAddr> for Destination {
    fn from(addr: SocketAddr) -> Self {
        Self::Addr(addr)
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}/{}:{}", self.prefix, self.port),
            IpAddr::V6(a) => write!(f, "[{a}/{}]:{}", self.prefix, self.port),
        }
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Addr(a) => a.fmt(f),
            Self::Network(n) => n.fmt(f),
        }
    }
}

impl FromStr for Destination {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if !s.contains('/') {
            let addr: SocketAddr = s.parse().map_err(|_| {
                format!("`{s}` is not `IP:port`, `[IPv6]:port`, `IP/prefix:port` or `[IPv6/prefix]:port`")
            })?;
            not_mapped(s, addr.ip())?;
            return Ok(Self::Addr(addr));
        }
        let (net, port) = match s.strip_prefix('[') {
            Some(rest) => rest
                .split_once("]:")
                .ok_or_else(|| format!("`{s}`: an IPv6 network is written `[ADDR/PREFIX]:PORT`"))?,
            None => s
                .rsplit_once(':')
                .ok_or_else(|| format!("`{s}`: a network needs a port (`IP/prefix:port`)"))?,
        };
        let port: u16 = Some(port)
            .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| format!("`{s}`: `{port}` is not a port"))?;
        let (addr, prefix) = net
            .split_once('/')
            .ok_or_else(|| format!("`{s}`: no `/prefix` in `{net}`"))?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("`{s}`: `{addr}` is not an IP address"))?;
        if addr.is_ipv6() != s.starts_with('[') {
            return Err(format!(
                "`{s}`: an IPv6 network is written in brackets (`[ADDR/PREFIX]:PORT`), an IPv4 one without"
            ));
        }
        not_mapped(s, addr)?;
        let prefix: u8 = Some(prefix)
            .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|p| p.parse().ok())
            .filter(|p| u32::from(*p) <= bits(addr))
            .ok_or_else(|| {
                format!(
                    "`{s}`: `{prefix}` is not a prefix length (0 to {})",
                    bits(addr)
                )
            })?;
        if u32::from(prefix) == bits(addr) {
            // One address: the same destination as `IP:port`, and compared as one.
            return Ok(Self::Addr(SocketAddr::new(addr, port)));
        }
        Network::new(addr, prefix, port)
            .map(Self::Network)
            .ok_or_else(|| {
                format!(
                    "`{s}`: {addr}/{prefix} has host bits set (the network is {}/{prefix})",
                    masked(addr, prefix)
                )
            })
    }
}

/// Refuses an IPv4-mapped IPv6 address: connections to IPv4 destinations are seen with
/// their IPv4 address, which such an entry would never match.
fn not_mapped(s: &str, addr: IpAddr) -> Result<(), String> {
    match addr {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => Err(format!(
                "`{s}`: an IPv4-mapped address never matches (connections to {v4} are seen as IPv4): write it as IPv4"
            )),
            None => Ok(()),
        },
        IpAddr::V4(_) => Ok(()),
    }
}

impl Serialize for Destination {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Destination {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn dst(s: &str) -> Destination {
        s.parse().unwrap()
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn addresses_and_networks_parse_and_print_back() {
        for s in [
            "10.96.0.20:80",
            "[2001:db8::20]:80",
            "10.1.2.0/24:5432",
            "0.0.0.0/0:443",
            "[2001:db8:5::/64]:443",
            "[::/0]:443",
        ] {
            assert_eq!(dst(s).to_string(), s);
            let toml = format!("a = \"{s}\"");
            #[derive(Deserialize, Serialize)]
            struct T {
                a: Destination,
            }
            let t: T = toml::from_str(&toml).unwrap();
            assert_eq!(t.a, dst(s));
            assert_eq!(toml::to_string(&t).unwrap().trim(), toml);
        }
    }

    #[test]
    fn bad_destinations_say_what_is_wrong() {
        for (s, says) in [
            (
                "10.1.2.7/24:5432",
                "host bits set (the network is 10.1.2.0/24)",
            ),
            ("10.1.2.0/33:5432", "`33` is not a prefix length (0 to 32)"),
            ("10.1.2.0/24", "a network needs a port"),
            ("10.1.2.0/24:http", "`http` is not a port"),
            ("2001:db8::/32:443", "in brackets"),
            ("[10.0.0.0/8]:443", "in brackets"),
            ("[2001:db8::/32:443", "written `[ADDR/PREFIX]:PORT`"),
            ("users:80", "is not `IP:port`"),
            ("10.1.2.x/24:80", "`10.1.2.x` is not an IP address"),
            ("10.1.2.0/+24:80", "`+24` is not a prefix length"),
            ("10.1.2.0/24:+80", "`+80` is not a port"),
            ("[::ffff:10.0.0.1]:80", "IPv4-mapped"),
            ("[::ffff:10.0.0.0/104]:80", "IPv4-mapped"),
        ] {
            let err = s.parse::<Destination>().unwrap_err();
            assert!(err.contains(says), "{s}: {err}");
        }
    }

    #[test]
    fn networks_hold_their_addresses_at_their_port_only() {
        let net = dst("10.1.2.0/24:5432");
        assert!(net.matches(&addr("10.1.2.0:5432")));
        assert!(net.matches(&addr("10.1.2.255:5432")));
        assert!(!net.matches(&addr("10.1.3.0:5432")));
        assert!(!net.matches(&addr("10.1.2.9:5433")));
        assert!(
            !net.matches(&addr("[::ffff:10.1.2.9]:5432")),
            "another family"
        );
        let all = dst("0.0.0.0/0:443");
        assert!(all.matches(&addr("203.0.113.9:443")));
        assert!(!all.matches(&addr("[2001:db8::1]:443")));
        let v6 = dst("[2001:db8:5::/64]:443");
        assert!(v6.matches(&addr("[2001:db8:5::9]:443")));
        assert!(!v6.matches(&addr("[2001:db8:6::9]:443")));
        // A /32 (or /128) is one address, compared as such.
        let one = dst("10.1.2.3/32:80");
        assert_eq!(one, dst("10.1.2.3:80"));
        assert_eq!(dst("[2001:db8::1/128]:80"), dst("[2001:db8::1]:80"));
        assert!(one.matches(&addr("10.1.2.3:80")));
        assert!(!one.matches(&addr("10.1.2.4:80")));
        assert_eq!(dst("10.96.0.20:80").port(), 80);
        assert_eq!(net.port(), 5432);
    }
}
