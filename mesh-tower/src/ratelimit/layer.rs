use std::sync::Arc;

use arc_swap::ArcSwap;

use mesh_core::config::RateLimitConfig;
use tower::Layer;

use prometheus_client::metrics::counter::Counter;

use super::{Limits, RateLimit};
use crate::metrics::server::ListenerMetrics;

/// Limits requests by [`Limits`]; see the [module docs](super). Clones share the
/// limiters, which [`LimitsHandle::replace`] swaps for new ones at run time.
#[derive(Clone, Debug)]
pub struct RateLimitLayer {
    limits: LimitsHandle,
    counters: Option<Arc<[Counter; 2]>>,
}

/// Replaces the limits of a [`RateLimitLayer`] and of every service it made, at run time
/// (a configuration reload). The new limiters start full: a reload forgives the
/// clients' recent use. Cheap to clone.
#[derive(Clone, Debug)]
pub struct LimitsHandle(pub(super) Arc<ArcSwap<Limits>>);

impl LimitsHandle {
    /// Limits every later request by `limits`; returns the limits it replaces.
    pub fn replace(&self, limits: Limits) -> Arc<Limits> {
        self.0.swap(Arc::new(limits))
    }

    /// The limits in force.
    pub fn current(&self) -> Arc<Limits> {
        self.0.load_full()
    }
}

impl RateLimitLayer {
    /// Limits by `limits`.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits: LimitsHandle(Arc::new(ArcSwap::from_pointee(limits))),
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

    /// The limits in force.
    pub fn limits(&self) -> Arc<Limits> {
        self.limits.current()
    }

    /// The handle that replaces the limits at run time.
    pub fn handle(&self) -> &LimitsHandle {
        &self.limits
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit::new(inner, self.limits.0.clone(), self.counters.clone())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use mesh_core::config::Rate;
    use tower::ServiceExt;

    #[tokio::test(start_paused = true)]
    async fn replaced_limits_apply_to_the_services_already_made() {
        let one = RateLimitConfig {
            total: Some(Rate {
                requests: 1,
                per: std::time::Duration::from_secs(60),
                burst: None,
            }),
            ..RateLimitConfig::default()
        };
        let layer = RateLimitLayer::from_config(&one);
        let svc = layer.layer(tower::service_fn(|_req: http::Request<()>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(()))
        }));
        let status = |svc: RateLimit<_>| async move {
            svc.oneshot(http::Request::new(())).await.unwrap().status()
        };
        assert_eq!(status(svc.clone()).await, 200);
        assert_eq!(status(svc.clone()).await, 429);
        layer
            .handle()
            .replace(Limits::new(&RateLimitConfig::default()));
        for _ in 0..10 {
            assert_eq!(status(svc.clone()).await, 200, "no limit any more");
        }
    }
}
