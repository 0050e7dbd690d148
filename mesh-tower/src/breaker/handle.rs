//! A breaker's handle: where outcomes are reported, and its gate.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use mesh_core::classify::{Class, Classifier};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::gate::{Gate, OPEN, PROBATION, SHUT};
use super::{BreakerPolicy, BreakerState, EjectionBudget, PROBE_RETRY, Phase, Transition};
use crate::decision::{BreakerChange, BreakerPhase, Event, Recorder};

/// Outcomes buffered between the request path and a breaker's task.
const CHANNEL: usize = 1024;

/// One endpoint's breaker: report outcomes with [`record`](Self::record), read the
/// [`gate`](Self::gate). Cheap to clone; when the last clone is dropped its task stops and
/// the endpoint leaves the ejection budget.
#[derive(Clone)]
pub struct BreakerHandle(Arc<Shared>);

struct Shared {
    gate: Arc<Gate>,
    tx: mpsc::Sender<Class>,
    classifier: Classifier,
    /// Whether a success must reach the task: a failure was reported since the last
    /// success, or the policy keeps a success-rate window. While the gate is open and
    /// this is false, successes change nothing and are not sent, so healthy traffic
    /// wakes no task.
    dirty: AtomicBool,
    tracks_rate: bool,
}

impl fmt::Debug for BreakerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BreakerHandle")
            .field("gate", &self.0.gate.state())
            .finish_non_exhaustive()
    }
}

impl BreakerHandle {
    /// Starts the breaker of the endpoint named `endpoint` (for logs) in a task: outcomes
    /// are classified by `classifier` and counted against `budget`; `on_transition` sees
    /// each change of phase. Must be called within a Tokio runtime.
    pub fn spawn(
        policy: BreakerPolicy,
        classifier: Classifier,
        budget: Arc<EjectionBudget>,
        endpoint: impl fmt::Display + Send + 'static,
        on_transition: impl Fn(Transition) + Send + 'static,
    ) -> Self {
        Self::spawn_recorded(policy, classifier, budget, endpoint, on_transition, None)
    }

    /// [`spawn`](Self::spawn), recording every change of phase (and every ejection the
    /// budget refused) in `decisions`, under the endpoint's name.
    pub(crate) fn spawn_recorded(
        policy: BreakerPolicy,
        classifier: Classifier,
        budget: Arc<EjectionBudget>,
        endpoint: impl fmt::Display + Send + 'static,
        on_transition: impl Fn(Transition) + Send + 'static,
        decisions: Option<Recorder>,
    ) -> Self {
        // The endpoint's name is made once, not per decision.
        let decisions = decisions.map(|r| (r, Arc::<str>::from(endpoint.to_string())));
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
            decisions,
        ));
        Self(Arc::new(Shared {
            gate,
            tx,
            classifier,
            dirty: AtomicBool::new(false),
            tracks_rate,
        }))
    }

    /// Reports a finished request's class. Never blocks; if the task is far behind, the
    /// outcome is dropped and logged at debug level.
    pub fn record(&self, class: Class) {
        let s = &*self.0;
        match class {
            Class::Success => {
                if !s.tracks_rate && s.gate.is_open() && !s.dirty.swap(false, Ordering::AcqRel) {
                    return;
                }
            }
            _ => s.dirty.store(true, Ordering::Release),
        }
        if let Err(mpsc::error::TrySendError::Full(_)) = s.tx.try_send(class) {
            tracing::debug!("circuit breaker is behind: an outcome was dropped");
        }
    }

    /// The endpoint's gate.
    pub fn gate(&self) -> &Gate {
        &self.0.gate
    }

    pub(super) fn classifier(&self) -> &Classifier {
        &self.0.classifier
    }
}

async fn drive(
    mut state: BreakerState,
    mut rx: mpsc::Receiver<Class>,
    gate: Arc<Gate>,
    budget: Arc<EjectionBudget>,
    endpoint: impl fmt::Display,
    on_transition: impl Fn(Transition),
    decisions: Option<(Recorder, Arc<str>)>,
) {
    let mut rng = fastrand::Rng::new();
    loop {
        let from = state.phase();
        let wake = match state.phase() {
            Phase::Ejected { until } => Some(until),
            Phase::Probation => Some(Instant::now() + PROBE_RETRY),
            Phase::Closed => None,
        };
        // Biased (outcomes first), so that a seeded simulation replays exactly.
        let transition = tokio::select! {
            biased;
            class = rx.recv() => match class {
                Some(class) => state.on_outcome(class, Instant::now(), &budget, &mut rng),
                None => break,
            },
            () = sleep_until(wake) => match state.on_tick(Instant::now()) {
                Some(t) => Some(t),
                None => {
                    // Probation with no outcome for a while: admit another probe.
                    gate.release_probe();
                    None
                }
            },
        };
        if let Some((recorder, name)) = &decisions
            && let Some(cause) = state.take_cause()
        {
            recorder.record(Event::Breaker(BreakerChange {
                endpoint: name.clone(),
                from: phase(from),
                to: phase(state.phase()),
                cause,
                ejected_for: match transition {
                    Some(Transition::Ejected { duration, .. }) => Some(duration),
                    _ => None,
                },
            }));
        }
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

/// The record's name of a phase.
fn phase(phase: Phase) -> BreakerPhase {
    match phase {
        Phase::Closed => BreakerPhase::Closed,
        Phase::Ejected { .. } => BreakerPhase::Ejected,
        Phase::Probation => BreakerPhase::Probation,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
