use std::sync::Arc;
use std::time::Duration;

use mesh_core::classify::Classifier;
use mesh_core::config::RateLimitedConfig;
use tower::Layer;

use super::{DEFAULT_DECAY, DEFAULT_RTT, EndpointLoad, PeakEwma};

/// How long a rate-limited answer penalizes its endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimitPenalty {
    /// The penalty when the answer names no period (default 1 s).
    pub default: Duration,
    /// The longest penalty, whatever the answer says (default 30 s).
    pub max: Duration,
}

impl Default for RateLimitPenalty {
    fn default() -> Self {
        Self::from(&RateLimitedConfig::default())
    }
}

impl From<&RateLimitedConfig> for RateLimitPenalty {
    fn from(config: &RateLimitedConfig) -> Self {
        Self {
            default: config.default_penalty,
            max: config.max_penalty,
        }
    }
}

/// Wraps an endpoint's service in [`PeakEwma`]; each [`layer`](Layer::layer) call starts a
/// fresh [`EndpointLoad`].
///
/// # Defaults
/// RTT 30 ms, decay 10 s, the default [`Classifier`] (429 and `RESOURCE_EXHAUSTED` are
/// rate limiting) and [`RateLimitPenalty::default`].
#[derive(Clone, Debug)]
pub struct PeakEwmaLayer {
    pub(super) default_rtt: Duration,
    pub(super) decay: Duration,
    pub(super) shared: Arc<Shared>,
}

#[derive(Debug)]
pub(super) struct Shared {
    pub(super) classifier: Classifier,
    pub(super) penalty: RateLimitPenalty,
}

impl Default for PeakEwmaLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl PeakEwmaLayer {
    /// The layer with the defaults.
    pub fn new() -> Self {
        Self {
            default_rtt: DEFAULT_RTT,
            decay: DEFAULT_DECAY,
            shared: Arc::new(Shared {
                classifier: Classifier::default(),
                penalty: RateLimitPenalty::default(),
            }),
        }
    }

    /// The RTT of an endpoint with no samples, and the estimate's decay.
    pub fn rtt(mut self, default_rtt: Duration, decay: Duration) -> Self {
        self.default_rtt = default_rtt;
        self.decay = decay;
        self
    }

    /// What counts as rate limiting, and the penalty it brings.
    pub fn rate_limited(mut self, classifier: Classifier, penalty: RateLimitPenalty) -> Self {
        self.shared = Arc::new(Shared {
            classifier,
            penalty,
        });
        self
    }

    /// Wraps `inner`, recording into `load` (a handle that others, such as a dashboard,
    /// may hold too).
    pub fn layer_with<S>(&self, inner: S, load: EndpointLoad) -> PeakEwma<S> {
        PeakEwma::from_parts(inner, load, self.shared.clone())
    }
}

impl<S> Layer<S> for PeakEwmaLayer {
    type Service = PeakEwma<S>;

    fn layer(&self, inner: S) -> PeakEwma<S> {
        self.layer_with(inner, EndpointLoad::new(self.default_rtt, self.decay))
    }
}
