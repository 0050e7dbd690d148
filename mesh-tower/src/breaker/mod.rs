//! Per-endpoint circuit breaking as a layer, with outcomes judged off the request path.
//!
//! [`BreakerLayer`] wraps each endpoint's service in a [`Breaker`]. Every answer's
//! [`Class`] (from the response head, or from gRPC trailers when the status comes there)
//! and every error is reported to the endpoint's [`BreakerHandle`] over a bounded channel;
//! a background task runs the [`BreakerState`] machine and opens or shuts a [`Gate`]. The
//! request path only does a `try_send` (none at all for a success while the gate is open
//! and no failure is pending) and a few atomic loads.
//!
//! **The gate is readiness.** While the endpoint is ejected, [`Breaker`]'s `poll_ready` is
//! pending (it wakes when the gate changes), and its [`Load`](crate::load::Load) says
//! `unready`, so the balancer does not pick it. In probation, the first `poll_ready` takes
//! the single probe permit; others stay pending. A permit whose request is dropped
//! unanswered (cancelled, or its service dropped before the call) is returned at once.
//!
//! The machine (Linkerd's consecutive-failures breaker, with Envoy's success-rate and
//! max-ejection ideas):
//!
//! - **Closed**: serving. `consecutive_failures` failures in a row (default 7), or — when
//!   configured — a success rate below the threshold over the window, eject the endpoint.
//! - **Ejected**: not ready, for a back-off of 1 s doubling per repeated ejection up to
//!   60 s, with jitter.
//! - **Probation**: one probe request; its success reinstates the endpoint (and resets the
//!   back-off), its failure ejects it again for longer. If the probe's outcome never
//!   arrives, another probe is admitted after [`PROBE_RETRY`].
//!
//! Rate-limited answers are neither success nor failure unless `count_rate_limited` is
//! set. An [`EjectionBudget`] shared by a service's endpoints (one per layer) caps the
//! share ejected at once (default 0.5) and never ejects the last endpoint: with the whole
//! pool failing, requests keep flowing (and fail fast to their callers) rather than
//! finding nothing.
//!
//! ```
//! use http::{Request, Response, StatusCode};
//! use mesh_tower::breaker::{BreakerLayer, BreakerPolicy};
//! use mesh_tower::backoff::Backoff;
//! use std::time::Duration;
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let policy = BreakerPolicy {
//!     consecutive_failures: 2,
//!     success_rate: None,
//!     backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(60), 0.5)?,
//!     count_rate_limited: false,
//! };
//! let layer = BreakerLayer::new(policy, 1.0);
//! layer.budget().add_endpoint(); // stands for a second endpoint: this one may be ejected
//! let mut endpoint = ServiceBuilder::new().layer(layer).service_fn(|_req: Request<()>| async {
//!     Ok::<_, http::Error>(Response::builder().status(503).body(())?)
//! });
//! for _ in 0..2 {
//!     let response = endpoint.ready().await?.call(Request::new(())).await?;
//!     assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
//! }
//! tokio::task::yield_now().await; // the breaker's task sees the failures
//! let ready = tokio::time::timeout(Duration::from_millis(100), endpoint.ready()).await;
//! assert!(ready.is_err(), "ejected: not ready");
//! # Ok(()) }
//! ```

mod body;
mod budget;
mod future;
mod gate;
mod handle;
mod layer;
mod service;
mod state;

use std::time::Duration;

pub use self::body::ResponseBody;
pub use self::budget::EjectionBudget;
pub use self::future::ResponseFuture;
pub use self::gate::{Gate, GateState};
pub use self::handle::BreakerHandle;
pub use self::layer::BreakerLayer;
pub use self::service::Breaker;
pub use self::state::{BreakerPolicy, BreakerState, Phase, SuccessRatePolicy, Transition};

#[cfg(doc)]
use mesh_core::classify::Class;

/// How long a probe admitted in probation may go without an outcome before another is
/// admitted.
pub const PROBE_RETRY: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::classify::{Class, Classifier};
    use std::sync::Arc;
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
        let breaker = BreakerHandle::spawn(
            policy(),
            Classifier::default(),
            budget.clone(),
            "10.0.0.1:80",
            move |t| log.lock().unwrap().push(t),
        );
        assert!(breaker.gate().may_admit());
        for _ in 0..3 {
            breaker.record(Class::Failure);
        }
        settle().await;
        assert!(!breaker.gate().may_admit(), "ejected");
        assert_eq!(budget.ejected(), 1);
        tokio::time::advance(Duration::from_secs(1)).await;
        settle().await;
        assert!(breaker.gate().try_probe().is_some(), "one probe");
        assert!(breaker.gate().try_probe().is_none(), "only one probe");
        // The probe never reports: another is admitted after PROBE_RETRY.
        tokio::time::advance(PROBE_RETRY).await;
        settle().await;
        assert!(breaker.gate().try_probe().is_some());
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

    /// Tries the request failed itself (its body stalled past the body read timeout),
    /// and tries never sent because the endpoint's pool was full, are not the endpoint's
    /// failures: however many, it stays in; real failures count.
    #[tokio::test(start_paused = true)]
    async fn failures_of_the_request_itself_do_not_eject() {
        use tower::ServiceExt;
        let layer = BreakerLayer::new(policy(), 0.5);
        layer.budget().add_endpoint(); // another endpoint, so this one may be ejected
        let handle = layer.handle("10.0.0.1:80", |_| {}).unwrap();
        let stalled = tower::service_fn(|_req: http::Request<()>| async {
            Err::<http::Response<()>, mesh_core::error::BoxError>(
                crate::connect::BodyReadTimeout(crate::connect::BODY_READ_TIMEOUT).into(),
            )
        });
        let breaker = layer.layer_with(stalled, Some(handle.clone()));
        for _ in 0..5 {
            let _ = breaker.clone().oneshot(http::Request::new(())).await;
        }
        let full = tower::service_fn(|_req: http::Request<()>| async {
            Err::<http::Response<()>, mesh_core::error::BoxError>(
                crate::connect::PoolOverflow {
                    addr: "10.0.0.1:80".parse().unwrap(),
                    connections: 1,
                    pending: 0,
                }
                .into(),
            )
        });
        let breaker = layer.layer_with(full, Some(handle.clone()));
        for _ in 0..5 {
            let _ = breaker.clone().oneshot(http::Request::new(())).await;
        }
        settle().await;
        assert!(
            handle.gate().may_admit(),
            "not ejected by the requests' own failures"
        );
        let reset = tower::service_fn(|_req: http::Request<()>| async {
            Err::<http::Response<()>, mesh_core::error::BoxError>("connection reset".into())
        });
        let breaker = layer.layer_with(reset, Some(handle.clone()));
        for _ in 0..3 {
            let _ = breaker.clone().oneshot(http::Request::new(())).await;
        }
        settle().await;
        assert!(!handle.gate().may_admit(), "ejected by the endpoint's");
    }

    #[tokio::test(start_paused = true)]
    async fn an_ejection_and_a_recovery_are_recorded_with_their_causes() {
        use crate::decision::{BreakerCause, BreakerPhase, DecisionRecord, Kind};
        let record = DecisionRecord::new(16);
        let layer = BreakerLayer::new(policy(), 0.5).decisions(record.recorder("users"));
        layer.budget().add_endpoint(); // another endpoint, so this one may be ejected
        let breaker = layer.handle("10.0.0.1:80", |_| {}).unwrap();
        for _ in 0..3 {
            breaker.record(Class::Failure);
        }
        settle().await;
        tokio::time::advance(Duration::from_secs(1)).await;
        settle().await;
        assert!(breaker.gate().try_probe().is_some());
        breaker.record(Class::Success);
        settle().await;
        let changes: Vec<_> = record
            .of_kind(Kind::Breaker)
            .iter()
            .map(|d| d.event.as_breaker().unwrap().clone())
            .collect();
        let steps: Vec<_> = changes.iter().map(|c| (c.from, c.to, c.cause)).collect();
        assert_eq!(
            steps,
            [
                (
                    BreakerPhase::Closed,
                    BreakerPhase::Ejected,
                    BreakerCause::ConsecutiveFailures { failures: 3 }
                ),
                (
                    BreakerPhase::Ejected,
                    BreakerPhase::Probation,
                    BreakerCause::EjectionOver
                ),
                (
                    BreakerPhase::Probation,
                    BreakerPhase::Closed,
                    BreakerCause::ProbeSucceeded
                ),
            ]
        );
        assert_eq!(changes[0].ejected_for, Some(Duration::from_secs(1)));
        assert_eq!(changes[1].ejected_for, None);
        assert!(changes.iter().all(|c| &*c.endpoint == "10.0.0.1:80"));
        let line = record.snapshot()[0].to_string();
        assert!(
            line.ends_with(
                "users breaker 10.0.0.1:80 closed -> ejected: 3 consecutive failures (for 1s)"
            ),
            "{line}"
        );
    }

    /// A permit from an earlier probe round (its probe did not report in time, and a new
    /// one was admitted) returns nothing when dropped: one probe at a time.
    #[test]
    fn a_stale_probe_permit_frees_no_newer_probe() {
        let gate = gate::Gate::default();
        gate.set(gate::PROBATION);
        let first = gate.try_probe().unwrap();
        // The task admits another probe: a new round.
        gate.release_probe();
        let second = gate.try_probe().unwrap();
        assert_ne!(first, second);
        gate.release_probe_of(first);
        assert!(
            !gate.may_admit(),
            "the stale permit freed the new round's probe"
        );
        assert!(gate.try_probe().is_none());
        gate.release_probe_of(second);
        assert!(gate.may_admit());
        // A new probation is a new round too.
        let third = gate.try_probe().unwrap();
        gate.set(gate::SHUT);
        gate.set(gate::PROBATION);
        let fourth = gate.try_probe().unwrap();
        gate.release_probe_of(third);
        assert!(gate.try_probe().is_none());
        gate.release_probe_of(fourth);
        assert!(gate.try_probe().is_some());
    }

    /// A probe of an earlier probation (sent before the last ejection, and slow) does
    /// not decide the next one; ignored outcomes do not put off the next probe; an
    /// ejection backed off past the clock's range does not panic.
    #[tokio::test(start_paused = true)]
    async fn only_a_probe_of_this_probation_decides_it() {
        let budget = Arc::new(EjectionBudget::new(0.5));
        budget.add_endpoint();
        let breaker = BreakerHandle::spawn(
            policy(),
            Classifier::default(),
            budget.clone(),
            "10.0.0.1:80",
            |_| {},
        );
        for _ in 0..3 {
            breaker.record(Class::Failure);
        }
        settle().await;
        tokio::time::advance(Duration::from_secs(1)).await;
        settle().await;
        let slow = breaker.gate().try_probe().unwrap();
        // The first probe hangs: another is admitted, and fails.
        tokio::time::advance(PROBE_RETRY).await;
        settle().await;
        let second = breaker.gate().try_probe().unwrap();
        breaker.record_outcome(Class::Failure, Some(second));
        settle().await;
        assert_eq!(breaker.gate().state(), GateState::Ejected);
        tokio::time::advance(Duration::from_secs(2)).await;
        settle().await;
        assert_eq!(breaker.gate().state(), GateState::Probation);
        // The slow probe of the first probation succeeds now: it decides nothing.
        breaker.record_outcome(Class::Success, Some(slow));
        settle().await;
        assert_eq!(breaker.gate().state(), GateState::Probation);
        // This probation's probe is lost; requests sent before the ejection keep ending
        // within PROBE_RETRY of each other: the next probe still comes on time.
        let lost = breaker.gate().try_probe().unwrap();
        for _ in 0..4 {
            tokio::time::advance(Duration::from_secs(1)).await;
            breaker.record_outcome(Class::Success, None);
            settle().await;
        }
        assert!(!breaker.gate().may_admit());
        tokio::time::advance(Duration::from_secs(1)).await;
        settle().await;
        let probe = breaker.gate().try_probe().unwrap();
        assert_ne!(probe, lost);
        breaker.record_outcome(Class::Success, Some(probe));
        settle().await;
        assert!(breaker.gate().is_open());
    }

    /// An endpoint removed while ejected leaves its gate open: a service still built on
    /// its handle passes everything rather than wait on a gate nobody opens.
    #[tokio::test(start_paused = true)]
    async fn a_removed_endpoints_gate_opens() {
        let layer = BreakerLayer::new(policy(), 0.5);
        let _other = layer.layer_with((), layer.handle("10.0.0.1:80", |_| {}));
        let ejected = layer.layer_with((), layer.handle("10.0.0.2:80", |_| {}));
        let handle = ejected.handle().cloned().unwrap();
        for _ in 0..3 {
            handle.record(Class::Failure);
        }
        settle().await;
        assert_eq!(handle.gate().state(), GateState::Ejected);
        drop(ejected);
        settle().await;
        assert!(handle.gate().is_open());
        assert_eq!(layer.budget().ejected(), 0);
    }

    #[test]
    fn an_ejection_past_the_clocks_range_does_not_panic() {
        let budget = EjectionBudget::new(0.5);
        budget.add_endpoint();
        budget.add_endpoint();
        let mut state = BreakerState::new(BreakerPolicy {
            backoff: crate::backoff::Backoff::new(Duration::MAX, Duration::MAX, 0.0).unwrap(),
            ..policy()
        });
        let mut rng = fastrand::Rng::with_seed(1);
        let now = tokio::time::Instant::now();
        for _ in 0..3 {
            state.on_outcome(Class::Failure, now, &budget, &mut rng);
        }
        assert!(matches!(state.phase(), Phase::Ejected { until } if until > now));
    }

    /// In probation only the probe decides: a request sent before the ejection that
    /// succeeds after it does not reinstate the endpoint.
    #[test]
    fn in_probation_only_the_probes_outcome_counts() {
        let budget = EjectionBudget::new(0.5);
        budget.add_endpoint();
        budget.add_endpoint();
        let mut rng = fastrand::Rng::with_seed(3);
        let mut state = BreakerState::new(policy());
        let now = tokio::time::Instant::now();
        for _ in 0..3 {
            state.on_outcome(Class::Failure, now, &budget, &mut rng);
        }
        let later = now + Duration::from_secs(2);
        assert_eq!(state.on_tick(later), Some(Transition::Probation));
        assert_eq!(
            state.on_outcome_without_permit(Class::Success, later, &budget, &mut rng),
            None
        );
        assert_eq!(state.phase(), Phase::Probation);
        assert_eq!(
            state.on_outcome(Class::Success, later, &budget, &mut rng),
            Some(Transition::Reinstated)
        );
        // Closed again: outcomes without a permit count as usual.
        for _ in 0..3 {
            state.on_outcome_without_permit(Class::Failure, later, &budget, &mut rng);
        }
        assert!(matches!(state.phase(), Phase::Ejected { .. }));
    }

    /// An endpoint removed from its balancer (its `Breaker` service dropped) leaves the
    /// ejection budget at once, though a request to it is still in flight and holds its
    /// handle: the last live endpoint is not ejected.
    #[tokio::test(start_paused = true)]
    async fn a_removed_endpoint_leaves_the_budget_while_its_requests_run() {
        let layer = BreakerLayer::new(policy(), 0.5);
        let live = layer.layer_with((), layer.handle("10.0.0.1:80", |_| {}));
        let removed = layer.layer_with((), layer.handle("10.0.0.2:80", |_| {}));
        let clone = removed.clone();
        let in_flight = removed.handle().cloned().unwrap();
        drop(removed);
        settle().await;
        // A clone of its service still counts it: of two endpoints, one may go.
        assert!(layer.budget().try_eject());
        layer.budget().release();
        drop(clone);
        settle().await;
        let handle = live.handle().unwrap();
        for _ in 0..3 {
            handle.record(Class::Failure);
        }
        settle().await;
        assert!(handle.gate().is_open(), "the last live endpoint stays in");
        // Outcomes of the removed endpoint's last request go nowhere, harmlessly.
        in_flight.record(Class::Failure);
        drop(in_flight);
        settle().await;
        assert!(handle.gate().is_open());
    }

    #[tokio::test(start_paused = true)]
    async fn an_ejection_the_budget_refuses_is_recorded() {
        use crate::decision::{BreakerCause, BreakerPhase, DecisionRecord};
        let record = DecisionRecord::new(16);
        let layer = BreakerLayer::new(policy(), 0.5).decisions(record.recorder("users"));
        // A lone endpoint: never ejected.
        let breaker = layer.handle("10.0.0.1:80", |_| {}).unwrap();
        for _ in 0..3 {
            breaker.record(Class::Failure);
        }
        settle().await;
        assert!(breaker.gate().is_open());
        let changes = record.snapshot();
        assert_eq!(changes.len(), 1);
        let change = changes[0].event.as_breaker().unwrap();
        assert_eq!(
            (change.from, change.to, change.cause),
            (
                BreakerPhase::Closed,
                BreakerPhase::Closed,
                BreakerCause::BudgetFull
            )
        );
    }
}
