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

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

const BUCKETS: usize = 10;

/// A retry budget; see the [module docs](self).
///
/// Lock-free: each bucket is one atomic word holding the bucket's number (its epoch:
/// which `ttl / 10` stretch since the budget was made) in the high 32 bits and its
/// count in the low 32. A word whose epoch has fallen out of the window counts as zero
/// and is restarted by the next count, so rotating the window needs no sweep and no lock.
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    reserve: u64,
    bucket_ns: u64,
    start: Instant,
    deposits: [AtomicU64; BUCKETS],
    withdrawals: [AtomicU64; BUCKETS],
}

impl Default for RetryBudget {
    /// 20 % of requests plus 10 per second, over 10 s.
    fn default() -> Self {
        Self::new(0.2, 10, Duration::from_secs(10))
    }
}

fn epoch_of(word: u64) -> u32 {
    (word >> 32) as u32
}

fn count_of(word: u64) -> u64 {
    word & u64::from(u32::MAX)
}

/// Adds one to `slot` for `epoch`, restarting the slot if it holds an older epoch.
fn add(slot: &AtomicU64, epoch: u32) {
    let mut word = slot.load(Ordering::Relaxed);
    loop {
        // A newer epoch than ours (we raced a rotation a whole window later) keeps its
        // own; adding to it errs by one count.
        let ahead = (epoch_of(word).wrapping_sub(epoch) as i32) > 0;
        let next = if epoch_of(word) == epoch || ahead {
            if count_of(word) == u64::from(u32::MAX) {
                return;
            }
            word + 1
        } else {
            (u64::from(epoch) << 32) | 1
        };
        match slot.compare_exchange_weak(word, next, Ordering::AcqRel, Ordering::Relaxed) {
            Ok(_) => return,
            Err(current) => word = current,
        }
    }
}

/// Takes back one count added to `slot` for `epoch` (nothing if the slot moved on).
fn remove(slot: &AtomicU64, epoch: u32) {
    let mut word = slot.load(Ordering::Relaxed);
    while epoch_of(word) == epoch && count_of(word) > 0 {
        match slot.compare_exchange_weak(word, word - 1, Ordering::AcqRel, Ordering::Relaxed) {
            Ok(_) => return,
            Err(current) => word = current,
        }
    }
}

/// The counts of the window ending with `epoch`.
fn sum(slots: &[AtomicU64; BUCKETS], epoch: u32) -> u64 {
    slots
        .iter()
        .map(|slot| slot.load(Ordering::Acquire))
        .filter(|&word| (epoch.wrapping_sub(epoch_of(word)) as usize) < BUCKETS)
        .map(count_of)
        .sum()
}

impl RetryBudget {
    /// A budget of `ratio` (0 to 1) of requests plus `min_per_second` per second, over
    /// `ttl` (clamped to 1–60 s).
    pub fn new(ratio: f64, min_per_second: u32, ttl: Duration) -> Self {
        let ttl = ttl.clamp(Duration::from_secs(1), Duration::from_secs(60));
        Self {
            ratio: ratio.clamp(0.0, 1.0),
            reserve: u64::from(min_per_second) * ttl.as_secs(),
            bucket_ns: crate::nanos(ttl / BUCKETS as u32).max(1),
            start: Instant::now(),
            deposits: Default::default(),
            withdrawals: Default::default(),
        }
    }

    /// The current bucket's epoch (wrapping after 2³² buckets, over 13 years).
    fn epoch(&self) -> u32 {
        (crate::nanos(Instant::now().saturating_duration_since(self.start)) / self.bucket_ns) as u32
    }

    /// Records a request.
    pub fn deposit(&self) {
        let epoch = self.epoch();
        add(&self.deposits[epoch as usize % BUCKETS], epoch);
    }

    /// Takes one retry if the budget allows it.
    pub fn withdraw(&self) -> bool {
        let epoch = self.epoch();
        let allowed =
            (sum(&self.deposits, epoch) as f64 * self.ratio).floor() as u64 + self.reserve;
        // Claim first and check after, so that concurrent callers cannot both take the
        // last retry (at worst both give theirs back).
        let slot = &self.withdrawals[epoch as usize % BUCKETS];
        add(slot, epoch);
        if sum(&self.withdrawals, epoch) <= allowed {
            true
        } else {
            remove(slot, epoch);
            false
        }
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

    #[test]
    fn concurrent_withdrawals_never_overdraw() {
        let budget = std::sync::Arc::new(RetryBudget::new(0.0, 5, Duration::from_secs(10)));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let budget = budget.clone();
                std::thread::spawn(move || (0..2_000).filter(|_| budget.withdraw()).count())
            })
            .collect();
        let granted: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        // 5/s over 10 s; racing claims may give back, never overdraw.
        assert!((46..=50).contains(&granted), "{granted} retries granted");
    }

    #[tokio::test(start_paused = true)]
    async fn a_bucket_restarts_a_window_later() {
        let budget = RetryBudget::new(1.0, 0, Duration::from_secs(10));
        budget.deposit();
        tokio::time::advance(Duration::from_secs(10)).await;
        // The same slot, one window on: the old deposit no longer counts.
        budget.deposit();
        assert!(budget.withdraw() && !budget.withdraw());
        // Long idle stretches, whatever their length, leave nothing behind.
        tokio::time::advance(Duration::from_secs(3_600 * 24 * 365)).await;
        assert!(!budget.withdraw());
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
