//! The gate a breaker's task opens and shuts, and that readiness reads.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use tokio::sync::Notify;

pub(super) const OPEN: u8 = 0;
pub(super) const SHUT: u8 = 1;
pub(super) const PROBATION: u8 = 2;

/// A gate's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GateState {
    /// Serving.
    Open,
    /// Ejected.
    Ejected,
    /// Admitting one probe.
    Probation,
}

/// May this endpoint take a request now? Written by the breaker's task, read by
/// [`Breaker::poll_ready`](super::Breaker) and the balancer; every change wakes the
/// services waiting on it.
#[derive(Debug, Default)]
pub struct Gate {
    state: AtomicU8,
    probe_taken: AtomicBool,
    changed: Arc<Notify>,
}

impl Gate {
    /// Takes the single probe permit in probation. (Open gates need no permit.)
    pub(super) fn try_probe(&self) -> bool {
        self.state.load(Ordering::Acquire) == PROBATION
            && !self.probe_taken.swap(true, Ordering::AcqRel)
    }

    /// Returns an unused probe permit.
    pub(super) fn release_probe(&self) {
        self.probe_taken.store(false, Ordering::Release);
        self.changed.notify_waiters();
    }

    /// Whether a request would be admitted now (without taking the probe permit).
    pub fn may_admit(&self) -> bool {
        match self.state.load(Ordering::Acquire) {
            OPEN => true,
            PROBATION => !self.probe_taken.load(Ordering::Acquire),
            _ => false,
        }
    }

    /// Whether the endpoint is serving normally (not ejected, not on probation).
    pub fn is_open(&self) -> bool {
        self.state.load(Ordering::Acquire) == OPEN
    }

    /// The gate's state, for display.
    pub fn state(&self) -> GateState {
        match self.state.load(Ordering::Acquire) {
            OPEN => GateState::Open,
            PROBATION => GateState::Probation,
            _ => GateState::Ejected,
        }
    }

    pub(super) fn set(&self, state: u8) {
        self.probe_taken.store(false, Ordering::Release);
        self.state.store(state, Ordering::Release);
        self.changed.notify_waiters();
    }

    pub(super) fn changed(&self) -> Arc<Notify> {
        self.changed.clone()
    }
}

/// The probe permit of an endpoint in probation, held by the service that took it in
/// `poll_ready` and then by its request. Dropped unused (the service was dropped, or its
/// request cancelled before an outcome), it is returned so another probe can go.
#[derive(Debug)]
pub(super) struct Permit(Option<super::BreakerHandle>);

impl Permit {
    pub(super) fn new(handle: super::BreakerHandle) -> Self {
        Self(Some(handle))
    }

    /// The probe's outcome was reported: the breaker's transition resets the gate.
    pub(super) fn consume(mut self) {
        self.0 = None;
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(handle) = self.0.take() {
            handle.gate().release_probe();
        }
    }
}
