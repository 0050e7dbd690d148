//! The shared per-endpoint load handle; see the [module docs](super).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use super::Cost;
use super::estimate::RttEstimate;

#[derive(Debug)]
struct State {
    ewma: RttEstimate,
}

/// The shared load of one endpoint: updated by completing requests, read by the balancer.
#[derive(Clone, Debug)]
pub struct EndpointLoad(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    in_flight: AtomicUsize,
    /// The end of the rate-limit penalty, in nanoseconds after `base` (0: none). Read on
    /// every pick without taking the lock.
    penalized_until: AtomicU64,
    base: Instant,
    /// The estimate as of its last update, in nanoseconds (`f64` bits), and when that was
    /// (nanoseconds after `base`): what readers decay to `now` without taking the lock.
    /// The two are stored one after the other; a reader racing an update may pair a new
    /// value with the old time, which errs by one sample's weight at most — harmless for
    /// a comparison that is itself a heuristic.
    published: AtomicU64,
    published_at: AtomicU64,
    decay_ns: f64,
    /// Serializes updates.
    state: Mutex<State>,
}

impl EndpointLoad {
    /// A fresh endpoint at `default_rtt`, decaying with `decay`.
    pub fn new(default_rtt: Duration, decay: Duration) -> Self {
        let now = Instant::now();
        Self(Arc::new(Inner {
            in_flight: AtomicUsize::new(0),
            penalized_until: AtomicU64::new(0),
            base: now,
            published: AtomicU64::new((default_rtt.as_nanos() as f64).to_bits()),
            published_at: AtomicU64::new(0),
            decay_ns: (decay.as_nanos() as f64).max(1.0),
            state: Mutex::new(State {
                ewma: RttEstimate::new(default_rtt, decay, now),
            }),
        }))
    }

    /// Updates the estimate under the lock and publishes it for readers.
    fn update(&self, f: impl FnOnce(&mut RttEstimate)) {
        let mut state = self.state();
        f(&mut state.ewma);
        let (estimate_ns, updated) = state.ewma.parts();
        self.0
            .published
            .store(estimate_ns.to_bits(), Ordering::Release);
        self.0
            .published_at
            .store(self.offset(updated), Ordering::Release);
    }

    /// The estimate at `now` in nanoseconds, from the published value, without locking.
    fn estimate_ns(&self, now: u64) -> f64 {
        let at = self.0.published_at.load(Ordering::Acquire);
        let estimate = f64::from_bits(self.0.published.load(Ordering::Acquire));
        let elapsed = now.saturating_sub(at) as f64;
        estimate * (-elapsed / self.0.decay_ns).exp()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The lock guards plain numbers; a panic while holding it cannot leave them
        // inconsistent, so a poisoned lock is still usable.
        self.0.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn offset(&self, at: Instant) -> u64 {
        crate::nanos(at.saturating_duration_since(self.0.base))
    }

    /// The cost at `now`: `estimate × (in_flight + 1)`, and whether the endpoint is within a
    /// rate-limit penalty.
    pub fn cost(&self, now: Instant) -> Cost {
        let in_flight = self.0.in_flight.load(Ordering::Relaxed);
        let now = self.offset(now);
        let until = self.0.penalized_until.load(Ordering::Acquire);
        Cost {
            unready: false,
            penalized: until != 0 && now < until,
            cost: self.estimate_ns(now) * (in_flight as f64 + 1.0),
        }
    }

    /// The cost as of the last update, not decayed since: what a gauge set right after a
    /// response reads, without a clock read or an exponential.
    pub(crate) fn last_cost(&self) -> f64 {
        let in_flight = self.0.in_flight.load(Ordering::Relaxed);
        f64::from_bits(self.0.published.load(Ordering::Acquire)) * (in_flight as f64 + 1.0)
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.0.in_flight.load(Ordering::Relaxed)
    }

    /// The RTT estimate at `now`.
    pub fn rtt_estimate(&self, now: Instant) -> Duration {
        Duration::from_nanos(self.estimate_ns(self.offset(now)) as u64)
    }

    /// Marks a request as started; the returned guard marks it finished when dropped (so a
    /// cancelled request never leaks load). Call [`InFlight::complete`] with its RTT when a
    /// response head arrives.
    pub fn start(&self) -> InFlight {
        self.0.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            load: self.clone(),
            started: Instant::now(),
        }
    }

    /// Penalizes the endpoint for `period` from `now` (a later penalty extends it; an
    /// earlier one never shortens it).
    pub fn penalize(&self, now: Instant, period: Duration) {
        // A period past the clock's range lasts as long as one can.
        let until = now
            .checked_add(period)
            .map_or(u64::MAX, |at| self.offset(at))
            .max(1);
        self.0.penalized_until.fetch_max(until, Ordering::AcqRel);
    }

    /// When the current penalty ends, if the endpoint is penalized at `now`.
    pub fn penalized_until(&self, now: Instant) -> Option<Instant> {
        let until = self.0.penalized_until.load(Ordering::Acquire);
        (until != 0 && self.offset(now) < until).then(|| self.0.base + Duration::from_nanos(until))
    }
}

/// One request in flight on an endpoint; see [`EndpointLoad::start`].
#[derive(Debug)]
pub struct InFlight {
    load: EndpointLoad,
    started: Instant,
}

impl InFlight {
    /// The endpoint's load.
    pub fn load(&self) -> &EndpointLoad {
        &self.load
    }

    /// Records the round-trip time, from the start to `now`, and finishes the request.
    pub fn complete(self, now: Instant) {
        let rtt = now.saturating_duration_since(self.started);
        self.load.update(|ewma| ewma.observe(rtt, now));
    }

    /// Finishes a request that got no answer (it failed, or was cancelled) at `now`: the
    /// time it took is a lower bound on the round trip, which raises the estimate when it
    /// exceeds it (a try that timed out) and leaves it alone otherwise (a fast failure says
    /// nothing about latency).
    pub fn abandon(self, now: Instant) {
        let rtt = now.saturating_duration_since(self.started);
        self.load.update(|ewma| ewma.observe_at_least(rtt, now));
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.load.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::DEFAULT_DECAY;
    use proptest::prelude::*;

    const MS: Duration = Duration::from_millis(1);

    #[tokio::test(start_paused = true)]
    async fn peaks_replace_and_lows_average_in() {
        let t0 = Instant::now();
        let mut e = RttEstimate::new(30 * MS, DEFAULT_DECAY, t0);
        assert_eq!(e.estimate(t0), 30 * MS);
        e.observe(100 * MS, t0);
        assert_eq!(e.estimate(t0), 100 * MS);
        // A low sample right away barely moves it (weight ~0).
        e.observe(MS, t0);
        assert_eq!(e.estimate(t0), 100 * MS);
        // After one decay period the old value keeps e^-1 of the weight.
        let t1 = t0 + DEFAULT_DECAY;
        e.observe(MS, t1);
        let est = e.estimate(t1).as_secs_f64() * 1e3;
        let expect = 100.0 * (-1.0f64).exp() + (1.0 - (-1.0f64).exp());
        assert!((est - expect).abs() < 0.01, "{est} vs {expect}");
        // Idle endpoints decay toward zero.
        assert!(e.estimate(t1 + 10 * DEFAULT_DECAY) < MS / 100);
    }

    #[tokio::test(start_paused = true)]
    async fn in_flight_guards_count_and_sample() {
        let load = EndpointLoad::new(10 * MS, DEFAULT_DECAY);
        let idle = load.cost(Instant::now());
        let a = load.start();
        let b = load.start();
        assert_eq!(load.in_flight(), 2);
        let busy = load.cost(Instant::now());
        assert!(
            (busy.cost / idle.cost - 3.0).abs() < 1e-9,
            "{busy:?} vs {idle:?}"
        );
        drop(a); // cancelled: no sample, but no leak either
        tokio::time::advance(200 * MS).await;
        b.complete(Instant::now());
        assert_eq!(load.in_flight(), 0);
        assert_eq!(load.rtt_estimate(Instant::now()), 200 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn abandoned_requests_only_raise_the_estimate() {
        let load = EndpointLoad::new(10 * MS, DEFAULT_DECAY);
        let fast_failure = load.start();
        tokio::time::advance(MS).await;
        fast_failure.abandon(Instant::now());
        // Only the decay since the start moved it.
        let est = load.rtt_estimate(Instant::now());
        assert!(
            est > 9 * MS && est <= 10 * MS,
            "a fast failure says nothing: {est:?}"
        );
        let timed_out = load.start();
        tokio::time::advance(50 * MS).await;
        timed_out.abandon(Instant::now());
        assert_eq!(load.in_flight(), 0);
        assert_eq!(
            load.rtt_estimate(Instant::now()),
            50 * MS,
            "a timeout is a lower bound"
        );
    }

    /// A penalty past the clock's range (a `RateLimitPenalty` bound of `Duration::MAX`
    /// and a huge `Retry-After`) lasts, without a panic.
    #[tokio::test(start_paused = true)]
    async fn a_penalty_past_the_clocks_range_lasts() {
        let load = EndpointLoad::new(5 * MS, DEFAULT_DECAY);
        let now = Instant::now();
        load.penalize(now, Duration::MAX);
        assert!(load.penalized_until(now).is_some_and(|until| until > now));
        tokio::time::advance(Duration::from_secs(86_400 * 365)).await;
        assert!(load.penalized_until(Instant::now()).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn penalties_order_first_and_expire() {
        let slow = EndpointLoad::new(500 * MS, DEFAULT_DECAY);
        let fast = EndpointLoad::new(5 * MS, DEFAULT_DECAY);
        let now = Instant::now();
        assert!(fast.cost(now) < slow.cost(now));
        fast.penalize(now, Duration::from_secs(2));
        fast.penalize(now, Duration::from_secs(1)); // never shortens
        assert!(slow.cost(now) < fast.cost(now));
        assert_eq!(
            fast.penalized_until(now),
            Some(now + Duration::from_secs(2))
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        let later = Instant::now();
        assert!(fast.cost(later) < slow.cost(later));
        assert_eq!(fast.penalized_until(later), None);
    }

    proptest! {
        #[test]
        fn estimate_stays_between_zero_and_the_largest_sample(
            samples in prop::collection::vec((0u64..1_000_000, 0u64..30_000), 1..50)
        ) {
            let t0 = Instant::now();
            let mut e = RttEstimate::new(30 * MS, DEFAULT_DECAY, t0);
            let mut now = t0;
            let mut peak = 30 * MS;
            for (rtt_us, gap_ms) in samples {
                now += Duration::from_millis(gap_ms);
                let rtt = Duration::from_micros(rtt_us);
                peak = peak.max(rtt);
                e.observe(rtt, now);
                let est = e.estimate(now);
                prop_assert!(est <= peak + Duration::from_nanos(1), "{est:?} > {peak:?}");
                prop_assert!(est + Duration::from_nanos(1) >= rtt, "{est:?} < {rtt:?}");
                // A sample at or above the current estimate becomes the estimate.
                e.observe(est + MS, now);
                prop_assert_eq!(e.estimate(now), est + MS);
                peak = peak.max(est + MS);
            }
        }

        #[test]
        fn load_order_is_total_and_penalty_first(a in 0.0f64..1e12, b in 0.0f64..1e12, pa: bool, pb: bool) {
            let (x, y) = (Cost { unready: false, penalized: pa, cost: a }, Cost { unready: false, penalized: pb, cost: b });
            if pa != pb {
                prop_assert_eq!(x < y, pb);
            } else {
                prop_assert_eq!(x.cmp(&y), a.total_cmp(&b));
            }
        }
    }
}
