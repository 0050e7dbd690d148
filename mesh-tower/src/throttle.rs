//! Log lines that an attacker or an outage could repeat without end (a denied request, an
//! unreachable application) are written at `info` at most once a second per call site,
//! saying how many were left at `debug` since; the others go to `debug`. A flood of
//! denied requests thus costs the log one line a second, not one per request, and
//! nothing is lost at `debug`.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// One call site's throttle: `static DENIED: Throttle = Throttle::new();`.
#[derive(Debug)]
pub(crate) struct Throttle {
    /// When the last line went out at `info`. (Locked only on these paths, which a
    /// request takes when it is refused or fails.)
    last: Mutex<Option<Instant>>,
    /// Lines held back since.
    held: AtomicU64,
}

/// At most one line at `info` in this long.
const EVERY: Duration = Duration::from_secs(1);

impl Throttle {
    pub(crate) const fn new() -> Self {
        Self {
            last: Mutex::new(None),
            held: AtomicU64::new(0),
        }
    }

    /// `Some(held back since the last one)` when a line may go out at `info` now (one a
    /// second); `None` when it goes to `debug`, counted.
    pub(crate) fn due(&self) -> Option<u64> {
        let now = Instant::now();
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.is_none_or(|at| now.saturating_duration_since(at) >= EVERY) {
            *last = Some(now);
            return Some(self.held.swap(0, Ordering::Relaxed));
        }
        self.held.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_line_a_second_with_the_count_held_back() {
        let t = Throttle::new();
        assert_eq!(t.due(), Some(0));
        for _ in 0..5 {
            assert_eq!(t.due(), None);
        }
        tokio::time::advance(Duration::from_millis(999)).await;
        assert_eq!(t.due(), None);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(t.due(), Some(6));
        assert_eq!(t.due(), None);
    }
}
