//! The peak-EWMA round-trip-time estimate; see the [module docs](super).

use std::time::Duration;

use tokio::time::Instant;

/// A peak-sensitive exponentially weighted moving average of round-trip times.
///
/// ```
/// use std::time::Duration;
/// use mesh_tower::load::RttEstimate;
/// use tokio::time::Instant;
///
/// let t0 = Instant::now();
/// let mut ewma = RttEstimate::new(Duration::from_millis(30), Duration::from_secs(10), t0);
/// ewma.observe(Duration::from_millis(500), t0);               // a spike replaces the estimate
/// assert_eq!(ewma.estimate(t0), Duration::from_millis(500));
/// ewma.observe(Duration::from_millis(10), t0 + Duration::from_secs(10));
/// let est = ewma.estimate(t0 + Duration::from_secs(10));
/// assert!(est < Duration::from_millis(200) && est > Duration::from_millis(10));
/// ```
#[derive(Clone, Debug)]
pub struct RttEstimate {
    estimate_ns: f64,
    updated: Instant,
    decay_ns: f64,
}

impl RttEstimate {
    /// An estimate starting at `default_rtt`, decaying with time constant `decay`.
    pub fn new(default_rtt: Duration, decay: Duration, now: Instant) -> Self {
        Self {
            estimate_ns: default_rtt.as_nanos() as f64,
            updated: now,
            // A zero decay would divide by zero; treat it as "no memory" (1 ns).
            decay_ns: (decay.as_nanos() as f64).max(1.0),
        }
    }

    fn weight(&self, now: Instant) -> f64 {
        let elapsed = crate::nanos(now.saturating_duration_since(self.updated)) as f64;
        (-elapsed / self.decay_ns).exp()
    }

    /// Folds in one RTT sample taken at `now`.
    pub fn observe(&mut self, rtt: Duration, now: Instant) {
        let sample = crate::nanos(rtt) as f64;
        let w = self.weight(now);
        // The EWMA of the old estimate and the sample; a sample above it wins outright.
        // (The old estimate's share, `estimate · w`, is also its value decayed to `now`.)
        let ewma = self.estimate_ns * w + sample * (1.0 - w);
        self.estimate_ns = ewma.max(sample);
        self.updated = self.updated.max(now);
    }

    /// The estimate as of its last update, in nanoseconds, and when that was.
    pub(super) fn parts(&self) -> (f64, Instant) {
        (self.estimate_ns, self.updated)
    }

    /// The estimate at `now`, decayed since the last sample.
    pub fn estimate(&self, now: Instant) -> Duration {
        Duration::from_nanos((self.estimate_ns * self.weight(now)) as u64)
    }
}

impl RttEstimate {
    /// Raises the estimate to `rtt` if it is above the estimate at `now`: a lower bound on
    /// a round trip (a try that failed or was cancelled after `rtt`) can only push the
    /// estimate up, never average it down.
    pub fn observe_at_least(&mut self, rtt: Duration, now: Instant) {
        if rtt > self.estimate(now) {
            self.observe(rtt, now);
        }
    }
}
