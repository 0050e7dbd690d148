use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Request;
use mesh_core::discover::BoxDiscover;
use mesh_core::error::BoxError;
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use super::error::{NoEndpoints, NoReadyEndpoints, NotReady};
use super::pool::{self, Live, MakeEndpoint, Pool, Slot};
use super::{Picked, ResponseFuture, ZonePreference, pick_detailed, recorded, weighted};
use crate::decision::{PickPath, Recorder};
use crate::load::Load;
use crate::retry::error::NoElsewhere;
use crate::retry::{Elsewhere, Retried};

/// How long `poll_ready` waits for a ready endpoint before failing (Linkerd's): 3 s.
pub const DEFAULT_FAIL_FAST: Duration = Duration::from_secs(3);

/// Picks before the balancer falls back to polling every endpoint.
const PICKS: usize = 3;

/// The endpoints of one request's latest tries that its retries avoid.
const TRIED: usize = 4;

/// Configures a [`Balance`].
///
/// # Defaults
/// Service name `default` (for errors and logs), no local zone, zone preference on with a
/// band of 1.5 (it applies only when a local zone is set), fail-fast after 3 s, an
/// unseeded random source, no decision record.
#[derive(Clone, Debug)]
pub struct BalanceBuilder {
    service: Arc<str>,
    local_zone: Option<String>,
    zone: ZonePreference,
    fail_fast: Duration,
    seed: Option<u64>,
    decisions: Option<Recorder>,
}

impl Default for BalanceBuilder {
    fn default() -> Self {
        Self {
            service: Arc::from("default"),
            local_zone: None,
            zone: ZonePreference::default(),
            fail_fast: DEFAULT_FAIL_FAST,
            seed: None,
            decisions: None,
        }
    }
}

impl BalanceBuilder {
    /// The service's name, for errors and logs.
    pub fn service_name(mut self, name: impl AsRef<str>) -> Self {
        self.service = Arc::from(name.as_ref());
        self
    }

    /// This workload's zone and the zone preference.
    pub fn zone(mut self, local_zone: Option<String>, preference: ZonePreference) -> Self {
        self.local_zone = local_zone;
        self.zone = preference;
        self
    }

    /// How long `poll_ready` waits for a ready endpoint before failing.
    pub fn fail_fast(mut self, timeout: Duration) -> Self {
        self.fail_fast = timeout;
        self
    }

    /// Seeds the random source: the `n`th clone of the balancer picks with seed
    /// `seed + n`, so runs that clone and call in the same order pick the same endpoints.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Records every pick in `recorder`'s [decision record](crate::decision): both
    /// candidates with their costs and tiers, and the winner (default: none).
    pub fn decisions(mut self, recorder: Recorder) -> Self {
        self.decisions = Some(recorder);
        self
    }

    /// [`decisions`](Self::decisions), when `recorder` is set.
    pub(crate) fn maybe_decisions(mut self, recorder: Option<Recorder>) -> Self {
        self.decisions = recorder;
        self
    }

    /// Starts following `discovery`, making each endpoint's service with `factory`.
    /// Must be called within a Tokio runtime.
    pub fn build<S>(self, discovery: BoxDiscover, factory: impl MakeEndpoint<S>) -> Balance<S>
    where
        S: Clone + Send + Sync + 'static,
    {
        let enabled = self.zone.enabled && self.local_zone.is_some();
        let (live, updates) = pool::spawn(discovery, self.local_zone, factory);
        let shared = Arc::new(Shared {
            live,
            updates,
            service: self.service,
            zone: ZonePreference {
                enabled,
                load_band: self.zone.load_band.max(1.0),
            },
            fail_fast: self.fail_fast,
            seed: self.seed,
            clones: AtomicU64::new(0),
            decisions: self.decisions,
            reasons: OnceLock::new(),
        });
        Balance::from_shared(shared)
    }
}

struct Shared<S> {
    live: Arc<Live<S>>,
    updates: watch::Receiver<u64>,
    service: Arc<str>,
    zone: ZonePreference,
    fail_fast: Duration,
    seed: Option<u64>,
    clones: AtomicU64,
    decisions: Option<Recorder>,
    /// Says why an endpoint's service is not ready, for [`NoReadyEndpoints`].
    reasons: OnceLock<Reasons<S>>,
}

/// Why an endpoint's service is not ready at an instant, if it can tell.
type Reasons<S> = Box<dyn Fn(&S, Instant) -> Option<String> + Send + Sync>;

/// Waiting for an endpoint to become ready.
struct Waiting<S> {
    deadline: Pin<Box<Sleep>>,
    started: Instant,
    /// Resolves to whether discovery changed (`false`: it is over).
    changes: Option<Pin<Box<dyn Future<Output = bool> + Send + Sync>>>,
    discovery_over: bool,
    /// Endpoints polled and not ready: kept so that they wake this balancer.
    pending: Vec<S>,
}

/// A power-of-two-choices balancer over a discovered set of endpoint services; see the
/// [module docs](super). Cheap to clone: clones share the endpoints.
pub struct Balance<S> {
    shared: Arc<Shared<S>>,
    rng: fastrand::Rng,
    /// The endpoint `poll_ready` picked, for the next `call`, with its slot's identity.
    picked: Option<(S, usize)>,
    /// The slots this request's tries went to (0: none), which its retries avoid.
    tried: [usize; TRIED],
    // Boxed: the slow path's state, kept out of the way of the common one.
    waiting: Option<Box<Waiting<S>>>,
}

impl<S> Clone for Balance<S> {
    fn clone(&self) -> Self {
        Self::from_shared(self.shared.clone())
    }
}

impl<S> fmt::Debug for Balance<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balance")
            .field("service", &self.shared.service)
            .field("pool", &*self.shared.live.current.load())
            .finish_non_exhaustive()
    }
}

impl Balance<()> {
    /// Configures a balancer; see [`BalanceBuilder`].
    pub fn builder() -> BalanceBuilder {
        BalanceBuilder::default()
    }
}

impl<S> Balance<S> {
    /// Tells the balancer how to ask an endpoint's service why it is not ready, so that a
    /// [`NoReadyEndpoints`] lists each endpoint's reason (the first
    /// [`MAX_CAUSES`](super::error::MAX_CAUSES)). Takes effect for every clone; only the
    /// first call counts. Asked only when the balancer gives up, never per request.
    pub fn with_unready_reasons(
        self,
        reasons: impl Fn(&S, Instant) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        let _ = self.shared.reasons.set(Box::new(reasons));
        self
    }

    fn from_shared(shared: Arc<Shared<S>>) -> Self {
        let rng = match shared.seed {
            Some(seed) => fastrand::Rng::with_seed(
                seed.wrapping_add(shared.clones.fetch_add(1, Ordering::Relaxed)),
            ),
            None => fastrand::Rng::new(),
        };
        Self {
            shared,
            rng,
            picked: None,
            tried: [0; TRIED],
            waiting: None,
        }
    }

    /// The current endpoints, for inspection (dashboards, tests).
    pub fn endpoints(&self) -> Vec<Arc<Slot<S>>> {
        self.shared.live.current.load().endpoints.clone()
    }

    /// The current snapshot.
    pub fn pool(&self) -> Arc<Pool<S>> {
        self.shared.live.current.load_full()
    }

    /// Waits until discovery has given at least one endpoint: `true` then, `false` if
    /// discovery ended without any. Not bounded: wrap it in a timeout. (A client rebuilt
    /// at a reload waits for this before it replaces one that had endpoints.)
    pub async fn discovered(&self) -> bool {
        let mut updates = self.shared.updates.clone();
        loop {
            updates.mark_unchanged();
            if !self.shared.live.current.load().endpoints.is_empty() {
                return true;
            }
            if self.shared.live.ended.load(Ordering::Acquire) || updates.changed().await.is_err() {
                return !self.shared.live.current.load().endpoints.is_empty();
            }
        }
    }

    /// Records a pick, when a decision record is set (one branch otherwise).
    #[inline]
    fn record(&self, pool: &Pool<S>, picked: &Picked, path: PickPath, passed_over: usize) {
        if let Some(recorder) = &self.shared.decisions
            && recorder.is_enabled()
        {
            let passed_over = u32::try_from(passed_over).unwrap_or(u32::MAX);
            recorder.record(recorded(pool, picked, path, passed_over));
        }
    }
}

impl<S> Balance<S>
where
    S: Load + Clone,
{
    /// The fast path: pick by cost, then ask the winner; pass over winners that are not
    /// ready.
    fn try_pick<B>(&mut self, pool: &Pool<S>, cx: &mut Context<'_>) -> Option<(S, usize)>
    where
        S: Service<Request<B>>,
        S::Error: Into<BoxError>,
    {
        let mut skip = [usize::MAX; PICKS];
        for round in 0..PICKS {
            let picked = pick_detailed(pool, self.shared.zone, &skip[..round], &mut self.rng)?;
            let i = picked.winner.0;
            let mut service = pool.endpoints[i].service.clone();
            match service.poll_ready(cx) {
                Poll::Ready(Ok(())) => {
                    self.record(pool, &picked, PickPath::P2c, round);
                    return Some((service, id(&pool.endpoints[i])));
                }
                Poll::Ready(Err(e)) => {
                    let error: BoxError = e.into();
                    tracing::debug!(%error, endpoint = %pool.endpoints[i].endpoint.key(), "endpoint failed readiness");
                }
                Poll::Pending => {}
            }
            skip[round] = i;
        }
        None
    }

    /// The slow path: poll every endpoint, so each wakes us when ready; take the cheapest
    /// ready one, or wait.
    fn poll_all<B>(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>>
    where
        S: Service<Request<B>>,
        S::Error: Into<BoxError>,
    {
        loop {
            let pool = self.shared.live.current.load_full();
            let shared = &self.shared;
            let waiting = self.waiting.get_or_insert_with(|| {
                Box::new(Waiting {
                    deadline: Box::pin(tokio::time::sleep(shared.fail_fast)),
                    started: Instant::now(),
                    changes: None,
                    discovery_over: false,
                    pending: Vec::new(),
                })
            });
            let now = Instant::now();
            waiting.pending.clear();
            let mut best: Option<((usize, crate::load::Cost), (S, usize))> = None;
            for (index, slot) in pool.endpoints.iter().enumerate() {
                let mut service = slot.service.clone();
                match service.poll_ready(cx) {
                    Poll::Ready(Ok(())) => {
                        let cost = weighted(slot, now);
                        if best.as_ref().is_none_or(|((_, c), _)| cost < *c) {
                            best = Some(((index, cost), (service, id(slot))));
                        }
                    }
                    Poll::Ready(Err(e)) => {
                        let error: BoxError = e.into();
                        tracing::debug!(%error, endpoint = %slot.endpoint.key(), "endpoint failed readiness");
                    }
                    Poll::Pending => waiting.pending.push(service),
                }
            }
            if let Some((winner, picked)) = best {
                let scan = Picked {
                    winner,
                    other: None,
                    zone: None,
                };
                self.record(&pool, &scan, PickPath::Scan, 0);
                self.picked = Some(picked);
                self.waiting = None;
                return Poll::Ready(Ok(()));
            }
            if pool.endpoints.is_empty() && shared.live.ended.load(Ordering::Acquire) {
                // Discovery stores its last endpoints before it sets `ended`: the pool read
                // afresh is final, where the one read above may predate them (discovery
                // ended meanwhile, on another thread). Seen in a full test run.
                if shared.live.current.load().endpoints.is_empty() {
                    self.waiting = None;
                    return Poll::Ready(Err(NoEndpoints {
                        service: shared.service.clone(),
                    }
                    .into()));
                }
                continue;
            }
            // Woken by discovery too: a new endpoint may be ready.
            if !waiting.discovery_over {
                let changes = waiting.changes.get_or_insert_with(|| {
                    let mut updates = shared.updates.clone();
                    updates.mark_unchanged();
                    Box::pin(async move { updates.changed().await.is_ok() })
                });
                if let Poll::Ready(changed) = changes.as_mut().poll(cx) {
                    waiting.changes = None;
                    waiting.discovery_over = !changed;
                    continue;
                }
            }
            if waiting.deadline.as_mut().poll(cx).is_ready() {
                let waited = now.saturating_duration_since(waiting.started);
                self.waiting = None;
                let error: BoxError = if pool.endpoints.is_empty() {
                    NoEndpoints {
                        service: shared.service.clone(),
                    }
                    .into()
                } else {
                    NoReadyEndpoints {
                        service: shared.service.clone(),
                        endpoints: pool.endpoints.len(),
                        waited,
                        causes: causes(shared, &pool.endpoints, now),
                    }
                    .into()
                };
                return Poll::Ready(Err(error));
            }
            return Poll::Pending;
        }
    }
}

/// Each endpoint's reason for not being ready, as far as the service can tell: the first
/// [`MAX_CAUSES`](super::error::MAX_CAUSES), then how many more there are.
fn causes<S>(shared: &Shared<S>, endpoints: &[Arc<Slot<S>>], now: Instant) -> Vec<String> {
    let Some(reasons) = shared.reasons.get() else {
        return Vec::new();
    };
    super::error::capped(endpoints.iter().filter_map(|slot| {
        reasons(&slot.service, now).map(|reason| format!("{}: {reason}", slot.endpoint.key()))
    }))
}

/// A slot's identity while it lives.
fn id<S>(slot: &Arc<Slot<S>>) -> usize {
    Arc::as_ptr(slot) as usize
}

fn is_preferred(cost: &crate::load::Cost) -> bool {
    !cost.penalized && !cost.unready
}

impl<S> Balance<S>
where
    S: Load + Clone,
{
    /// Picks again for a retry, passing over the last try's endpoint (and, for
    /// `elsewhere`, every penalized one), taking only an endpoint ready right now.
    fn repick<B>(&mut self, elsewhere: bool) -> Option<(S, usize)>
    where
        S: Service<Request<B>>,
    {
        let pool = self.shared.live.current.load();
        let mut skip = [usize::MAX; TRIED + PICKS];
        let mut n = 0;
        for (i, slot) in pool.endpoints.iter().enumerate() {
            if n < TRIED && self.tried.contains(&id(slot)) {
                skip[n] = i;
                n += 1;
            }
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let now = Instant::now();
        for round in 0..PICKS {
            let picked = pick_detailed(&pool, self.shared.zone, &skip[..n + round], &mut self.rng)?;
            let i = picked.winner.0;
            let slot = &pool.endpoints[i];
            if elsewhere && !is_preferred(&weighted(slot, now)) {
                // The pick prefers unpenalized endpoints: this means there is none.
                return None;
            }
            let mut service = slot.service.clone();
            if let Poll::Ready(Ok(())) = service.poll_ready(&mut cx) {
                self.record(&pool, &picked, PickPath::Repick, round);
                return Some((service, id(slot)));
            }
            skip[n + round] = i;
        }
        None
    }
}

impl<S, B, RB> Service<Request<B>> for Balance<S>
where
    S: Service<Request<B>, Response = http::Response<RB>> + Load + Clone,
    S::Error: Into<BoxError>,
{
    type Response = http::Response<RB>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.picked.is_some() {
            return Poll::Ready(Ok(()));
        }
        let pool = self.shared.live.current.load();
        if let Some(picked) = self.try_pick(&pool, cx) {
            self.picked = Some(picked);
            self.waiting = None;
            return Poll::Ready(Ok(()));
        }
        drop(pool);
        self.poll_all(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let Some((mut service, mut slot)) = self.picked.take() else {
            return ResponseFuture::failed(NotReady.into());
        };
        let elsewhere = req.extensions().get::<Elsewhere>().is_some();
        if elsewhere || req.extensions().get::<Retried>().is_some() {
            // A retry goes to an endpoint none of the request's tries went to when one is
            // ready; the retry of a rate-limited answer, only to one that is not rate
            // limiting.
            let unfit = self.tried.contains(&slot)
                || elsewhere && !is_preferred(&service.load(Instant::now()));
            if unfit {
                match self.repick(elsewhere) {
                    Some((other, other_slot)) => (service, slot) = (other, other_slot),
                    None if elsewhere => return ResponseFuture::failed(NoElsewhere.into()),
                    None => {}
                }
            }
            self.tried.rotate_right(1);
            self.tried[0] = slot;
        } else {
            // A first try: a new request.
            self.tried = [0; TRIED];
            self.tried[0] = slot;
        }
        ResponseFuture::new(service.call(req))
    }
}
