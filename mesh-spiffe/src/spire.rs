//! Credentials from the SPIFFE Workload API, as a SPIRE agent serves it (feature `spire`).
//!
//! [`SpireSource`] runs the `spiffe` crate's [`X509Source`], which holds a
//! `FetchX509SVID` stream open to the agent, reconnects with backoff when it drops, and
//! notifies on every change. Each change is converted into this crate's [`Svid`] and
//! [`BundleSet`] — the same validation as every other source: exactly one SPIFFE URI SAN on
//! the leaf, a private key that matches it, bundles that parse as trust anchors — and
//! published, SVID and bundles as one update, into a [`CredentialStore`]. `SpireSource`
//! is a [`CredentialSource`] itself, so [`Mtls::new`](crate::Mtls::new) takes it directly
//! and every handshake sees the current credentials.
//!
//! An update that cannot be used (unparseable, a key that does not match its certificate,
//! a malformed bundle) leaves the last good credentials in place and logs a `tracing`
//! warning: a workload keeps serving with its current SVID until the agent sends a usable
//! one, and the SVID's own expiry bounds how long that lasts.
//!
//! A withdrawal is different: the agent answering `PERMISSION_DENIED` says this workload
//! is no longer entitled to its identity (its registration entry was deleted, say, for a
//! compromised workload), and the Workload API asks clients to stop using the SVIDs it no
//! longer gives (SPIFFE Workload API 5.2.1). The source drops its SVID and bundles once
//! the withdrawal has lasted [`DEFAULT_WITHDRAWAL_GRACE`] (30 s;
//! [`SpireSourceBuilder::withdrawal_grace`]) without the agent giving them back, which
//! rides out an agent that denies for a moment (while it resyncs after a restart, say).
//! From then on handshakes fail, closed, and a readiness check on the SVID fails, until
//! the agent issues the identity again. A lost connection to the agent is no withdrawal:
//! it keeps the credentials, and the source reconnects.
//!
//! # Defaults
//!
//! - **Endpoint**: the `SPIFFE_ENDPOINT_SOCKET` environment variable, as the `spiffe` crate
//!   reads it; [`SpireSourceBuilder::endpoint`] sets one explicitly
//!   (`unix:///run/spire/agent.sock`, or `tcp://127.0.0.1:8081`).
//! - **Initial timeout**: 10 s ([`DEFAULT_INITIAL_TIMEOUT`]) for the first usable SVID;
//!   [`SpireSourceBuilder::build`] fails after it, so a workload without an identity does not
//!   start half-working. Meanwhile a missing socket or an agent with no identity for the
//!   workload yet is retried.
//! - **SVID**: the agent's default (first) SVID.
//! - **Reconnection**: the `spiffe` crate's, exponential backoff from 200 ms to 10 s with
//!   jitter.
//! - **Key check**: with [`default_provider`](crate::tls::default_provider) unless
//!   [`SpireSourceBuilder::provider`] says otherwise.
//!
//! ```no_run
//! use mesh_spiffe::{Authorizer, Mtls, MtlsConnector};
//! use mesh_spiffe::spire::SpireSource;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let source = SpireSource::builder()
//!     .endpoint("unix:///run/spire/agent/public/api.sock")
//!     .build()
//!     .await?;
//! let mtls = Mtls::new(source);
//! let connector = MtlsConnector::new(&mtls, mesh_core::SpiffeId::new("spiffe://example.org/api")?)?;
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use spiffe::{
    TrustDomain, X509BundleSet, X509Source, X509SourceError, X509SourceUpdates, X509Svid,
};
use tokio::sync::watch;
use tokio::task::AbortHandle;

use crate::credentials::{Bundle, BundleSet, CredentialSource, CredentialStore, Svid};
use crate::error::CredentialError;

/// How long [`SpireSourceBuilder::build`] waits for the first usable SVID by default.
pub const DEFAULT_INITIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an identity the agent withdrew is kept, by default, in case the agent gives
/// it back (see the [module docs](self)).
pub const DEFAULT_WITHDRAWAL_GRACE: Duration = Duration::from_secs(30);

/// Why a [`SpireSource`] could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpireError {
    /// The Workload API refused the workload or could not be used (a malformed endpoint
    /// address, a server without the X.509 methods, a closed source).
    #[error("SPIFFE Workload API: {0}")]
    WorkloadApi(#[source] X509SourceError),
    /// No SVID arrived within the initial timeout.
    #[error("no SVID from the SPIFFE Workload API within {0:?}")]
    Timeout(Duration),
    /// SVIDs arrived, but none was usable within the initial timeout.
    #[error("no usable SVID from the SPIFFE Workload API within {timeout:?}: {error}")]
    Unusable {
        /// The initial timeout.
        timeout: Duration,
        /// What was wrong with the last SVID received.
        #[source]
        error: CredentialError,
    },
}

/// Settings for a [`SpireSource`]; see the [module docs](self) for the defaults.
#[derive(Clone, Debug)]
pub struct SpireSourceBuilder {
    endpoint: Option<String>,
    initial_timeout: Duration,
    withdrawal_grace: Duration,
    provider: Option<Arc<CryptoProvider>>,
}

impl SpireSourceBuilder {
    /// Connects to `endpoint` (`unix:///path/to/socket` or `tcp://ip:port`) instead of the
    /// address in `SPIFFE_ENDPOINT_SOCKET`.
    pub fn endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = Some(endpoint.into());
        self
    }

    /// Waits at most `timeout` for the first usable SVID (default 10 s).
    pub fn initial_timeout(mut self, timeout: Duration) -> Self {
        self.initial_timeout = timeout;
        self
    }

    /// Keeps an identity the agent withdrew for `grace` before dropping it (default
    /// [`DEFAULT_WITHDRAWAL_GRACE`]; zero drops it at once).
    pub fn withdrawal_grace(mut self, grace: Duration) -> Self {
        self.withdrawal_grace = grace;
        self
    }

    /// Checks private keys with `provider` (default: [`crate::tls::default_provider`]).
    pub fn provider(mut self, provider: Arc<CryptoProvider>) -> Self {
        self.provider = Some(provider);
        self
    }

    /// Connects, waits for the first usable SVID, and starts following updates.
    ///
    /// Must be called within a Tokio runtime, which runs the background watch.
    pub async fn build(self) -> Result<SpireSource, SpireError> {
        let timeout = self.initial_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut builder = X509Source::builder();
        if let Some(endpoint) = &self.endpoint {
            builder = builder.endpoint(endpoint);
        }
        let x509 = match tokio::time::timeout_at(deadline, builder.build()).await {
            Ok(Ok(x509)) => x509,
            Ok(Err(X509SourceError::InitialSyncTimeout)) | Err(_) => {
                return Err(SpireError::Timeout(timeout));
            }
            Ok(Err(error)) => return Err(SpireError::WorkloadApi(error)),
        };
        let mut publisher = Publisher {
            store: Arc::new(CredentialStore::new()),
            provider: self.provider.unwrap_or_else(crate::tls::default_provider),
            applied_svid: None,
            applied_bundles: None,
        };
        // Subscribe before the first read, so that no update falls between the two.
        let mut updates = x509.updated();
        while let Err(rejected) = publisher.apply(&x509) {
            let error = match rejected {
                Rejected::Source(error) => return Err(SpireError::WorkloadApi(error)),
                Rejected::Credential(error) => error,
            };
            tracing::warn!(%error, "unusable SVID from the Workload API: waiting for another");
            match tokio::time::timeout_at(deadline, updates.changed()).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => return Err(SpireError::WorkloadApi(error)),
                Err(_) => return Err(SpireError::Unusable { timeout, error }),
            }
        }
        let store = publisher.store.clone();
        let watcher = tokio::spawn(follow(
            x509.clone(),
            updates,
            publisher,
            self.withdrawal_grace,
        ))
        .abort_handle();
        Ok(SpireSource {
            store,
            x509,
            watcher,
        })
    }
}

/// Credentials from the SPIFFE Workload API (SPIRE); see the [module docs](self).
///
/// Dropping it stops following updates (the credentials it holds stay as they were in
/// anything that cloned them out).
#[derive(Debug)]
pub struct SpireSource {
    store: Arc<CredentialStore>,
    x509: X509Source,
    watcher: AbortHandle,
}

impl SpireSource {
    /// A builder with the defaults of the [module docs](self).
    pub fn builder() -> SpireSourceBuilder {
        SpireSourceBuilder {
            endpoint: None,
            initial_timeout: DEFAULT_INITIAL_TIMEOUT,
            withdrawal_grace: DEFAULT_WITHDRAWAL_GRACE,
            provider: None,
        }
    }

    /// Connects with every default: the endpoint in `SPIFFE_ENDPOINT_SOCKET`, 10 s for the
    /// first SVID.
    pub async fn connect() -> Result<Self, SpireError> {
        Self::builder().build().await
    }

    /// The store the source publishes into.
    pub fn store(&self) -> &Arc<CredentialStore> {
        &self.store
    }

    /// Stops following updates and closes the Workload API connection. The last
    /// credentials stay in the store.
    pub async fn shutdown(&self) {
        self.watcher.abort();
        self.x509.shutdown().await;
    }
}

impl Drop for SpireSource {
    fn drop(&mut self) {
        // The watcher holds a handle on the `X509Source`; once it is gone, the source
        // closes its stream when its last handle (ours) drops.
        self.watcher.abort();
    }
}

impl CredentialSource for SpireSource {
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

/// Publishes each change of the `X509Source`, and drops the credentials of an identity
/// the agent withdrew once `grace` passed without it given back; runs until the source
/// closes.
async fn follow(
    x509: X509Source,
    mut updates: X509SourceUpdates,
    mut publisher: Publisher,
    grace: Duration,
) {
    // When a withdrawal began, the credentials go.
    let mut drop_at: Option<tokio::time::Instant> = None;
    loop {
        let changed = tokio::select! {
            changed = updates.changed() => changed,
            () = sleep_until(drop_at) => {
                drop_at = None;
                tracing::error!(
                    ?grace,
                    "the Workload API withdrew this workload's identity: credentials dropped, handshakes fail until it issues one again"
                );
                publisher.clear();
                continue;
            }
        };
        if let Err(error) = changed {
            tracing::debug!(%error, "Workload API source closed: credentials stop updating");
            return;
        }
        match publisher.apply(&x509) {
            Ok(()) => {
                if drop_at.take().is_some() {
                    tracing::info!("the Workload API gave the withdrawn identity back");
                }
            }
            Err(Rejected::Source(error @ X509SourceError::Withdrawn(_))) => {
                if drop_at.is_none() && publisher.store.svid().is_some() {
                    tracing::warn!(
                        %error,
                        ?grace,
                        "the Workload API withdrew this workload's identity: its credentials go unless it is given back within the grace"
                    );
                    drop_at = Some(tokio::time::Instant::now() + grace);
                }
            }
            Err(error) => {
                tracing::warn!(
                    %error,
                    "unusable update from the Workload API: keeping the last good credentials"
                );
                // The agent answers again: the identity is no longer withdrawn, though
                // what it sent cannot be used.
                if drop_at.is_some() && x509.state().withdrawal().is_none() {
                    drop_at = None;
                    tracing::info!("the Workload API no longer withdraws the identity");
                }
            }
        }
    }
}

/// Sleeps until `at`; never, without one.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Why an update was not published.
#[derive(Debug)]
enum Rejected {
    /// The source has no usable SVID (withdrawn by the agent, expired, closed).
    Source(X509SourceError),
    /// The SVID or a bundle failed this crate's validation.
    Credential(CredentialError),
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Source(error) => fmt::Display::fmt(error, f),
            Self::Credential(error) => fmt::Display::fmt(error, f),
        }
    }
}

/// Converts the source's current state and publishes it into the store.
#[derive(Debug)]
struct Publisher {
    store: Arc<CredentialStore>,
    provider: Arc<CryptoProvider>,
    /// The SVID and bundles last published, to skip re-publishing an unchanged state.
    applied_svid: Option<Arc<X509Svid>>,
    applied_bundles: Option<Arc<X509BundleSet>>,
}

impl Publisher {
    /// Drops the credentials (a withdrawn identity); whatever the agent sends next is
    /// published, even if it is what was withdrawn.
    fn clear(&mut self) {
        self.store.clear();
        self.applied_svid = None;
        self.applied_bundles = None;
    }

    fn apply(&mut self, x509: &X509Source) -> Result<(), Rejected> {
        // One coherent snapshot: the SVID and the bundles of the same response.
        let state = x509.state();
        let context = state.context().map_err(Rejected::Source)?;
        let bundles = context.bundle_set().clone();
        let svid = state.svid();
        if let (Ok(svid), Some(old_svid), Some(old_bundles)) =
            (&svid, &self.applied_svid, &self.applied_bundles)
            && Arc::ptr_eq(old_svid, svid)
            && Arc::ptr_eq(old_bundles, &bundles)
        {
            return Ok(());
        }
        let converted = match svid {
            Ok(raw) => convert_svid(&raw, &self.provider)
                .map(|ours| (raw, ours))
                .map_err(Rejected::Credential),
            Err(error) => Err(Rejected::Source(error)),
        };
        match converted {
            Ok((raw, ours)) => {
                let own = ours.id().trust_domain().clone();
                let set = convert_bundles(&bundles, Some(&own)).map_err(Rejected::Credential)?;
                tracing::info!(
                    id = %ours.id(),
                    trust_domains = set.len(),
                    "credentials from the Workload API"
                );
                self.store.set(ours, set);
                self.applied_svid = Some(raw);
                self.applied_bundles = Some(bundles);
                Ok(())
            }
            Err(rejected) => {
                // No usable SVID in the update (expired by this host's clock, refused by
                // our checks), but its bundles still count: a root or a federation the
                // agent removed must stop being trusted (Workload API §4.4), whatever the
                // SVID's state.
                if self
                    .applied_bundles
                    .as_ref()
                    .is_none_or(|b| !Arc::ptr_eq(b, &bundles))
                {
                    let own = self.store.svid().map(|s| s.id().trust_domain().clone());
                    if let Ok(set) = convert_bundles(&bundles, own.as_ref())
                        && !set.same_trust(&self.store.bundles())
                    {
                        tracing::info!(
                            trust_domains = set.len(),
                            "trust bundles from the Workload API (no usable SVID in the update)"
                        );
                        self.store.set_bundles(set);
                    }
                    self.applied_bundles = Some(bundles);
                }
                Err(rejected)
            }
        }
    }
}

/// The `spiffe` crate's SVID as this crate's, validated.
fn convert_svid(svid: &X509Svid, provider: &CryptoProvider) -> Result<Svid, CredentialError> {
    let chain = svid.cert_chain().iter().map(der).collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        svid.private_key().as_bytes().to_vec(),
    ));
    let ours = Svid::new(chain, key)?;
    ours.check_key(provider)?;
    Ok(ours)
}

fn der(cert: &spiffe::Certificate) -> CertificateDer<'static> {
    CertificateDer::from(cert.as_bytes().to_vec())
}

/// The `spiffe` crate's bundles as this crate's. The bundle of `own` (the SVID's trust
/// domain) must be valid, or the whole update is refused; a federated bundle that is not
/// (empty: that trust domain has no X.509 authorities, X509-SVID §6.2; or holding no
/// usable authority) is left out with a warning, so that one foreign domain cannot stop
/// the workload's own SVID from rotating. Leaving it out means trusting nothing from that
/// domain: the safe side.
fn convert_bundles(
    bundles: &X509BundleSet,
    own: Option<&TrustDomain>,
) -> Result<BundleSet, CredentialError> {
    let mut set = BundleSet::new();
    for (trust_domain, bundle) in bundles.iter() {
        match Bundle::new(bundle.authorities().iter().map(der).collect()) {
            Ok(bundle) => set.insert(trust_domain.clone(), bundle),
            Err(error) if Some(trust_domain) != own => {
                tracing::warn!(
                    %trust_domain,
                    %error,
                    "trust bundle from the Workload API left out: nothing from that trust domain is trusted"
                );
            }
            Err(error) => return Err(error),
        }
    }
    Ok(set)
}
