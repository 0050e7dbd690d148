//! An in-memory certificate authority for tests (feature `test-util`).
//!
//! [`TestCa`] plays the part of SPIRE's CA: it has a root (and optionally an
//! intermediate) for one trust domain and issues X.509 SVIDs — ECDSA P-256 leaf
//! certificates with exactly one `spiffe://` URI SAN, the `digitalSignature` key usage and
//! both `serverAuth` and `clientAuth` extended key usages, valid for one hour unless told
//! otherwise. It can also issue the malformed certificates a verifier must refuse (no URI
//! SAN, two, a non-SPIFFE URI, a CA certificate as a leaf, expired or not yet valid).
//!
//! Root rotation follows the overlap procedure a fleet uses: [`TestCa::begin_rotation`]
//! adds a new root, which signs every SVID issued from then on while the bundle holds both
//! roots; [`TestCa::finish_rotation`] drops the old root from the bundle, after which chains
//! to it are refused.
//!
//! ```
//! use mesh_spiffe::test_ca::TestCa;
//!
//! let mut ca = TestCa::new("example.org")?;
//! let svid = ca.issue("spiffe://example.org/ns/prod/sa/web")?;
//! assert_eq!(svid.id().path(), "/ns/prod/sa/web");
//! assert_eq!(ca.bundle()?.certs().len(), 1);
//! ca.begin_rotation()?;
//! assert_eq!(ca.bundle()?.certs().len(), 2);
//! ca.finish_rotation();
//! assert_eq!(ca.bundle()?.certs().len(), 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::credentials::{Bundle, BundleSet, Svid};
use crate::error::CredentialError;
use mesh_core::identity::{SpiffeId, TrustDomain};

/// Why the test CA could not do what it was asked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TestCaError {
    /// rcgen refused the certificate.
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// A SPIFFE ID or trust domain did not parse.
    #[error("invalid SPIFFE ID or trust domain: {0}")]
    Id(#[from] mesh_core::identity::SpiffeIdError),
    /// The issued certificate is not an SVID (expected for deliberately malformed ones;
    /// use [`LeafBuilder::build_raw`] for those).
    #[error(transparent)]
    Credential(#[from] CredentialError),
}

struct Authority {
    params: CertificateParams,
    key: KeyPair,
    der: CertificateDer<'static>,
}

impl Authority {
    fn issuer(&self) -> Issuer<'_, &KeyPair> {
        Issuer::from_params(&self.params, &self.key)
    }
}

/// A CA hierarchy (root, optional intermediate) that rotates.
struct Generation {
    root: Authority,
    intermediate: Option<Authority>,
}

/// An in-memory SPIFFE CA for one trust domain. See the [module docs](self).
pub struct TestCa {
    trust_domain: TrustDomain,
    intermediate: Intermediate,
    current: Generation,
    /// The previous root during a rotation's overlap.
    previous: Option<Generation>,
    serial: u64,
}

impl fmt::Debug for TestCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestCa")
            .field("trust_domain", &self.trust_domain)
            .field("intermediate", &self.intermediate)
            .field("rotating", &self.previous.is_some())
            .finish()
    }
}

fn to_offset(t: SystemTime) -> time::OffsetDateTime {
    let secs = match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    };
    time::OffsetDateTime::from_unix_timestamp(secs).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// Distinguishes the CAs of one process, so that two CAs of the same trust domain have
/// different names, as real ones do.
static CA_COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Whether SVIDs are signed by an intermediate under the root, and what kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Intermediate {
    None,
    Signing,
    NotSigning,
}

fn ca_params(
    trust_domain: &TrustDomain,
    name: &str,
    serial: u64,
) -> Result<CertificateParams, TestCaError> {
    let unique = CA_COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "mesh test CA");
    params.distinguished_name.push(
        DnType::CommonName,
        format!("{trust_domain} {name} {serial} #{unique}"),
    );
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.subject_alt_names = vec![SanType::URI(format!("spiffe://{trust_domain}").try_into()?)];
    let now = SystemTime::now();
    params.not_before = to_offset(now - Duration::from_secs(3600));
    params.not_after = to_offset(now + Duration::from_secs(10 * 365 * 24 * 3600));
    Ok(params)
}

impl TestCa {
    /// A CA with a self-signed root for `trust_domain`.
    pub fn new(trust_domain: &str) -> Result<Self, TestCaError> {
        Self::build(trust_domain, Intermediate::None)
    }

    /// A CA whose SVIDs are signed by an intermediate under the root; SVID chains then
    /// carry the intermediate.
    pub fn with_intermediate(trust_domain: &str) -> Result<Self, TestCaError> {
        Self::build(trust_domain, Intermediate::Signing)
    }

    /// A CA whose SVIDs are signed by an intermediate that is a CA but whose key usage
    /// lacks `keyCertSign`: chains a verifier must refuse (X509-SVID 4.3, RFC 5280
    /// 6.1.4 (n)).
    pub fn with_non_signing_intermediate(trust_domain: &str) -> Result<Self, TestCaError> {
        Self::build(trust_domain, Intermediate::NotSigning)
    }

    fn build(trust_domain: &str, intermediate: Intermediate) -> Result<Self, TestCaError> {
        let trust_domain = TrustDomain::new(trust_domain)?;
        let current = Self::generation(&trust_domain, intermediate, 0)?;
        Ok(Self {
            trust_domain,
            intermediate,
            current,
            previous: None,
            serial: 0,
        })
    }

    fn generation(
        td: &TrustDomain,
        intermediate: Intermediate,
        serial: u64,
    ) -> Result<Generation, TestCaError> {
        let params = ca_params(td, "root", serial)?;
        let key = KeyPair::generate()?;
        let der = params.self_signed(&key)?.der().clone();
        let root = Authority { params, key, der };
        let intermediate = if intermediate != Intermediate::None {
            let mut params = ca_params(td, "intermediate", serial)?;
            if intermediate == Intermediate::NotSigning {
                params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            }
            let key = KeyPair::generate()?;
            let der = params.signed_by(&key, &root.issuer())?.der().clone();
            Some(Authority { params, key, der })
        } else {
            None
        };
        Ok(Generation { root, intermediate })
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The current bundle: the root, or both roots during a rotation.
    pub fn bundle(&self) -> Result<Bundle, TestCaError> {
        let mut certs = vec![self.current.root.der.clone()];
        if let Some(previous) = &self.previous {
            certs.push(previous.root.der.clone());
        }
        Ok(Bundle::new(certs)?)
    }

    /// A bundle set holding this CA's bundle only.
    pub fn bundle_set(&self) -> Result<BundleSet, TestCaError> {
        Ok(BundleSet::new().with(self.trust_domain.clone(), self.bundle()?))
    }

    /// The root certificate that signs new SVIDs.
    pub fn root(&self) -> &CertificateDer<'static> {
        &self.current.root.der
    }

    /// Starts a root rotation: a new root (and intermediate) signs SVIDs from now on; the
    /// bundle holds the old and the new root until [`finish_rotation`](Self::finish_rotation).
    pub fn begin_rotation(&mut self) -> Result<(), TestCaError> {
        self.serial += 1;
        let next = Self::generation(&self.trust_domain, self.intermediate, self.serial)?;
        self.previous = Some(std::mem::replace(&mut self.current, next));
        Ok(())
    }

    /// Ends the overlap: the old root leaves the bundle.
    pub fn finish_rotation(&mut self) {
        self.previous = None;
    }

    /// Issues an SVID for `id`, valid from an hour ago for an hour from now.
    pub fn issue(&mut self, id: &str) -> Result<Svid, TestCaError> {
        self.leaf().uri(id).build()
    }

    /// A builder for a leaf certificate with chosen contents.
    pub fn leaf(&mut self) -> LeafBuilder<'_> {
        let now = SystemTime::now();
        LeafBuilder {
            ca: self,
            uris: Vec::new(),
            dns: Vec::new(),
            not_before: now - Duration::from_secs(3600),
            not_after: now + Duration::from_secs(3600),
            is_ca: false,
        }
    }
}

/// A leaf certificate to issue; see [`TestCa::leaf`].
#[derive(Debug)]
pub struct LeafBuilder<'a> {
    ca: &'a mut TestCa,
    uris: Vec<String>,
    dns: Vec<String>,
    not_before: SystemTime,
    not_after: SystemTime,
    is_ca: bool,
}

impl LeafBuilder<'_> {
    /// Adds a URI SAN (call once for an SVID; zero or twice for a malformed certificate).
    pub fn uri(mut self, uri: &str) -> Self {
        self.uris.push(uri.to_owned());
        self
    }

    /// Adds a DNS SAN.
    pub fn dns(mut self, name: &str) -> Self {
        self.dns.push(name.to_owned());
        self
    }

    /// Sets the validity period.
    pub fn validity(mut self, not_before: SystemTime, not_after: SystemTime) -> Self {
        self.not_before = not_before;
        self.not_after = not_after;
        self
    }

    /// Marks the certificate as a CA (which a verifier must refuse as a leaf).
    pub fn ca(mut self) -> Self {
        self.is_ca = true;
        self
    }

    /// Issues it as an [`Svid`] (which requires exactly one SPIFFE URI SAN).
    pub fn build(self) -> Result<Svid, TestCaError> {
        let (chain, key) = self.build_raw()?;
        Ok(Svid::new(chain, key)?)
    }

    /// Issues it as a raw chain and key, whatever its SANs.
    pub fn build_raw(
        self,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TestCaError> {
        self.ca.serial += 1;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.serial_number = Some(rcgen::SerialNumber::from(self.ca.serial));
        for uri in &self.uris {
            params
                .subject_alt_names
                .push(SanType::URI(uri.as_str().try_into()?));
        }
        for name in &self.dns {
            params
                .subject_alt_names
                .push(SanType::DnsName(name.as_str().try_into()?));
        }
        params.not_before = to_offset(self.not_before);
        params.not_after = to_offset(self.not_after);
        if self.is_ca {
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::DigitalSignature,
            ];
        } else {
            params.is_ca = IsCa::ExplicitNoCa;
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
        }
        let key = KeyPair::generate()?;
        let generation = &self.ca.current;
        let signer = generation.intermediate.as_ref().unwrap_or(&generation.root);
        let leaf = params.signed_by(&key, &signer.issuer())?.der().clone();
        let mut chain = vec![leaf];
        if let Some(intermediate) = &generation.intermediate {
            chain.push(intermediate.der.clone());
        }
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((chain, key))
    }
}

/// PEM text for certificates (`CERTIFICATE` blocks, in order), e.g. an SVID chain or a
/// bundle, for files and for other TLS stacks.
pub fn certs_pem(certs: &[CertificateDer<'_>]) -> String {
    let blocks: Vec<pem::Pem> = certs
        .iter()
        .map(|c| pem::Pem::new("CERTIFICATE", c.as_ref().to_vec()))
        .collect();
    pem::encode_many(&blocks)
}

/// PEM text for a private key, in the block its encoding calls for (`PRIVATE KEY` for
/// PKCS#8, `EC PRIVATE KEY` for SEC1, `RSA PRIVATE KEY` for PKCS#1).
pub fn key_pem(key: &PrivateKeyDer<'_>) -> String {
    let tag = match key {
        PrivateKeyDer::Pkcs1(_) => "RSA PRIVATE KEY",
        PrivateKeyDer::Sec1(_) => "EC PRIVATE KEY",
        _ => "PRIVATE KEY",
    };
    pem::encode(&pem::Pem::new(tag, key.secret_der().to_vec()))
}

impl Svid {
    /// The chain as PEM (leaf first) and the key as PEM: the files a PEM credential source
    /// reads (test-util).
    pub fn to_pem(&self) -> (String, String) {
        (certs_pem(self.chain()), key_pem(self.key()))
    }
}

impl Bundle {
    /// The bundle's certificates as PEM (test-util).
    pub fn to_pem(&self) -> String {
        certs_pem(self.certs())
    }
}

/// Parses a SPIFFE ID, for tests.
pub fn spiffe_id(s: &str) -> Result<SpiffeId, TestCaError> {
    Ok(SpiffeId::new(s)?)
}
