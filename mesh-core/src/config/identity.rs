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
/// withdrawal_grace = "30s"    # [30s] how long the agent may deny this workload before its identity is dropped
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
        /// How long the agent may deny this workload an identity (`PERMISSION_DENIED`: its
        /// registration entry was deleted) before the SVID and bundles it gave are dropped
        /// and handshakes fail closed. A grace for an agent that denies for a moment;
        /// `"0s"` drops them at once. Default: 30 s.
        #[serde(
            default = "default_withdrawal_grace",
            with = "crate::serde_str::duration"
        )]
        withdrawal_grace: std::time::Duration,
    },
    /// PEM files on disk, for VMs without SPIRE; reloaded when they change.
    Files {
        /// The SVID certificate chain, leaf first.
        cert: PathBuf,
        /// The SVID's private key (PKCS#8, SEC1 or PKCS#1 PEM).
        key: PathBuf,
        /// CA bundles by trust domain; at least one. Two keys naming one trust domain
        /// (`example.org` and `Example.org`) are refused.
        #[serde(deserialize_with = "unique_bundles")]
        bundles: BTreeMap<TrustDomainKey, PathBuf>,
    },
}

/// As `mesh_spiffe::spire::DEFAULT_WITHDRAWAL_GRACE`.
fn default_withdrawal_grace() -> std::time::Duration {
    std::time::Duration::from_secs(30)
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
        TrustDomainKey::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl TrustDomainKey {
    /// A trust domain written as its name (`example.org`) or its SPIFFE ID
    /// (`spiffe://example.org`), in any case; one with a path is refused (a workload's ID
    /// where its trust domain was meant).
    fn parse(s: &str) -> Result<Self, String> {
        let td = TrustDomain::new(s).map_err(|e| format!("invalid trust domain `{s}`: {e}"))?;
        let name = s
            .get(..9)
            .filter(|scheme| scheme.eq_ignore_ascii_case("spiffe://"))
            .map_or(s, |_| &s[9..]);
        if name.contains('/') {
            return Err(format!(
                "trust domain `{s}` has a path: write the trust domain alone, `{}`",
                td.as_str()
            ));
        }
        Ok(TrustDomainKey(td))
    }
}

/// The `bundles` table, refusing two keys that name one trust domain (`example.org` and
/// `spiffe://Example.org`): one of their files would be left out without a word.
fn unique_bundles<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<BTreeMap<TrustDomainKey, PathBuf>, D::Error> {
    struct Bundles;
    impl<'de> serde::de::Visitor<'de> for Bundles {
        type Value = BTreeMap<TrustDomainKey, PathBuf>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a table of trust domain = bundle file")
        }

        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut bundles = BTreeMap::new();
            while let Some((key, path)) = map.next_entry::<String, PathBuf>()? {
                let td = TrustDomainKey::parse(&key).map_err(serde::de::Error::custom)?;
                if bundles.contains_key(&td) {
                    return Err(serde::de::Error::custom(format_args!(
                        "`{key}` names trust domain `{}` as another key does: give it one bundle file",
                        td.0.as_str()
                    )));
                }
                bundles.insert(td, path);
            }
            Ok(bundles)
        }
    }
    deserializer.deserialize_map(Bundles)
}
