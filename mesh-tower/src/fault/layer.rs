use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use http::{HeaderName, HeaderValue, StatusCode};
use mesh_core::config::FaultConfig;
use tower::Layer;

use super::{DEFAULT_MAX_ACTIVE, Dice, Fault, InvalidFault, Ratio};

/// Injects delays and aborts into a share of requests; see the [module docs](super).
///
/// Clones of the layer, and every service it makes, share one cap on active faults.
#[derive(Clone, Debug)]
pub struct FaultLayer {
    pub(super) config: Arc<Config>,
    pub(super) active: Arc<AtomicUsize>,
}

/// What a [`FaultLayer`] injects, shared by its services.
#[derive(Clone, Debug)]
pub(super) struct Config {
    pub(super) delay: Option<(Duration, Ratio)>,
    pub(super) abort_status: Option<StatusCode>,
    pub(super) abort_grpc_code: Option<u16>,
    pub(super) abort_ratio: Ratio,
    pub(super) header: Option<(HeaderName, Option<HeaderValue>)>,
    pub(super) max_active: usize,
    pub(super) seed: Option<u64>,
}

impl Default for FaultLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl FaultLayer {
    /// A layer that injects nothing until told to (with [`delay`](Self::delay),
    /// [`abort`](Self::abort) or [`abort_grpc_code`](Self::abort_grpc_code)).
    pub fn new() -> Self {
        Self {
            config: Arc::new(Config {
                delay: None,
                abort_status: None,
                abort_grpc_code: None,
                abort_ratio: Ratio::Never,
                header: None,
                max_active: DEFAULT_MAX_ACTIVE,
                seed: None,
            }),
            active: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Compiles `config`: its `delay` for `delay_ratio` of requests, its `abort_status`
    /// for `abort_ratio` of them (a gRPC request gets the mapped gRPC code).
    ///
    /// With `abort_grpc_code`, gRPC requests get that code; with `header`, only requests
    /// carrying it are faulted.
    ///
    /// Fails on an `abort_status` outside 200 to 599, an `abort_grpc_code` outside 1 to
    /// 16, a `header` that is not a header name (and value), or a ratio outside 0 to 1
    /// (the ratio of an absent delay or abort is not checked).
    pub fn from_config(config: &FaultConfig) -> Result<Self, InvalidFault> {
        let ratio = |field, value: f64| {
            if (0.0..=1.0).contains(&value) {
                Ok(value)
            } else {
                Err(InvalidFault::Ratio { field, value })
            }
        };
        let mut layer = Self::new();
        if let Some(delay) = config.delay {
            layer = layer.delay(delay, ratio("delay_ratio", config.delay_ratio)?);
        }
        if let Some(status) = config.abort_status {
            let code = StatusCode::from_u16(status)
                .ok()
                .filter(|s| (200..600).contains(&s.as_u16()))
                .ok_or(InvalidFault::AbortStatus(status))?;
            layer = layer.abort(code, ratio("abort_ratio", config.abort_ratio)?);
        }
        if let Some(code) = config.abort_grpc_code {
            if !(1..=16).contains(&code) {
                return Err(InvalidFault::AbortGrpcCode(code));
            }
            let abort_ratio = ratio("abort_ratio", config.abort_ratio)?;
            layer = layer.abort_grpc_code(code);
            Arc::make_mut(&mut layer.config).abort_ratio = Ratio::new(abort_ratio);
        }
        if let Some(header) = &config.header {
            let bad = || InvalidFault::Header(header.name.clone());
            let name = HeaderName::from_bytes(header.name.as_bytes()).map_err(|_| bad())?;
            layer = match &header.value {
                None => layer.only_with_header(name),
                Some(value) => {
                    let value = HeaderValue::from_str(value).map_err(|_| bad())?;
                    layer.only_with_header_value(name, value)
                }
            };
        }
        Ok(layer)
    }

    fn config_mut(&mut self) -> &mut Config {
        Arc::make_mut(&mut self.config)
    }

    /// Delays `ratio` of requests (clamped to 0 to 1; NaN counts as 0) by `delay`
    /// before they reach the inner service.
    pub fn delay(mut self, delay: Duration, ratio: f64) -> Self {
        self.config_mut().delay = Some((delay, Ratio::new(ratio)));
        self
    }

    /// Answers `ratio` of requests (clamped to 0 to 1; NaN counts as 0) with `status`
    /// instead of sending them on; a gRPC request gets a trailers-only answer with the
    /// [`abort_grpc_code`](Self::abort_grpc_code), or else the gRPC code `status` maps to
    /// ([`grpc_code_for`](super::grpc_code_for)).
    pub fn abort(mut self, status: StatusCode, ratio: f64) -> Self {
        let config = self.config_mut();
        config.abort_status = Some(status);
        config.abort_ratio = Ratio::new(ratio);
        self
    }

    /// The gRPC status code (`grpc-status`) that aborted gRPC requests get. With no
    /// [`abort`](Self::abort) status, it also enables aborts, of every request (ratio 1,
    /// until `abort` sets one), and other HTTP requests get 503.
    pub fn abort_grpc_code(mut self, code: u16) -> Self {
        let config = self.config_mut();
        if config.abort_status.is_none() && config.abort_grpc_code.is_none() {
            config.abort_ratio = Ratio::Always;
        }
        config.abort_grpc_code = Some(code);
        self
    }

    /// Injects faults only into requests carrying the header `name`, whatever its value.
    pub fn only_with_header(mut self, name: HeaderName) -> Self {
        self.config_mut().header = Some((name, None));
        self
    }

    /// Injects faults only into requests carrying the header `name` with the value `value`
    /// (one of its values, if repeated).
    pub fn only_with_header_value(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.config_mut().header = Some((name, Some(value)));
        self
    }

    /// At most `max` faults at once (default [`DEFAULT_MAX_ACTIVE`]); beyond, requests
    /// pass unfaulted.
    pub fn max_active(mut self, max: usize) -> Self {
        self.config_mut().max_active = max;
        self
    }

    /// Draws the per-request decisions from a generator seeded with `seed`, so that a
    /// sequence of requests is faulted the same way every run. Each service the layer
    /// makes starts from the seed; its clones share one sequence.
    pub fn seed(mut self, seed: u64) -> Self {
        self.config_mut().seed = Some(seed);
        self
    }

    /// How many faults are in progress now, over every service this layer made.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }
}

impl<S> Layer<S> for FaultLayer {
    type Service = Fault<S>;

    fn layer(&self, inner: S) -> Fault<S> {
        let dice = match self.config.seed {
            Some(seed) => Dice::Seeded(Arc::new(AtomicU64::new(seed))),
            None => Dice::Thread,
        };
        Fault::new(inner, self.config.clone(), self.active.clone(), dice)
    }
}
