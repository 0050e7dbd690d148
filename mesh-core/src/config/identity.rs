//! Where a workload's identity comes from.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::identity::TrustDomain;

/// The source of this workload's X.509 SVIDs and trust bundles.
///
/// ```toml
/// [identity]
/// source = "spire"                                      # the SPIFFE Workload API
/// socket = "unix:///run/spire/agent/public/api.sock"    # default: $SPIFFE_ENDPOINT_SOCKET
/// ```
///
/// ```toml
/// [identity]
/// source = "files"                 # PEM files, reloaded when they change
/// cert = "/etc/mesh/svid.pem"      # the SVID chain, leaf first
/// key = "/etc/mesh/svid.key"       # its private key (PKCS#8, SEC1 or PKCS#1 PEM)
/// [identity.bundles]               # one CA bundle per trusted domain (federation)
/// "example.org" = "/etc/mesh/example.org.pem"
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "source", rename_all = "kebab-case", deny_unknown_fields)]
#[non_exhaustive]
pub enum IdentityConfig {
    /// The SPIFFE Workload API, as served by a SPIRE agent.
    Spire {
        /// The Workload API socket (`unix:///path`, `unix:/path` or `tcp://IP:PORT`).
        /// Default: the `SPIFFE_ENDPOINT_SOCKET` environment variable.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        socket: Option<String>,
    },
    /// PEM files on disk, for VMs without SPIRE; reloaded when they change.
    Files {
        /// The SVID certificate chain, leaf first.
        cert: PathBuf,
        /// The SVID's private key (PKCS#8, SEC1 or PKCS#1 PEM).
        key: PathBuf,
        /// CA bundles by trust domain; at least one.
        bundles: BTreeMap<TrustDomainKey, PathBuf>,
    },
}

/// A trust domain used as a TOML key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TrustDomainKey(pub TrustDomain);

impl Serialize for TrustDomainKey {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.0.as_str())
    }
}

impl<'de> Deserialize<'de> for TrustDomainKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        let td = TrustDomain::new(&s).map_err(|e| {
            serde::de::Error::custom(format_args!("invalid trust domain `{s}`: {e}"))
        })?;
        // Only the name itself, as written in SPIFFE IDs: `TrustDomain::new` would take
        // `Example.org` or `spiffe://example.org/x` for `example.org` too, and two keys
        // naming one domain would silently leave one bundle file out.
        if td.as_str() != s {
            return Err(serde::de::Error::custom(format_args!(
                "trust domain `{s}`: write it as `{}` (lowercase, without `spiffe://` or a path)",
                td.as_str()
            )));
        }
        Ok(TrustDomainKey(td))
    }
}
