//! The ejection budget shared by a service's endpoints; see the [module docs](super).

use std::sync::atomic::{AtomicUsize, Ordering};

/// Caps the share of a service's endpoints that may be ejected at once.
#[derive(Debug)]
pub struct EjectionBudget {
    max_share: f64,
    total: AtomicUsize,
    ejected: AtomicUsize,
}

impl EjectionBudget {
    /// A budget allowing `max_share` (0 to 1) of the endpoints out at once, and never all.
    pub fn new(max_share: f64) -> Self {
        Self {
            max_share: max_share.clamp(0.0, 1.0),
            total: AtomicUsize::new(0),
            ejected: AtomicUsize::new(0),
        }
    }

    /// Counts one more endpoint.
    pub fn add_endpoint(&self) {
        self.total.fetch_add(1, Ordering::AcqRel);
    }

    /// Counts one endpoint fewer (one that is not ejected).
    pub fn remove_endpoint(&self) {
        self.total.fetch_sub(1, Ordering::AcqRel);
    }

    /// Endpoints currently ejected or in probation.
    pub fn ejected(&self) -> usize {
        self.ejected.load(Ordering::Acquire)
    }

    /// Takes one ejection if the share allows it.
    pub fn try_eject(&self) -> bool {
        let total = self.total.load(Ordering::Acquire);
        let allowed =
            ((total as f64 * self.max_share).floor() as usize).min(total.saturating_sub(1));
        self.ejected
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < allowed).then_some(n + 1)
            })
            .is_ok()
    }

    /// Returns an ejection (the endpoint was reinstated or removed).
    pub fn release(&self) {
        let _ = self
            .ejected
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }
}
