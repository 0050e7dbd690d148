//! A breaker's handle: where outcomes are reported, and its gate.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use mesh_core::classify::{Class, Classifier};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

use super::gate::{Gate, OPEN, PROBATION, SHUT, round_since};
use super::{BreakerPolicy, BreakerState, EjectionBudget, PROBE_RETRY, Phase, Transition};
use crate::decision::{BreakerChange, BreakerPhase, Event, Recorder};

/// Outcomes buffered between the request path and a breaker's task.
const CHANNEL: usize = 1024;

/// One endpoint's breaker: report outcomes with [`record`](Self::record), read the
/// [`gate`](Self::gate). Cheap to clone.
///
/// The endpoint counts in the ejection budget until it leaves: when the last
/// [`Breaker`](super::Breaker) service built with this handle is dropped (the endpoint
/// was removed from its balancer), or, for a handle never given to one, when its last
/// clone is. Clones held by requests still in flight then no longer count it: a removed
/// endpoint's long stream cannot let the budget eject the last live one. Its task stops
/// there, its gate opens for good, and outcomes recorded after are dropped: build a new
/// handle for an endpoint that comes back.
#[derive(Clone)]
pub struct BreakerHandle(Arc<Shared>);

struct Shared {
    gate: Arc<Gate>,
    /// Outcomes, each with who reports it.
    tx: mpsc::Sender<(Class, Reporter)>,
    classifier: Classifier,
    /// Whether a success must reach the task: a failure was reported since the last
    /// success, or the policy keeps a success-rate window. While the gate is open and
    /// this is false, successes change nothing and are not sent, so healthy traffic
    /// wakes no task.
    dirty: AtomicBool,
    tracks_rate: bool,
    /// [`Breaker`](super::Breaker) services holding this handle ([`Member`]).
    services: AtomicUsize,
    /// Signalled when the last of them is dropped: the endpoint leaves.
    left: Arc<Notify>,
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
        let left = Arc::new(Notify::new());
        tokio::spawn(drive(
            BreakerState::new(policy),
            (rx, left.clone()),
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
            services: AtomicUsize::new(0),
            left,
        }))
    }

    /// Reports a finished request's class. Never blocks; if the task is far behind, the
    /// outcome is dropped and logged at debug level. In probation it is taken as the
    /// probe's (a [`Breaker`](super::Breaker) service tells its probe from requests sent
    /// before the ejection, whose outcomes probation ignores).
    pub fn record(&self, class: Class) {
        self.send(class, Reporter::Anyone);
    }

    /// [`record`](Self::record) for a request that held the probe permit of `round`, or
    /// none: in probation only the outcome of a probe of that probation counts.
    pub(super) fn record_outcome(&self, class: Class, round: Option<u32>) {
        self.send(class, round.map_or(Reporter::NotProbe, Reporter::Probe));
    }

    fn send(&self, class: Class, reporter: Reporter) {
        let s = &*self.0;
        match class {
            Class::Success => {
                if !s.tracks_rate && s.gate.is_open() && !s.dirty.swap(false, Ordering::AcqRel) {
                    return;
                }
            }
            _ => s.dirty.store(true, Ordering::Release),
        }
        if let Err(mpsc::error::TrySendError::Full(_)) = s.tx.try_send((class, reporter)) {
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

/// A [`Breaker`](super::Breaker) service's hold on its endpoint's place in the ejection
/// budget: the endpoint leaves when the last one is dropped (see [`BreakerHandle`]).
pub(super) struct Member(BreakerHandle);

impl Member {
    pub(super) fn new(handle: BreakerHandle) -> Self {
        handle.0.services.fetch_add(1, Ordering::AcqRel);
        Self(handle)
    }
}

impl Clone for Member {
    fn clone(&self) -> Self {
        Self::new(self.0.clone())
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        if self.0.0.services.fetch_sub(1, Ordering::AcqRel) == 1 {
            // A permit kept for the task, which may not be waiting right now.
            self.0.0.left.notify_one();
        }
    }
}

impl std::ops::Deref for Member {
    type Target = BreakerHandle;

    fn deref(&self) -> &BreakerHandle {
        &self.0
    }
}

impl fmt::Debug for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Who reports an outcome.
#[derive(Clone, Copy, Debug)]
enum Reporter {
    /// [`BreakerHandle::record`]: taken as a probe's in probation.
    Anyone,
    /// A request that held the probe permit of this round.
    Probe(u32),
    /// A request that held no permit (sent while the gate was open).
    NotProbe,
}

async fn drive(
    mut state: BreakerState,
    // Outcomes, and the signal that the endpoint left.
    (mut rx, left): (mpsc::Receiver<(Class, Reporter)>, Arc<Notify>),
    gate: Arc<Gate>,
    budget: Arc<EjectionBudget>,
    endpoint: impl fmt::Display,
    on_transition: impl Fn(Transition),
    decisions: Option<(Recorder, Arc<str>)>,
) {
    let mut rng = fastrand::Rng::new();
    // In probation: the round it began in (a probe of an earlier one, sent before the
    // last ejection, does not decide it), and when the next probe is admitted if the
    // current one has not reported.
    let mut probation_round = 0;
    let mut next_probe = Instant::now();
    loop {
        let from = state.phase();
        let wake = match state.phase() {
            Phase::Ejected { until } => Some(until),
            Phase::Probation => Some(next_probe),
            Phase::Closed => None,
        };
        // Biased (outcomes first), so that a seeded simulation replays exactly.
        let transition = tokio::select! {
            biased;
            outcome = rx.recv() => match outcome {
                Some((class, reporter)) => {
                    let probe = match reporter {
                        Reporter::Anyone => true,
                        Reporter::Probe(round) => round_since(round, probation_round),
                        Reporter::NotProbe => false,
                    };
                    if probe {
                        state.on_outcome(class, Instant::now(), &budget, &mut rng)
                    } else {
                        state.on_outcome_without_permit(class, Instant::now(), &budget, &mut rng)
                    }
                }
                None => break,
            },
            // Removed from its balancer: out of the budget now, whatever is in flight.
            () = left.notified() => break,
            () = sleep_until(wake) => match state.on_tick(Instant::now()) {
                Some(t) => Some(t),
                None => {
                    // Probation with no outcome for a while: admit another probe.
                    gate.release_probe();
                    next_probe = Instant::now() + PROBE_RETRY;
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
                    probation_round = gate.round();
                    next_probe = Instant::now() + PROBE_RETRY;
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
    // Out of the budget, the endpoint is judged no more: a service still (or again)
    // built on this handle passes everything rather than wait on a gate nobody opens.
    gate.set(OPEN);
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
