//! Client metrics, registered in a `prometheus-client` registry that the host application
//! owns and exposes.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `mesh_client_responses_total` | counter | `service`, `server_address`, `http_response_status_code`, `class` |
//! | `mesh_client_errors_total` | counter | `service`, `server_address` (no answer: connect failure, reset, try timeout) |
//! | `mesh_client_try_duration_seconds` | histogram | `service` (one try, to the response head) |
//! | `mesh_client_retries_total` | counter | `service` |
//! | `mesh_client_retry_budget_exhausted_total` | counter | `service` |
//! | `mesh_client_breaker_transitions_total` | counter | `service`, `server_address`, `state` (`ejected`, `probation`, `reinstated`) |
//! | `mesh_client_endpoint_load` | gauge | `service`, `server_address` (peak-EWMA cost in seconds at the last response) |
//!
//! Label names follow OpenTelemetry's HTTP semantic conventions where they exist
//! (`server.address`, `http.response.status_code`, with dots as underscores). Label values
//! are shared strings, so recording allocates nothing.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use http::StatusCode;
use mesh_core::classify::Class;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::time::Instant;

use crate::balance::pool::Slot;
use crate::breaker::Transition;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    service: Arc<str>,
    server_address: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResponseLabels {
    service: Arc<str>,
    server_address: Arc<str>,
    http_response_status_code: u16,
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BreakerLabels {
    service: Arc<str>,
    server_address: Arc<str>,
    state: &'static str,
}

/// Handles to one endpoint's most frequent series, made once per endpoint so that the
/// common response (200, success) touches no label map.
#[derive(Clone, Debug)]
pub struct EndpointMetrics {
    ok: Counter,
    load: Gauge<f64, AtomicU64>,
}

/// The metrics of one client (one service).
#[derive(Clone, Debug)]
pub struct ClientMetrics {
    service: Arc<str>,
    responses: Family<ResponseLabels, Counter>,
    errors: Family<EndpointLabels, Counter>,
    durations: Family<ServiceLabels, Histogram>,
    duration: Histogram,
    retries: Counter,
    budget_exhausted: Counter,
    breaker: Family<BreakerLabels, Counter>,
    load: Family<EndpointLabels, Gauge<f64, AtomicU64>>,
}

fn class_name(class: Option<Class>) -> &'static str {
    match class {
        Some(Class::Success) => "success",
        Some(Class::Failure) => "failure",
        Some(Class::RateLimited) => "rate_limited",
        None => "pending",
    }
}

impl ClientMetrics {
    /// Registers the metrics of service `service` in `registry`.
    pub fn register(registry: &mut Registry, service: &str) -> Self {
        let this = Self {
            service: Arc::from(service),
            responses: Family::default(),
            errors: Family::default(),
            durations: Family::new_with_constructor(|| {
                // 1 ms to ~16 s.
                Histogram::new(exponential_buckets(0.001, 2.0, 15))
            }),
            duration: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            retries: Counter::default(),
            budget_exhausted: Counter::default(),
            breaker: Family::default(),
            load: Family::default(),
        };
        registry.register(
            "mesh_client_responses",
            "Responses received, by endpoint, status and class",
            this.responses.clone(),
        );
        registry.register(
            "mesh_client_errors",
            "Tries that got no response (connect failure, reset, try timeout)",
            this.errors.clone(),
        );
        registry.register(
            "mesh_client_try_duration_seconds",
            "Time from sending a try to its response head",
            this.durations.clone(),
        );
        let retries = Family::<ServiceLabels, Counter>::default();
        let exhausted = Family::<ServiceLabels, Counter>::default();
        let labels = ServiceLabels {
            service: this.service.clone(),
        };
        // Bind the service label once; the handles are shared with the families.
        let duration = this.durations.get_or_create(&labels).clone();
        let this = Self {
            duration,
            retries: retries.get_or_create(&labels).clone(),
            budget_exhausted: exhausted.get_or_create(&labels).clone(),
            ..this
        };
        registry.register("mesh_client_retries", "Retries sent", retries);
        registry.register(
            "mesh_client_retry_budget_exhausted",
            "Retries not sent because the retry budget was exhausted",
            exhausted,
        );
        registry.register(
            "mesh_client_breaker_transitions",
            "Circuit breaker state changes, by endpoint",
            this.breaker.clone(),
        );
        registry.register(
            "mesh_client_endpoint_load",
            "Peak-EWMA load of each endpoint, in seconds, at its last response",
            this.load.clone(),
        );
        this
    }

    fn endpoint(&self, address: &Arc<str>) -> EndpointLabels {
        EndpointLabels {
            service: self.service.clone(),
            server_address: address.clone(),
        }
    }

    /// The handles of the endpoint labelled `address`.
    pub(crate) fn endpoint_handles(&self, address: &Arc<str>) -> EndpointMetrics {
        EndpointMetrics {
            ok: self
                .responses
                .get_or_create(&ResponseLabels {
                    service: self.service.clone(),
                    server_address: address.clone(),
                    http_response_status_code: 200,
                    class: class_name(Some(Class::Success)),
                })
                .clone(),
            load: self.load.get_or_create(&self.endpoint(address)).clone(),
        }
    }

    pub(crate) fn response<B>(
        &self,
        slot: &Slot<B>,
        status: StatusCode,
        class: Option<Class>,
        took: std::time::Duration,
    ) {
        match (&slot.metrics, class) {
            (Some(h), Some(Class::Success)) if status == StatusCode::OK => {
                h.ok.inc();
            }
            _ => {
                self.responses
                    .get_or_create(&ResponseLabels {
                        service: self.service.clone(),
                        server_address: slot.label.clone(),
                        http_response_status_code: status.as_u16(),
                        class: class_name(class),
                    })
                    .inc();
            }
        }
        self.duration.observe(took.as_secs_f64());
        let cost = slot.load.load(Instant::now()).cost / 1e9;
        match &slot.metrics {
            Some(h) => {
                h.load.set(cost);
            }
            None => {
                self.load
                    .get_or_create(&self.endpoint(&slot.label))
                    .set(cost);
            }
        }
    }

    pub(crate) fn error<B>(&self, slot: &Slot<B>) {
        self.errors.get_or_create(&self.endpoint(&slot.label)).inc();
    }

    /// Retries sent so far.
    pub fn retries(&self) -> u64 {
        self.retries.get()
    }

    /// Retries refused by the budget so far.
    pub fn budget_exhaustions(&self) -> u64 {
        self.budget_exhausted.get()
    }

    pub(crate) fn retried(&self) {
        self.retries.inc();
    }

    pub(crate) fn budget_exhausted(&self) {
        self.budget_exhausted.inc();
    }

    /// Counts a breaker transition of the endpoint labelled `address`.
    pub(crate) fn transition(&self, address: &Arc<str>, t: Transition) {
        let state = match t {
            Transition::Ejected { .. } => "ejected",
            Transition::Probation => "probation",
            Transition::Reinstated => "reinstated",
        };
        self.breaker
            .get_or_create(&BreakerLabels {
                service: self.service.clone(),
                server_address: address.clone(),
                state,
            })
            .inc();
    }
}
