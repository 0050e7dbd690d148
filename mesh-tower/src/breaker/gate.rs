//! The gate a breaker's task opens and shuts, and that readiness reads.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};

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
///
/// In probation one probe is admitted at a time. Each probation, and each new probe the
/// task admits when one has not reported for a while, is a new *round*: a permit
/// returns its probe only in its own round, so a permit left from an earlier round
/// (a cancelled request) cannot let a second probe through.
#[derive(Debug, Default)]
pub struct Gate {
    state: AtomicU8,
    /// The probe round, times two, plus one while its probe is taken.
    probe: AtomicU32,
    changed: Arc<Notify>,
}

impl Gate {
    /// Takes the single probe permit in probation, returning its round. (Open gates need
    /// no permit.)
    pub(super) fn try_probe(&self) -> Option<u32> {
        if self.state.load(Ordering::Acquire) != PROBATION {
            return None;
        }
        self.probe
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                (v & 1 == 0).then_some(v | 1)
            })
            .ok()
            .map(|v| v >> 1)
    }

    /// Starts a new probe round with its probe free (the last one did not report in
    /// time).
    pub(super) fn release_probe(&self) {
        self.next_round();
        self.changed.notify_waiters();
    }

    /// Returns the unused probe permit of `round`, if that is still the current round.
    pub(super) fn release_probe_of(&self, round: u32) {
        let taken = round.wrapping_shl(1) | 1;
        if self
            .probe
            .compare_exchange(taken, taken & !1, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.changed.notify_waiters();
        }
    }

    fn next_round(&self) {
        let _ = self
            .probe
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                Some(((v >> 1).wrapping_add(1)).wrapping_shl(1))
            });
    }

    /// Whether a request would be admitted now (without taking the probe permit).
    pub fn may_admit(&self) -> bool {
        match self.state.load(Ordering::Acquire) {
            OPEN => true,
            PROBATION => self.probe.load(Ordering::Acquire) & 1 == 0,
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
        self.next_round();
        self.state.store(state, Ordering::Release);
        self.changed.notify_waiters();
    }

    pub(super) fn changed(&self) -> Arc<Notify> {
        self.changed.clone()
    }
}

/// The probe permit of an endpoint in probation, held by the service that took it in
/// `poll_ready` and then by its request. Dropped unused (the service was dropped, or its
/// request cancelled before an outcome), it is returned so another probe can go, if its
/// round is still the current one.
#[derive(Debug)]
pub(super) struct Permit(Option<(super::BreakerHandle, u32)>);

impl Permit {
    pub(super) fn new(handle: super::BreakerHandle, round: u32) -> Self {
        Self(Some((handle, round)))
    }

    /// The probe's outcome was reported: the breaker's transition resets the gate.
    pub(super) fn consume(mut self) {
        self.0 = None;
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some((handle, round)) = self.0.take() {
            handle.gate().release_probe_of(round);
        }
    }
}
