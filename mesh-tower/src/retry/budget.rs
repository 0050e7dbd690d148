//! The retry budget (Finagle's and Linkerd's): retries may add at most `ratio` of the
//! requests seen in the last `ttl`, plus a reserve of `min_per_second` per second of
//! `ttl` that lets clients with little traffic retry at all. Defaults: 20 %, 10/s, 10 s.
//!
//! Requests (deposits) and retries (withdrawals) are counted in ten buckets spanning
//! `ttl`, rotated by the clock, so counts older than `ttl` fall out. A retry is allowed
//! while `withdrawals < ⌊ratio × deposits⌋ + min_per_second × ttl` over the window. Over
//! any stretch of `E` seconds the retries therefore stay under
//! `ratio × requests + min_per_second × (E + ttl)`: when every request fails, a client
//! sends at most 1.2× its traffic plus the small reserve, never a retry storm.
//!
//! ```
//! use std::time::Duration;
//! use mesh_tower::retry::budget::RetryBudget;
//!
//! let budget = RetryBudget::new(0.2, 0, Duration::from_secs(10));
//! for _ in 0..10 {
//!     budget.deposit();
//! }
//! assert!(budget.withdraw() && budget.withdraw()); // 20 % of 10
//! assert!(!budget.withdraw());
//! ```

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

const BUCKETS: usize = 10;

/// A retry budget; see the [module docs](self).
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    reserve: u64,
    bucket: Duration,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    start: Instant,
    /// The absolute index of the current bucket since `start`.
    current: u64,
    deposits: [u64; BUCKETS],
    withdrawals: [u64; BUCKETS],
}

impl Default for RetryBudget {
    /// 20 % of requests plus 10 per second, over 10 s.
    fn default() -> Self {
        Self::new(0.2, 10, Duration::from_secs(10))
    }
}

impl RetryBudget {
    /// A budget of `ratio` (0 to 1) of requests plus `min_per_second` per second, over
    /// `ttl` (clamped to 1–60 s).
    pub fn new(ratio: f64, min_per_second: u32, ttl: Duration) -> Self {
        let ttl = ttl.clamp(Duration::from_secs(1), Duration::from_secs(60));
        Self {
            ratio: ratio.clamp(0.0, 1.0),
            reserve: u64::from(min_per_second) * ttl.as_secs(),
            bucket: ttl / BUCKETS as u32,
            state: Mutex::new(State {
                start: Instant::now(),
                current: 0,
                deposits: [0; BUCKETS],
                withdrawals: [0; BUCKETS],
            }),
        }
    }

    fn with_state<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        // Plain counters: a panic while holding the lock cannot leave them inconsistent.
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let index = (now.saturating_duration_since(state.start).as_nanos()
            / self.bucket.as_nanos().max(1)) as u64;
        // Clear every bucket entered since the last call (at most all of them).
        let steps = index.saturating_sub(state.current).min(BUCKETS as u64);
        for k in 1..=steps {
            let i = ((state.current + k) % BUCKETS as u64) as usize;
            state.deposits[i] = 0;
            state.withdrawals[i] = 0;
        }
        state.current = state.current.max(index);
        f(&mut state)
    }

    /// Records a request.
    pub fn deposit(&self) {
        self.with_state(|s| {
            let i = (s.current % BUCKETS as u64) as usize;
            s.deposits[i] += 1;
        });
    }

    /// Takes one retry if the budget allows it.
    pub fn withdraw(&self) -> bool {
        self.with_state(|s| {
            let deposits: u64 = s.deposits.iter().sum();
            let withdrawals: u64 = s.withdrawals.iter().sum();
            let allowed = (deposits as f64 * self.ratio).floor() as u64 + self.reserve;
            if withdrawals < allowed {
                let i = (s.current % BUCKETS as u64) as usize;
                s.withdrawals[i] += 1;
                true
            } else {
                false
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[tokio::test(start_paused = true)]
    async fn old_counts_leave_the_window() {
        let budget = RetryBudget::new(0.5, 0, Duration::from_secs(10));
        for _ in 0..4 {
            budget.deposit();
        }
        assert!(budget.withdraw() && budget.withdraw() && !budget.withdraw());
        tokio::time::advance(Duration::from_secs(11)).await;
        // Both the requests and the retries have expired.
        assert!(!budget.withdraw());
        budget.deposit();
        budget.deposit();
        assert!(budget.withdraw() && !budget.withdraw());
    }

    #[tokio::test(start_paused = true)]
    async fn the_reserve_allows_retries_without_traffic() {
        let budget = RetryBudget::new(0.0, 2, Duration::from_secs(5));
        let granted = (0..20).filter(|_| budget.withdraw()).count();
        assert_eq!(granted, 10);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever the pacing, retries stay under
        /// `ratio × requests + min_per_second × (elapsed + ttl)`.
        #[test]
        fn retries_stay_within_the_budget(
            ratio in 0.0f64..=1.0,
            per_second in 0u32..20,
            requests in 0u32..600,
            gaps_ms in prop::collection::vec(0u64..300, 1..20),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            rt.block_on(async {
                let started = Instant::now();
                let ttl = Duration::from_secs(10);
                let budget = RetryBudget::new(ratio, per_second, ttl);
                let mut granted = 0u64;
                for i in 0..requests {
                    budget.deposit();
                    // Every request asks for a retry, as when everything fails.
                    if budget.withdraw() {
                        granted += 1;
                    }
                    tokio::time::advance(Duration::from_millis(gaps_ms[i as usize % gaps_ms.len()])).await;
                }
                let seconds = (ttl + started.elapsed()).as_secs_f64().ceil();
                let cap = f64::from(requests) * ratio + f64::from(per_second) * seconds;
                prop_assert!(granted as f64 <= cap, "{granted} retries for {requests} requests (cap {cap})");
                Ok(())
            })?;
        }
    }
}
