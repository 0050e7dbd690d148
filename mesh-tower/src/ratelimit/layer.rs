use std::sync::Arc;

use mesh_core::config::RateLimitConfig;
use tower::Layer;

use super::{Limits, RateLimit};

/// Limits requests by [`Limits`]; see the [module docs](super). Clones share the limiters.
#[derive(Clone, Debug)]
pub struct RateLimitLayer {
    limits: Arc<Limits>,
}

impl RateLimitLayer {
    /// Limits by `limits`.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits: Arc::new(limits),
        }
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
        RateLimit::new(inner, self.limits.clone())
    }
}
