//! The balancer's view of a service: endpoints from discovery, each with its service,
//! published as an immutable snapshot.
//!
//! A background task consumes the discovery stream. After each batch of changes (every
//! change already available), it builds a new [`Pool`] and swaps it in atomically. A
//! request reads the current snapshot with one atomic load: no lock is shared between
//! requests, and churn never blocks them. A removed endpoint leaves the snapshot at once,
//! but the requests already sent to it hold their own clone of its service and finish
//! (drain) normally; its connections close when the last one is done.
//!
//! An `Insert` for an address already present keeps the endpoint's service (connections,
//! load, breaker) when only its zone, weight or metadata changed, and makes a new one when
//! its expected identity changed (a new identity needs a new TLS configuration).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;
use futures_util::StreamExt;
use mesh_core::discover::{BoxDiscover, Change};
use mesh_core::{Endpoint, EndpointKey};
use tokio::sync::watch;

/// One endpoint as the balancer sees it.
pub struct Slot<S> {
    /// What discovery said about it.
    pub endpoint: Endpoint,
    /// Its service (its stack: breaker, load, connection, …).
    pub service: S,
}

impl<S> fmt::Debug for Slot<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slot")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

/// A snapshot of a service's endpoints.
pub struct Pool<S> {
    /// The endpoints, in no particular order.
    pub endpoints: Vec<Arc<Slot<S>>>,
    /// Indices of endpoints in the local zone.
    pub local: Vec<usize>,
    /// Indices of endpoints in other (or unknown) zones.
    pub remote: Vec<usize>,
    /// Every index, `0..endpoints.len()`.
    pub all: Vec<usize>,
}

impl<S> Default for Pool<S> {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            local: Vec::new(),
            remote: Vec::new(),
            all: Vec::new(),
        }
    }
}

impl<S> fmt::Debug for Pool<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("endpoints", &self.endpoints.len())
            .field("local", &self.local.len())
            .finish()
    }
}

impl<S> Pool<S> {
    /// A pool of `slots`, split by `local_zone`.
    pub fn new(slots: impl IntoIterator<Item = Arc<Slot<S>>>, local_zone: Option<&str>) -> Self {
        let mut pool = Pool::default();
        for slot in slots {
            let i = pool.endpoints.len();
            if local_zone.is_some() && slot.endpoint.zone() == local_zone {
                pool.local.push(i);
            } else {
                pool.remote.push(i);
            }
            pool.endpoints.push(slot);
            pool.all.push(i);
        }
        pool
    }
}

/// Makes the service of a newly discovered endpoint, or `None` to leave it out (logged by
/// the factory). Any `FnMut(&Endpoint) -> Option<S>` is one.
pub trait MakeEndpoint<S>: Send + 'static {
    /// The service for `endpoint`.
    fn make(&mut self, endpoint: &Endpoint) -> Option<S>;
}

impl<S, F> MakeEndpoint<S> for F
where
    F: FnMut(&Endpoint) -> Option<S> + Send + 'static,
{
    fn make(&mut self, endpoint: &Endpoint) -> Option<S> {
        self(endpoint)
    }
}

/// What the discovery task shares with the balancers.
pub(super) struct Live<S> {
    pub(super) current: ArcSwap<Pool<S>>,
    pub(super) ended: AtomicBool,
}

/// Starts the task that follows `discovery`.
pub(super) fn spawn<S: Send + Sync + Clone + 'static>(
    discovery: BoxDiscover,
    local_zone: Option<String>,
    factory: impl MakeEndpoint<S>,
) -> (Arc<Live<S>>, watch::Receiver<u64>) {
    let live = Arc::new(Live {
        current: ArcSwap::from_pointee(Pool::default()),
        ended: AtomicBool::new(false),
    });
    let (tx, rx) = watch::channel(0);
    tokio::spawn(follow(discovery, local_zone, factory, live.clone(), tx));
    (live, rx)
}

async fn follow<S: Clone>(
    mut discovery: BoxDiscover,
    local_zone: Option<String>,
    mut factory: impl MakeEndpoint<S>,
    live: Arc<Live<S>>,
    tx: watch::Sender<u64>,
) {
    // Ordered by address, so that the pool's order (which the seeded picks index) does
    // not depend on a hasher's random keys: a seeded run replays exactly.
    let mut slots: BTreeMap<EndpointKey, Arc<Slot<S>>> = BTreeMap::new();
    loop {
        // Wait for one change, then take every change already available as one batch.
        let first = tokio::select! {
            biased;
            next = discovery.next() => next,
            // Every balancer is gone: nobody reads the pool any more.
            () = tx.closed() => return,
        };
        let Some(first) = first else {
            tracing::debug!("discovery ended; keeping the last endpoints");
            live.ended.store(true, Ordering::Release);
            tx.send_modify(|n| *n += 1);
            return;
        };
        let mut batch = vec![first];
        while let Some(Some(more)) = futures_util::FutureExt::now_or_never(discovery.next()) {
            batch.push(more);
        }
        for change in batch {
            match change {
                Ok(Change::Insert(key, endpoint)) => {
                    let service = match slots.get(&key) {
                        Some(old) if old.endpoint.identity() == endpoint.identity() => {
                            old.service.clone()
                        }
                        _ => match factory.make(&endpoint) {
                            Some(service) => service,
                            None => {
                                slots.remove(&key);
                                continue;
                            }
                        },
                    };
                    tracing::debug!(%key, "endpoint added");
                    slots.insert(key, Arc::new(Slot { endpoint, service }));
                }
                Ok(Change::Remove(key)) => {
                    tracing::debug!(%key, "endpoint removed");
                    slots.remove(&key);
                }
                Err(error) => tracing::warn!(%error, "discovery error"),
            }
        }
        let pool = Pool::new(slots.values().cloned(), local_zone.as_deref());
        live.current.store(Arc::new(pool));
        tx.send_modify(|n| *n += 1);
    }
}
