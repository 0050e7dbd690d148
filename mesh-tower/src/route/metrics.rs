//! Route metrics: requests by route and backend, answers and durations by route.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
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
/// only increments counters. A route's series go once no route set holds it any more (a
/// reload removed it): two sets with the route (the running one and a reload's) share
/// them.
#[derive(Clone, Debug)]
pub struct RouteMetrics {
    requests: Family<BackendLabels, Counter>,
    responses: Family<StatusLabels, Counter>,
    durations: Family<RouteLabels, Histogram>,
    unmatched: Counter,
    /// The route sets holding each route, and the backends they gave it.
    live: Arc<Mutex<HashMap<Arc<str>, LiveRoute>>>,
}

#[derive(Debug, Default)]
struct LiveRoute {
    count: usize,
    backends: BTreeSet<Arc<str>>,
}

/// One route's answer counters and duration histogram.
#[derive(Debug)]
pub(super) struct RouteHandles {
    /// `1xx` to `5xx`, then `error`.
    classes: [Counter; 6],
    duration: Histogram,
    route: Arc<str>,
    metrics: RouteMetrics,
}

impl Drop for RouteHandles {
    fn drop(&mut self) {
        let m = &self.metrics;
        let mut live = m.live.lock().unwrap_or_else(|p| p.into_inner());
        let Some(entry) = live.get_mut(&self.route) else {
            return;
        };
        entry.count = entry.count.saturating_sub(1);
        if entry.count > 0 {
            return;
        }
        let Some(gone) = live.remove(&self.route) else {
            return;
        };
        // Under the lock `route` makes them under.
        for status_class in CLASSES {
            m.responses.remove(&StatusLabels {
                route: self.route.clone(),
                status_class,
            });
        }
        m.durations.remove(&RouteLabels {
            route: self.route.clone(),
        });
        for backend in gone.backends {
            m.requests.remove(&BackendLabels {
                route: self.route.clone(),
                backend,
            });
        }
    }
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
            live: Arc::default(),
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

    /// Route `route`'s handles, held by a route set whose route sends to `backends`
    /// (whose request counters [`requests`](Self::requests) gives).
    pub(super) fn route(&self, route: &str, backends: &[&str]) -> RouteHandles {
        let route: Arc<str> = Arc::from(route);
        // Counted and taken under the lock that the route's last drop removes them under.
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let entry = live.entry(route.clone()).or_default();
        entry.count += 1;
        entry
            .backends
            .extend(backends.iter().map(|b| Arc::from(*b)));
        RouteHandles {
            classes: CLASSES.map(|status_class| {
                self.responses
                    .get_or_create(&StatusLabels {
                        route: route.clone(),
                        status_class,
                    })
                    .clone()
            }),
            duration: self
                .durations
                .get_or_create(&RouteLabels {
                    route: route.clone(),
                })
                .clone(),
            route,
            metrics: self.clone(),
        }
    }

    pub(super) fn requests(&self, route: &str, backend: &str) -> Counter {
        // With the live routes' lock: a route's last drop removes its backends' counters
        // under it.
        let _live = self.live.lock().unwrap_or_else(|p| p.into_inner());
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
