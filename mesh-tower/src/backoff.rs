//! Exponential back-off with jitter, shared by retries and circuit-breaker ejections.
//!
//! The delay before attempt `n` (counting from 0) is `min · 2ⁿ`, capped at `max`, then
//! shortened by a random share of itself of at most `jitter` (so with the default jitter of
//! 0.5 it falls between half the base and the base). Randomizing spreads out clients that
//! failed together, so they do not retry in lockstep; capping keeps a long outage from
//! pushing delays past usefulness. Defaults: 25–250 ms for retries, 1–60 s for ejections
//! (see `mesh_core::config::BackoffConfig`).
//!
//! The random source is passed in, so that tests can seed it.

use std::time::Duration;

use mesh_core::config::BackoffConfig;

/// The default back-off between retries: 25 to 250 ms, jitter 0.5.
pub const DEFAULT_RETRY_BACKOFF: Backoff =
    Backoff::constant(Duration::from_millis(25), Duration::from_millis(250), 0.5);

/// The default back-off of circuit-breaker ejections: 1 to 60 s, jitter 0.5.
pub const DEFAULT_EJECTION_BACKOFF: Backoff =
    Backoff::constant(Duration::from_secs(1), Duration::from_secs(60), 0.5);

/// An exponential back-off policy.
///
/// ```
/// use std::time::Duration;
/// use mesh_tower::backoff::Backoff;
///
/// let backoff = Backoff::new(Duration::from_millis(25), Duration::from_millis(250), 0.0)?;
/// let mut rng = fastrand::Rng::with_seed(7);
/// let delays: Vec<_> = (0..6).map(|n| backoff.delay(n, &mut rng).as_millis()).collect();
/// assert_eq!(delays, [25, 50, 100, 200, 250, 250]);
/// # Ok::<(), mesh_tower::backoff::InvalidBackoff>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    jitter: f64,
}

/// Back-off bounds that make no sense.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("invalid back-off: {0}")]
pub struct InvalidBackoff(&'static str);

impl Backoff {
    /// A policy from `min` to `max` with the given jitter share.
    pub fn new(min: Duration, max: Duration, jitter: f64) -> Result<Self, InvalidBackoff> {
        if min.is_zero() {
            return Err(InvalidBackoff("min must be greater than zero"));
        }
        if min > max {
            return Err(InvalidBackoff("min must not exceed max"));
        }
        if !(0.0..=1.0).contains(&jitter) {
            return Err(InvalidBackoff("jitter must be between 0 and 1"));
        }
        Ok(Self { min, max, jitter })
    }

    /// A policy from constants known to be valid (`0 < min <= max`, `0 <= jitter <= 1`).
    pub(crate) const fn constant(min: Duration, max: Duration, jitter: f64) -> Self {
        Self { min, max, jitter }
    }

    /// The policy a configuration describes.
    pub fn from_config(config: &BackoffConfig) -> Result<Self, InvalidBackoff> {
        Self::new(config.min, config.max, config.jitter)
    }

    /// The largest delay, before jitter.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// The delay before attempt `attempt` (0 for the first back-off).
    pub fn delay(&self, attempt: u32, rng: &mut fastrand::Rng) -> Duration {
        let base = self
            .min
            .saturating_mul(1u32 << attempt.min(31))
            .min(self.max);
        // Jitter only shortens it; a product past `Duration`'s range (from a `min` near
        // `Duration::MAX`) keeps the base.
        Duration::try_from_secs_f64(base.as_secs_f64() * (1.0 - self.jitter * rng.f64()))
            .map_or(base, |d| d.min(base))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Bounds at the edge of `Duration`'s range give delays, not a panic.
    #[test]
    fn the_largest_bounds_do_not_overflow() {
        let mut rng = fastrand::Rng::with_seed(7);
        let edge = Backoff::new(Duration::MAX, Duration::MAX, 0.0).unwrap();
        assert_eq!(edge.delay(40, &mut rng), Duration::MAX);
        let jittered = Backoff::new(Duration::MAX, Duration::MAX, 0.5).unwrap();
        assert!(jittered.delay(0, &mut rng) <= Duration::MAX);
    }

    #[test]
    fn refuses_nonsense() {
        let ms = Duration::from_millis;
        assert!(Backoff::new(Duration::ZERO, ms(1), 0.0).is_err());
        assert!(Backoff::new(ms(2), ms(1), 0.0).is_err());
        assert!(Backoff::new(ms(1), ms(2), 1.5).is_err());
        assert!(Backoff::new(ms(1), ms(2), -0.1).is_err());
    }

    proptest! {
        #[test]
        fn delays_stay_within_bounds_and_grow(
            min_ms in 1u64..1_000,
            extra_ms in 0u64..100_000,
            jitter in 0.0f64..=1.0,
            seed in any::<u64>(),
        ) {
            let (min, max) = (Duration::from_millis(min_ms), Duration::from_millis(min_ms + extra_ms));
            let backoff = Backoff::new(min, max, jitter).unwrap();
            let mut rng = fastrand::Rng::with_seed(seed);
            for attempt in 0..64 {
                let d = backoff.delay(attempt, &mut rng);
                let base = min.saturating_mul(1 << attempt.min(31)).min(max);
                prop_assert!(d <= base, "{d:?} > {base:?}");
                prop_assert!(d >= base.mul_f64(1.0 - jitter) - Duration::from_nanos(1));
            }
            // Without jitter the sequence never decreases.
            let plain = Backoff::new(min, max, 0.0).unwrap();
            let seq: Vec<_> = (0..40).map(|n| plain.delay(n, &mut rng)).collect();
            prop_assert!(seq.windows(2).all(|w| w[0] <= w[1]));
            prop_assert_eq!(*seq.last().unwrap(), max);
        }
    }
}
