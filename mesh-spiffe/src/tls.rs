//! rustls configurations that authenticate both ends by SPIFFE ID.
//!
//! [`Mtls`] holds what both sides share — the [`CredentialSource`], the crypto provider and
//! the ALPN protocols — and builds a [`rustls::ClientConfig`] for a given expected server
//! identity or a [`rustls::ServerConfig`] that requires and verifies client certificates.
//!
//! Defaults and why:
//!
//! - **Crypto provider**: `ring` (feature `ring`, on by default), or `aws-lc-rs` (feature
//!   `aws-lc-rs`) when `ring` is off; always passed explicitly with
//!   `builder_with_provider`, never the process-wide default, which panics when both are
//!   linked. [`Mtls::with_provider`] takes any other.
//! - **Versions**: TLS 1.3 and 1.2; rustls negotiates 1.3 whenever the peer has it.
//! - **ALPN**: `h2`, then `http/1.1`.
//! - **Certificates**: resolved from the source at every handshake through
//!   `ResolvesServerCert` / `ResolvesClientCert`. The rustls signing key is built once per
//!   SVID and cached until the source hands out a different SVID, so rotation costs one key
//!   parse, not one per handshake. With no SVID yet, handshakes fail (closed).
//! - **Verification**: [`crate::verify`]; the bundle set is read at every handshake.
//! - **Session resumption is off** on both sides. A resumed session skips certificate
//!   verification, so it would let a peer whose anchor was just removed keep connecting;
//!   every connection therefore does a full handshake against the current bundles.

use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use rustls::client::{ResolvesClientCert, Resumption};
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig, SignatureScheme};

use crate::authorize::Authorizer;
use crate::credentials::{CredentialSource, Svid};
use crate::verify::SpiffeVerifier;

#[cfg(not(any(feature = "ring", feature = "aws-lc-rs")))]
compile_error!("mesh-spiffe needs a crypto provider: enable the `ring` or `aws-lc-rs` feature");

/// The crypto provider used when none is given: `ring`, or `aws-lc-rs` when only that
/// feature is on.
pub fn default_provider() -> Arc<CryptoProvider> {
    #[cfg(feature = "ring")]
    {
        Arc::new(rustls::crypto::ring::default_provider())
    }
    #[cfg(all(not(feature = "ring"), feature = "aws-lc-rs"))]
    {
        Arc::new(rustls::crypto::aws_lc_rs::default_provider())
    }
}

/// The ALPN protocols offered by default: `h2`, then `http/1.1`.
pub const DEFAULT_ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Shared settings for SPIFFE mutual TLS; builds client and server configurations.
///
/// ```
/// use mesh_spiffe::{Authorizer, Mtls};
/// use mesh_spiffe::credentials::CredentialStore;
///
/// let mtls = Mtls::new(CredentialStore::new());
/// let server = mtls.server_config(Authorizer::any())?;
/// assert_eq!(server.alpn_protocols, [b"h2".to_vec(), b"http/1.1".to_vec()]);
/// # Ok::<(), rustls::Error>(())
/// ```
#[derive(Clone)]
pub struct Mtls {
    source: Arc<dyn CredentialSource>,
    provider: Arc<CryptoProvider>,
    alpn: Vec<Vec<u8>>,
    resolver: Arc<SvidResolver>,
}

impl fmt::Debug for Mtls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mtls")
            .field("source", &self.source)
            .field("alpn", &self.alpn)
            .finish_non_exhaustive()
    }
}

impl Mtls {
    /// Settings over `source`, with the default provider and ALPN.
    pub fn new(source: impl CredentialSource) -> Self {
        Self::from_arc(Arc::new(source))
    }

    /// The same, for a source already shared.
    pub fn from_arc(source: Arc<dyn CredentialSource>) -> Self {
        let provider = default_provider();
        Self {
            resolver: Arc::new(SvidResolver::new(source.clone(), provider.clone())),
            source,
            provider,
            alpn: DEFAULT_ALPN.iter().map(|p| p.to_vec()).collect(),
        }
    }

    /// Uses `provider` for handshakes and verification.
    pub fn with_provider(mut self, provider: Arc<CryptoProvider>) -> Self {
        self.resolver = Arc::new(SvidResolver::new(self.source.clone(), provider.clone()));
        self.provider = provider;
        self
    }

    /// Offers these ALPN protocols, in order of preference.
    pub fn with_alpn(mut self, protocols: impl IntoIterator<Item = Vec<u8>>) -> Self {
        self.alpn = protocols.into_iter().collect();
        self
    }

    /// The credential source.
    pub fn source(&self) -> &Arc<dyn CredentialSource> {
        &self.source
    }

    /// The crypto provider.
    pub fn provider(&self) -> &Arc<CryptoProvider> {
        &self.provider
    }

    /// A client configuration that accepts servers `expected` authorizes.
    pub fn client_config(&self, expected: Authorizer) -> Result<ClientConfig, rustls::Error> {
        let verifier = SpiffeVerifier::new(self.source.clone(), expected, &self.provider);
        let mut config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(self.resolver.clone());
        config.alpn_protocols = self.alpn.clone();
        config.resumption = Resumption::disabled();
        Ok(config)
    }

    /// A server configuration that requires a client SVID that `clients` authorizes.
    pub fn server_config(&self, clients: Authorizer) -> Result<ServerConfig, rustls::Error> {
        let verifier = SpiffeVerifier::new(self.source.clone(), clients, &self.provider);
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_client_cert_verifier(Arc::new(verifier))
            .with_cert_resolver(self.resolver.clone());
        config.alpn_protocols = self.alpn.clone();
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(config)
    }
}

/// Resolves this workload's certificate from the source, caching the rustls key per SVID.
struct SvidResolver {
    source: Arc<dyn CredentialSource>,
    provider: Arc<CryptoProvider>,
    cache: ArcSwapOption<(Arc<Svid>, Arc<CertifiedKey>)>,
}

impl fmt::Debug for SvidResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SvidResolver").finish_non_exhaustive()
    }
}

impl SvidResolver {
    fn new(source: Arc<dyn CredentialSource>, provider: Arc<CryptoProvider>) -> Self {
        Self {
            source,
            provider,
            cache: ArcSwapOption::empty(),
        }
    }

    fn current(&self) -> Option<Arc<CertifiedKey>> {
        let Some(svid) = self.source.svid() else {
            tracing::warn!("no SVID yet: refusing the handshake");
            return None;
        };
        if let Some(cached) = &*self.cache.load()
            && Arc::ptr_eq(&cached.0, &svid)
        {
            return Some(cached.1.clone());
        }
        match svid.certified_key(&self.provider) {
            Ok(key) => {
                let key = Arc::new(key);
                self.cache.store(Some(Arc::new((svid, key.clone()))));
                Some(key)
            }
            Err(error) => {
                tracing::warn!(%error, id = %svid.id(), "SVID unusable: refusing the handshake");
                None
            }
        }
    }
}

impl ResolvesServerCert for SvidResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl ResolvesClientCert for SvidResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        true
    }
}
