//! The gate a breaker's task opens and shuts, and that readiness reads.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

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
/// (a cancelled request) cannot let a second probe through. The state, the round and
/// whether the probe is taken share one atomic word, so that they change together: a
/// probe is never taken from a gate that has just been shut.
#[derive(Debug, Default)]
pub struct Gate {
    /// Bit 0: the probe is taken; bits 1–2: the state; bits 3 up: the probe round.
    word: AtomicU32,
    changed: Arc<Notify>,
}

const TAKEN: u32 = 1;
const STATE_BITS: u32 = 0b110;
const ROUND_SHIFT: u32 = 3;

fn state_of(word: u32) -> u8 {
    ((word & STATE_BITS) >> 1) as u8
}

fn round_of(word: u32) -> u32 {
    word >> ROUND_SHIFT
}

/// A word in the round after `word`'s, with `state` and the probe free.
fn next_round(word: u32, state: u8) -> u32 {
    (round_of(word).wrapping_add(1) << ROUND_SHIFT) | (u32::from(state) << 1)
}

/// Whether probe round `round` is `since` or later (rounds wrap).
pub(super) fn round_since(round: u32, since: u32) -> bool {
    round.wrapping_sub(since) & (u32::MAX >> ROUND_SHIFT) < 1 << (31 - ROUND_SHIFT)
}

impl Gate {
    /// Takes the single probe permit in probation, returning its round. (Open gates need
    /// no permit.)
    pub(super) fn try_probe(&self) -> Option<u32> {
        self.word
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                (state_of(w) == PROBATION && w & TAKEN == 0).then_some(w | TAKEN)
            })
            .ok()
            .map(round_of)
    }

    /// In probation, starts a new probe round with its probe free (the last one did not
    /// report in time).
    pub(super) fn release_probe(&self) {
        let released = self
            .word
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                (state_of(w) == PROBATION).then(|| next_round(w, PROBATION))
            })
            .is_ok();
        if released {
            self.changed.notify_waiters();
        }
    }

    /// Returns the unused probe permit of `round`, if that is still the current round.
    pub(super) fn release_probe_of(&self, round: u32) {
        let taken = (round << ROUND_SHIFT) | (u32::from(PROBATION) << 1) | TAKEN;
        if self
            .word
            .compare_exchange(taken, taken & !TAKEN, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.changed.notify_waiters();
        }
    }

    /// The current probe round.
    pub(super) fn round(&self) -> u32 {
        round_of(self.word.load(Ordering::Acquire))
    }

    /// Whether a request would be admitted now (without taking the probe permit).
    pub fn may_admit(&self) -> bool {
        let w = self.word.load(Ordering::Acquire);
        match state_of(w) {
            OPEN => true,
            PROBATION => w & TAKEN == 0,
            _ => false,
        }
    }

    /// Whether the endpoint is serving normally (not ejected, not on probation).
    pub fn is_open(&self) -> bool {
        state_of(self.word.load(Ordering::Acquire)) == OPEN
    }

    /// The gate's state, for display.
    pub fn state(&self) -> GateState {
        match state_of(self.word.load(Ordering::Acquire)) {
            OPEN => GateState::Open,
            PROBATION => GateState::Probation,
            _ => GateState::Ejected,
        }
    }

    /// Sets the state, in a new probe round.
    pub(super) fn set(&self, state: u8) {
        let _ = self
            .word
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                Some(next_round(w, state))
            });
        self.changed.notify_waiters();
    }

    pub(super) fn changed(&self) -> Arc<Notify> {
        self.changed.clone()
    }
}

/// The probe permit of an endpoint in probation, held by the service that took it in
/// `poll_ready` and then by its request. Dropped unused (the service was dropped, or its
/// request cancelled before an outcome), it is returned so another probe can go, if its
/// round is still the current one. Boxed: probes are rare, and every request's future
/// and body keep room for one.
#[derive(Debug)]
pub(super) struct Permit(Option<Box<(super::BreakerHandle, u32)>>);

impl Permit {
    pub(super) fn new(handle: super::BreakerHandle, round: u32) -> Self {
        Self(Some(Box::new((handle, round))))
    }

    /// The probe round the permit was taken in.
    pub(super) fn round(&self) -> Option<u32> {
        self.0.as_ref().map(|held| held.1)
    }

    /// The probe's outcome was reported: the breaker's transition resets the gate.
    pub(super) fn consume(mut self) {
        self.0 = None;
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(held) = self.0.take() {
            held.0.gate().release_probe_of(held.1);
        }
    }
}
