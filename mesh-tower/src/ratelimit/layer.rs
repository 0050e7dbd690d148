use std::sync::Arc;

use mesh_core::config::RateLimitConfig;
use tower::Layer;

use prometheus_client::metrics::counter::Counter;

use super::{Limits, RateLimit};
use crate::metrics::server::ListenerMetrics;

/// Limits requests by [`Limits`]; see the [module docs](super). Clones share the limiters.
#[derive(Clone, Debug)]
pub struct RateLimitLayer {
    limits: Arc<Limits>,
    counters: Option<Arc<[Counter; 2]>>,
}

impl RateLimitLayer {
    /// Limits by `limits`.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits: Arc::new(limits),
            counters: None,
        }
    }

    /// Counts refusals in `metrics` (`mesh_server_rate_limited_total`).
    pub fn with_metrics(mut self, metrics: &ListenerMetrics) -> Self {
        self.counters = Some(Arc::new([
            metrics.rate_limited_counter("client"),
            metrics.rate_limited_counter("total"),
        ]));
        self
    }

    /// Compiles `config`.
    pub fn from_config(config: &RateLimitConfig) -> Self {
        Self::new(Limits::new(config))
    }

    /// The limits.
    pub fn limits(&self) -> &Arc<Limits> {
        &self.limits
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit::new(inner, self.limits.clone(), self.counters.clone())
    }
}
