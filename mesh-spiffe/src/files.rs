//! Credentials from PEM files, reloaded when they change (feature `files`, on by default).
//!
//! For workloads without SPIRE (VMs, bare metal, certificates from cert-manager or a
//! config-management tool), [`PemFiles`] reads:
//!
//! - the SVID **certificate chain**, leaf first, as `CERTIFICATE` PEM blocks;
//! - its **private key**, as PKCS#8 (`PRIVATE KEY`), SEC1 (`EC PRIVATE KEY`) or PKCS#1
//!   (`RSA PRIVATE KEY`) PEM — it may be the same file as the chain (other blocks are
//!   skipped);
//! - one **bundle** file per trusted trust domain (federation), as `CERTIFICATE` blocks.
//!
//! # Validation
//!
//! The chain must be non-empty and its leaf an SVID (exactly one `spiffe://` URI SAN, see
//! [`Svid::new`]); the key must load with the crypto provider (by default
//! [`default_provider`](crate::tls::default_provider)) and match the leaf's public key
//! ([`Svid::check_key`]); every bundle must hold at least one CA certificate that parses as
//! a trust anchor ([`Bundle::new`]). At [`start`](PemFilesBuilder::start) anything missing
//! or invalid is a [`FilesError`] naming the file and the reason.
//!
//! # Reloading
//!
//! The files are watched with mesh-core's [`FileWatch`] (see [`mesh_core::watch`] for the
//! algorithm: directory watches that see atomic renames and Kubernetes secret / config-map
//! symlink swaps, a 100 ms debounce, a 10 s safety-net poll). Whenever any file changes,
//! all are re-read and validated, and the results published into a [`CredentialStore`]:
//!
//! - the **SVID** (certificate and key together) is replaced only when the chain and the key
//!   form a valid pair. A half-written file, or a certificate replaced before its key (so
//!   that they do not match yet), keeps the last good SVID: the reason is logged with
//!   `tracing::warn!`, naming the file, and the pair is tried again when a file next
//!   changes — typically when the key arrives a moment later. An expired certificate, or
//!   a chain that does not verify against its trust domain's bundle (its intermediate
//!   still to come, or issued by another CA) while the SVID in use does, keeps it too; the
//!   latter is tried again when a bundle changes. Starting with either is warned about;
//! - each **bundle** is replaced independently of the SVID and of the other bundles, as
//!   soon as its file parses; a bad bundle file keeps that trust domain's last good bundle;
//! - content identical to what is published, or to what was already found invalid, does
//!   not tick [`updates`](CredentialSource::updates) nor log again.
//!
//! A deleted file therefore keeps the credentials that were read from it. The watch stops
//! when the [`PemFiles`] is dropped.
//!
//! ```no_run
//! use mesh_spiffe::files::PemFiles;
//! use mesh_spiffe::{Authorizer, Mtls, MtlsAcceptor};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let files = PemFiles::builder("/etc/mesh/svid.pem", "/etc/mesh/svid.key")
//!     .bundle("example.org".parse()?, "/etc/mesh/example.org.pem")
//!     .start()
//!     .await?;
//! let mtls = Mtls::new(files);
//! let acceptor = MtlsAcceptor::new(&mtls, Authorizer::any())?;
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mesh_core::config::IdentityConfig;
use mesh_core::identity::TrustDomain;
use mesh_core::watch::{FileContent, FileWatch, Snapshot, WatchError};
use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;
use tokio::task::AbortHandle;

use crate::credentials::{Bundle, BundleSet, CredentialSource, CredentialStore, Svid};
use crate::error::CredentialError;

/// Why PEM credential files could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FilesError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A file was read but its content is not usable.
    #[error("{path}: {source}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: CredentialError,
    },
    /// The certificate and the key are each valid but do not belong together.
    #[error("private key {key} does not match the certificate in {cert}: {reason}")]
    KeyMismatch {
        /// The certificate chain file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// The crypto provider's reason.
        reason: String,
    },
    /// A directory could not be watched.
    #[error("watching {path}: {message}")]
    Watch {
        /// The directory.
        path: PathBuf,
        /// The watcher's error.
        message: String,
    },
    /// No bundle file was configured: every peer would be refused.
    #[error("no trust bundle file configured: at least one is needed to verify peers")]
    NoBundles,
    /// The identity configuration names another source than `files`.
    #[error("the identity configuration's source is not `files`")]
    NotFiles,
}

impl FilesError {
    fn invalid(path: &Path, source: CredentialError) -> Self {
        Self::Invalid {
            path: path.to_path_buf(),
            source,
        }
    }

    fn from_watch(error: WatchError) -> Self {
        match error {
            WatchError::Read { path, source } => Self::Read { path, source },
            WatchError::Watch { path, message } => Self::Watch { path, message },
            other => Self::Watch {
                path: PathBuf::new(),
                message: other.to_string(),
            },
        }
    }
}

/// Settings of a [`PemFiles`] source.
///
/// # Defaults
///
/// - `provider`: [`default_provider`](crate::tls::default_provider) (`ring`).
/// - `poll_interval`: 10 s; `debounce`: 100 ms (as [`mesh_core::watch`]).
#[derive(Clone)]
pub struct PemFilesBuilder {
    cert: PathBuf,
    key: PathBuf,
    bundles: BTreeMap<TrustDomain, PathBuf>,
    provider: Arc<CryptoProvider>,
    poll_interval: Duration,
    debounce: Duration,
}

impl fmt::Debug for PemFilesBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PemFilesBuilder")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .field("bundles", &self.bundles)
            .field("poll_interval", &self.poll_interval)
            .field("debounce", &self.debounce)
            .finish_non_exhaustive()
    }
}

impl PemFilesBuilder {
    /// The settings an [`IdentityConfig::Files`] describes.
    ///
    /// # Errors
    ///
    /// [`FilesError::NotFiles`] for any other identity source.
    pub fn from_config(config: &IdentityConfig) -> Result<Self, FilesError> {
        match config {
            IdentityConfig::Files { cert, key, bundles } => Ok(bundles
                .iter()
                .fold(PemFiles::builder(cert, key), |builder, (td, path)| {
                    builder.bundle(td.0.clone(), path)
                })),
            _ => Err(FilesError::NotFiles),
        }
    }

    /// Trusts the CA certificates in `path` for peers of `trust_domain` (replacing any
    /// earlier file for that domain).
    pub fn bundle(mut self, trust_domain: TrustDomain, path: impl Into<PathBuf>) -> Self {
        self.bundles.insert(trust_domain, path.into());
        self
    }

    /// Loads and checks keys with `provider` (default: [`crate::tls::default_provider`]).
    /// Use the provider the [`Mtls`](crate::Mtls) settings use.
    pub fn provider(mut self, provider: Arc<CryptoProvider>) -> Self {
        self.provider = provider;
        self
    }

    /// Re-reads the files at least this often (default 10 s).
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// Waits this long without file events before reading (default 100 ms).
    pub fn debounce(mut self, debounce: Duration) -> Self {
        self.debounce = debounce;
        self
    }

    /// Reads and validates every file, publishes the credentials, and starts watching the
    /// files in a background task. Must be called within a tokio runtime.
    ///
    /// # Errors
    ///
    /// [`FilesError::NoBundles`] if no bundle is configured; otherwise the first file that
    /// is missing ([`FilesError::Read`]) or invalid ([`FilesError::Invalid`],
    /// [`FilesError::KeyMismatch`]), or [`FilesError::Watch`].
    pub async fn start(self) -> Result<PemFiles, FilesError> {
        if self.bundles.is_empty() {
            return Err(FilesError::NoBundles);
        }
        let paths = [&self.cert, &self.key]
            .into_iter()
            .chain(self.bundles.values())
            .cloned();
        let watch = FileWatch::builder(paths)
            .poll_interval(self.poll_interval)
            .debounce(self.debounce)
            .start()
            .await
            .map_err(FilesError::from_watch)?;

        let snapshot = watch.snapshot();
        let files = snapshot.files();
        let cert = bytes(&files[0]);
        let key = bytes(&files[1]);
        let svid = parse_svid(&self.cert, cert, &self.key, key, &self.provider)?;
        if leaf_expired(&svid) {
            // Started with, not refused: a renewal may be about to replace it, and the
            // readiness check reports it. But every handshake will fail until then.
            tracing::warn!(
                id = %svid.id(), cert = %self.cert.display(), not_after = ?svid.not_after(),
                "the SVID's certificate has expired: peers refuse it until the file is replaced"
            );
        }
        let mut bundles = BTreeMap::new();
        for ((td, path), file) in self.bundles.iter().zip(&files[2..]) {
            let content = bytes(file);
            let bundle = parse_bundle(path, content)?;
            bundles.insert(td.clone(), (content.to_vec(), bundle));
        }
        let set = bundles
            .iter()
            .fold(BundleSet::new(), |set, (td, (_, bundle))| {
                set.with(td.clone(), bundle.clone())
            });
        if let Err(error) = crate::verify::chains_to(&svid, &set, &self.provider) {
            // Started with (a bundle may be about to follow), but every peer holding the
            // same bundles will refuse it until then.
            tracing::warn!(
                id = %svid.id(), cert = %self.cert.display(), %error,
                "the SVID does not verify against its trust bundle: peers refuse it"
            );
        }

        let store = Arc::new(CredentialStore::new());
        let reloader = Reloader {
            cert: self.cert,
            key: self.key,
            provider: self.provider,
            store: store.clone(),
            svid_good: (cert.to_vec(), key.to_vec()),
            bundles: self.bundles.into_iter().collect(),
            bundles_good: bundles,
            last_seen: snapshot,
        };
        store.set(svid, reloader.bundle_set());
        tracing::info!(
            cert = %reloader.cert.display(),
            id = ?store.svid().map(|s| s.id().to_string()),
            trust_domains = reloader.bundles.len(),
            "loaded credentials from PEM files"
        );
        let task = tokio::spawn(reloader.run(watch)).abort_handle();
        Ok(PemFiles { store, task })
    }
}

/// The bytes of a file read successfully at the start.
fn bytes(file: &FileContent) -> &[u8] {
    // `FileWatch::start` fails unless every file was read.
    file.content().unwrap_or_default()
}

/// Credentials from PEM files, reloaded when they change; see the [module docs](self).
pub struct PemFiles {
    store: Arc<CredentialStore>,
    task: AbortHandle,
}

impl fmt::Debug for PemFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PemFiles")
            .field("svid", &self.store.svid())
            .field("bundles", &self.store.bundles())
            .finish_non_exhaustive()
    }
}

impl PemFiles {
    /// Settings for the chain in `cert` and the key in `key`; add at least one
    /// [`bundle`](PemFilesBuilder::bundle), then [`start`](PemFilesBuilder::start).
    pub fn builder(cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> PemFilesBuilder {
        PemFilesBuilder {
            cert: cert.into(),
            key: key.into(),
            bundles: BTreeMap::new(),
            provider: crate::tls::default_provider(),
            poll_interval: mesh_core::watch::DEFAULT_POLL_INTERVAL,
            debounce: mesh_core::watch::DEFAULT_DEBOUNCE,
        }
    }

    /// Starts the source an [`IdentityConfig::Files`] describes, with the default provider
    /// and timings.
    ///
    /// # Errors
    ///
    /// [`FilesError::NotFiles`] for another source, or as [`PemFilesBuilder::start`].
    pub async fn from_config(config: &IdentityConfig) -> Result<Self, FilesError> {
        PemFilesBuilder::from_config(config)?.start().await
    }
}

impl Drop for PemFiles {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CredentialSource for PemFiles {
    fn svid(&self) -> Option<Arc<Svid>> {
        self.store.svid()
    }

    fn bundles(&self) -> Arc<BundleSet> {
        self.store.bundles()
    }

    fn updates(&self) -> watch::Receiver<u64> {
        self.store.updates()
    }
}

/// Parses and checks an SVID from the contents of its chain and key files, as
/// [`PemFilesBuilder::start`] and every reload do; the paths only name the files in errors.
///
/// Exposed for the fuzz targets in `fuzz/`; not a stable API.
///
/// # Errors
///
/// [`FilesError::Invalid`] or [`FilesError::KeyMismatch`], as [`PemFilesBuilder::start`].
#[doc(hidden)]
pub fn parse_svid(
    cert_path: &Path,
    cert: &[u8],
    key_path: &Path,
    key: &[u8],
    provider: &CryptoProvider,
) -> Result<Svid, FilesError> {
    let chain = parse_certs(cert_path, cert)?;
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| {
        let reason = match e {
            pem::Error::NoItemsFound => {
                "no PRIVATE KEY, EC PRIVATE KEY or RSA PRIVATE KEY PEM block".to_owned()
            }
            other => pem_reason(&other),
        };
        FilesError::invalid(key_path, CredentialError::Pem(reason))
    })?;
    provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| FilesError::invalid(key_path, CredentialError::Key(e.to_string())))?;
    let svid = Svid::new(chain, key).map_err(|e| FilesError::invalid(cert_path, e))?;
    svid.check_key(provider)
        .map_err(|e| FilesError::KeyMismatch {
            cert: cert_path.to_path_buf(),
            key: key_path.to_path_buf(),
            reason: match e {
                CredentialError::Key(reason) => reason,
                other => other.to_string(),
            },
        })?;
    Ok(svid)
}

/// Parses a bundle file's content, as [`PemFilesBuilder::start`] and every reload do;
/// `path` only names the file in errors.
///
/// Exposed for the fuzz targets in `fuzz/`; not a stable API.
///
/// # Errors
///
/// [`FilesError::Invalid`] when the content is not PEM, holds no `CERTIFICATE` block, or a
/// certificate is not a usable trust anchor.
#[doc(hidden)]
pub fn parse_bundle(path: &Path, content: &[u8]) -> Result<Bundle, FilesError> {
    Bundle::new(parse_certs(path, content)?).map_err(|e| FilesError::invalid(path, e))
}

/// The `CERTIFICATE` blocks of a PEM file, in order; at least one.
fn parse_certs(path: &Path, content: &[u8]) -> Result<Vec<CertificateDer<'static>>, FilesError> {
    let certs = CertificateDer::pem_slice_iter(content)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| FilesError::invalid(path, CredentialError::Pem(pem_reason(&e))))?;
    if certs.is_empty() {
        return Err(FilesError::invalid(
            path,
            CredentialError::Pem("no CERTIFICATE PEM block".to_owned()),
        ));
    }
    Ok(certs)
}

/// Why PEM text does not parse, readably (pki-types prints markers as byte lists).
fn pem_reason(error: &pem::Error) -> String {
    match error {
        pem::Error::MissingSectionEnd { end_marker } => format!(
            "not valid PEM: no `-----END {}-----` line (is the file complete?)",
            String::from_utf8_lossy(end_marker)
        ),
        pem::Error::IllegalSectionStart { line } => format!(
            "not valid PEM: malformed line `{}`",
            String::from_utf8_lossy(line)
        ),
        other => format!("not valid PEM: {other}"),
    }
}

/// The background task's state: what is published and what was last seen.
struct Reloader {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    store: Arc<CredentialStore>,
    /// The chain and key bytes of the published SVID.
    svid_good: (Vec<u8>, Vec<u8>),
    /// Bundle files, in the order they follow the chain and key in the watch.
    bundles: Vec<(TrustDomain, PathBuf)>,
    /// The bytes and bundle published for each trust domain.
    bundles_good: BTreeMap<TrustDomain, (Vec<u8>, Bundle)>,
    /// The last snapshot handled, so that a file still invalid is not reported again.
    last_seen: Snapshot,
}

impl Reloader {
    async fn run(mut self, mut watch: FileWatch) {
        loop {
            let snapshot = watch.changed().await;
            self.apply(snapshot);
        }
    }

    fn bundle_set(&self) -> BundleSet {
        self.bundles_good
            .iter()
            .fold(BundleSet::new(), |set, (td, (_, bundle))| {
                set.with(td.clone(), bundle.clone())
            })
    }

    /// Validates what changed in `snapshot` and publishes what is valid.
    fn apply(&mut self, snapshot: Snapshot) {
        let last_seen = std::mem::replace(&mut self.last_seen, snapshot.clone());
        let (files, seen) = (snapshot.files(), last_seen.files());

        let svid_changed = files[..2] != seen[..2];
        let mut bundles_changed = false;
        for (i, (td, path)) in self.bundles.iter().enumerate() {
            let (file, seen) = (&files[2 + i], &seen[2 + i]);
            if file == seen {
                continue;
            }
            let content = match file.content() {
                Ok(content) => content,
                Err(error) => {
                    tracing::warn!(
                        path = %path.display(), %error, trust_domain = %td,
                        "trust bundle file unreadable; keeping the last good bundle"
                    );
                    continue;
                }
            };
            if self
                .bundles_good
                .get(td)
                .is_some_and(|(good, _)| good[..] == *content)
            {
                continue;
            }
            match parse_bundle(path, content) {
                Ok(bundle) => {
                    tracing::info!(
                        path = %path.display(), trust_domain = %td,
                        authorities = bundle.certs().len(), "trust bundle reloaded"
                    );
                    self.bundles_good
                        .insert(td.clone(), (content.to_vec(), bundle));
                    bundles_changed = true;
                }
                Err(error) => tracing::warn!(
                    trust_domain = %td,
                    "{error}; keeping the last good trust bundle"
                ),
            }
        }
        // After the bundles: a new SVID is checked against the bundles it will be used
        // with, and one refused for want of its root is taken once its bundle comes.
        let svid = if svid_changed || bundles_changed {
            self.reload_svid(&files[0], &files[1])
        } else {
            None
        };
        match (svid, bundles_changed) {
            (Some(svid), true) => self.store.set(svid, self.bundle_set()),
            (Some(svid), false) => self.store.set_svid(svid),
            (None, true) => self.store.set_bundles(self.bundle_set()),
            (None, false) => {}
        }
    }

    /// A new valid SVID from the chain and key files, if they changed into one.
    fn reload_svid(&mut self, cert: &FileContent, key: &FileContent) -> Option<Svid> {
        let (cert_bytes, key_bytes) = (readable(cert)?, readable(key)?);
        if self.svid_good.0 == cert_bytes && self.svid_good.1 == key_bytes {
            return None;
        }
        match parse_svid(&self.cert, cert_bytes, &self.key, key_bytes, &self.provider) {
            // An old pair put back (a restored backup, a configuration tool's stale copy)
            // would replace a working SVID with one every peer refuses.
            Ok(svid) if leaf_expired(&svid) => {
                tracing::warn!(
                    id = %svid.id(), cert = %self.cert.display(),
                    "the new SVID's certificate has expired; keeping the last good SVID"
                );
                None
            }
            // A chain that does not lead to its domain's bundle (its intermediate still to
            // be written, or issued by the wrong CA) would fail every handshake: it does
            // not replace an SVID that still verifies.
            Ok(svid) if self.breaks_trust(&svid) => None,
            Ok(svid) => {
                tracing::info!(id = %svid.id(), cert = %self.cert.display(), "SVID reloaded");
                self.svid_good = (cert_bytes.to_vec(), key_bytes.to_vec());
                Some(svid)
            }
            Err(error) => {
                tracing::warn!("{error}; keeping the last good SVID");
                None
            }
        }
    }
}

impl Reloader {
    /// Whether `new` fails verification against the bundles published (said at warn)
    /// while the SVID in use passes it.
    fn breaks_trust(&self, new: &Svid) -> bool {
        let bundles = self.bundle_set();
        let Err(error) = crate::verify::chains_to(new, &bundles, &self.provider) else {
            return false;
        };
        let current_verifies = self.store.svid().is_some_and(|current| {
            crate::verify::chains_to(&current, &bundles, &self.provider).is_ok()
        });
        if current_verifies {
            tracing::warn!(
                id = %new.id(), cert = %self.cert.display(), %error,
                "the new SVID does not verify against its trust bundle; keeping the last good SVID"
            );
        }
        current_verifies
    }
}

/// Whether the SVID's leaf certificate has expired by this host's clock.
fn leaf_expired(svid: &Svid) -> bool {
    let Some(leaf) = svid.chain().first() else {
        return false;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    x509_parser::parse_x509_certificate(leaf.as_ref())
        .is_ok_and(|(_, cert)| cert.validity().not_after.timestamp() <= now)
}

/// The file's bytes, or `None` after logging why it could not be read.
fn readable(file: &FileContent) -> Option<&[u8]> {
    file.content()
        .map_err(|error| {
            tracing::warn!(
                path = %file.path().display(), %error,
                "SVID file unreadable; keeping the last good SVID"
            );
        })
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_errors_name_the_file_and_reason() {
        let provider = crate::tls::default_provider();
        let (c, k) = (Path::new("/x/svid.pem"), Path::new("/x/svid.key"));

        let err = parse_svid(c, b"", k, b"", &provider)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/x/svid.pem") && err.contains("no CERTIFICATE"),
            "{err}"
        );

        let half = b"-----BEGIN CERTIFICATE-----\nMIIB";
        let err = parse_svid(c, half, k, b"", &provider)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/x/svid.pem") && err.contains("-----END CERTIFICATE-----"),
            "{err}"
        );

        let cert = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let err = parse_svid(c, cert, k, b"junk", &provider)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/x/svid.key") && err.contains("no PRIVATE KEY"),
            "{err}"
        );

        // A SEC1 block is recognised as a key (and then refused by the provider here,
        // since it is not a real key).
        let sec1 = b"-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n";
        let err = parse_svid(c, cert, k, sec1, &provider).unwrap_err();
        assert!(
            matches!(&err, FilesError::Invalid { path, source: CredentialError::Key(_) } if path == k),
            "{err:?}"
        );

        let err = parse_bundle(Path::new("b.pem"), b"nothing")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("b.pem") && err.contains("no CERTIFICATE"),
            "{err}"
        );
    }

    #[test]
    fn from_config_takes_only_files() {
        let config = mesh_core::config::MeshConfig::from_toml("[identity]\nsource = \"spire\"\n")
            .unwrap()
            .identity
            .unwrap();
        assert!(matches!(
            PemFilesBuilder::from_config(&config),
            Err(FilesError::NotFiles)
        ));
        let td = TrustDomain::new("example.org").unwrap();
        let config = IdentityConfig::Files {
            cert: "c.pem".into(),
            key: "k.pem".into(),
            bundles: [(
                mesh_core::config::TrustDomainKey(td.clone()),
                "b.pem".into(),
            )]
            .into_iter()
            .collect(),
        };
        let builder = PemFilesBuilder::from_config(&config).unwrap();
        assert_eq!(builder.bundles.get(&td).unwrap(), Path::new("b.pem"));
        assert_eq!(builder.cert, Path::new("c.pem"));
    }
}
