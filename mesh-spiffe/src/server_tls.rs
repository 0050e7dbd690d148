//! TLS for clients outside the mesh: a listener that presents a certificate of its own
//! (any X.509 chain and private key in PEM — from a public CA, an internal one, or
//! self-signed) and asks for no client certificate, as an edge proxy terminating HTTPS
//! does.
//!
//! Clients are not authenticated: requests over such a connection carry no
//! [`PeerIdentity`](crate::PeerIdentity), so an authorization policy sees them as
//! unauthenticated, as on a plaintext listener. TLS 1.3 and 1.2 with the crypto
//! provider's default suites, ALPN `h2` then `http/1.1`, no session resumption state kept
//! (each handshake is a full one, as for mTLS). Each handshake is bounded (default 10 s).
//! The certificate is read once, when the acceptor is built.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::NoServerSessionStorage;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::tls::{DEFAULT_ALPN, default_provider};
use crate::transport::{DEFAULT_HANDSHAKE_TIMEOUT, TransportError, bounded};

/// Why a server certificate cannot be used; each names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerTlsError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The certificate chain holds no `CERTIFICATE` block, or is not PEM.
    #[error("{path}: {reason}")]
    Certificate {
        /// The file (or `certificate` for bytes).
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The key is not a PEM private key (PKCS#8, PKCS#1 or SEC1).
    #[error("{path}: {reason}")]
    Key {
        /// The file (or `key` for bytes).
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the pair (a key that does not match the certificate, say).
    #[error("certificate and key: {0}")]
    Tls(#[from] rustls::Error),
}

/// Completes server-authenticated TLS handshakes; see the [module docs](self).
#[derive(Clone)]
pub struct ServerTlsAcceptor {
    acceptor: tokio_rustls::TlsAcceptor,
    handshake_timeout: Duration,
}

impl std::fmt::Debug for ServerTlsAcceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTlsAcceptor")
            .field("handshake_timeout", &self.handshake_timeout)
            .finish_non_exhaustive()
    }
}

impl ServerTlsAcceptor {
    /// An acceptor presenting the chain in `cert` (leaf first) with the key in `key`, both
    /// PEM files, with the default crypto provider.
    pub fn from_files(cert: &Path, key: &Path) -> Result<Self, ServerTlsError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| ServerTlsError::Read {
                path: path.display().to_string(),
                source,
            })
        };
        Self::parse(
            &read(cert)?,
            &read(key)?,
            &cert.display().to_string(),
            &key.display().to_string(),
            default_provider(),
        )
    }

    /// The same from PEM bytes, with `provider`.
    pub fn from_pem(
        cert: &[u8],
        key: &[u8],
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, ServerTlsError> {
        Self::parse(cert, key, "certificate", "key", provider)
    }

    fn parse(
        cert: &[u8],
        key: &[u8],
        cert_name: &str,
        key_name: &str,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, ServerTlsError> {
        let chain = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ServerTlsError::Certificate {
                path: cert_name.to_owned(),
                reason: format!("not valid PEM: {e}"),
            })?;
        if chain.is_empty() {
            return Err(ServerTlsError::Certificate {
                path: cert_name.to_owned(),
                reason: "no CERTIFICATE PEM block".into(),
            });
        }
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| ServerTlsError::Key {
            path: key_name.to_owned(),
            reason: format!("no usable PEM private key: {e}"),
        })?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        config.alpn_protocols = DEFAULT_ALPN.iter().map(|p| p.to_vec()).collect();
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(Self {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        })
    }

    /// Bounds each handshake (default 10 s).
    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// Runs the server handshake on an accepted transport.
    pub async fn accept<IO>(
        &self,
        io: IO,
    ) -> Result<tokio_rustls::server::TlsStream<IO>, TransportError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        bounded(self.handshake_timeout, self.acceptor.accept(io)).await
    }
}

#[cfg(all(test, feature = "test-util"))]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::test_ca::TestCa;

    #[test]
    fn bad_certificates_and_keys_are_named() {
        let mut ca = TestCa::new("example.org").unwrap();
        let (chain, key) = ca.issue("spiffe://example.org/edge").unwrap().to_pem();
        let (_, other_key) = ca.issue("spiffe://example.org/other").unwrap().to_pem();
        let provider = default_provider();
        assert!(
            ServerTlsAcceptor::from_pem(chain.as_bytes(), key.as_bytes(), provider.clone()).is_ok()
        );

        let err =
            ServerTlsAcceptor::from_pem(b"junk", key.as_bytes(), provider.clone()).unwrap_err();
        assert!(matches!(err, ServerTlsError::Certificate { .. }), "{err}");
        assert!(err.to_string().contains("no CERTIFICATE"), "{err}");
        let err =
            ServerTlsAcceptor::from_pem(chain.as_bytes(), b"junk", provider.clone()).unwrap_err();
        assert!(matches!(err, ServerTlsError::Key { .. }), "{err}");
        // A key that is not the certificate's: refused now, not at the first handshake.
        let err = ServerTlsAcceptor::from_pem(chain.as_bytes(), other_key.as_bytes(), provider)
            .unwrap_err();
        assert!(matches!(err, ServerTlsError::Tls(_)), "{err}");

        let missing = Path::new("/nonexistent/edge.crt");
        let err = ServerTlsAcceptor::from_files(missing, missing).unwrap_err();
        assert!(
            err.to_string().starts_with("/nonexistent/edge.crt: "),
            "{err}"
        );
    }
}
