//! SPIFFE peer verification.
//!
//! A peer is accepted when, in this order:
//!
//! 1. its leaf certificate is a leaf as X509-SVID 4.1, 4.3 and 5.2 define one — basic
//!    constraints not `CA=true`, a key usage extension with `digitalSignature` and with
//!    neither `keyCertSign` nor `cRLSign` — and carries exactly one URI SAN, a workload
//!    SPIFFE ID (`spiffe://trust-domain/path`, path not empty);
//! 2. this side holds a bundle for that ID's trust domain (federation: one bundle per
//!    domain, never a pooled set, so one domain's CA cannot vouch for another's IDs);
//! 3. the chain verifies against that bundle's anchors with webpki — signatures, validity
//!    period, basic constraints, and the extended key usage for the direction
//!    (`serverAuth` when verifying a server, `clientAuth` when verifying a client; a leaf
//!    without the extension is accepted for both, as webpki does);
//! 4. the [`Authorizer`] accepts the SPIFFE ID.
//!
//! DNS names are never checked: SVIDs may carry no DNS SAN at all. The bundle set is read
//! from the [`CredentialSource`] at every handshake, which is what makes trust-anchor
//! rotation take effect without a restart. Every refusal is a [`VerifyError`] that names
//! the reason.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use crate::authorize::Authorizer;
use crate::credentials::CredentialSource;
use crate::error::VerifyError;
use mesh_core::identity::SpiffeId;

/// Reads the SPIFFE ID of an SVID leaf, checking the X509-SVID rules on a leaf (basic
/// constraints and key usage) and on its SANs: step 1 of the [module docs](self). Does not
/// verify the chain.
pub fn spiffe_id_of(leaf: &CertificateDer<'_>) -> Result<SpiffeId, VerifyError> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| VerifyError::Malformed(e.to_string()))?;
    check_leaf_rules(&cert)?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| VerifyError::Malformed(e.to_string()))?;
    let mut uris = san
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        });
    let uri = match (uris.next(), uris.count()) {
        (None, _) => return Err(VerifyError::NoUriSan),
        (Some(uri), 0) => uri,
        (Some(_), more) => return Err(VerifyError::MultipleUriSans(more + 1)),
    };
    let not_spiffe = |reason: String| VerifyError::NotSpiffe {
        uri: uri.chars().take(256).collect(),
        reason,
    };
    // The `spiffe` crate lower-cases the scheme and trust domain; a certificate must
    // carry them lower-case already (as go-spiffe requires), so that the identity
    // authorized and logged is the one the certificate says.
    let authority = uri
        .strip_prefix("spiffe://")
        .map(|rest| rest.split('/').next().unwrap_or(rest));
    if authority.is_some_and(|a| a.bytes().any(|b| b.is_ascii_uppercase())) {
        return Err(not_spiffe(
            "the trust domain name must be lower-case".into(),
        ));
    }
    if uri
        .get(..9)
        .is_some_and(|scheme| scheme != "spiffe://" && scheme.eq_ignore_ascii_case("spiffe://"))
    {
        return Err(not_spiffe("the scheme must be lower-case `spiffe`".into()));
    }
    let id = SpiffeId::new(uri).map_err(|e| not_spiffe(e.to_string()))?;
    if id.path().is_empty() {
        return Err(not_spiffe(
            "a workload ID needs a path after the trust domain".into(),
        ));
    }
    Ok(id)
}

/// Checks what X509-SVID 4.1, 4.3 and 5.2 require of a leaf, in this order, each refusal
/// with its own reason:
///
/// - basic constraints do not say `CA=true` ([`VerifyError::CaAsLeaf`]; a leaf without the
///   extension is not a CA, as RFC 5280 reads it);
/// - a key usage extension is present ([`VerifyError::NoKeyUsage`]);
/// - it does not set `keyCertSign` ([`VerifyError::KeyCertSignOnLeaf`]) or `cRLSign`
///   ([`VerifyError::CrlSignOnLeaf`]);
/// - it sets `digitalSignature` ([`VerifyError::NoDigitalSignature`]).
///
/// A duplicated basic constraints or key usage extension, or one that does not parse, is
/// [`VerifyError::Malformed`]. `keyEncipherment` and `keyAgreement` are allowed, as the
/// spec allows them. Whether the key usage extension is marked critical (4.3 says it must
/// be) is not checked: 5.2, the rules for validators, does not ask it.
fn check_leaf_rules(cert: &X509Certificate<'_>) -> Result<(), VerifyError> {
    let constraints = cert
        .basic_constraints()
        .map_err(|e| VerifyError::Malformed(format!("basic constraints extension: {e}")))?;
    if constraints.is_some_and(|ext| ext.value.ca) {
        return Err(VerifyError::CaAsLeaf);
    }
    let usage = cert
        .key_usage()
        .map_err(|e| VerifyError::Malformed(format!("key usage extension: {e}")))?
        .ok_or(VerifyError::NoKeyUsage)?
        .value;
    if usage.key_cert_sign() {
        return Err(VerifyError::KeyCertSignOnLeaf);
    }
    if usage.crl_sign() {
        return Err(VerifyError::CrlSignOnLeaf);
    }
    if !usage.digital_signature() {
        return Err(VerifyError::NoDigitalSignature);
    }
    Ok(())
}

/// Checks what X509-SVID 4.1 and 4.3 require of a signing certificate (a root of a bundle,
/// an intermediate of a chain): basic constraints with `CA=true`, and, when it has a key
/// usage extension, `keyCertSign` in it. The error completes "the certificate …".
pub(crate) fn check_signing_cert(der: &[u8]) -> Result<(), String> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| format!("does not parse: {e}"))?;
    let constraints = cert
        .basic_constraints()
        .map_err(|e| format!("has a malformed basic constraints extension: {e}"))?;
    if !constraints.is_some_and(|ext| ext.value.ca) {
        return Err("is not a CA certificate (its basic constraints do not say CA=true)".into());
    }
    let usage = cert
        .key_usage()
        .map_err(|e| format!("has a malformed key usage extension: {e}"))?;
    if usage.is_some_and(|ext| !ext.value.key_cert_sign()) {
        return Err("may not sign certificates (its key usage lacks keyCertSign)".into());
    }
    Ok(())
}

/// Runs the verifier's four checks (see the [module docs](self)) on a peer's certificates,
/// as a handshake does: for a server (`server == true`, usage `serverAuth`) or a client
/// (`clientAuth`), with the bundles `source` holds now.
///
/// Exposed for the fuzz targets in `fuzz/` (untrusted certificates without a handshake);
/// not a stable API. Connections get these checks through [`Mtls`](crate::Mtls)'s
/// configurations.
#[doc(hidden)]
pub fn verify_peer(
    source: Arc<dyn CredentialSource>,
    authorizer: Authorizer,
    provider: &CryptoProvider,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    server: bool,
) -> Result<SpiffeId, VerifyError> {
    let role = if server { Role::Server } else { Role::Client };
    SpiffeVerifier::new(source, authorizer, provider).verify(end_entity, intermediates, now, role)
}

/// Whether `svid`'s chain leads to its trust domain's roots in `bundles`, as a peer holding
/// `bundles` would verify it in a handshake, either as a client or as a server (an SVID
/// may carry only one of the two usages): a chain missing its intermediate, or issued by
/// another CA, fails. Dates are judged at the leaf's `notBefore` when that is later than
/// this host's clock: a renewed SVID that is valid by its issuer's clock but not yet by a
/// lagging one here is not refused for it (expiry is checked on its own).
#[cfg(feature = "files")]
pub(crate) fn chains_to(
    svid: &crate::credentials::Svid,
    bundles: &crate::credentials::BundleSet,
    provider: &CryptoProvider,
) -> Result<(), VerifyError> {
    let Some((leaf, intermediates)) = svid.chain().split_first() else {
        return Err(VerifyError::Malformed("an empty certificate chain".into()));
    };
    let source = crate::credentials::CredentialStore::new();
    source.set_bundles(bundles.clone());
    let verifier = SpiffeVerifier::new(Arc::new(source), Authorizer::any(), provider);
    let not_before = x509_parser::parse_x509_certificate(leaf.as_ref())
        .ok()
        .and_then(|(_, cert)| u64::try_from(cert.validity().not_before.timestamp()).ok())
        .map(|secs| UnixTime::since_unix_epoch(std::time::Duration::from_secs(secs)));
    let now = UnixTime::now().max(not_before.unwrap_or(UnixTime::now()));
    verifier
        .verify(leaf, intermediates, now, Role::Client)
        .or_else(|_| verifier.verify(leaf, intermediates, now, Role::Server))
        .map(|_| ())
}

/// Which end of the connection is being verified.
#[derive(Clone, Copy, Debug)]
enum Role {
    Server,
    Client,
}

/// The SPIFFE verifier, for either side of a connection. Built by
/// [`crate::tls`]'s configuration builders.
pub(crate) struct SpiffeVerifier {
    source: Arc<dyn CredentialSource>,
    authorizer: Authorizer,
    algorithms: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for SpiffeVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeVerifier")
            .field("authorizer", &self.authorizer)
            .finish_non_exhaustive()
    }
}

impl SpiffeVerifier {
    pub(crate) fn new(
        source: Arc<dyn CredentialSource>,
        authorizer: Authorizer,
        provider: &CryptoProvider,
    ) -> Self {
        Self {
            source,
            authorizer,
            algorithms: provider.signature_verification_algorithms,
        }
    }

    /// Runs the four checks of the module docs.
    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        role: Role,
    ) -> Result<SpiffeId, VerifyError> {
        let id = spiffe_id_of(end_entity)?;
        let bundles = self.source.bundles();
        let bundle = bundles
            .get(id.trust_domain())
            .ok_or_else(|| VerifyError::NoBundle(id.trust_domain().clone()))?;
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| VerifyError::Malformed(format!("{e:?}")))?;
        let usage = match role {
            Role::Server => webpki::KeyUsage::server_auth(),
            Role::Client => webpki::KeyUsage::client_auth(),
        };
        let path = cert
            .verify_for_usage(
                self.algorithms.all,
                bundle.anchors(),
                intermediates,
                now,
                usage,
                None,
                None,
            )
            .map_err(|e| match e {
                webpki::Error::CertExpired { .. } => VerifyError::Expired,
                webpki::Error::InvalidCertValidity => VerifyError::Chain(
                    "a certificate's validity period ends before it begins".into(),
                ),
                webpki::Error::CertNotValidYet { .. } => VerifyError::NotYetValid,
                // Either no anchor has the issuer's name, or one has it but did not sign: both
                // mean the chain does not lead to this domain's roots.
                webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey => {
                    VerifyError::UnknownIssuer(id.trust_domain().clone())
                }
                webpki::Error::CaUsedAsEndEntity => VerifyError::CaAsLeaf,
                other => VerifyError::Chain(format!("{other:?}")),
            })?;
        // webpki checks that intermediates are CAs, not their key usage: X509-SVID 4.3
        // asks signing certificates for `keyCertSign` (RFC 5280 6.1.4 (n)).
        for (i, intermediate) in path.intermediate_certificates().enumerate() {
            check_signing_cert(intermediate.der().as_ref()).map_err(|reason| {
                VerifyError::Chain(format!("intermediate certificate #{i} {reason}"))
            })?;
        }
        self.authorizer.authorize(&id)?;
        Ok(id)
    }

    // Handshake signatures are checked the same way on both sides.
    fn tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn log_refusal(&self, role: Role, err: &VerifyError) {
        tracing::debug!(?role, error = %err, "refused peer certificate");
    }
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.verify(end_entity, intermediates, now, Role::Server) {
            Ok(_) => Ok(ServerCertVerified::assertion()),
            Err(e) => {
                self.log_refusal(Role::Server, &e);
                Err(e.into_rustls())
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

impl ClientCertVerifier for SpiffeVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: a client has one SVID and presents it whatever the server's roots.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match self.verify(end_entity, intermediates, now, Role::Client) {
            Ok(_) => Ok(ClientCertVerified::assertion()),
            Err(e) => {
                self.log_refusal(Role::Client, &e);
                Err(e.into_rustls())
            }
        }
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_der(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
            let _ = spiffe_id_of(&CertificateDer::from(bytes));
        }
    }

    /// A self-signed certificate for `spiffe://example.org/a` with these key usages and
    /// basic constraints (`None`: no key usage extension at all).
    #[cfg(feature = "test-util")]
    fn leaf_with(usages: Option<Vec<rcgen::KeyUsagePurpose>>, ca: bool) -> CertificateDer<'static> {
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://example.org/a".try_into().unwrap(),
        )];
        params.is_ca = if ca {
            rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained)
        } else {
            rcgen::IsCa::ExplicitNoCa
        };
        params.key_usages = usages.unwrap_or_default();
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    #[cfg(feature = "test-util")]
    #[test]
    fn leaf_key_usage_and_basic_constraints_follow_x509_svid() {
        use rcgen::KeyUsagePurpose::*;
        let cases = [
            (Some(vec![DigitalSignature]), false, Ok(())),
            (
                Some(vec![DigitalSignature, KeyEncipherment, KeyAgreement]),
                false,
                Ok(()),
            ),
            (
                Some(vec![DigitalSignature]),
                true,
                Err(VerifyError::CaAsLeaf),
            ),
            (None, false, Err(VerifyError::NoKeyUsage)),
            (
                Some(vec![DigitalSignature, KeyCertSign]),
                false,
                Err(VerifyError::KeyCertSignOnLeaf),
            ),
            (
                Some(vec![DigitalSignature, CrlSign]),
                false,
                Err(VerifyError::CrlSignOnLeaf),
            ),
            (
                Some(vec![KeyEncipherment]),
                false,
                Err(VerifyError::NoDigitalSignature),
            ),
        ];
        for (usages, ca, want) in cases {
            let what = format!("{usages:?}, CA={ca}");
            let got = spiffe_id_of(&leaf_with(usages, ca)).map(|id| id.path().to_owned());
            assert_eq!(got, want.map(|()| "/a".to_owned()), "{what}");
        }
    }

    #[cfg(feature = "test-util")]
    #[test]
    fn never_panics_on_mutated_certificates() {
        let mut ca = crate::test_ca::TestCa::new("example.org").unwrap();
        let der = ca.issue("spiffe://example.org/a").unwrap().chain()[0].to_vec();
        assert_eq!(
            spiffe_id_of(&CertificateDer::from(der.clone()))
                .unwrap()
                .path(),
            "/a"
        );
        for i in 0..der.len() {
            for flip in [0x01, 0x80, 0xff] {
                let mut mutated = der.clone();
                mutated[i] ^= flip;
                let _ = spiffe_id_of(&CertificateDer::from(mutated));
            }
            let _ = spiffe_id_of(&CertificateDer::from(der[..i].to_vec()));
        }
    }
}
