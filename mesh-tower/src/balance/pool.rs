//! The balancer's view of a service: endpoints from discovery, each with its connection,
//! load and breaker, published as an immutable snapshot.
//!
//! A background task consumes the discovery stream. After each batch of changes (every
//! change already available), it builds a new [`Pool`] and swaps it in atomically. A
//! request reads the current snapshot with one atomic load: no lock is shared between
//! requests, and churn never blocks them. A removed endpoint leaves the snapshot at once,
//! but the requests already sent to it hold their own reference and finish (drain)
//! normally; its connections close when the last one is done.
//!
//! An `Insert` for an address already present keeps the endpoint's connections, load and
//! breaker when only its zone, weight or metadata changed, and starts afresh when its
//! expected identity changed (a new identity needs a new TLS configuration).

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use futures_util::StreamExt;
use mesh_core::discover::{BoxDiscover, Change};
use mesh_core::{Endpoint, EndpointKey};
use tokio::sync::watch;

use super::load::EndpointLoad;
use crate::breaker::Breaker;
use crate::connect::EndpointClient;

/// One endpoint as the balancer sees it.
pub struct Slot<B> {
    /// What discovery said about it.
    pub endpoint: Endpoint,
    /// Its connections.
    pub client: EndpointClient<B>,
    /// Its load.
    pub load: EndpointLoad,
    /// Its circuit breaker, when breaking is on.
    pub breaker: Option<Breaker>,
    /// Its address as a shared string, for metric labels.
    pub label: Arc<str>,
    /// Its pre-made metric handles, when metrics are on.
    pub metrics: Option<crate::metrics::EndpointMetrics>,
}

/// The per-endpoint parts a [`SlotFactory`] makes.
#[derive(Debug)]
pub struct SlotParts<B> {
    /// The endpoint's connections.
    pub client: EndpointClient<B>,
    /// Its load.
    pub load: EndpointLoad,
    /// Its circuit breaker, when breaking is on.
    pub breaker: Option<Breaker>,
    /// Its address as a shared string, for metric labels.
    pub label: Arc<str>,
    /// Its pre-made metric handles, when metrics are on.
    pub metrics: Option<crate::metrics::EndpointMetrics>,
}

impl<B> fmt::Debug for Slot<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slot")
            .field("endpoint", &self.endpoint)
            .field("in_flight", &self.load.in_flight())
            .finish_non_exhaustive()
    }
}

/// A snapshot of a service's endpoints.
pub struct Pool<B> {
    /// The endpoints, in no particular order.
    pub endpoints: Vec<Arc<Slot<B>>>,
    /// Indices of endpoints in the local zone.
    pub local: Vec<usize>,
    /// Indices of endpoints in other (or unknown) zones.
    pub remote: Vec<usize>,
    /// Every index, `0..endpoints.len()`.
    pub all: Vec<usize>,
}

impl<B> Default for Pool<B> {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            local: Vec::new(),
            remote: Vec::new(),
            all: Vec::new(),
        }
    }
}

impl<B> fmt::Debug for Pool<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("endpoints", &self.endpoints.len())
            .field("local", &self.local.len())
            .finish()
    }
}

/// Builds the per-endpoint parts for a newly discovered endpoint, or `None` to leave it
/// out (logged by the factory).
pub trait SlotFactory<B>: Send + 'static {
    /// The parts for `endpoint`.
    fn make(&mut self, endpoint: &Endpoint) -> Option<SlotParts<B>>;
}

impl<B, F> SlotFactory<B> for F
where
    F: FnMut(&Endpoint) -> Option<SlotParts<B>> + Send + 'static,
{
    fn make(&mut self, endpoint: &Endpoint) -> Option<SlotParts<B>> {
        self(endpoint)
    }
}

/// The live pool of one service, kept current by a discovery task.
pub struct PoolHandle<B> {
    current: Arc<ArcSwap<Pool<B>>>,
    updates: watch::Receiver<u64>,
}

impl<B> Clone for PoolHandle<B> {
    fn clone(&self) -> Self {
        Self {
            current: self.current.clone(),
            updates: self.updates.clone(),
        }
    }
}

impl<B> fmt::Debug for PoolHandle<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolHandle")
            .field("pool", &*self.current.load())
            .finish()
    }
}

impl<B: Send + 'static> PoolHandle<B> {
    /// Starts following `discovery`, with `local_zone` for zone preference.
    pub fn spawn(
        discovery: BoxDiscover,
        local_zone: Option<String>,
        factory: impl SlotFactory<B>,
    ) -> Self {
        let current = Arc::new(ArcSwap::from_pointee(Pool::default()));
        let (tx, updates) = watch::channel(0);
        tokio::spawn(follow(discovery, local_zone, factory, current.clone(), tx));
        Self { current, updates }
    }

    /// The current snapshot.
    pub fn load(&self) -> Arc<Pool<B>> {
        self.current.load_full()
    }

    /// Waits until the pool has at least one endpoint (or discovery ended with none).
    pub async fn ready(&self) -> Arc<Pool<B>> {
        let pool = self.load();
        if !pool.endpoints.is_empty() {
            return pool;
        }
        let mut updates = self.updates.clone();
        loop {
            let pool = self.load();
            if !pool.endpoints.is_empty() {
                return pool;
            }
            if updates.changed().await.is_err() {
                return self.load();
            }
        }
    }
}

async fn follow<B: Send + 'static>(
    mut discovery: BoxDiscover,
    local_zone: Option<String>,
    mut factory: impl SlotFactory<B>,
    current: Arc<ArcSwap<Pool<B>>>,
    tx: watch::Sender<u64>,
) {
    let mut slots: HashMap<EndpointKey, Arc<Slot<B>>> = HashMap::new();
    loop {
        // Wait for one change, then take every change already available as one batch.
        let first = tokio::select! {
            next = discovery.next() => next,
            // Every handle is gone: nobody reads the pool any more.
            () = tx.closed() => return,
        };
        let Some(first) = first else {
            tracing::debug!("discovery ended; keeping the last endpoints");
            return;
        };
        let mut batch = vec![first];
        while let Some(Some(more)) = futures_util::FutureExt::now_or_never(discovery.next()) {
            batch.push(more);
        }
        for change in batch {
            match change {
                Ok(Change::Insert(key, endpoint)) => {
                    let slot = match slots.get(&key) {
                        Some(old) if old.endpoint.identity() == endpoint.identity() => Slot {
                            endpoint,
                            client: old.client.clone(),
                            load: old.load.clone(),
                            breaker: old.breaker.clone(),
                            label: old.label.clone(),
                            metrics: old.metrics.clone(),
                        },
                        _ => match factory.make(&endpoint) {
                            Some(parts) => Slot {
                                endpoint,
                                client: parts.client,
                                load: parts.load,
                                breaker: parts.breaker,
                                label: parts.label,
                                metrics: parts.metrics,
                            },
                            None => {
                                slots.remove(&key);
                                continue;
                            }
                        },
                    };
                    tracing::debug!(%key, "endpoint added");
                    slots.insert(key, Arc::new(slot));
                }
                Ok(Change::Remove(key)) => {
                    tracing::debug!(%key, "endpoint removed");
                    slots.remove(&key);
                }
                Err(error) => tracing::warn!(%error, "discovery error"),
            }
        }
        let mut pool = Pool::default();
        for slot in slots.values() {
            let i = pool.endpoints.len();
            let local = local_zone.is_some() && slot.endpoint.zone() == local_zone.as_deref();
            if local {
                pool.local.push(i);
            } else {
                pool.remote.push(i);
            }
            pool.endpoints.push(slot.clone());
            pool.all.push(i);
        }
        current.store(Arc::new(pool));
        tx.send_modify(|n| *n += 1);
    }
}
