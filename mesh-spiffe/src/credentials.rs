//! Credentials: this workload's X.509 SVID and the trust bundles it verifies peers with.
//!
//! Every credential source (the SPIRE Workload API, PEM files, the test CA) implements
//! [`CredentialSource`]: the current [`Svid`], the current [`BundleSet`], and a
//! [`watch`] channel that ticks when either changes. The TLS
//! configurations built by this crate ask the source at *every handshake*, so a rotated
//! SVID or bundle takes effect for the next connection with no restart, and established
//! connections are untouched.
//!
//! [`CredentialStore`] is the ready-made implementation the sources publish into: one
//! lock-free [`ArcSwap`] cell holding the SVID and the bundles, and a watch channel.
//! Reading is an atomic load. [`CredentialStore::set`] replaces both in one step; a
//! handshake reads the SVID (to present) and the bundles (to verify the peer) at two
//! moments, which is harmless because rotations overlap: old and new credentials are both
//! valid while a fleet moves from one to the other.
//!
//! Values are validated on construction: an [`Svid`] has a non-empty chain whose leaf
//! carries exactly one SPIFFE URI SAN and is a leaf as X509-SVID defines one (not a CA;
//! key usage with `digitalSignature`, without `keyCertSign` or `cRLSign`), and a
//! [`BundleSet`] holds only certificates that parse as trust anchors.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, TrustAnchor};
use tokio::sync::watch;

use crate::error::CredentialError;
use mesh_core::identity::{SpiffeId, TrustDomain};

/// An X.509 SVID: a certificate chain (leaf first) whose leaf names one SPIFFE ID, and its
/// private key.
pub struct Svid {
    id: SpiffeId,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// The leaf's `notAfter`, in seconds since the Unix epoch.
    not_after: i64,
}

impl Svid {
    /// An SVID from a DER chain (leaf first) and its private key.
    ///
    /// Fails when the chain is empty, or the leaf does not carry exactly one `spiffe://` URI
    /// SAN or breaks the X509-SVID leaf rules on basic constraints and key usage (the
    /// checks peers run, [`spiffe_id_of`](crate::verify::spiffe_id_of)). Whether the key matches the leaf is checked where a crypto provider is at hand
    /// (see [`Svid::check_key`]).
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, CredentialError> {
        let leaf = chain.first().ok_or(CredentialError::EmptyChain)?;
        let id = crate::verify::spiffe_id_of(leaf).map_err(CredentialError::Leaf)?;
        // It parsed for its ID just above.
        let not_after = x509_parser::parse_x509_certificate(leaf.as_ref())
            .map_or(LAST_X509_TIME, |(_, cert)| {
                cert.validity().not_after.timestamp()
            });
        Ok(Self {
            id,
            chain,
            key,
            not_after,
        })
    }

    /// When the leaf certificate expires (its `notAfter`): from then on, peers refuse it.
    pub fn not_after(&self) -> std::time::SystemTime {
        let secs = self.not_after.unsigned_abs();
        if self.not_after >= 0 {
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs)
        } else {
            std::time::UNIX_EPOCH - std::time::Duration::from_secs(secs)
        }
    }

    /// Whether the leaf certificate has expired at `now`.
    pub fn is_expired(&self, now: std::time::SystemTime) -> bool {
        now >= self.not_after()
    }

    /// The SPIFFE ID the leaf certificate names.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// The certificate chain, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The private key.
    pub fn key(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }

    /// Checks that the private key parses with `provider` and matches the leaf's public key.
    pub fn check_key(
        &self,
        provider: &rustls::crypto::CryptoProvider,
    ) -> Result<(), CredentialError> {
        self.certified_key(provider).map(drop)
    }

    /// The rustls form of this SVID, for a certificate resolver.
    pub(crate) fn certified_key(
        &self,
        provider: &rustls::crypto::CryptoProvider,
    ) -> Result<rustls::sign::CertifiedKey, CredentialError> {
        rustls::sign::CertifiedKey::from_der(self.chain.clone(), self.key.clone_key(), provider)
            .map_err(|e| CredentialError::Key(e.to_string()))
    }
}

/// 9999-12-31T23:59:59Z, the last time X.509 can say (RFC 5280 §4.1.2.5).
const LAST_X509_TIME: i64 = 253_402_300_799;

impl fmt::Debug for Svid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Svid")
            .field("id", &self.id)
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

/// The CA certificates of one trust domain, parsed as trust anchors.
#[derive(Clone)]
pub struct Bundle {
    certs: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
}

impl Bundle {
    /// A bundle of DER CA certificates. Fails if there is none, or if any does not parse
    /// as a trust anchor. A certificate that parses but is no signing certificate
    /// (X509-SVID 4.1 and 4.3: basic constraints with `CA=true`, and `keyCertSign` if it
    /// has a key usage extension) is left out with a warning, so that an SVID put in a
    /// bundle by mistake cannot become a root while the bundle's real roots still work;
    /// a bundle left with no certificate fails with the first one's reason.
    pub fn new(certs: Vec<CertificateDer<'static>>) -> Result<Self, CredentialError> {
        if certs.is_empty() {
            return Err(CredentialError::EmptyBundle);
        }
        let mut kept = Vec::with_capacity(certs.len());
        let mut anchors = Vec::with_capacity(certs.len());
        let mut first_refused = None;
        for (i, der) in certs.into_iter().enumerate() {
            let anchor = webpki::anchor_from_trusted_cert(&der)
                .map(|a| a.to_owned())
                .map_err(|e| CredentialError::Anchor {
                    index: i,
                    reason: format!("{e:?}"),
                })?;
            if let Err(reason) = crate::verify::check_signing_cert(&der) {
                let error = CredentialError::Anchor {
                    index: i,
                    reason: format!("the certificate {reason}"),
                };
                tracing::warn!(%error, "left out of the trust bundle");
                first_refused.get_or_insert(error);
                continue;
            }
            anchors.push(anchor);
            kept.push(der);
        }
        match first_refused {
            Some(error) if kept.is_empty() => Err(error),
            _ => Ok(Self {
                certs: kept,
                anchors,
            }),
        }
    }

    /// The CA certificates (those left out excepted).
    pub fn certs(&self) -> &[CertificateDer<'static>] {
        &self.certs
    }

    /// The trust anchors, for chain verification.
    pub fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }
}

impl fmt::Debug for Bundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bundle")
            .field("authorities", &self.certs.len())
            .finish()
    }
}

/// Trust bundles by trust domain: the local domain's and any federated ones.
#[derive(Clone, Debug, Default)]
pub struct BundleSet {
    bundles: HashMap<TrustDomain, Arc<Bundle>>,
}

impl BundleSet {
    /// An empty set: every peer is refused.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the bundle of `trust_domain`.
    pub fn insert(&mut self, trust_domain: TrustDomain, bundle: Bundle) {
        self.bundles.insert(trust_domain, Arc::new(bundle));
    }

    /// The set with one more bundle.
    pub fn with(mut self, trust_domain: TrustDomain, bundle: Bundle) -> Self {
        self.insert(trust_domain, bundle);
        self
    }

    /// The bundle of `trust_domain`, if trusted.
    pub fn get(&self, trust_domain: &TrustDomain) -> Option<&Bundle> {
        self.bundles.get(trust_domain).map(|b| &**b)
    }

    /// The trust domains with a bundle.
    pub fn trust_domains(&self) -> impl Iterator<Item = &TrustDomain> {
        self.bundles.keys()
    }

    /// The number of trust domains.
    pub fn len(&self) -> usize {
        self.bundles.len()
    }

    /// Whether no trust domain has a bundle.
    pub fn is_empty(&self) -> bool {
        self.bundles.is_empty()
    }

    /// Whether both sets trust the same certificates for the same trust domains.
    pub fn same_trust(&self, other: &BundleSet) -> bool {
        self.bundles.len() == other.bundles.len()
            && self.bundles.iter().all(|(td, bundle)| {
                other
                    .bundles
                    .get(td)
                    .is_some_and(|theirs| theirs.certs == bundle.certs)
            })
    }
}

/// A source of this workload's credentials.
///
/// Implementations must make [`svid`](Self::svid) and [`bundles`](Self::bundles) cheap:
/// they are called at every TLS handshake.
pub trait CredentialSource: Send + Sync + fmt::Debug + 'static {
    /// The current SVID, or `None` before the first one arrived.
    fn svid(&self) -> Option<Arc<Svid>>;

    /// The current trust bundles.
    fn bundles(&self) -> Arc<BundleSet>;

    /// A channel that changes (its value is a generation counter) whenever the SVID or the
    /// bundles change.
    fn updates(&self) -> watch::Receiver<u64>;
}

/// Credentials held in memory and replaced atomically; the store every source in this
/// crate publishes into, and a [`CredentialSource`] itself.
///
/// ```
/// use mesh_spiffe::credentials::{BundleSet, CredentialSource, CredentialStore};
///
/// let store = CredentialStore::new();
/// assert!(store.svid().is_none());
/// let mut updates = store.updates();
/// store.set_bundles(BundleSet::new());
/// assert!(updates.has_changed().unwrap());
/// ```
#[derive(Debug)]
pub struct CredentialStore {
    current: ArcSwap<Snapshot>,
    generation: watch::Sender<u64>,
}

/// What the store holds, replaced as a whole.
#[derive(Debug, Default)]
struct Snapshot {
    svid: Option<Arc<Svid>>,
    bundles: Arc<BundleSet>,
}

impl Default for CredentialStore {
    fn default() -> Self {
        Self::new()
    }
}

impl CredentialStore {
    /// An empty store: no SVID, no bundles.
    pub fn new() -> Self {
        Self {
            current: ArcSwap::from_pointee(Snapshot::default()),
            generation: watch::Sender::new(0),
        }
    }

    /// A store holding `svid` and `bundles`.
    pub fn with(svid: Svid, bundles: BundleSet) -> Self {
        let store = Self::new();
        store.set(svid, bundles);
        store
    }

    /// Replaces the SVID, keeping the bundles.
    pub fn set_svid(&self, svid: Svid) {
        tracing::debug!(id = %svid.id(), "SVID updated");
        let svid = Arc::new(svid);
        self.current.rcu(|cur| Snapshot {
            svid: Some(svid.clone()),
            bundles: cur.bundles.clone(),
        });
        self.bump();
    }

    /// Replaces the bundles, keeping the SVID.
    pub fn set_bundles(&self, bundles: BundleSet) {
        tracing::debug!(trust_domains = bundles.len(), "trust bundles updated");
        let bundles = Arc::new(bundles);
        self.current.rcu(|cur| Snapshot {
            svid: cur.svid.clone(),
            bundles: bundles.clone(),
        });
        self.bump();
    }

    /// Replaces both in one step: no reader sees one without the other.
    pub fn set(&self, svid: Svid, bundles: BundleSet) {
        self.current.store(Arc::new(Snapshot {
            svid: Some(Arc::new(svid)),
            bundles: Arc::new(bundles),
        }));
        self.bump();
    }

    /// Drops the SVID and the bundles: handshakes fail (closed) until credentials are set
    /// again. For an identity its issuer withdrew.
    pub fn clear(&self) {
        tracing::debug!("credentials cleared");
        self.current.store(Arc::new(Snapshot::default()));
        self.bump();
    }

    fn bump(&self) {
        self.generation.send_modify(|g| *g = g.wrapping_add(1));
    }
}

impl CredentialSource for CredentialStore {
    fn svid(&self) -> Option<Arc<Svid>> {
        self.current.load().svid.clone()
    }

    fn bundles(&self) -> Arc<BundleSet> {
        self.current.load().bundles.clone()
    }

    fn updates(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }
}

impl<S: CredentialSource + ?Sized> CredentialSource for Arc<S> {
    fn svid(&self) -> Option<Arc<Svid>> {
        (**self).svid()
    }

    fn bundles(&self) -> Arc<BundleSet> {
        (**self).bundles()
    }

    fn updates(&self) -> watch::Receiver<u64> {
        (**self).updates()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_credentials_are_refused_with_reasons() {
        let garbage = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
        let key = PrivateKeyDer::Pkcs8(vec![0u8; 8].into());
        assert_eq!(
            Svid::new(vec![], key.clone_key()).unwrap_err(),
            CredentialError::EmptyChain
        );
        let err = Svid::new(vec![garbage.clone()], key)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("SVID leaf certificate: peer certificate is malformed"),
            "{err}"
        );
        assert_eq!(
            Bundle::new(vec![]).unwrap_err(),
            CredentialError::EmptyBundle
        );
        let err = Bundle::new(vec![garbage]).unwrap_err().to_string();
        assert!(
            err.starts_with("trust bundle certificate #0 is not a valid CA certificate"),
            "{err}"
        );
    }

    #[cfg(feature = "test-util")]
    #[test]
    fn a_key_that_does_not_match_is_refused() {
        let mut ca = crate::test_ca::TestCa::new("example.org").unwrap();
        let a = ca.issue("spiffe://example.org/a").unwrap();
        let b = ca.issue("spiffe://example.org/b").unwrap();
        let provider = crate::tls::default_provider();
        a.check_key(&provider).unwrap();
        let mixed = Svid::new(a.chain().to_vec(), b.key().clone_key()).unwrap();
        let err = mixed.check_key(&provider).unwrap_err().to_string();
        assert!(err.starts_with("SVID private key"), "{err}");
    }
}
