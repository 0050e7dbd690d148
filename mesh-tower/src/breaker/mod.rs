//! Per-endpoint circuit breaking, off the request path.
//!
//! Each endpoint has a [`Breaker`]: responses report their [`Class`] to it over a bounded
//! channel, and a background task runs the [`BreakerState`] machine and opens or shuts a
//! [`Gate`] that the balancer reads before picking the endpoint. The request path only
//! does a `try_send` and two atomic loads.
//!
//! The machine (Linkerd's consecutive-failures breaker, with Envoy's success-rate and
//! max-ejection ideas):
//!
//! - **Closed**: serving. `consecutive_failures` failures in a row (default 7), or — when
//!   configured — a success rate below the threshold over the window, eject the endpoint.
//! - **Ejected**: not picked, for a back-off of 1 s doubling per repeated ejection up to
//!   60 s, with jitter.
//! - **Probation**: the gate admits exactly one probe request; its success reinstates the
//!   endpoint (and resets the back-off), its failure ejects it again for longer. If the
//!   probe's outcome never arrives (a cancelled request), another probe is admitted after
//!   [`PROBE_RETRY`].
//!
//! Rate-limited answers are neither success nor failure unless `count_rate_limited` is
//! set. An [`EjectionBudget`] shared by a service's endpoints caps the share ejected at
//! once (default 0.5) and never ejects the last endpoint: with the whole pool failing,
//! requests keep flowing (and fail fast to their callers) rather than finding nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::time::Duration;

use mesh_core::classify::Class;
use tokio::sync::mpsc;
use tokio::time::Instant;

mod state;

pub use self::state::{BreakerPolicy, BreakerState, Phase, SuccessRatePolicy, Transition};

/// How long a probe admitted in probation may go without an outcome before another is
/// admitted.
pub const PROBE_RETRY: Duration = Duration::from_secs(5);

/// Outcomes buffered between the request path and a breaker's task.
const CHANNEL: usize = 1024;

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

const OPEN: u8 = 0;
const SHUT: u8 = 1;
const PROBATION: u8 = 2;

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

/// What the balancer reads: may this endpoint take a request now?
#[derive(Debug, Default)]
pub struct Gate {
    state: AtomicU8,
    probe_taken: AtomicBool,
}

impl Gate {
    /// Whether the endpoint may be picked, taking the single probe permit in probation.
    pub fn try_admit(&self) -> bool {
        match self.state.load(Ordering::Acquire) {
            OPEN => true,
            PROBATION => !self.probe_taken.swap(true, Ordering::AcqRel),
            _ => false,
        }
    }

    /// Whether [`try_admit`](Self::try_admit) would admit a request now (it does not take
    /// the probe permit).
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

    fn set(&self, state: u8) {
        self.probe_taken.store(false, Ordering::Release);
        self.state.store(state, Ordering::Release);
    }
}

/// One endpoint's breaker: report outcomes with [`record`](Self::record), read the
/// [`gate`](Self::gate). Dropping it stops its task.
#[derive(Debug, Clone)]
pub struct Breaker {
    gate: Arc<Gate>,
    tx: mpsc::Sender<Class>,
    /// Whether a success must reach the task: a failure was reported since the last
    /// success, or the policy keeps a success-rate window. While the gate is open and
    /// this is false, successes change nothing and are not sent, so healthy traffic
    /// wakes no task.
    dirty: Arc<AtomicBool>,
    tracks_rate: bool,
}

impl Breaker {
    /// Starts the breaker of the endpoint named `endpoint` (for logs) in a task.
    pub fn spawn(
        policy: BreakerPolicy,
        budget: Arc<EjectionBudget>,
        endpoint: impl std::fmt::Display + Send + 'static,
        on_transition: impl Fn(Transition) + Send + 'static,
    ) -> Self {
        let gate = Arc::new(Gate::default());
        let (tx, rx) = mpsc::channel(CHANNEL);
        budget.add_endpoint();
        let tracks_rate = policy.success_rate.is_some();
        tokio::spawn(drive(
            BreakerState::new(policy),
            rx,
            gate.clone(),
            budget,
            endpoint,
            on_transition,
        ));
        Self {
            gate,
            tx,
            dirty: Arc::new(AtomicBool::new(false)),
            tracks_rate,
        }
    }

    /// Reports a finished request's class. Never blocks; if the task is far behind, the
    /// outcome is dropped and logged at debug level.
    pub fn record(&self, class: Class) {
        match class {
            Class::Success => {
                if !self.tracks_rate
                    && self.gate.is_open()
                    && !self.dirty.swap(false, Ordering::AcqRel)
                {
                    return;
                }
            }
            _ => self.dirty.store(true, Ordering::Release),
        }
        if let Err(mpsc::error::TrySendError::Full(_)) = self.tx.try_send(class) {
            tracing::debug!("circuit breaker is behind: an outcome was dropped");
        }
    }

    /// The endpoint's gate.
    pub fn gate(&self) -> &Gate {
        &self.gate
    }
}

async fn drive(
    mut state: BreakerState,
    mut rx: mpsc::Receiver<Class>,
    gate: Arc<Gate>,
    budget: Arc<EjectionBudget>,
    endpoint: impl std::fmt::Display,
    on_transition: impl Fn(Transition),
) {
    let mut rng = fastrand::Rng::new();
    loop {
        let wake = match state.phase() {
            Phase::Ejected { until } => Some(until),
            Phase::Probation => Some(Instant::now() + PROBE_RETRY),
            Phase::Closed => None,
        };
        let transition = tokio::select! {
            class = rx.recv() => match class {
                Some(class) => state.on_outcome(class, Instant::now(), &budget, &mut rng),
                None => break,
            },
            () = sleep_until(wake) => match state.on_tick(Instant::now()) {
                Some(t) => Some(t),
                None => {
                    // Probation with no outcome for a while: admit another probe.
                    gate.probe_taken.store(false, Ordering::Release);
                    None
                }
            },
        };
        if let Some(t) = transition {
            match t {
                Transition::Ejected { duration, streak } => {
                    tracing::info!(%endpoint, ?duration, streak, "endpoint ejected");
                    gate.set(SHUT);
                }
                Transition::Probation => {
                    tracing::debug!(%endpoint, "endpoint on probation");
                    gate.set(PROBATION);
                }
                Transition::Reinstated => {
                    tracing::info!(%endpoint, "endpoint reinstated");
                    gate.set(OPEN);
                }
            }
            on_transition(t);
        }
    }
    if state.phase() != Phase::Closed {
        budget.release();
    }
    budget.remove_endpoint();
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn policy() -> BreakerPolicy {
        BreakerPolicy {
            consecutive_failures: 3,
            success_rate: None,
            backoff: crate::backoff::Backoff::new(
                Duration::from_secs(1),
                Duration::from_secs(60),
                0.0,
            )
            .unwrap(),
            count_rate_limited: false,
        }
    }

    /// Lets the breaker task process what was sent.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_gate_follows_the_state_machine() {
        let budget = Arc::new(EjectionBudget::new(0.5));
        budget.add_endpoint(); // another endpoint, so this one may be ejected
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let breaker = Breaker::spawn(policy(), budget.clone(), "10.0.0.1:80", move |t| {
            log.lock().unwrap().push(t)
        });
        assert!(breaker.gate().try_admit());
        for _ in 0..3 {
            breaker.record(Class::Failure);
        }
        settle().await;
        assert!(!breaker.gate().try_admit(), "ejected");
        assert_eq!(budget.ejected(), 1);
        tokio::time::advance(Duration::from_secs(1)).await;
        settle().await;
        assert!(breaker.gate().try_admit(), "one probe");
        assert!(!breaker.gate().try_admit(), "only one probe");
        // The probe never reports: another is admitted after PROBE_RETRY.
        tokio::time::advance(PROBE_RETRY).await;
        settle().await;
        assert!(breaker.gate().try_admit());
        breaker.record(Class::Success);
        settle().await;
        assert!(breaker.gate().is_open());
        assert_eq!(budget.ejected(), 0);
        assert_eq!(
            *seen.lock().unwrap(),
            [
                Transition::Ejected {
                    duration: Duration::from_secs(1),
                    streak: 1
                },
                Transition::Probation,
                Transition::Reinstated
            ]
        );
        // Dropping the breaker removes the endpoint from the budget.
        drop(breaker);
        settle().await;
        assert!(
            !budget.try_eject(),
            "one endpoint left: it may not be ejected"
        );
    }
}
