//! Service discovery: streams of endpoint changes.
//!
//! Every source produces a stream of [`Change`]s — tower's
//! [`discover::Change`](tower::discover::Change) keyed by [`EndpointKey`] — so any source
//! plugs straight into tower's `Discover` trait and so into a balancer. A source computes
//! its full endpoint set whenever it learns something new and emits only the difference
//! from the last set it emitted (see [`EndpointSet::diff`]): an `Insert` for each new or
//! changed endpoint, then a `Remove` for each endpoint that is gone. Inserts come first so
//! that replacing every endpoint never leaves the balancer momentarily empty.
//!
//! Sources, each behind a feature:
//!
//! | source | feature | updates |
//! |---|---|---|
//! | [`StaticDiscovery`] | `discover-static` (default) | none: the list, then the stream ends |
//! | [`FileDiscovery`] | `discover-file` | when the file changes (directory watch plus a 10 s poll), including atomic replace and symlink swaps; a bad file keeps the last set |
//! | [`DnsDiscovery`] | `discover-dns` | A/AAAA or SRV, re-resolved on the records' TTL within a floor (5 s) and a ceiling (5 min); a failed lookup keeps the last set, an empty answer or an NXDOMAIN lasting 30 s empties it |
//!
//! A source that fails after it started (a malformed file, a failed DNS lookup) keeps the
//! last good set, logs why through `tracing`, and tries again; it does not yield an error,
//! because an error from a discovery stream fails the balancer fed by it. Errors that a
//! caller must act on are returned when the source is created.

use std::collections::BTreeMap;

use crate::config::DiscoveryConfig;
use crate::endpoint::{Endpoint, EndpointKey};

#[cfg(feature = "discover-static")]
mod static_list;
#[cfg(feature = "discover-static")]
pub use self::static_list::StaticDiscovery;

#[cfg(feature = "discover-dns")]
pub mod dns;
#[cfg(feature = "discover-dns")]
pub use self::dns::{DnsDiscovery, DnsDiscoveryBuilder};

#[cfg(feature = "discover-file")]
pub mod file;
#[cfg(feature = "discover-file")]
pub use self::file::{FileDiscovery, FileDiscoveryBuilder};

#[cfg(any(feature = "discover-file", feature = "discover-dns"))]
mod updates;
#[cfg(any(feature = "discover-file", feature = "discover-dns"))]
pub use self::updates::Updates;

/// One change to a service's endpoints, as tower's balancers consume it.
pub type Change = tower::discover::Change<EndpointKey, Endpoint>;

/// A type-erased discovery stream, for holding sources of different kinds in one place.
pub type BoxDiscover = std::pin::Pin<
    Box<dyn futures_core::Stream<Item = Result<Change, DiscoverError>> + Send + 'static>,
>;

/// Why a discovery source could not be created or had to stop.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiscoverError {
    /// An endpoints file could not be read.
    #[error("reading endpoints file {path}: {source}")]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// An endpoints file was read but is not a valid endpoint list.
    #[error("endpoints file {path} is malformed: {message}")]
    Malformed {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong, and where in the file.
        message: String,
    },
    /// A file watch could not be set up.
    #[error("watching {path}: {message}")]
    Watch {
        /// The watched path.
        path: std::path::PathBuf,
        /// The watcher's error.
        message: String,
    },
    /// The configured source was compiled out: its feature is not enabled.
    #[error("{kind} discovery needs mesh-core's `{feature}` feature")]
    Unsupported {
        /// The `kind` of discovery configured.
        kind: &'static str,
        /// The feature that provides it.
        feature: &'static str,
    },
    /// A DNS name is not valid, or a DNS lookup failed.
    #[error("DNS discovery for `{name}`: {message}")]
    Dns {
        /// The name being resolved.
        name: String,
        /// What went wrong.
        message: String,
    },
}

/// Starts the source a [`DiscoveryConfig`] describes.
///
/// A file source reads its file before this returns (a missing or malformed file is an
/// error); a DNS source resolves in the background. A source whose feature is not enabled
/// gives [`DiscoverError::Unsupported`].
///
/// ```
/// use futures_util::StreamExt;
/// use mesh_core::config::DiscoveryConfig;
/// use mesh_core::discover::{self, Change};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let config: DiscoveryConfig =
///     toml::from_str(r#"kind = "static"
///                       endpoints = [{ addr = "127.0.0.1:8080" }]"#)?;
/// let mut changes = discover::from_config(&config).await?;
/// assert!(matches!(changes.next().await, Some(Ok(Change::Insert(..)))));
/// # Ok(()) }
/// ```
pub async fn from_config(config: &DiscoveryConfig) -> Result<BoxDiscover, DiscoverError> {
    match config {
        #[cfg(feature = "discover-static")]
        DiscoveryConfig::Static { endpoints } => {
            Ok(Box::pin(StaticDiscovery::new(endpoints.iter().cloned())))
        }
        #[cfg(feature = "discover-file")]
        DiscoveryConfig::File { path } => Ok(Box::pin(FileDiscovery::watch(path.clone()).await?)),
        #[cfg(feature = "discover-dns")]
        DiscoveryConfig::Dns {
            host,
            port,
            min_ttl,
            max_ttl,
            name_servers,
            nxdomain_grace,
        } => Ok(Box::pin(
            name_servers
                .iter()
                .fold(DnsDiscovery::host(host.clone(), *port), |b, addr| {
                    b.name_server(*addr)
                })
                .ttl_floor(*min_ttl)
                .ttl_ceiling(*max_ttl)
                .nxdomain_grace(*nxdomain_grace)
                .build()?,
        )),
        #[cfg(feature = "discover-dns")]
        DiscoveryConfig::DnsSrv {
            name,
            min_ttl,
            max_ttl,
            name_servers,
            nxdomain_grace,
        } => Ok(Box::pin(
            name_servers
                .iter()
                .fold(DnsDiscovery::srv(name.clone()), |b, addr| {
                    b.name_server(*addr)
                })
                .ttl_floor(*min_ttl)
                .ttl_ceiling(*max_ttl)
                .nxdomain_grace(*nxdomain_grace)
                .build()?,
        )),
        #[allow(unreachable_patterns)] // reachable when a source's feature is off
        other => Err(DiscoverError::Unsupported {
            kind: match other {
                DiscoveryConfig::Static { .. } => "static",
                DiscoveryConfig::File { .. } => "file",
                _ => "dns",
            },
            feature: match other {
                DiscoveryConfig::Static { .. } => "discover-static",
                DiscoveryConfig::File { .. } => "discover-file",
                _ => "discover-dns",
            },
        }),
    }
}

/// At most this many endpoints come from one discovery source (a DNS name, an endpoints
/// file): beyond it, those of the lowest addresses are kept, with a warning.
pub const MAX_ENDPOINTS: usize = 4096;

/// A set of endpoints keyed by address: the state a discovery source diffs against.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointSet(BTreeMap<EndpointKey, Endpoint>);

impl EndpointSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// The number of endpoints.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The endpoint at `key`, if any.
    pub fn get(&self, key: &EndpointKey) -> Option<&Endpoint> {
        self.0.get(key)
    }

    /// Adds an endpoint, replacing any earlier endpoint at the same address.
    pub fn insert(&mut self, endpoint: Endpoint) -> Option<Endpoint> {
        self.0.insert(endpoint.key(), endpoint)
    }

    /// Keeps the `max` endpoints of lowest key; true if some were dropped.
    #[cfg(any(feature = "discover-file", feature = "discover-dns"))]
    pub(crate) fn truncate(&mut self, max: usize) -> bool {
        let Some(first_dropped) = self.0.keys().nth(max).copied() else {
            return false;
        };
        self.0.split_off(&first_dropped);
        true
    }

    /// Iterates over the endpoints in key order.
    pub fn iter(&self) -> impl Iterator<Item = &Endpoint> {
        self.0.values()
    }

    /// The changes that turn `self` into `next`: an `Insert` for every endpoint that is new
    /// or differs in any field, then a `Remove` for every key that `next` lacks. Equal sets
    /// produce no change.
    ///
    /// ```
    /// use mesh_core::discover::{Change, EndpointSet};
    /// use mesh_core::endpoint::Endpoint;
    ///
    /// let a = Endpoint::new("10.0.0.1:80".parse()?);
    /// let b = Endpoint::new("10.0.0.2:80".parse()?);
    /// let old: EndpointSet = [a.clone()].into_iter().collect();
    /// let new: EndpointSet = [b.clone()].into_iter().collect();
    /// let changes = old.diff(&new);
    /// assert!(matches!(&changes[0], Change::Insert(k, _) if *k == b.key()));
    /// assert!(matches!(&changes[1], Change::Remove(k) if *k == a.key()));
    /// assert!(new.diff(&new).is_empty());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn diff(&self, next: &EndpointSet) -> Vec<Change> {
        let inserts = next
            .0
            .iter()
            .filter(|(k, ep)| self.0.get(k) != Some(ep))
            .map(|(k, ep)| Change::Insert(*k, ep.clone()));
        let removes = self
            .0
            .keys()
            .filter(|k| !next.0.contains_key(k))
            .map(|k| Change::Remove(*k));
        inserts.chain(removes).collect()
    }
}

impl FromIterator<Endpoint> for EndpointSet {
    fn from_iter<I: IntoIterator<Item = Endpoint>>(iter: I) -> Self {
        Self(iter.into_iter().map(|ep| (ep.key(), ep)).collect())
    }
}

impl IntoIterator for EndpointSet {
    type Item = Endpoint;
    type IntoIter = std::collections::btree_map::IntoValues<EndpointKey, Endpoint>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::SocketAddr;

    fn ep(port: u16, zone: u8) -> Endpoint {
        Endpoint::new(SocketAddr::from(([127, 0, 0, 1], port))).with_zone(format!("z{zone}"))
    }

    /// Applies changes to a set, as a balancer would.
    fn apply(mut set: EndpointSet, changes: Vec<Change>) -> EndpointSet {
        for c in changes {
            match c {
                Change::Insert(k, ep) => {
                    assert_eq!(k, ep.key());
                    set.0.insert(k, ep);
                }
                Change::Remove(k) => {
                    assert!(
                        set.0.remove(&k).is_some(),
                        "removed a key that was not there"
                    );
                }
            }
        }
        set
    }

    #[test]
    fn changed_fields_are_reinserted() {
        let old: EndpointSet = [ep(1, 0), ep(2, 0)].into_iter().collect();
        let new: EndpointSet = [ep(1, 0), ep(2, 1)].into_iter().collect();
        let changes = old.diff(&new);
        assert_eq!(changes.len(), 1);
        assert!(matches!(&changes[0], Change::Insert(_, e) if e.zone() == Some("z1")));
    }

    proptest! {
        #[test]
        fn diff_transforms_old_into_new(
            old in prop::collection::vec((0u16..20, 0u8..3), 0..15),
            new in prop::collection::vec((0u16..20, 0u8..3), 0..15),
        ) {
            let old: EndpointSet = old.into_iter().map(|(p, z)| ep(p, z)).collect();
            let new: EndpointSet = new.into_iter().map(|(p, z)| ep(p, z)).collect();
            let changes = old.diff(&new);
            // Minimal: one change per differing key at most.
            let differing = new.0.iter().filter(|(k, e)| old.0.get(k) != Some(e)).count()
                + old.0.keys().filter(|k| !new.0.contains_key(k)).count();
            prop_assert_eq!(changes.len(), differing);
            // Inserts before removes.
            let first_remove = changes.iter().position(|c| matches!(c, Change::Remove(_)));
            if let Some(i) = first_remove {
                prop_assert!(changes[i..].iter().all(|c| matches!(c, Change::Remove(_))));
            }
            prop_assert_eq!(apply(old, changes), new);
        }
    }
}
