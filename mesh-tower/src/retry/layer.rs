use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use tower::Layer;

use super::{Retry, RetryBudget, RetryPolicy};
use crate::decision::Recorder;

/// Retries failed tries of the service below; see the [module docs](super).
///
/// # Defaults
/// [`RetryPolicy::default`] and [`RetryBudget::default`] (20 % of requests plus 10 per
/// second, over 10 s), no decision record. Services made by one `RetryLayer` (and its
/// clones) share its budget.
#[derive(Clone, Debug, Default)]
pub struct RetryLayer {
    policy: RetryPolicy,
    budget: Arc<RetryBudget>,
    retries: Option<Counter>,
    exhausted: Option<Counter>,
    decisions: Option<Recorder>,
}

#[derive(Debug)]
pub(super) struct Shared {
    pub(super) policy: RetryPolicy,
    pub(super) budget: Arc<RetryBudget>,
    pub(super) retries: Option<Counter>,
    pub(super) exhausted: Option<Counter>,
    pub(super) decisions: Option<Recorder>,
}

impl RetryLayer {
    /// A layer retrying by `policy` within `budget`.
    pub fn new(policy: RetryPolicy, budget: RetryBudget) -> Self {
        Self {
            policy,
            budget: Arc::new(budget),
            retries: None,
            exhausted: None,
            decisions: None,
        }
    }

    /// Counts retries sent in `retries`, and retries the budget refused in `exhausted`
    /// (for example `prometheus-client` counters registered by the host).
    pub fn counters(mut self, retries: Counter, exhausted: Counter) -> Self {
        self.retries = Some(retries);
        self.exhausted = Some(exhausted);
        self
    }

    /// Records, after every failed try, whether it was retried and why (not), in
    /// `recorder`'s [decision record](crate::decision) (default: none).
    pub fn decisions(mut self, recorder: Recorder) -> Self {
        self.decisions = Some(recorder);
        self
    }

    /// The policy.
    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }

    /// The shared budget.
    pub fn budget(&self) -> &Arc<RetryBudget> {
        &self.budget
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Retry<S> {
        Retry::from_parts(
            inner,
            Arc::new(Shared {
                policy: self.policy.clone(),
                budget: self.budget.clone(),
                retries: self.retries.clone(),
                exhausted: self.exhausted.clone(),
                decisions: self.decisions.clone(),
            }),
        )
    }
}
