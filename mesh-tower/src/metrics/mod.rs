//! Client metrics, registered in a `prometheus-client` registry that the host application
//! owns and exposes.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `mesh_client_responses_total` | counter | `service`, `server_address`, `http_response_status_code`, `class` (`success`, `failure`, `rate_limited`, `cancelled`) |
//! | `mesh_client_errors_total` | counter | `service`, `server_address` (no answer: connect failure, reset, try timeout) |
//! | `mesh_client_try_duration_seconds` | histogram | `service` (one try, to the response head) |
//! | `mesh_client_retries_total` | counter | `service` |
//! | `mesh_client_retry_budget_exhausted_total` | counter | `service` |
//! | `mesh_client_breaker_transitions_total` | counter | `service`, `server_address`, `state` (`ejected`, `probation`, `reinstated`) |
//! | `mesh_client_endpoint_load` | gauge | `service`, `server_address` (peak-EWMA cost in seconds at the last response) |
//! | `mesh_client_pool_connections` | gauge | `service`, `server_address` (HTTP/1.1 connections open: in use, idle or being dialled) |
//! | `mesh_client_pool_requests_waiting` | gauge | `service`, `server_address` (requests waiting for an HTTP/1.1 connection) |
//! | `mesh_client_pool_overflows_total` | counter | `service`, `server_address` (requests refused unsent: every connection busy, the line full) |
//!
//! The three pool series exist for endpoints whose connection pool was attached with
//! [`EndpointMetrics::with_pool`] (`MeshClient` attaches it for services that may speak
//! HTTP/1.1: `auto` and `http1`). They are read from the pool at each scrape, not kept
//! up to date on the request path; an address served by two clients for a while (a reload
//! re-making a service's client) shows their sum, and the overflow count starts again
//! from zero once only the new client is left, which Prometheus takes for a counter reset.
//!
//! **Classes.** An answer's `class` is the endpoint's [`Classifier`]'s. Most answers are
//! counted at their head; a gRPC answer whose `grpc-status` is not in its headers (every
//! call but a trailers-only one) is counted when its body gives the status: at its
//! trailers, or as a `failure` if the stream ends or breaks without them; dropped before
//! then (the caller stopped reading), it counts as `cancelled`. Its try duration is still
//! measured to the response head.
//!
//! Label names follow OpenTelemetry's HTTP semantic conventions where they exist
//! (`server.address`, `http.response.status_code`, with dots as underscores). Label values
//! are shared strings, so recording allocates nothing; the common answer (200, success)
//! goes to a counter handle made once per endpoint, touching no label map.
//!
//! **As a layer.** [`ClientMetrics::endpoint`] gives one endpoint's [`EndpointMetrics`],
//! which is a `Layer`: the [`Metrics`] service it makes records every answer and error of
//! that endpoint (and, with [`EndpointMetrics::with_load`], its load after each answer).
//! An endpoint's series are removed from the registry once the endpoint is gone: removed
//! from discovery and its last request done.
//!
//! ```
//! use http::{Request, Response};
//! use mesh_core::classify::Classifier;
//! use mesh_tower::metrics::ClientMetrics;
//! use prometheus_client::registry::Registry;
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let mut registry = Registry::default();
//! let metrics = ClientMetrics::register(&mut registry, "users");
//! let mut endpoint = ServiceBuilder::new()
//!     .layer(metrics.endpoint("10.0.0.7:8080".into(), Classifier::default()))
//!     .service_fn(|_req: Request<()>| async {
//!         Ok::<_, http::Error>(Response::builder().status(503).body(())?)
//!     });
//! endpoint.ready().await?.call(Request::new(())).await?;
//! let mut text = String::new();
//! prometheus_client::encoding::text::encode(&mut text, &registry)?;
//! assert!(text.contains(r#"mesh_client_responses_total{service="users",server_address="10.0.0.7:8080",http_response_status_code="503",class="failure"} 1"#));
//! drop(endpoint); // the endpoint is gone: so are its series
//! let mut text = String::new();
//! prometheus_client::encoding::text::encode(&mut text, &registry)?;
//! assert!(!text.contains("10.0.0.7"));
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::StatusCode;
use mesh_core::classify::Class;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use mesh_core::classify::Classifier;

#[cfg(feature = "breaker")]
use crate::breaker::Transition;
use crate::connect::{PoolProbe, PoolStatus};
use crate::load::EndpointLoad;

mod body;
mod future;
pub mod server;
mod service;

pub use self::body::ResponseBody;
pub use self::future::ResponseFuture;
pub use self::service::Metrics;

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
    retries_family: Family<ServiceLabels, Counter>,
    exhausted_family: Family<ServiceLabels, Counter>,
    breaker: Family<BreakerLabels, Counter>,
    load: Family<EndpointLabels, Gauge<f64, AtomicU64>>,
    /// The series objects alive per service and address: an address can have two for a
    /// while (an endpoint re-made under a new identity while the old one drains, or a
    /// service's client replaced by a reload), and only the last one to go removes the
    /// address's series. Shared by every [`for_service`](Self::for_service) derivative.
    live: LiveMap,
    /// The handles alive per service, likewise: the last one of a service to go (its
    /// client dropped, a reload having removed it) removes the service's own series.
    services: ServiceMap,
    /// This service's place in `services` (none for the families alone), held for its
    /// drop.
    _hold: Option<Arc<ServiceHold>>,
}

/// How many [`ClientMetrics`] of each service are alive (clones count once).
type ServiceMap = Arc<Mutex<HashMap<Arc<str>, usize>>>;

/// One [`ClientMetrics::for_service`] handle's place among its service's: the last one
/// dropped removes the service's series.
#[derive(Debug)]
struct ServiceHold {
    labels: ServiceLabels,
    services: ServiceMap,
    durations: Family<ServiceLabels, Histogram>,
    retries: Family<ServiceLabels, Counter>,
    exhausted: Family<ServiceLabels, Counter>,
}

impl Drop for ServiceHold {
    fn drop(&mut self) {
        let mut services = self.services.lock().unwrap_or_else(|p| p.into_inner());
        let Some(count) = services.get_mut(&self.labels.service) else {
            return;
        };
        *count = count.saturating_sub(1);
        if *count == 0 {
            services.remove(&self.labels.service);
            // Under the lock that `for_service` makes them under: never removed between a
            // new handle's count and its taking them.
            self.durations.remove(&self.labels);
            self.retries.remove(&self.labels);
            self.exhausted.remove(&self.labels);
        }
    }
}

/// A service's name and an endpoint's address.
type ServiceAddress = (Arc<str>, Arc<str>);

#[derive(Debug, Default)]
struct Live {
    count: usize,
    /// Status labels recorded by series already gone.
    seen: Vec<(u16, &'static str)>,
    /// The connection pools of the address's live series, each beside its series (by
    /// address), to be read at scrape time.
    pools: Vec<(usize, PoolProbe)>,
}

/// The live endpoints, by service and address.
type LiveMap = Arc<Mutex<HashMap<ServiceAddress, Live>>>;

/// Encodes the pool series of every live endpoint with a pool, read at scrape time.
#[derive(Debug)]
struct PoolCollector(LiveMap);

impl Collector for PoolCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let mut pools: Vec<(ServiceAddress, PoolStatus)> = {
            let Ok(live) = self.0.lock() else {
                return Ok(());
            };
            live.iter()
                .filter(|(_, l)| !l.pools.is_empty())
                .map(|(key, l)| {
                    let sum = l
                        .pools
                        .iter()
                        .fold(PoolStatus::default(), |mut sum, (_, p)| {
                            let s = p.status();
                            sum.open += s.open;
                            sum.waiting += s.waiting;
                            sum.overflows += s.overflows;
                            sum
                        });
                    (key.clone(), sum)
                })
                .collect()
        };
        if pools.is_empty() {
            return Ok(());
        }
        pools.sort_by(|a, b| a.0.cmp(&b.0));
        let rows: Vec<_> = pools
            .into_iter()
            .map(|((service, server_address), status)| {
                let labels = EndpointLabels {
                    service,
                    server_address,
                };
                (labels, status)
            })
            .collect();
        encode_pools(
            &mut encoder,
            &PoolFamilies {
                connections: (
                    "mesh_client_pool_connections",
                    "HTTP/1.1 connections open to each endpoint (in use, idle or being dialled; at most pool.max_connections per client)",
                ),
                waiting: (
                    "mesh_client_pool_requests_waiting",
                    "Requests waiting for an HTTP/1.1 connection to each endpoint (at most pool.max_pending per client)",
                ),
                overflows: (
                    "mesh_client_pool_overflows",
                    "Requests refused without being sent: every HTTP/1.1 connection to the endpoint busy and pool.max_pending waiting",
                ),
            },
            &rows,
        )
    }
}

/// The names and help texts of the three families [`encode_pools`] writes: two gauges and
/// a counter (whose name gets `_total` in the text format).
#[derive(Clone, Copy, Debug)]
pub struct PoolFamilies {
    /// Connections open ([`PoolStatus::open`]).
    pub connections: (&'static str, &'static str),
    /// Requests waiting ([`PoolStatus::waiting`]).
    pub waiting: (&'static str, &'static str),
    /// Requests refused ([`PoolStatus::overflows`]).
    pub overflows: (&'static str, &'static str),
}

/// Writes one series per row in each of `families`, from a collector: how connection
/// pools stand (say, each endpoint's or each listener's, labelled by `L`).
pub fn encode_pools<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder<'_>,
    families: &PoolFamilies,
    rows: &[(L, PoolStatus)],
) -> Result<(), std::fmt::Error> {
    let mut gauge = |(name, help): (&str, &str), value: fn(&PoolStatus) -> usize| {
        let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (labels, status) in rows {
            let value = i64::try_from(value(status)).unwrap_or(i64::MAX);
            prometheus_client::metrics::gauge::ConstGauge::new(value)
                .encode(family.encode_family(labels)?)?;
        }
        Ok::<_, std::fmt::Error>(())
    };
    gauge(families.connections, |s| s.open)?;
    gauge(families.waiting, |s| s.waiting)?;
    let (name, help) = families.overflows;
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, status) in rows {
        prometheus_client::metrics::counter::ConstCounter::new(status.overflows)
            .encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

/// The `class` label of an answer's class; `None`: a gRPC answer dropped before its status.
fn class_name(class: Option<Class>) -> &'static str {
    match class {
        Some(Class::Success) => "success",
        Some(Class::Failure) => "failure",
        Some(Class::RateLimited) => "rate_limited",
        None => "cancelled",
    }
}

impl ClientMetrics {
    /// Registers the client metric families in `registry`, and gives service `service`'s
    /// metrics. Register once per registry: the metrics of other services come from
    /// [`for_service`](Self::for_service) (a family registered twice would be exposed
    /// twice, which Prometheus refuses).
    pub fn register(registry: &mut Registry, service: &str) -> Self {
        Self::register_families(registry).for_service(service)
    }

    /// Registers the client metric families in `registry`, with no service's series yet:
    /// each client takes its own with [`for_service`](Self::for_service) (or
    /// `MeshClientBuilder::shared_metrics`, which does). Once per registry.
    pub fn register_families(registry: &mut Registry) -> Self {
        let this = Self {
            service: Arc::from(""),
            responses: Family::default(),
            errors: Family::default(),
            durations: Family::new_with_constructor(|| {
                // 1 ms to ~16 s.
                Histogram::new(exponential_buckets(0.001, 2.0, 15))
            }),
            duration: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            retries: Counter::default(),
            budget_exhausted: Counter::default(),
            retries_family: Family::default(),
            exhausted_family: Family::default(),
            breaker: Family::default(),
            load: Family::default(),
            live: Arc::default(),
            services: Arc::default(),
            _hold: None,
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
        registry.register(
            "mesh_client_retries",
            "Retries sent",
            this.retries_family.clone(),
        );
        registry.register(
            "mesh_client_retry_budget_exhausted",
            "Retries not sent because the retry budget was exhausted",
            this.exhausted_family.clone(),
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
        registry.register_collector(Box::new(PoolCollector(this.live.clone())));
        this
    }

    /// The service these record under.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Service `service`'s metrics, in the same families (and so the same registry) as
    /// these: one registration serves every client of a process. Two clients of the same
    /// service (one replacing the other, say) share its series, which are removed from the
    /// registry once the last handle of the service is dropped (with its client, say).
    pub fn for_service(&self, service: &str) -> Self {
        let labels = ServiceLabels {
            service: Arc::from(service),
        };
        // Counted and taken under the lock that the last drop of the service removes its
        // series under.
        let mut services = self.services.lock().unwrap_or_else(|p| p.into_inner());
        *services.entry(labels.service.clone()).or_default() += 1;
        let duration = self.durations.get_or_create(&labels).clone();
        let retries = self.retries_family.get_or_create(&labels).clone();
        let budget_exhausted = self.exhausted_family.get_or_create(&labels).clone();
        drop(services);
        Self {
            duration,
            retries,
            budget_exhausted,
            service: labels.service.clone(),
            _hold: Some(Arc::new(ServiceHold {
                labels,
                services: self.services.clone(),
                durations: self.durations.clone(),
                retries: self.retries_family.clone(),
                exhausted: self.exhausted_family.clone(),
            })),
            ..self.clone()
        }
    }

    /// The series of the endpoint labelled `address` (usually its `ip:port`), answers
    /// classified by `classifier`. They are removed from the registry when the last clone
    /// of the returned handle is dropped, that is when the endpoint has left discovery and
    /// its last request is done.
    pub fn endpoint(&self, address: Arc<str>, classifier: Classifier) -> EndpointMetrics {
        let labels = EndpointLabels {
            service: self.service.clone(),
            server_address: address.clone(),
        };
        let ok = ResponseLabels {
            service: self.service.clone(),
            server_address: address.clone(),
            http_response_status_code: 200,
            class: class_name(Some(Class::Success)),
        };
        // Counted and taken under the lock that the last drop of the address removes its
        // series under: they are never removed between the two.
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.entry((self.service.clone(), address.clone()))
            .or_default()
            .count += 1;
        let series = EndpointSeries {
            ok: self.responses.get_or_create(&ok).clone(),
            errors: self.errors.get_or_create(&labels).clone(),
            load: self.load.get_or_create(&labels).clone(),
            duration: self.duration.clone(),
            client: self.clone(),
            address,
            classifier,
            statuses: Mutex::new(Vec::new()),
        };
        drop(live);
        EndpointMetrics(Arc::new(Handle {
            series: Arc::new(series),
            load: None,
        }))
    }

    /// The counters a [`RetryLayer`](crate::retry::RetryLayer) feeds: retries sent, and
    /// retries the budget refused.
    pub fn retry_counters(&self) -> (Counter, Counter) {
        (self.retries.clone(), self.budget_exhausted.clone())
    }

    /// Retries sent so far.
    pub fn retries(&self) -> u64 {
        self.retries.get()
    }

    /// Retries refused by the budget so far.
    pub fn budget_exhaustions(&self) -> u64 {
        self.budget_exhausted.get()
    }
}

/// One endpoint's series; see [`ClientMetrics::endpoint`]. Cheap to clone; a
/// [`Layer`](tower::Layer) making [`Metrics`] services.
#[derive(Clone, Debug)]
pub struct EndpointMetrics(Arc<Handle>);

#[derive(Debug)]
struct Handle {
    series: Arc<EndpointSeries>,
    load: Option<EndpointLoad>,
}

#[derive(Debug)]
struct EndpointSeries {
    ok: Counter,
    errors: Counter,
    load: Gauge<f64, AtomicU64>,
    duration: Histogram,
    client: ClientMetrics,
    address: Arc<str>,
    classifier: Classifier,
    /// Status and class labels recorded besides the common one, to remove them at the end.
    statuses: Mutex<Vec<(u16, &'static str)>>,
}

impl EndpointMetrics {
    /// Also sets the endpoint's load gauge from `load` after each answer.
    pub fn with_load(self, load: EndpointLoad) -> Self {
        Self(Arc::new(Handle {
            series: self.0.series.clone(),
            load: Some(load),
        }))
    }

    /// Also exposes the endpoint's HTTP/1.1 pool (`mesh_client_pool_*`, read from `pool`
    /// at each scrape) for as long as the endpoint's series live.
    pub fn with_pool(self, pool: PoolProbe) -> Self {
        let s = &self.0.series;
        if let Ok(mut live) = s.client.live.lock()
            && let Some(entry) = live.get_mut(&(s.client.service.clone(), s.address.clone()))
        {
            entry.pools.push((Arc::as_ptr(s) as usize, pool));
        }
        self
    }

    /// Records a response head that took `took`, and counts the answer, unless it is a gRPC
    /// answer whose class waits for its trailers: then gives the handle its body counts it
    /// with ([`count_grpc`](Self::count_grpc)).
    fn response(
        &self,
        status: StatusCode,
        headers: &http::HeaderMap,
        took: Duration,
    ) -> Option<EndpointMetrics> {
        let s = &*self.0.series;
        s.duration.observe(took.as_secs_f64());
        if let Some(load) = &self.0.load {
            // Just updated by the answer (the load layer sits below): no decay to apply.
            s.load.set(load.last_cost() / 1e9);
        }
        match s.classifier.classify_response(status, headers) {
            Some(class) => {
                self.count(status.as_u16(), Some(class));
                None
            }
            None => Some(self.clone()),
        }
    }

    /// Counts a gRPC answer (HTTP 200) of `class` (`None`: dropped before its status).
    fn count_grpc(&self, class: Option<Class>) {
        self.count(200, class);
    }

    /// The class of a gRPC answer with these trailers.
    fn classify_trailers(&self, trailers: Option<&http::HeaderMap>) -> Class {
        self.0.series.classifier.classify_trailers(trailers)
    }

    fn count(&self, code: u16, class: Option<Class>) {
        let s = &*self.0.series;
        if code == 200 && class == Some(Class::Success) {
            s.ok.inc();
        } else {
            let class = class_name(class);
            if let Ok(mut seen) = s.statuses.lock()
                && !seen.contains(&(code, class))
            {
                seen.push((code, class));
            }
            s.client
                .responses
                .get_or_create(&s.response_labels(code, class))
                .inc();
        }
    }

    fn error(&self) {
        self.0.series.errors.inc();
    }

    /// Counts a breaker transition of this endpoint.
    #[cfg(feature = "breaker")]
    pub fn transition(&self, t: Transition) {
        let s = &*self.0.series;
        s.client
            .breaker
            .get_or_create(&s.breaker_labels(state_name(t)))
            .inc();
    }
}

#[cfg(feature = "breaker")]
fn state_name(t: Transition) -> &'static str {
    match t {
        Transition::Ejected { .. } => "ejected",
        Transition::Probation => "probation",
        Transition::Reinstated => "reinstated",
    }
}

impl EndpointSeries {
    fn labels(&self) -> EndpointLabels {
        EndpointLabels {
            service: self.client.service.clone(),
            server_address: self.address.clone(),
        }
    }

    fn response_labels(&self, code: u16, class: &'static str) -> ResponseLabels {
        ResponseLabels {
            service: self.client.service.clone(),
            server_address: self.address.clone(),
            http_response_status_code: code,
            class,
        }
    }

    fn breaker_labels(&self, state: &'static str) -> BreakerLabels {
        BreakerLabels {
            service: self.client.service.clone(),
            server_address: self.address.clone(),
            state,
        }
    }
}

impl Drop for EndpointSeries {
    fn drop(&mut self) {
        let c = &self.client;
        let mut seen =
            std::mem::take(&mut *self.statuses.lock().unwrap_or_else(|p| p.into_inner()));
        // Held to the end: an endpoint of the address made meanwhile would take the series
        // being removed (see `ClientMetrics::endpoint`).
        let mut live = c.live.lock().unwrap_or_else(|p| p.into_inner());
        let key = (c.service.clone(), self.address.clone());
        if let Some(entry) = live.get_mut(&key) {
            let me = std::ptr::from_ref::<Self>(self) as usize;
            entry.pools.retain(|(series, _)| *series != me);
            entry.count = entry.count.saturating_sub(1);
            if entry.count > 0 {
                // Another series object of this address lives on: it removes them all.
                entry.seen.append(&mut seen);
                return;
            }
            seen.append(&mut entry.seen);
        }
        live.remove(&key);
        c.responses
            .remove(&self.response_labels(200, class_name(Some(Class::Success))));
        for (code, class) in &seen {
            c.responses.remove(&self.response_labels(*code, class));
        }
        c.errors.remove(&self.labels());
        c.load.remove(&self.labels());
        for state in ["ejected", "probation", "reinstated"] {
            c.breaker.remove(&self.breaker_labels(state));
        }
        drop(live);
    }
}

impl<S> tower::Layer<S> for EndpointMetrics {
    type Service = Metrics<S>;

    fn layer(&self, inner: S) -> Metrics<S> {
        Metrics::new(inner, Some(self.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(registry: &Registry) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, registry).unwrap_or_default();
        out
    }

    #[test]
    fn an_address_keeps_its_series_while_any_endpoint_of_it_lives() {
        let mut registry = Registry::default();
        let metrics = ClientMetrics::register(&mut registry, "users");
        let old = metrics.endpoint("10.0.0.1:80".into(), Classifier::default());
        old.response(
            StatusCode::BAD_GATEWAY,
            &http::HeaderMap::new(),
            Duration::ZERO,
        );
        // Re-made (say, under a new identity) while the old one drains.
        let new = metrics.endpoint("10.0.0.1:80".into(), Classifier::default());
        new.response(StatusCode::OK, &http::HeaderMap::new(), Duration::ZERO);
        drop(old);
        let t = text(&registry);
        assert!(
            t.contains(r#"server_address="10.0.0.1:80",http_response_status_code="200""#),
            "{t}"
        );
        drop(new);
        let t = text(&registry);
        assert!(!t.contains("10.0.0.1:80"), "{t}");
    }

    type Frames = http_body_util::StreamBody<
        futures_util::stream::Iter<
            std::vec::IntoIter<Result<http_body::Frame<bytes::Bytes>, std::convert::Infallible>>,
        >,
    >;

    /// A gRPC answer (200, `application/grpc`) with a message and `grpc-status` in its
    /// trailers.
    fn grpc_answer(status: &'static str) -> http::Response<Frames> {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static(status));
        let frames = vec![
            Ok(http_body::Frame::data(bytes::Bytes::from_static(
                b"\0\0\0\0\0",
            ))),
            Ok(http_body::Frame::trailers(trailers)),
        ];
        let mut resp = http::Response::new(http_body_util::StreamBody::new(
            futures_util::stream::iter(frames),
        ));
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
        resp
    }

    #[tokio::test]
    async fn grpc_answers_are_classified_by_their_trailers() {
        use http_body_util::BodyExt;
        use tower::{Layer, Service, ServiceExt};

        let mut registry = Registry::default();
        let metrics = ClientMetrics::register(&mut registry, "users");
        let mut endpoint = metrics
            .endpoint("10.0.0.1:80".into(), Classifier::default())
            .layer(tower::service_fn(|req: http::Request<()>| async move {
                let status = if req.uri().path() == "/ok" { "0" } else { "14" };
                Ok::<_, std::convert::Infallible>(grpc_answer(status))
            }));
        for path in ["/unavailable", "/ok"] {
            let req = http::Request::get(path).body(()).unwrap_or_default();
            let resp = endpoint.ready().await.unwrap_or_else(|e| match e {});
            let resp = resp.call(req).await.unwrap_or_else(|e| match e {});
            let _ = resp.into_body().collect().await;
        }
        // Dropped before its trailers: the caller gave up, not the endpoint.
        let req = http::Request::get("/unavailable")
            .body(())
            .unwrap_or_default();
        let resp = endpoint.ready().await.unwrap_or_else(|e| match e {});
        drop(resp.call(req).await);
        let t = text(&registry);
        let line = |class: &str| {
            format!(
                r#"mesh_client_responses_total{{service="users",server_address="10.0.0.1:80",http_response_status_code="200",class="{class}"}} 1"#
            )
        };
        assert!(t.contains(&line("failure")), "{t}");
        assert!(t.contains(&line("success")), "{t}");
        assert!(t.contains(&line("cancelled")), "{t}");
        assert!(!t.contains("pending"), "{t}");
    }

    /// Endpoints of one address made and dropped on two threads: while one lives, its
    /// series are in the families (a last drop elsewhere does not remove the series a new
    /// endpoint has just taken).
    #[test]
    fn an_endpoint_made_while_another_goes_keeps_its_series() {
        let mut registry = Registry::default();
        let metrics = ClientMetrics::register(&mut registry, "users");
        let ok = ResponseLabels {
            service: "users".into(),
            server_address: "10.0.0.1:80".into(),
            http_response_status_code: 200,
            class: "success",
        };
        let lost = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..200_000 {
                        let e = metrics.endpoint("10.0.0.1:80".into(), Classifier::default());
                        if metrics.responses.get(&ok).is_none() {
                            lost.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        drop(e);
                    }
                });
            }
        });
        assert_eq!(lost.into_inner(), 0, "series removed under a live endpoint");
        assert!(!text(&registry).contains("10.0.0.1"));
    }

    #[test]
    fn services_share_one_registration_and_keep_their_own_series() {
        let mut registry = Registry::default();
        let families = ClientMetrics::register_families(&mut registry);
        assert!(
            !text(&registry).contains("service="),
            "no series before a service"
        );
        let users = families.for_service("users");
        let orders = families.for_service("orders");
        assert_eq!(users.service(), "users");
        // The same address under two services: each keeps its series until its own last
        // endpoint goes.
        let u = users.endpoint("10.0.0.1:80".into(), Classifier::default());
        let o = orders.endpoint("10.0.0.1:80".into(), Classifier::default());
        u.response(StatusCode::OK, &http::HeaderMap::new(), Duration::ZERO);
        o.response(StatusCode::OK, &http::HeaderMap::new(), Duration::ZERO);
        users.retry_counters().0.inc();
        let t = text(&registry);
        let mut types: Vec<&str> = t.lines().filter(|l| l.starts_with("# TYPE")).collect();
        let all = types.len();
        types.sort_unstable();
        types.dedup();
        assert_eq!(types.len(), all, "a family described twice:\n{t}");
        assert!(
            t.contains(r#"mesh_client_retries_total{service="users"} 1"#),
            "{t}"
        );
        assert!(
            t.contains(r#"mesh_client_retries_total{service="orders"} 0"#),
            "{t}"
        );
        drop(u);
        let t = text(&registry);
        assert!(!t.contains(r#"service="users",server_address"#), "{t}");
        assert!(
            t.contains(r#"service="orders",server_address="10.0.0.1:80""#),
            "{t}"
        );
    }

    /// A service's own series live as long as a handle of it: a second handle (a reload's
    /// new client) keeps them when the first goes, and the last one removes them (a
    /// service a reload took out leaves nothing behind).
    #[test]
    fn a_services_series_go_with_its_last_handle() {
        let mut registry = Registry::default();
        let families = ClientMetrics::register_families(&mut registry);
        let old = families.for_service("users");
        old.retry_counters().0.inc();
        let new = families.for_service("users");
        let clone = new.clone();
        drop(old);
        let t = text(&registry);
        assert!(
            t.contains(r#"mesh_client_retries_total{service="users"} 1"#),
            "{t}"
        );
        drop(new);
        assert!(text(&registry).contains(r#"service="users""#));
        drop(clone);
        let t = text(&registry);
        assert!(!t.contains(r#"service="users""#), "{t}");
    }
}
