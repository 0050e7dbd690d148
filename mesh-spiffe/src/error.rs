//! Errors, one `#[non_exhaustive]` enum per concern.
//!
//! - [`VerifyError`]: why a peer's certificate was refused. Verifiers report it to rustls
//!   inside `rustls::Error::InvalidCertificate`, so the handshake error names the reason;
//!   [`VerifyError::from_rustls`] finds it again.
//! - [`CredentialError`]: why an SVID, key or bundle is unusable (sources keep their last
//!   good credentials and log it).
//! - `FilesError` (feature `files`, in `files`): why PEM credential files could not be
//!   loaded at start, naming the file.

use std::sync::Arc;

use mesh_core::identity::{SpiffeId, TrustDomain};

/// Why a peer certificate was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The certificate is not valid DER X.509.
    #[error("peer certificate is malformed: {0}")]
    Malformed(String),
    /// The leaf has no URI SAN, so it names no SPIFFE ID.
    #[error("peer certificate has no URI SAN: it is not a SPIFFE SVID")]
    NoUriSan,
    /// The leaf has several URI SANs; an SVID has exactly one.
    #[error("peer certificate has {0} URI SANs; a SPIFFE SVID has exactly one")]
    MultipleUriSans(usize),
    /// The URI SAN is not a valid SPIFFE ID for a workload.
    #[error("peer certificate's URI SAN `{uri}` is not a workload SPIFFE ID: {reason}")]
    NotSpiffe {
        /// The URI as presented.
        uri: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The leaf is a CA certificate: its basic constraints say `CA=true` (X509-SVID 4.1,
    /// 5.2: a leaf must say `CA=false`).
    #[error(
        "peer presented a CA certificate as its leaf certificate \
         (basic constraints CA=true; X509-SVID 4.1, 5.2)"
    )]
    CaAsLeaf,
    /// The leaf has no key usage extension; an X509-SVID must carry one, with
    /// `digitalSignature` set (X509-SVID 4.3).
    #[error(
        "leaf certificate has no key usage extension; an SVID must have one with \
         digitalSignature set (X509-SVID 4.3)"
    )]
    NoKeyUsage,
    /// The leaf's key usage has `keyCertSign` set, which only signing (CA) certificates may
    /// have (X509-SVID 4.3, 5.2).
    #[error("leaf certificate has keyCertSign set in its key usage (X509-SVID 4.3, 5.2)")]
    KeyCertSignOnLeaf,
    /// The leaf's key usage has `cRLSign` set, which only signing (CA) certificates may have
    /// (X509-SVID 4.3, 5.2).
    #[error("leaf certificate has cRLSign set in its key usage (X509-SVID 4.3, 5.2)")]
    CrlSignOnLeaf,
    /// The leaf's key usage lacks `digitalSignature`, which every leaf SVID must set
    /// (X509-SVID 4.3).
    #[error("leaf certificate's key usage lacks digitalSignature (X509-SVID 4.3)")]
    NoDigitalSignature,
    /// No bundle is held for the peer's trust domain.
    #[error("no trust bundle for the peer's trust domain `{0}`")]
    NoBundle(TrustDomain),
    /// The certificate has expired.
    #[error("peer certificate has expired")]
    Expired,
    /// The certificate is not valid yet.
    #[error("peer certificate is not valid yet")]
    NotYetValid,
    /// The chain is not signed by an anchor of the trust domain's bundle.
    #[error("peer certificate chain is not signed by a trusted root of `{0}`")]
    UnknownIssuer(TrustDomain),
    /// Another chain-validation failure.
    #[error("peer certificate chain is invalid: {0}")]
    Chain(String),
    /// The chain is valid but the identity is not one this side accepts.
    #[error("peer identity `{id}` is not authorized (expected {expected})")]
    Unauthorized {
        /// The peer's verified identity.
        id: SpiffeId,
        /// What was expected, as the authorizer describes itself.
        expected: String,
    },
}

impl VerifyError {
    /// The `VerifyError` a rustls error stands for, if any: the one it carries, or
    /// [`Expired`](Self::Expired) / [`NotYetValid`](Self::NotYetValid) for rustls' own
    /// variants of those.
    pub fn from_rustls(err: &rustls::Error) -> Option<VerifyError> {
        use rustls::CertificateError as E;
        match err {
            rustls::Error::InvalidCertificate(E::Other(other)) => {
                other.0.downcast_ref::<VerifyError>().cloned()
            }
            rustls::Error::InvalidCertificate(E::Expired | E::ExpiredContext { .. }) => {
                Some(Self::Expired)
            }
            rustls::Error::InvalidCertificate(E::NotValidYet | E::NotValidYetContext { .. }) => {
                Some(Self::NotYetValid)
            }
            _ => None,
        }
    }

    /// Wraps this error for rustls. Expiry and a validity not begun keep rustls' own
    /// variants, so that the peer receives the matching TLS alert (`certificate_expired`)
    /// and can tell its clock or its rotation is at fault; every other refusal carries its
    /// details, and the peer gets `certificate_unknown`.
    pub(crate) fn into_rustls(self) -> rustls::Error {
        rustls::Error::InvalidCertificate(match self {
            Self::Expired => rustls::CertificateError::Expired,
            Self::NotYetValid => rustls::CertificateError::NotValidYet,
            other => rustls::CertificateError::Other(rustls::OtherError(Arc::new(other))),
        })
    }
}

/// Why credentials are unusable.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialError {
    /// The SVID's certificate chain is empty.
    #[error("SVID certificate chain is empty")]
    EmptyChain,
    /// The SVID's leaf is not a valid SVID.
    #[error("SVID leaf certificate: {0}")]
    Leaf(#[source] VerifyError),
    /// The private key does not parse or does not match the leaf.
    #[error("SVID private key: {0}")]
    Key(String),
    /// A bundle holds no certificate.
    #[error("trust bundle is empty")]
    EmptyBundle,
    /// A bundle certificate is not a usable trust anchor.
    #[error("trust bundle certificate #{index} is not a valid CA certificate: {reason}")]
    Anchor {
        /// Its position in the bundle.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// PEM input holds no item of the expected kind, or does not parse.
    #[error("{0}")]
    Pem(String),
}
