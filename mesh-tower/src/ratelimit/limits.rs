//! The compiled limits: GCRA limiters from `governor` on Tokio's clock.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::{Quota, RateLimiter};
use mesh_core::config::{Rate, RateLimitConfig};
use mesh_core::identity::{IdentityPattern, SpiffeId};
use mesh_spiffe::PeerIdentity;
use tokio::time::Instant;

/// Per-client states kept at most (the table is counted every 64 checks, so it may
/// overshoot by that many); while it is full, clients share one overflow state until
/// idle ones are evicted.
pub const DEFAULT_MAX_CLIENTS: usize = 10_000;

/// Checks between sweeps of idle client states.
const SWEEP_EVERY: u64 = 4096;

/// Checks between counts of the client states.
const COUNT_EVERY: u64 = 64;

/// Tokio's clock for `governor`, so that paused time drives the limiters too.
#[derive(Clone, Debug)]
pub(super) struct TokioClock {
    base: Instant,
}

impl Clock for TokioClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        Nanos::from(crate::nanos(
            Instant::now().saturating_duration_since(self.base),
        ))
    }
}

type Keyed = RateLimiter<
    Key,
    governor::state::keyed::DefaultKeyedStateStore<Key>,
    TokioClock,
    NoOpMiddleware<Nanos>,
>;

/// A client's key: its identity, one for every unauthenticated caller together, and one
/// shared key for the clients beyond the cap.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) enum Key {
    /// A verified peer: one reference count to make, where an identity's string would
    /// be copied.
    Peer(PeerIdentity),
    #[cfg(test)]
    Id(SpiffeId),
    Unauthenticated,
    Overflow,
}

/// One limit, and how it is advertised.
#[derive(Debug)]
pub(super) struct Limit {
    /// Its `RateLimit-Policy` identifier.
    pub(super) id: &'static str,
    pub(super) quota: u32,
    pub(super) window_secs: u64,
}

impl Limit {
    fn of(id: &'static str, rate: &Rate) -> Self {
        Self {
            id,
            quota: rate.requests,
            window_secs: rate.per.as_secs_f64().ceil().max(1.0) as u64,
        }
    }
}

struct PerClient {
    limiter: Keyed,
    limit: Limit,
    clients: Vec<IdentityPattern>,
    /// The table held `max_clients` states when last counted.
    full: std::sync::atomic::AtomicBool,
}

/// The total limit: one GCRA state (its theoretical arrival time, in nanoseconds on the
/// limiter's clock), in an atomic. `governor` cannot tell whether it would admit a
/// request without spending a cell; this one can, so that a request the client's own
/// limit refuses spends nothing of the total.
#[derive(Debug)]
struct Total {
    tat: AtomicU64,
    /// `per / requests`.
    interval: u64,
    /// `interval × (burst − 1)`: how far ahead of now the arrival time may run.
    tolerance: u64,
}

impl Total {
    fn new(rate: &Rate) -> Self {
        let interval = crate::nanos(rate.per / rate.requests.max(1)).max(1);
        Self {
            tat: AtomicU64::new(0),
            interval,
            // A burst past what the arithmetic holds is cut to a quarter of the range (as
            // `quota` cuts governor's), not saturated, which would admit without bound.
            tolerance: interval
                .saturating_mul(u64::from(rate.burst().max(1) - 1).min(u64::MAX / 4 / interval)),
        }
    }

    /// The state after admitting one request at `now`, or how long until one would be.
    fn next(&self, tat: u64, now: u64) -> Result<u64, Duration> {
        let tat = tat.max(now);
        if tat - now <= self.tolerance {
            Ok(tat.saturating_add(self.interval))
        } else {
            Err(Duration::from_nanos(tat - now - self.tolerance))
        }
    }

    fn peek(&self, now: u64) -> Result<(), Duration> {
        self.next(self.tat.load(Ordering::Acquire), now).map(|_| ())
    }

    fn take(&self, now: u64) -> Result<(), Duration> {
        let mut tat = self.tat.load(Ordering::Acquire);
        loop {
            let next = self.next(tat, now)?;
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(()),
                Err(current) => tat = current,
            }
        }
    }
}

/// A refusal by [`Limits::admit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Refused {
    /// The limit that refused: `"client"` (the client's own) or `"total"`.
    pub limit: &'static str,
    /// How long until that limit would admit one more.
    pub wait: Duration,
}

/// A refusal: which limit, and when the limiter would admit the request.
#[derive(Debug)]
pub(super) struct Refusal<'a> {
    pub(super) limit: &'a Limit,
    pub(super) wait: Duration,
}

/// The limits of one [`RateLimitConfig`]; see the [module docs](super).
pub struct Limits {
    clock: TokioClock,
    total: Option<(Total, Limit)>,
    /// Overrides first (first match wins), then the general per-client limit.
    per_client: Vec<PerClient>,
    max_clients: usize,
    checks: AtomicU64,
    /// When the last sweep ran, in nanoseconds on `clock`.
    last_sweep: AtomicU64,
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits")
            .field("total", &self.total.as_ref().map(|(_, l)| l))
            .field(
                "per_client",
                &self.per_client.iter().map(|p| &p.limit).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

fn quota(rate: &Rate) -> Quota {
    let requests = NonZeroU32::new(rate.requests).unwrap_or(NonZeroU32::MIN);
    // One request per `per / requests`, at most `burst` at once.
    let interval = (rate.per / requests.get()).max(Duration::from_nanos(1));
    // governor holds a burst as `interval × (burst − 1)` nanoseconds: a burst that
    // would overflow it (configuration refuses one taking over 10 years to earn) is cut to
    // what fits, a quarter of the range, leaving room for the clock.
    let fits = u32::try_from(u64::MAX / 4 / crate::nanos(interval).max(1)).unwrap_or(u32::MAX);
    let burst = NonZeroU32::new(rate.burst().min(fits)).unwrap_or(NonZeroU32::MIN);
    Quota::with_period(interval)
        .unwrap_or_else(|| Quota::per_second(requests))
        .allow_burst(burst)
}

impl Limits {
    /// Compiles `config` (validated: every rate has at least one request and a positive
    /// period; a zero is taken as one).
    pub fn new(config: &RateLimitConfig) -> Self {
        let clock = TokioClock {
            base: Instant::now(),
        };
        let keyed = |rate: &Rate| RateLimiter::new(quota(rate), Default::default(), clock.clone());
        let mut per_client: Vec<PerClient> = config
            .overrides
            .iter()
            .map(|o| PerClient {
                limiter: keyed(&o.limit),
                limit: Limit::of("client", &o.limit),
                clients: o.clients.clone(),
                full: Default::default(),
            })
            .collect();
        if let Some(rate) = &config.per_client {
            per_client.push(PerClient {
                limiter: keyed(rate),
                limit: Limit::of("client", rate),
                clients: vec![IdentityPattern::Any],
                full: Default::default(),
            });
        }
        Self {
            total: config
                .total
                .as_ref()
                .map(|rate| (Total::new(rate), Limit::of("total", rate))),
            per_client,
            clock,
            max_clients: DEFAULT_MAX_CLIENTS,
            checks: AtomicU64::new(0),
            last_sweep: AtomicU64::new(0),
        }
    }

    /// Caps the per-client states kept (default 10,000).
    pub fn with_max_clients(mut self, max: usize) -> Self {
        self.max_clients = max.max(1);
        self
    }

    /// `check_peer` by identity, for tests.
    #[cfg(test)]
    pub(super) fn check(&self, client: Option<&SpiffeId>) -> Result<(), Refusal<'_>> {
        self.check_with(client, || {
            client.map_or(Key::Unauthenticated, |id| Key::Id(id.clone()))
        })
    }

    /// Whether one more request (or connection) of `peer` (`None`: unauthenticated) is
    /// admitted now, spending its cells when it is: what [`RateLimit`](super::RateLimit)
    /// asks for each request, and an opaque listener for each connection. A refusal says
    /// which limit refused (`"client"` or `"total"`) and how long until it would admit.
    pub fn admit(&self, peer: Option<&PeerIdentity>) -> Result<(), Refused> {
        self.check_peer(peer).map_err(|r| Refused {
            limit: r.limit.id,
            wait: r.wait,
        })
    }

    /// Whether a request of `peer` (`None`: unauthenticated) is admitted now. A request
    /// either limit refuses spends nothing of the other: the total is looked at first
    /// without spending, then the client's own limit spends, then the total.
    pub(super) fn check_peer(&self, peer: Option<&PeerIdentity>) -> Result<(), Refusal<'_>> {
        self.check_with(peer.map(PeerIdentity::id), || {
            peer.map_or(Key::Unauthenticated, |p| Key::Peer(p.clone()))
        })
    }

    fn check_with(
        &self,
        client: Option<&SpiffeId>,
        key: impl FnOnce() -> Key,
    ) -> Result<(), Refusal<'_>> {
        if self.total.is_none() && self.per_client.is_empty() {
            return Ok(());
        }
        let now = self.clock.now().as_u64();
        if let Some((total, limit)) = &self.total {
            total.peek(now).map_err(|wait| Refusal { limit, wait })?;
        }
        let mine = self.per_client.iter().find(|p| match client {
            Some(id) => p.clients.iter().any(|c| c.matches(id)),
            // Unauthenticated callers fall under the general limit only.
            None => p.clients.contains(&IdentityPattern::Any),
        });
        if let Some(p) = mine {
            // While the table is full (after a sweep), every client shares one state: the
            // memory stays bounded, at the price of coarser limits under that load.
            let key = if self.sweep(p) { Key::Overflow } else { key() };
            if let Err(not_until) = p.limiter.check_key(&key) {
                return Err(Refusal {
                    limit: &p.limit,
                    wait: not_until.wait_time_from(self.clock.now()),
                });
            }
        }
        if let Some((total, limit)) = &self.total {
            // Another request may have taken the last cell since the look: then this one
            // is refused, its client's cell spent (a race, not a pattern).
            total.take(now).map_err(|wait| Refusal { limit, wait })?;
        }
        Ok(())
    }

    /// Every few thousand checks, and when the cap is reached (at most once a second, as
    /// a sweep visits every state), forgets clients whose state has fully recovered:
    /// those are indistinguishable from a new client. Counting the states locks every
    /// shard of the map, so it is done every [`COUNT_EVERY`] checks only; returns whether
    /// the table is full.
    fn sweep(&self, p: &PerClient) -> bool {
        let n = self.checks.fetch_add(1, Ordering::Relaxed);
        if !n.is_multiple_of(COUNT_EVERY) {
            return p.full.load(Ordering::Relaxed);
        }
        let mut full = p.limiter.len() >= self.max_clients;
        if n.is_multiple_of(SWEEP_EVERY) || full {
            let now = self.clock.now().as_u64();
            let last = self.last_sweep.load(Ordering::Relaxed);
            let due = !full || now.saturating_sub(last) >= 1_000_000_000;
            if due
                && self
                    .last_sweep
                    .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                p.limiter.retain_recent();
                full = p.limiter.len() >= self.max_clients;
            }
        }
        p.full.store(full, Ordering::Relaxed);
        full
    }

    /// Per-client states held, over all per-client limits.
    pub fn clients(&self) -> usize {
        self.per_client.iter().map(|p| p.limiter.len()).sum()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use mesh_core::config::RateLimitOverride;

    fn rate(requests: u32, per_ms: u64, burst: Option<u32>) -> Rate {
        Rate {
            requests,
            per: Duration::from_millis(per_ms),
            burst,
        }
    }

    fn id(s: &str) -> SpiffeId {
        SpiffeId::new(s).unwrap()
    }

    /// Admissions per second of `client` hammering every millisecond for `secs` seconds.
    async fn per_second(limits: &Limits, client: Option<&SpiffeId>, secs: usize) -> Vec<u32> {
        let mut counts = vec![0; secs];
        for count in &mut counts {
            for _ in 0..1000 {
                if limits.check(client).is_ok() {
                    *count += 1;
                }
                tokio::time::advance(Duration::from_millis(1)).await;
            }
        }
        counts
    }

    /// A rate whose burst takes longer to earn than the limiter's arithmetic holds (the
    /// configuration refuses it; the Rust API may be given one) neither panics nor
    /// admits without bound.
    #[tokio::test(start_paused = true)]
    async fn bursts_too_long_to_earn_neither_overflow_nor_open_the_limit() {
        let ten_years = 3650 * 24 * 3600 * 1000;
        let limits = Limits::new(&RateLimitConfig {
            total: Some(rate(1, ten_years, Some(60))),
            per_client: Some(rate(1, ten_years, Some(1_000_000))),
            ..RateLimitConfig::default()
        });
        let web = id("spiffe://example.org/ns/prod/sa/web");
        let admitted = (0..2_000)
            .filter(|_| limits.check(Some(&web)).is_ok())
            .count();
        assert!(admitted > 0 && admitted <= 60, "{admitted}");
        let total = Limits::new(&RateLimitConfig {
            total: Some(rate(1, ten_years, Some(60))),
            ..RateLimitConfig::default()
        });
        let admitted = (0..2_000).filter(|_| total.check(None).is_ok()).count();
        assert!(admitted > 0 && admitted <= 60, "{admitted}");
    }

    #[tokio::test(start_paused = true)]
    async fn n_per_second_admits_n_per_second() {
        for n in [1, 10, 100, 250] {
            let limits = Limits::new(&RateLimitConfig {
                per_client: Some(rate(n, 1000, None)),
                ..RateLimitConfig::default()
            });
            let counts = per_second(&limits, None, 5).await;
            // The first second also spends the initial burst.
            assert!(counts[0] <= 2 * n, "{n}/s: {counts:?}");
            for &c in &counts[1..] {
                assert!(c.abs_diff(n) <= 1, "{n}/s: {counts:?}");
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn clients_are_isolated_and_overrides_replace_the_general_limit() {
        let limits = Limits::new(&RateLimitConfig {
            per_client: Some(rate(10, 1000, Some(1))),
            overrides: vec![RateLimitOverride {
                clients: vec!["spiffe://example.org/ns/batch/*".parse().unwrap()],
                limit: rate(2, 1000, Some(1)),
            }],
            ..RateLimitConfig::default()
        });
        let web = id("spiffe://example.org/ns/prod/sa/web");
        let api = id("spiffe://example.org/ns/prod/sa/api");
        let batch = id("spiffe://example.org/ns/batch/sa/jobs");
        let mut counts = [0u32; 4];
        for _ in 0..3000 {
            for (i, client) in [Some(&web), Some(&api), Some(&batch), None]
                .into_iter()
                .enumerate()
            {
                if limits.check(client).is_ok() {
                    counts[i] += 1;
                }
            }
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        // 3 s each: web and api 10/s on their own, batch 2/s, the unauthenticated 10/s.
        for (i, want) in [30, 30, 6, 30].into_iter().enumerate() {
            assert!(counts[i].abs_diff(want) <= 1, "{counts:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_total_caps_everyone_and_client_refusals_spend_none_of_it() {
        let limits = Limits::new(&RateLimitConfig {
            total: Some(rate(20, 1000, Some(1))),
            per_client: Some(rate(5, 1000, Some(1))),
            ..RateLimitConfig::default()
        });
        let noisy = id("spiffe://example.org/noisy");
        let clients: Vec<SpiffeId> = (0..8)
            .map(|i| id(&format!("spiffe://example.org/c{i}")))
            .collect();
        let (mut noisy_ok, mut others_ok) = (0u32, 0u32);
        for _ in 0..2000 {
            // The noisy client tries ten times a millisecond.
            for _ in 0..10 {
                if limits.check(Some(&noisy)).is_ok() {
                    noisy_ok += 1;
                }
            }
            for c in &clients {
                if limits.check(Some(c)).is_ok() {
                    others_ok += 1;
                }
            }
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        // Over 2 s: the total admits 40; the noisy client gets only its own 10.
        assert!(
            (noisy_ok + others_ok).abs_diff(40) <= 1,
            "{noisy_ok} + {others_ok}"
        );
        assert!(noisy_ok.abs_diff(10) <= 1, "{noisy_ok}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_advertised_wait_is_enough() {
        for (requests, per_ms, burst) in [
            (1, 1000, None),
            (3, 10_000, Some(1)),
            (100, 1000, None),
            (1, 60_000, None),
        ] {
            let limits = Limits::new(&RateLimitConfig {
                per_client: Some(rate(requests, per_ms, burst)),
                ..RateLimitConfig::default()
            });
            // Exhaust, then wait exactly as long as the refusal says (in whole seconds,
            // as `Retry-After` carries it).
            let wait = loop {
                if let Err(refusal) = limits.check(None) {
                    break refusal.wait;
                }
            };
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            tokio::time::advance(Duration::from_secs(secs.max(1))).await;
            assert!(
                limits.check(None).is_ok(),
                "{requests}/{per_ms}ms: waited {secs}s"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn client_states_stay_bounded() {
        let limits = Limits::new(&RateLimitConfig {
            per_client: Some(rate(1, 1000, None)),
            ..RateLimitConfig::default()
        })
        .with_max_clients(100);
        for i in 0..5000 {
            let _ = limits.check(Some(&id(&format!("spiffe://example.org/c{i}"))));
            if i % 500 == 0 {
                tokio::time::advance(Duration::from_millis(1100)).await;
            }
        }
        // The table is counted every COUNT_EVERY checks: it may overshoot by that much.
        let bound = 100 + COUNT_EVERY as usize + 1;
        assert!(limits.clients() <= bound, "{} states", limits.clients());
        // Once they recover, a sweep forgets them.
        tokio::time::advance(Duration::from_secs(2)).await;
        for _ in 0..SWEEP_EVERY {
            let _ = limits.check(None);
        }
        assert!(limits.clients() <= 2, "{} states", limits.clients());
    }
}
