use std::sync::Arc;

use mesh_core::config::AuthorizationPolicy;
use tower::Layer;

use super::{Authorize, Policy, PolicyError};
use crate::metrics::server::ListenerMetrics;
use prometheus_client::metrics::counter::Counter;

/// Authorizes requests by a [`Policy`]; see the [module docs](super). Clones share the
/// compiled policy.
#[derive(Clone, Debug)]
pub struct AuthorizeLayer {
    policy: Arc<Policy>,
    counters: Option<Arc<Counters>>,
}

/// The decision counters of one policy on one listener, made once.
#[derive(Debug)]
pub(super) struct Counters {
    pub(super) rules: Vec<Counter>,
    pub(super) allow: Counter,
    pub(super) audit: Counter,
    pub(super) deny: Counter,
}

impl AuthorizeLayer {
    /// Authorizes by `policy`.
    pub fn new(policy: Policy) -> Self {
        Self {
            policy: Arc::new(policy),
            counters: None,
        }
    }

    /// Counts decisions in `metrics` (`mesh_server_authz_total`).
    pub fn with_metrics(mut self, metrics: &ListenerMetrics) -> Self {
        let name = self.policy.name();
        self.counters = Some(Arc::new(Counters {
            rules: self
                .policy
                .rule_names()
                .map(|rule| metrics.authz_counter(name, Some(rule), "allow"))
                .collect(),
            allow: metrics.authz_counter(name, None, "allow"),
            audit: metrics.authz_counter(name, None, "audit"),
            deny: metrics.authz_counter(name, None, "deny"),
        }));
        self
    }

    /// Compiles the policy named `name` from its configuration.
    pub fn from_config(name: &str, config: &AuthorizationPolicy) -> Result<Self, PolicyError> {
        Policy::new(name, config).map(Self::new)
    }

    /// The compiled policy.
    pub fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }
}

impl<S> Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;

    fn layer(&self, inner: S) -> Authorize<S> {
        Authorize::new(inner, self.policy.clone(), self.counters.clone())
    }
}
