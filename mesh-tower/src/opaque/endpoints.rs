//! The outbound endpoints: followed from discovery, each with its connect health and open
//! connections, and the pick among them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use futures_util::StreamExt;
use mesh_core::discover::{BoxDiscover, Change};
use mesh_core::identity::IdentityPattern;
use mesh_core::{Endpoint, EndpointKey};
use mesh_spiffe::{Authorizer, Mtls, MtlsConnector};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::balance::p2c::pick_by;
use crate::connect::ConnState;

/// The endpoints as discovery last gave them.
pub(super) struct Endpoints {
    pub(super) set: ArcSwap<Vec<Arc<Target>>>,
    /// Sent each time the set changes or discovery ends.
    pub(super) changed: watch::Sender<()>,
    pub(super) ended: AtomicBool,
}

/// One endpoint: how to dial it, its connect health and its open connections.
pub(super) struct Target {
    pub(super) addr: SocketAddr,
    pub(super) weight: f64,
    pub(super) tls: Option<MtlsConnector>,
    pub(super) state: ConnState,
    pub(super) open: AtomicUsize,
}

/// Makes the [`Target`] of an endpoint.
pub(super) struct MakeTarget {
    pub(super) transport: Option<Mtls>,
    pub(super) server_identity: Option<IdentityPattern>,
    pub(super) service: String,
}

impl MakeTarget {
    /// The target of `endpoint`, or `None` (logged) to leave it out.
    pub(super) fn target(&self, endpoint: &Endpoint) -> Option<Target> {
        let tls = match &self.transport {
            None => {
                // Said, not silently dropped: nobody should take the service for verified.
                if let Some(id) = endpoint.identity() {
                    tracing::warn!(service = %self.service, endpoint = %endpoint.key(), identity = %id, "discovery gives this endpoint an identity, which a plaintext service cannot verify: connecting in plaintext (use tls = \"mtls\" to verify it)");
                }
                None
            }
            Some(mtls) => {
                let expected = match (endpoint.identity(), &self.server_identity) {
                    (Some(id), _) => Authorizer::exact(id.clone()),
                    (None, Some(p)) => Authorizer::pattern(p.clone()),
                    // No expectation at all: refuse every server rather than trust any.
                    (None, None) => Authorizer::predicate(
                        "an identity given by discovery or `server_identity`",
                        |_| false,
                    ),
                };
                match MtlsConnector::new(mtls, expected) {
                    Ok(connector) => Some(connector),
                    Err(error) => {
                        // Fail closed: leave the endpoint out rather than dial plaintext.
                        tracing::error!(%error, service = %self.service, endpoint = %endpoint.key(), "cannot build a TLS configuration; endpoint skipped");
                        return None;
                    }
                }
            }
        };
        Some(Target {
            addr: endpoint.addr(),
            weight: f64::from(endpoint.weight().get()),
            tls,
            state: ConnState::new(),
            open: AtomicUsize::new(0),
        })
    }
}

/// Follows discovery into `endpoints` until it ends.
pub(super) async fn follow(
    mut discovery: BoxDiscover,
    endpoints: Arc<Endpoints>,
    make: MakeTarget,
) {
    let mut current: BTreeMap<EndpointKey, Arc<Target>> = BTreeMap::new();
    while let Some(change) = discovery.next().await {
        match change {
            Ok(Change::Insert(key, endpoint)) => match make.target(&endpoint) {
                Some(target) => {
                    current.insert(key, Arc::new(target));
                }
                None => {
                    current.remove(&key);
                }
            },
            Ok(Change::Remove(key)) => {
                current.remove(&key);
            }
            Err(error) => {
                tracing::warn!(service = %make.service, %error, "discovery failed; keeping the endpoints");
                continue;
            }
        }
        endpoints
            .set
            .store(Arc::new(current.values().cloned().collect()));
        endpoints.changed.send_replace(());
    }
    endpoints.ended.store(true, Ordering::Release);
    endpoints.changed.send_replace(());
}

/// An open connection counted on its endpoint until dropped.
pub(super) struct Open(pub(super) Arc<Target>);

impl Open {
    pub(super) fn new(target: Arc<Target>) -> Self {
        target.open.fetch_add(1, Ordering::AcqRel);
        Self(target)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a pick found.
pub(super) enum Pick {
    Picked(Arc<Target>),
    /// Every endpoint not excluded is backing off; the first back-off ends then.
    BackingOff(Option<Instant>),
    /// No endpoint that is not excluded.
    Empty,
}

impl Endpoints {
    /// Power of two choices over open connections per weight, among the endpoints not
    /// tried and not in back-off.
    pub(super) fn pick(
        &self,
        tried: &[SocketAddr],
        now: Instant,
        rng: &Mutex<fastrand::Rng>,
    ) -> Pick {
        let set = self.set.load();
        let candidates = |t: &Target| !tried.contains(&t.addr);
        if !set.iter().any(|t| candidates(t)) {
            return Pick::Empty;
        }
        let picked = {
            // A pick holds the lock for two samples; a panic cannot leave the generator
            // inconsistent.
            let mut rng = rng.lock().unwrap_or_else(|p| p.into_inner());
            pick_by(set.len(), &mut rng, |i| {
                let t = set.get(i)?;
                (candidates(t) && t.state.is_ready(now))
                    .then(|| (t.open.load(Ordering::Acquire) as f64 + 1.0) / t.weight)
            })
        };
        match picked.and_then(|(i, _)| set.get(i)) {
            Some(target) => Pick::Picked(target.clone()),
            None => Pick::BackingOff(
                set.iter()
                    .filter(|t| candidates(t))
                    .filter_map(|t| t.state.backoff_until(now))
                    .min(),
            ),
        }
    }
}
