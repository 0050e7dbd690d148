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
//!
//! # Rotation
//!
//! [`from_files`](ServerTlsAcceptor::from_files) and
//! [`from_pem`](ServerTlsAcceptor::from_pem) read the certificate once.
//! [`watch_files`](ServerTlsAcceptor::watch_files) (feature `files`) keeps reading it:
//! certificates from ACME clients or cert-manager are rewritten every few weeks, and a
//! proxy that must restart to pick them up drops its connections to do so. The two files
//! are watched with mesh-core's [`FileWatch`](mesh_core::watch::FileWatch) (directory
//! events, which see atomic renames and Kubernetes secret symlink swaps; a 100 ms
//! debounce; a 10 s safety-net poll). When either changes, both are re-read and the pair
//! replaces the one presented **only if** it is valid: PEM that parses, a key that matches
//! the leaf, and a leaf not yet expired. Anything else — a half-written file, an expired
//! replacement — keeps the last good pair, logs the reason with `tracing::warn!` naming
//! the file, and is tried again when a file next changes. A certificate and key that do
//! not match (one written before the other) get 2 s for the other file to change before
//! they count as refused. Handshakes under way keep the pair they started with; connections
//! already established are not touched. The watch stops when the last clone of the
//! acceptor is dropped. [`status`](ServerTlsAcceptor::status) tells what is presented
//! (the leaf's expiry) and how many reloads were applied and refused, for metrics.

use std::path::Path;
#[cfg(feature = "files")]
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::CertifiedKey;
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
    /// The certificate chain holds no `CERTIFICATE` block, is not PEM, its leaf is not an
    /// X.509 certificate, or (on a reload) the leaf has expired.
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
    /// The files' directories could not be watched.
    #[error("watching {path}: {reason}")]
    Watch {
        /// The certificate and key files.
        path: String,
        /// What the watch said.
        reason: String,
    },
}

/// What an acceptor presents and how its reloads went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct CertificateStatus {
    /// When the presented leaf certificate expires (its `notAfter`).
    pub not_after: SystemTime,
    /// Changed files that were valid and now are presented.
    pub reloads: u64,
    /// Changed files that were not valid and were refused (the last good pair stays).
    pub rejected: u64,
}

/// The pair presented now, shared by the resolver, the acceptor and the watch task.
#[derive(Debug)]
struct Current {
    key: ArcSwap<CertifiedKey>,
    /// The leaf's `notAfter`, in seconds since the Unix epoch.
    not_after: AtomicI64,
    reloads: AtomicU64,
    rejected: AtomicU64,
}

#[cfg(feature = "files")]
impl Current {
    fn set(&self, pair: Pair) {
        self.key.store(Arc::new(pair.key));
        self.not_after.store(pair.not_after, Ordering::Relaxed);
    }
}

/// Hands every handshake the current pair, whatever the client asked for.
#[derive(Debug)]
struct Resolver(Arc<Current>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.key.load_full())
    }
}

/// A validated chain and key.
struct Pair {
    key: CertifiedKey,
    not_after: i64,
}

/// Stops the watch task when the last acceptor clone goes.
#[derive(Debug)]
struct WatchTask(tokio::task::AbortHandle);

impl Drop for WatchTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Completes server-authenticated TLS handshakes; see the [module docs](self).
#[derive(Clone)]
pub struct ServerTlsAcceptor {
    acceptor: tokio_rustls::TlsAcceptor,
    handshake_timeout: Duration,
    current: Arc<Current>,
    _watch: Option<Arc<WatchTask>>,
}

impl std::fmt::Debug for ServerTlsAcceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTlsAcceptor")
            .field("handshake_timeout", &self.handshake_timeout)
            .field("watched", &self._watch.is_some())
            .finish_non_exhaustive()
    }
}

impl ServerTlsAcceptor {
    /// An acceptor presenting the chain in `cert` (leaf first) with the key in `key`, both
    /// PEM files, with the default crypto provider. The files are read once; see
    /// [`watch_files`](Self::watch_files) to follow their changes.
    pub fn from_files(cert: &Path, key: &Path) -> Result<Self, ServerTlsError> {
        let provider = default_provider();
        let pair = Pair::parse(
            &read(cert)?,
            &read(key)?,
            &cert.display().to_string(),
            &key.display().to_string(),
            &provider,
        )?;
        Self::new(pair, provider)
    }

    /// The same from PEM bytes, with `provider`.
    pub fn from_pem(
        cert: &[u8],
        key: &[u8],
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, ServerTlsError> {
        let pair = Pair::parse(cert, key, "certificate", "key", &provider)?;
        Self::new(pair, provider)
    }

    /// An acceptor presenting the PEM chain in `cert` with the key in `key`, as
    /// [`from_files`](Self::from_files), which then follows changes to either file: see
    /// [Rotation](self#rotation). Must be called within a tokio runtime; the watch runs in
    /// a task of its own until the last clone of the acceptor is dropped.
    ///
    /// # Errors
    ///
    /// As `from_files` for the files as they are now, and [`ServerTlsError::Watch`] when
    /// their directories cannot be watched.
    #[cfg(feature = "files")]
    pub async fn watch_files(
        cert: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
    ) -> Result<Self, ServerTlsError> {
        Self::watch_files_with(
            cert.into(),
            key.into(),
            mesh_core::watch::DEFAULT_POLL_INTERVAL,
        )
        .await
    }

    /// [`watch_files`](Self::watch_files) with the watch's safety-net poll every `poll`
    /// (default 10 s) instead.
    #[cfg(feature = "files")]
    pub async fn watch_files_with(
        cert: PathBuf,
        key: PathBuf,
        poll: Duration,
    ) -> Result<Self, ServerTlsError> {
        use mesh_core::watch::{FileWatch, WatchError};
        let watch = FileWatch::builder([cert.clone(), key.clone()])
            .poll_interval(poll)
            .start()
            .await
            .map_err(|error| match error {
                WatchError::Read { path, source } => ServerTlsError::Read {
                    path: path.display().to_string(),
                    source,
                },
                other => ServerTlsError::Watch {
                    path: format!("{} and {}", cert.display(), key.display()),
                    reason: other.to_string(),
                },
            })?;
        let snapshot = watch.snapshot();
        let files = snapshot.files();
        // `start` fails unless both files were read.
        let content = |i: usize| files.get(i).and_then(|f| f.content().ok()).unwrap_or(&[]);
        let provider = default_provider();
        let (cert_bytes, key_bytes) = (content(0), content(1));
        let pair = Pair::parse(
            cert_bytes,
            key_bytes,
            &cert.display().to_string(),
            &key.display().to_string(),
            &provider,
        )?;
        let mut acceptor = Self::new(pair, provider.clone())?;
        let reloader = Reloader {
            good: (cert_bytes.to_vec(), key_bytes.to_vec()),
            cert,
            key,
            provider,
            current: acceptor.current.clone(),
        };
        let task = tokio::spawn(reloader.run(watch)).abort_handle();
        acceptor._watch = Some(Arc::new(WatchTask(task)));
        Ok(acceptor)
    }

    fn new(pair: Pair, provider: Arc<CryptoProvider>) -> Result<Self, ServerTlsError> {
        if pair.not_after <= unix_now() {
            // Served all the same (a replacement may be on its way), but every client will
            // refuse it.
            tracing::warn!("the edge certificate has expired: clients will refuse it");
        }
        let current = Arc::new(Current {
            not_after: AtomicI64::new(pair.not_after),
            key: ArcSwap::from_pointee(pair.key),
            reloads: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
        });
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Resolver(current.clone())));
        config.alpn_protocols = DEFAULT_ALPN.iter().map(|p| p.to_vec()).collect();
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(Self {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            current,
            _watch: None,
        })
    }

    /// Bounds each handshake (default 10 s).
    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// The presented certificate's expiry and the reloads so far.
    pub fn status(&self) -> CertificateStatus {
        let secs = self.current.not_after.load(Ordering::Relaxed);
        let not_after = if secs >= 0 {
            UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
        } else {
            UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
        };
        CertificateStatus {
            not_after,
            reloads: self.current.reloads.load(Ordering::Relaxed),
            rejected: self.current.rejected.load(Ordering::Relaxed),
        }
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

/// Seconds since the Unix epoch, now.
fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn read(path: &Path) -> Result<Vec<u8>, ServerTlsError> {
    std::fs::read(path).map_err(|source| ServerTlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

impl Pair {
    /// Validates a PEM chain and key: a chain, a leaf that is X.509, a key the provider
    /// loads and that matches the leaf.
    fn parse(
        cert: &[u8],
        key: &[u8],
        cert_name: &str,
        key_name: &str,
        provider: &CryptoProvider,
    ) -> Result<Self, ServerTlsError> {
        let bad_cert = |reason: String| ServerTlsError::Certificate {
            path: cert_name.to_owned(),
            reason,
        };
        let chain = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad_cert(format!("not valid PEM: {e}")))?;
        let leaf = chain
            .first()
            .ok_or_else(|| bad_cert("no CERTIFICATE PEM block".into()))?;
        let not_after = x509_parser::parse_x509_certificate(leaf.as_ref())
            .map_err(|e| bad_cert(format!("the first certificate is not X.509: {e}")))?
            .1
            .validity()
            .not_after
            .timestamp();
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| ServerTlsError::Key {
            path: key_name.to_owned(),
            reason: format!("no usable PEM private key: {e}"),
        })?;
        let key = CertifiedKey::from_der(chain, key, provider)?;
        Ok(Self { key, not_after })
    }
}

/// How long a certificate and key that do not match may wait for the other file before
/// the change counts as refused: tools write the two one after the other.
#[cfg(feature = "files")]
const MISMATCH_GRACE: Duration = Duration::from_secs(2);

/// The watch task's state.
#[cfg(feature = "files")]
struct Reloader {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    /// The bytes of the pair presented, or last refused: the same content again is not
    /// validated (nor logged) again.
    good: (Vec<u8>, Vec<u8>),
    current: Arc<Current>,
}

#[cfg(feature = "files")]
impl Reloader {
    async fn run(mut self, mut watch: mesh_core::watch::FileWatch) {
        // A certificate and key that do not match yet: refused if no change comes within
        // the grace (the other file is usually on its way).
        let mut mismatch: Option<(ServerTlsError, std::pin::Pin<Box<tokio::time::Sleep>>)> = None;
        loop {
            let snapshot = match &mut mismatch {
                Some((_, grace)) => {
                    tokio::select! {
                        snapshot = watch.changed() => snapshot,
                        () = grace.as_mut() => {
                            if let Some((error, _)) = mismatch.take() {
                                self.refuse(&error);
                            }
                            continue;
                        }
                    }
                }
                None => watch.changed().await,
            };
            mismatch = None;
            let files = snapshot.files();
            let (Some(cert), Some(key)) = (files.first(), files.get(1)) else {
                continue;
            };
            if let Some(error) = self.apply(cert.content(), key.content()) {
                tracing::info!("{error}; waiting up to {MISMATCH_GRACE:?} for the other file");
                mismatch = Some((error, Box::pin(tokio::time::sleep(MISMATCH_GRACE))));
            }
        }
    }

    fn refuse(&self, error: &ServerTlsError) {
        self.current.rejected.fetch_add(1, Ordering::Relaxed);
        tracing::warn!("{error}; keeping the last good edge certificate");
    }

    /// Presents the pair read from the files if it is valid and new; gives back the error
    /// of a certificate and key that do not match (not refused yet: see `run`).
    fn apply(
        &mut self,
        cert: Result<&[u8], &std::io::Error>,
        key: Result<&[u8], &std::io::Error>,
    ) -> Option<ServerTlsError> {
        let (cert, key) = match (cert, key) {
            (Ok(cert), Ok(key)) => (cert, key),
            (Err(error), _) | (_, Err(error)) => {
                tracing::warn!(cert = %self.cert.display(), key = %self.key.display(), %error, "edge certificate files unreadable; keeping the last good pair");
                return None;
            }
        };
        if self.good.0 == cert && self.good.1 == key {
            return None;
        }
        self.good = (cert.to_vec(), key.to_vec());
        let pair = Pair::parse(
            cert,
            key,
            &self.cert.display().to_string(),
            &self.key.display().to_string(),
            &self.provider,
        )
        .and_then(|pair| {
            if pair.not_after <= unix_now() {
                return Err(ServerTlsError::Certificate {
                    path: self.cert.display().to_string(),
                    reason: "the new certificate has expired".into(),
                });
            }
            Ok(pair)
        });
        match pair {
            Ok(pair) => {
                self.current.set(pair);
                self.current.reloads.fetch_add(1, Ordering::Relaxed);
                tracing::info!(cert = %self.cert.display(), "edge certificate reloaded");
                None
            }
            Err(
                error @ ServerTlsError::Tls(rustls::Error::InconsistentKeys(
                    rustls::InconsistentKeys::KeyMismatch,
                )),
            ) => Some(error),
            Err(error) => {
                self.refuse(&error);
                None
            }
        }
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
