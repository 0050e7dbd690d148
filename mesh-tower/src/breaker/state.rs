//! The circuit breaker's state machine, pure and driven by outcomes and the clock.

use std::time::Duration;

use mesh_core::classify::Class;
use tokio::time::Instant;

use super::EjectionBudget;
use crate::backoff::Backoff;
use crate::decision::BreakerCause;

/// When an endpoint is ejected.
#[derive(Clone, Debug, PartialEq)]
pub struct BreakerPolicy {
    /// Consecutive failures that eject (default 7).
    pub consecutive_failures: u32,
    /// Optional ejection on a low success rate.
    pub success_rate: Option<SuccessRatePolicy>,
    /// How long ejections last (default 1 s doubling to 60 s, jitter 0.5).
    pub backoff: Backoff,
    /// Whether rate-limited answers count as failures (default false).
    pub count_rate_limited: bool,
}

/// Ejection when the success rate over a window is below a threshold.
#[derive(Clone, Debug, PartialEq)]
pub struct SuccessRatePolicy {
    /// The lowest acceptable rate, 0 to 1.
    pub threshold: f64,
    /// The window, counted in tenths: an outcome counts for between nine tenths of it
    /// and all of it.
    pub window: Duration,
    /// Outcomes in the window before the rate is judged.
    pub min_requests: u32,
}

/// The state an endpoint's readiness depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Serving.
    Closed,
    /// Ejected until the instant given.
    Ejected {
        /// When probation starts.
        until: Instant,
    },
    /// Ejection over: one probe request decides.
    Probation,
}

/// A change of phase, for logs and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// Closed or probation -> ejected.
    Ejected {
        /// For how long.
        duration: Duration,
        /// The ejection's number in a row (1 for the first since the last reinstatement).
        streak: u32,
    },
    /// Ejected -> probation.
    Probation,
    /// Probation -> closed.
    Reinstated,
}

/// One endpoint's breaker.
#[derive(Debug)]
pub struct BreakerState {
    policy: BreakerPolicy,
    phase: Phase,
    consecutive: u32,
    /// Ejections in a row without a successful probe: the back-off attempt.
    streak: u32,
    window: RateWindow,
    /// Why the last step changed the phase (or was refused an ejection), for the
    /// decision record.
    cause: Option<BreakerCause>,
}

impl BreakerState {
    /// A closed breaker.
    pub fn new(policy: BreakerPolicy) -> Self {
        Self {
            policy,
            phase: Phase::Closed,
            consecutive: 0,
            streak: 0,
            window: RateWindow::default(),
            cause: None,
        }
    }

    /// Why the last call to [`on_outcome`](Self::on_outcome) or
    /// [`on_tick`](Self::on_tick) changed the phase, or why it refused an ejection
    /// ([`BreakerCause::BudgetFull`]); cleared by the call.
    pub fn take_cause(&mut self) -> Option<BreakerCause> {
        self.cause.take()
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Folds in the outcome of a request that finished at `now`.
    ///
    /// In probation the outcome is the probe's: success reinstates, failure ejects again
    /// for longer. Outcomes of requests that were already in flight when the endpoint was
    /// ejected are ignored while it is ejected; in probation, pass them to
    /// [`on_outcome_without_permit`](Self::on_outcome_without_permit).
    pub fn on_outcome(
        &mut self,
        class: Class,
        now: Instant,
        budget: &EjectionBudget,
        rng: &mut fastrand::Rng,
    ) -> Option<Transition> {
        self.outcome(class, true, now, budget, rng)
    }

    /// [`on_outcome`](Self::on_outcome) for a request that was not the probe (it held no
    /// probe permit): sent before the ejection, it finished after it. Ignored in
    /// probation, where only the probe decides; counted as usual when closed.
    pub fn on_outcome_without_permit(
        &mut self,
        class: Class,
        now: Instant,
        budget: &EjectionBudget,
        rng: &mut fastrand::Rng,
    ) -> Option<Transition> {
        self.outcome(class, false, now, budget, rng)
    }

    fn outcome(
        &mut self,
        class: Class,
        probe: bool,
        now: Instant,
        budget: &EjectionBudget,
        rng: &mut fastrand::Rng,
    ) -> Option<Transition> {
        let failed = match class {
            Class::Success => false,
            Class::Failure => true,
            Class::RateLimited if self.policy.count_rate_limited => true,
            // Neither success nor failure: the load penalty handles it.
            Class::RateLimited => return None,
        };
        match self.phase {
            Phase::Ejected { .. } => None,
            Phase::Probation if !probe => None,
            Phase::Probation => {
                if failed {
                    self.cause = Some(BreakerCause::ProbeFailed);
                    Some(self.eject(now, rng))
                } else {
                    self.phase = Phase::Closed;
                    self.streak = 0;
                    self.consecutive = 0;
                    self.window.clear();
                    budget.release();
                    self.cause = Some(BreakerCause::ProbeSucceeded);
                    Some(Transition::Reinstated)
                }
            }
            Phase::Closed => {
                self.consecutive = if failed {
                    self.consecutive.saturating_add(1)
                } else {
                    0
                };
                let rate_too_low = self.record(now, !failed);
                let cause = if self.consecutive >= self.policy.consecutive_failures {
                    Some(BreakerCause::ConsecutiveFailures {
                        failures: self.consecutive,
                    })
                } else {
                    rate_too_low.map(|(rate, requests)| BreakerCause::SuccessRate {
                        rate,
                        threshold: self
                            .policy
                            .success_rate
                            .as_ref()
                            .map_or(0.0, |p| p.threshold),
                        requests,
                    })
                };
                if let Some(cause) = cause {
                    if budget.try_eject() {
                        self.cause = Some(cause);
                        return Some(self.eject(now, rng));
                    }
                    self.cause = Some(BreakerCause::BudgetFull);
                    tracing::debug!("not ejecting: the maximum ejected share is reached");
                }
                None
            }
        }
    }

    /// Moves an ejection that is over to probation.
    pub fn on_tick(&mut self, now: Instant) -> Option<Transition> {
        match self.phase {
            Phase::Ejected { until } if now >= until => {
                self.phase = Phase::Probation;
                self.cause = Some(BreakerCause::EjectionOver);
                Some(Transition::Probation)
            }
            _ => None,
        }
    }

    fn eject(&mut self, now: Instant, rng: &mut fastrand::Rng) -> Transition {
        let duration = self.policy.backoff.delay(self.streak, rng);
        self.streak = self.streak.saturating_add(1);
        self.consecutive = 0;
        self.window.clear();
        self.phase = Phase::Ejected {
            // A back-off past the clock's range (bounds near `Duration::MAX`) ends as late
            // as the clock allows.
            until: now
                .checked_add(duration)
                .or_else(|| now.checked_add(Duration::from_secs(30 * 365 * 86_400)))
                .unwrap_or(now),
        };
        Transition::Ejected {
            duration,
            streak: self.streak,
        }
    }

    /// Records an outcome in the success-rate window; returns the rate and the outcomes
    /// counted when the rate is now below the threshold.
    fn record(&mut self, now: Instant, ok: bool) -> Option<(f64, u32)> {
        let policy = self.policy.success_rate.as_ref()?;
        let (total, successes) = self.window.record(now, policy.window, ok);
        if total < u64::from(policy.min_requests) || total == 0 {
            return None;
        }
        ((successes as f64) < policy.threshold * total as f64).then(|| {
            (
                successes as f64 / total as f64,
                u32::try_from(total).unwrap_or(u32::MAX),
            )
        })
    }
}

/// How many parts the success-rate window is counted in.
const RATE_BUCKETS: usize = 10;

/// The outcomes of the success-rate window, counted in [`RATE_BUCKETS`] buckets of a tenth
/// of the window each: constant work per outcome and constant memory, whatever the request
/// rate. The rate is judged over the current bucket and the nine before it, so an outcome
/// counts for between nine tenths of the window and the whole of it.
#[derive(Debug, Default)]
struct RateWindow {
    /// Outcomes and successes per bucket.
    buckets: [(u64, u64); RATE_BUCKETS],
    /// The bucket now filling.
    current: usize,
    /// When the current bucket began; `None` while the window is empty.
    began: Option<Instant>,
    /// The sums over the buckets.
    total: u64,
    successes: u64,
}

impl RateWindow {
    fn clear(&mut self) {
        *self = Self::default();
    }

    /// Counts an outcome at `now`; returns the outcomes and successes in the window.
    fn record(&mut self, now: Instant, window: Duration, ok: bool) -> (u64, u64) {
        let width = (window / RATE_BUCKETS as u32).max(Duration::from_millis(1));
        match self.began {
            None => self.began = Some(now),
            Some(began) => {
                let steps = now.saturating_duration_since(began).as_nanos() / width.as_nanos();
                if steps >= RATE_BUCKETS as u128 {
                    // Everything counted is older than the window.
                    self.clear();
                    self.began = Some(now);
                } else if steps > 0 {
                    for _ in 0..steps {
                        self.current = (self.current + 1) % RATE_BUCKETS;
                        let (n, ok) = std::mem::take(&mut self.buckets[self.current]);
                        self.total -= n;
                        self.successes -= ok;
                    }
                    // `steps` is under RATE_BUCKETS here.
                    self.began = Some(began + width * steps as u32);
                }
            }
        }
        let bucket = &mut self.buckets[self.current];
        bucket.0 += 1;
        self.total += 1;
        if ok {
            bucket.1 += 1;
            self.successes += 1;
        }
        (self.total, self.successes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy(n: u32) -> BreakerPolicy {
        BreakerPolicy {
            consecutive_failures: n,
            success_rate: None,
            backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(60), 0.0).unwrap(),
            count_rate_limited: false,
        }
    }

    fn budget(total: usize) -> EjectionBudget {
        let b = EjectionBudget::new(0.5);
        for _ in 0..total {
            b.add_endpoint();
        }
        b
    }

    #[tokio::test(start_paused = true)]
    async fn ejects_after_consecutive_failures_probes_and_reinstates() {
        let budget = budget(4);
        let mut rng = fastrand::Rng::with_seed(1);
        let mut b = BreakerState::new(policy(3));
        let now = Instant::now();
        assert_eq!(b.on_outcome(Class::Failure, now, &budget, &mut rng), None);
        assert_eq!(b.on_outcome(Class::Failure, now, &budget, &mut rng), None);
        // A success resets the count; rate limiting neither counts nor resets.
        assert_eq!(b.on_outcome(Class::Success, now, &budget, &mut rng), None);
        for _ in 0..2 {
            assert_eq!(b.on_outcome(Class::Failure, now, &budget, &mut rng), None);
        }
        assert_eq!(
            b.on_outcome(Class::RateLimited, now, &budget, &mut rng),
            None
        );
        let t = b.on_outcome(Class::Failure, now, &budget, &mut rng);
        assert_eq!(
            t,
            Some(Transition::Ejected {
                duration: Duration::from_secs(1),
                streak: 1
            })
        );
        assert_eq!(budget.ejected(), 1);
        // Outcomes of requests already in flight are ignored.
        assert_eq!(b.on_outcome(Class::Success, now, &budget, &mut rng), None);
        assert_eq!(b.on_tick(now + Duration::from_millis(999)), None);
        assert_eq!(
            b.on_tick(now + Duration::from_secs(1)),
            Some(Transition::Probation)
        );
        // A failed probe ejects for twice as long.
        let t = b.on_outcome(Class::Failure, now, &budget, &mut rng);
        assert_eq!(
            t,
            Some(Transition::Ejected {
                duration: Duration::from_secs(2),
                streak: 2
            })
        );
        b.on_tick(now + Duration::from_secs(2));
        assert_eq!(b.phase(), Phase::Probation);
        assert_eq!(
            b.on_outcome(Class::Success, now, &budget, &mut rng),
            Some(Transition::Reinstated)
        );
        assert_eq!(b.phase(), Phase::Closed);
        assert_eq!(budget.ejected(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limited_answers_count_when_configured() {
        let budget = budget(4);
        let mut rng = fastrand::Rng::with_seed(1);
        let mut b = BreakerState::new(BreakerPolicy {
            count_rate_limited: true,
            ..policy(2)
        });
        let now = Instant::now();
        b.on_outcome(Class::RateLimited, now, &budget, &mut rng);
        assert!(
            b.on_outcome(Class::RateLimited, now, &budget, &mut rng)
                .is_some()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn success_rate_over_a_window() {
        let budget = budget(4);
        let mut rng = fastrand::Rng::with_seed(1);
        let mut b = BreakerState::new(BreakerPolicy {
            success_rate: Some(SuccessRatePolicy {
                threshold: 0.8,
                window: Duration::from_secs(10),
                min_requests: 10,
            }),
            ..policy(100)
        });
        let t0 = Instant::now();
        // 3 failures in 9: below 80 %, but too few requests to judge.
        for i in 0..9 {
            let class = if i % 3 == 0 {
                Class::Failure
            } else {
                Class::Success
            };
            assert_eq!(b.on_outcome(class, t0, &budget, &mut rng), None);
        }
        // Old outcomes leave the window: 11 s later only fresh ones count.
        let t1 = t0 + Duration::from_secs(11);
        for _ in 0..9 {
            assert_eq!(b.on_outcome(Class::Success, t1, &budget, &mut rng), None);
        }
        assert_eq!(b.on_outcome(Class::Failure, t1, &budget, &mut rng), None); // 9/10
        assert_eq!(b.on_outcome(Class::Failure, t1, &budget, &mut rng), None); // 9/11 = 0.82
        let t = b.on_outcome(Class::Failure, t1, &budget, &mut rng); // 9/12 = 0.75
        assert!(matches!(t, Some(Transition::Ejected { .. })), "{t:?}");
    }

    #[test]
    fn the_rate_window_forgets_outcomes_a_tenth_at_a_time() {
        let window = Duration::from_secs(10);
        let mut w = RateWindow::default();
        let t0 = Instant::now();
        for _ in 0..5 {
            w.record(t0, window, false);
        }
        // 9.5 s later the first tenth is still in the window.
        assert_eq!(
            w.record(t0 + Duration::from_millis(9_500), window, true),
            (6, 1)
        );
        // Past 10 s it has left: its five failures with it.
        assert_eq!(
            w.record(t0 + Duration::from_millis(10_500), window, true),
            (2, 2)
        );
        // A long silence empties it.
        assert_eq!(
            w.record(t0 + Duration::from_secs(60), window, false),
            (1, 0)
        );
        // Many outcomes in one instant: counted, not stored.
        let t1 = t0 + Duration::from_secs(61);
        for _ in 0..100_000 {
            w.record(t1, window, true);
        }
        assert_eq!((w.total, w.successes), (100_001, 100_000));
    }

    #[test]
    fn the_budget_never_ejects_the_last_endpoints() {
        let b = EjectionBudget::new(1.0);
        b.add_endpoint();
        assert!(!b.try_eject(), "a lone endpoint is never ejected");
        b.add_endpoint();
        assert!(b.try_eject());
        assert!(!b.try_eject(), "one endpoint must stay");
        b.release();
        let half = EjectionBudget::new(0.5);
        for _ in 0..5 {
            half.add_endpoint();
        }
        assert!(half.try_eject() && half.try_eject() && !half.try_eject());
    }

    proptest! {
        #[test]
        fn never_more_ejected_than_the_share_allows(
            n in 1usize..20,
            share in 0.0f64..=1.0,
            outcomes in prop::collection::vec((0usize..20, any::<bool>()), 0..400),
            seed in any::<u64>(),
        ) {
            let budget = EjectionBudget::new(share);
            for _ in 0..n {
                budget.add_endpoint();
            }
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut breakers: Vec<_> = (0..n).map(|_| BreakerState::new(policy(2))).collect();
            let mut now = Instant::now();
            for (i, ok) in outcomes {
                now += Duration::from_millis(100);
                let b = &mut breakers[i % n];
                b.on_tick(now);
                b.on_outcome(if ok { Class::Success } else { Class::Failure }, now, &budget, &mut rng);
                let out = breakers.iter().filter(|b| b.phase() != Phase::Closed).count();
                prop_assert_eq!(out, budget.ejected());
                prop_assert!(out <= ((n as f64) * share).floor() as usize);
                prop_assert!(out < n);
            }
        }
    }
}
