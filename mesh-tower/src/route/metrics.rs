//! Route metrics: requests by route and backend, answers and durations by route.

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    route: Arc<str>,
    backend: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    route: Arc<str>,
    status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: Arc<str>,
}

/// The metrics of [`Router`](super::Router)s, registered once and shared by every route
/// set built with them ([`RoutesBuilder::metrics`](super::RoutesBuilder::metrics)):
///
/// - `mesh_route_requests_total{route, backend}`: requests sent, by route and the
///   backend its split picked (`route=""` for requests no route took that went to the
///   default backend);
/// - `mesh_route_responses_total{route, status_class}`: answers by status class (`1xx`
///   … `5xx`), or `error` when the backend failed without one;
/// - `mesh_route_request_duration_seconds{route}`: from routing a request to its
///   response head (1 ms to ~16 s, exponential buckets);
/// - `mesh_route_unmatched_total`: requests no route took.
///
/// Each route's handles are looked up once, when its route set is built, so a request
/// only increments counters.
#[derive(Clone, Debug)]
pub struct RouteMetrics {
    requests: Family<BackendLabels, Counter>,
    responses: Family<StatusLabels, Counter>,
    durations: Family<RouteLabels, Histogram>,
    unmatched: Counter,
}

/// One route's answer counters and duration histogram.
#[derive(Debug)]
pub(super) struct RouteHandles {
    /// `1xx` to `5xx`, then `error`.
    classes: [Counter; 6],
    duration: Histogram,
}

const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "error"];

impl RouteMetrics {
    /// Registers the route metrics in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let this = Self {
            requests: Family::default(),
            responses: Family::default(),
            durations: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 15))
            }),
            unmatched: Counter::default(),
        };
        registry.register(
            "mesh_route_requests",
            "Requests sent, by route and backend",
            this.requests.clone(),
        );
        registry.register(
            "mesh_route_responses",
            "Answers by route and status class (error: no answer)",
            this.responses.clone(),
        );
        registry.register(
            "mesh_route_request_duration_seconds",
            "Time from routing a request to its response head, by route",
            this.durations.clone(),
        );
        registry.register(
            "mesh_route_unmatched",
            "Requests no route took",
            this.unmatched.clone(),
        );
        this
    }

    pub(super) fn route(&self, route: &str) -> RouteHandles {
        let route: Arc<str> = Arc::from(route);
        RouteHandles {
            classes: CLASSES.map(|status_class| {
                self.responses
                    .get_or_create(&StatusLabels {
                        route: route.clone(),
                        status_class,
                    })
                    .clone()
            }),
            duration: self.durations.get_or_create(&RouteLabels { route }).clone(),
        }
    }

    pub(super) fn requests(&self, route: &str, backend: &str) -> Counter {
        self.requests
            .get_or_create(&BackendLabels {
                route: Arc::from(route),
                backend: Arc::from(backend),
            })
            .clone()
    }

    pub(super) fn unmatched(&self) -> Counter {
        self.unmatched.clone()
    }
}

impl RouteHandles {
    /// Counts an answer (`None`: the backend failed) that took `elapsed`.
    pub(super) fn record(&self, status: Option<StatusCode>, elapsed: Duration) {
        let class = match status {
            Some(s) => usize::from(s.as_u16() / 100).clamp(1, 5) - 1,
            None => 5,
        };
        self.classes[class].inc();
        self.duration.observe(elapsed.as_secs_f64());
    }
}
