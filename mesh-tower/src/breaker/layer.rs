use std::fmt;
use std::sync::Arc;

use mesh_core::classify::Classifier;
use mesh_core::config::{BreakerConfig, RateLimitedConfig};
use tower::Layer;

use super::{Breaker, BreakerHandle, BreakerPolicy, EjectionBudget, SuccessRatePolicy, Transition};
use crate::backoff::{Backoff, InvalidBackoff};
use crate::decision::Recorder;

/// Wraps each endpoint's service in a [`Breaker`]. Endpoints made by one layer share its
/// [`EjectionBudget`], so the layer stands for one service's set of endpoints.
///
/// # Defaults
/// Eject after 7 consecutive failures, for 1 s doubling to 60 s with jitter 0.5; no
/// success-rate rule; rate-limited answers do not count; at most half the endpoints (and
/// never the last one) ejected at once; the default [`Classifier`]; no decision record.
#[derive(Clone)]
pub struct BreakerLayer {
    policy: Option<BreakerPolicy>,
    classifier: Classifier,
    budget: Arc<EjectionBudget>,
    decisions: Option<Recorder>,
}

impl fmt::Debug for BreakerLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BreakerLayer")
            .field("policy", &self.policy)
            .field("ejected", &self.budget.ejected())
            .finish_non_exhaustive()
    }
}

impl Default for BreakerLayer {
    fn default() -> Self {
        Self::with_backoff(
            &BreakerConfig::default(),
            &RateLimitedConfig::default(),
            crate::backoff::DEFAULT_EJECTION_BACKOFF,
        )
    }
}

impl BreakerLayer {
    /// A layer ejecting by `policy`, with at most `max_ejected_share` of the endpoints out.
    pub fn new(policy: BreakerPolicy, max_ejected_share: f64) -> Self {
        Self {
            policy: Some(policy),
            classifier: Classifier::default(),
            budget: Arc::new(EjectionBudget::new(max_ejected_share)),
            decisions: None,
        }
    }

    /// A layer that never ejects: its services pass everything through.
    pub fn disabled() -> Self {
        Self {
            policy: None,
            classifier: Classifier::default(),
            budget: Arc::new(EjectionBudget::new(0.0)),
            decisions: None,
        }
    }

    /// The layer a `[services.NAME]` configuration describes.
    pub fn from_config(
        breaker: &BreakerConfig,
        rate_limited: &RateLimitedConfig,
    ) -> Result<Self, InvalidBackoff> {
        let backoff = Backoff::from_config(&breaker.backoff)?;
        Ok(Self::with_backoff(breaker, rate_limited, backoff))
    }

    fn with_backoff(
        breaker: &BreakerConfig,
        rate_limited: &RateLimitedConfig,
        backoff: Backoff,
    ) -> Self {
        if !breaker.enabled {
            return Self::disabled();
        }
        let policy = BreakerPolicy {
            consecutive_failures: breaker.consecutive_failures.max(1),
            success_rate: breaker.success_rate.as_ref().map(|s| SuccessRatePolicy {
                threshold: s.threshold,
                window: s.window,
                min_requests: s.min_requests,
            }),
            backoff,
            count_rate_limited: rate_limited.count_toward_ejection,
        };
        Self::new(policy, breaker.max_ejected_share)
    }

    /// How answers are classified (default: [`Classifier::default`]).
    pub fn classifier(mut self, classifier: Classifier) -> Self {
        self.classifier = classifier;
        self
    }

    /// Records the breakers' changes of phase, and the ejections the budget refused, in
    /// `recorder`'s [decision record](crate::decision) (default: none). Applies to the
    /// breakers started after the call.
    pub fn decisions(mut self, recorder: Recorder) -> Self {
        self.decisions = Some(recorder);
        self
    }

    /// The shared ejection budget.
    pub fn budget(&self) -> &Arc<EjectionBudget> {
        &self.budget
    }

    /// Starts a breaker for the endpoint named `endpoint`, reporting its transitions to
    /// `on_transition`; `None` when breaking is disabled. Needs a Tokio runtime.
    pub fn handle(
        &self,
        endpoint: impl fmt::Display + Send + 'static,
        on_transition: impl Fn(Transition) + Send + 'static,
    ) -> Option<BreakerHandle> {
        let policy = self.policy.clone()?;
        Some(BreakerHandle::spawn_recorded(
            policy,
            self.classifier.clone(),
            self.budget.clone(),
            endpoint,
            on_transition,
            self.decisions.clone(),
        ))
    }

    /// Wraps `inner` with the breaker `handle` (from [`handle`](Self::handle)).
    pub fn layer_with<S>(&self, inner: S, handle: Option<BreakerHandle>) -> Breaker<S> {
        Breaker::new(inner, handle)
    }
}

impl<S> Layer<S> for BreakerLayer {
    type Service = Breaker<S>;

    /// Wraps `inner` with a new breaker (named `endpoint` in logs). Needs a Tokio runtime
    /// when breaking is enabled.
    fn layer(&self, inner: S) -> Breaker<S> {
        Breaker::new(inner, self.handle("endpoint", |_| {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_the_default_configuration() {
        let config =
            BreakerLayer::from_config(&BreakerConfig::default(), &RateLimitedConfig::default());
        assert_eq!(config.unwrap().policy, BreakerLayer::default().policy);
        assert!(BreakerLayer::default().policy.is_some());
    }
}
