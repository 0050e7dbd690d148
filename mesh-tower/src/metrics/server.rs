//! Inbound (server) metrics, registered in the host application's `prometheus-client`
//! registry.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `http_server_request_duration_seconds` | histogram | `listener`, `http_request_method`, `http_response_status_code`, `network_protocol_version` (+ `client`) |
//! | `rpc_server_duration_seconds` | histogram | `listener`, `rpc_system` (`grpc`), `rpc_service`, `rpc_method`, `rpc_grpc_status_code` (+ `client`) |
//! | `http_server_request_body_size_bytes` | histogram | `listener`, `http_request_method` |
//! | `http_server_response_body_size_bytes` | histogram | `listener`, `http_request_method` |
//! | `mesh_server_authz_total` | counter | `listener`, `policy`, `rule` (`default` when none), `outcome` (`allow`, `deny`, `audit`) |
//! | `mesh_server_rate_limited_total` | counter | `listener`, `limit` (`client`, `total`) |
//! | `mesh_server_tls_handshake_failures_total` | counter | `listener`, `reason` |
//! | `mesh_server_connections` | gauge | `listener`: connections open, from their accept (TLS handshakes, and the opaque fallback's relays, included) to their close |
//! | `mesh_server_connections_closed_total` | counter | `listener`, `reason`: connections the server closed, or shut down, on its own: `cancelled_requests` (its client cancelled most of its requests: shut down with `GOAWAY`, then closed), `no_request` (none within the header read timeout), `stalled_client` (it stopped reading), `idle` (idle timeout, a graceful shutdown), `error` (it ended with an error: malformed input, a flood h2 refuses with `GOAWAY`, a broken connection), `shed` (the listener was at `max_connections` and this connection had not finished its handshake or sent a request: closed to accept a newer one), `peer_certificate_expired` (the client certificate its mTLS handshake verified expired: shut down gracefully) |
//!
//! Names and labels follow OpenTelemetry's HTTP and RPC semantic conventions
//! (`http.server.request.duration`, `rpc.server.duration`, …, dots as underscores).
//! A request is measured from its arrival to the end of its response body, so streamed
//! answers count whole; a gRPC call's status is read from the response headers
//! (trailers-only) or trailers. A call that ends with neither counts with the code gRPC
//! clients make of its HTTP status (gRPC's HTTP to gRPC status mapping: a 503 or a 429
//! is `UNAVAILABLE` (14), a 404 `UNIMPLEMENTED` (12), a 200 `UNKNOWN` (2)); a status
//! outside 0–16 or one that is not a number counts as `UNKNOWN` (what gRPC clients make
//! of them).
//!
//! **Cardinality is bounded.** Methods outside the standard ones count as `_OTHER`; the
//! client's identity becomes a label only with [`ListenerMetrics::with_client_label`].
//! gRPC service and method names come from the request path, which anyone who can reach
//! the listener chooses, so a path is *named* (becomes `rpc_service` and `rpc_method`
//! values) only when
//!
//! - it is `/SERVICE/METHOD`, each part 1 to 128 bytes of `[A-Za-z0-9._-]`, and
//! - an answer to it shows that the method exists and that the caller was let through:
//!   HTTP 200, not the mesh's own answer (no `x-mesh-error`: a refusal by authorization,
//!   rate limit or body limit, a missing route), and a `grpc-status` (in the headers or
//!   the trailers) other than `PERMISSION_DENIED` (7), `UNIMPLEMENTED` (12) and
//!   `UNAUTHENTICATED` (16).
//!
//! Calls to paths not (yet) named count as `_OTHER`. A listener names at most 1,000 paths,
//! kept for its lifetime; later ones count as `_OTHER` too. A named path is found at the
//! request by one hash lookup under a read lock, with no allocation; a path not named yet
//! is copied (at most 258 bytes) until its answer decides.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, OnceLock, RwLock};
use std::task::{Context, Poll};

use bytes::Buf;
use http::{HeaderMap, Method, Request, Response, Version};
use http_body::{Body, Frame, SizeHint};
use mesh_core::classify::grpc;
use mesh_spiffe::PeerIdentity;
use pin_project_lite::pin_project;
use prometheus_client::encoding::{EncodeLabel, EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use tokio::time::Instant;
use tower::Layer;
use tower_service::Service;

use crate::access_log::{Entry, Outcome, Recorder};

/// Distinct gRPC paths named in labels before the rest count as `_OTHER`.
const MAX_RPC_NAMES: usize = 1000;

/// The longest gRPC service or method name used as a label value, in bytes.
const MAX_RPC_NAME_LEN: usize = 128;

/// The gRPC service and method of `path` (`/SERVICE/METHOD`) if both may be label values:
/// 1 to [`MAX_RPC_NAME_LEN`] bytes of `[A-Za-z0-9._-]`. Pure; looks at no more than
/// `2 * MAX_RPC_NAME_LEN + 2` bytes.
fn rpc_path(path: &str) -> Option<(&str, &str)> {
    if path.len() > 2 * MAX_RPC_NAME_LEN + 2 {
        return None;
    }
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    let valid = |name: &str| {
        !name.is_empty()
            && name.len() <= MAX_RPC_NAME_LEN
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    };
    (valid(service) && valid(method)).then_some((service, method))
}

/// A gRPC service's and method's label values.
type RpcLabelNames = (Arc<str>, Arc<str>);

/// A gRPC call's label names, as far as they are known at its request.
#[derive(Debug)]
enum RpcName {
    /// A path named already.
    Known(Arc<str>, Arc<str>),
    /// A well-formed path not named yet: its answer decides (see the [module docs](self)).
    New(Box<str>),
    /// `_OTHER`.
    Other,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct HttpLabels {
    listener: Arc<str>,
    method: &'static str,
    status: u16,
    version: &'static str,
    client: Option<Arc<str>>,
}

impl EncodeLabelSet for HttpLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> Result<(), std::fmt::Error> {
        ("listener", &*self.listener).encode(encoder.encode_label())?;
        ("http_request_method", self.method).encode(encoder.encode_label())?;
        ("http_response_status_code", self.status).encode(encoder.encode_label())?;
        ("network_protocol_version", self.version).encode(encoder.encode_label())?;
        if let Some(client) = &self.client {
            ("client", &**client).encode(encoder.encode_label())?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct RpcLabels {
    listener: Arc<str>,
    service: Arc<str>,
    method: Arc<str>,
    code: u16,
    client: Option<Arc<str>>,
}

impl EncodeLabelSet for RpcLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> Result<(), std::fmt::Error> {
        ("listener", &*self.listener).encode(encoder.encode_label())?;
        ("rpc_system", "grpc").encode(encoder.encode_label())?;
        ("rpc_service", &*self.service).encode(encoder.encode_label())?;
        ("rpc_method", &*self.method).encode(encoder.encode_label())?;
        ("rpc_grpc_status_code", self.code).encode(encoder.encode_label())?;
        if let Some(client) = &self.client {
            ("client", &**client).encode(encoder.encode_label())?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct SizeLabels {
    listener: Arc<str>,
    http_request_method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct AuthzLabels {
    listener: Arc<str>,
    policy: Arc<str>,
    rule: Arc<str>,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct LimitLabels {
    listener: Arc<str>,
    limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct ListenerLabel {
    listener: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct ReasonLabels {
    listener: Arc<str>,
    reason: &'static str,
}

#[derive(Debug)]
struct Families {
    http: Family<HttpLabels, Histogram>,
    rpc: Family<RpcLabels, Histogram>,
    request_size: Family<SizeLabels, Histogram>,
    response_size: Family<SizeLabels, Histogram>,
    authz: Family<AuthzLabels, Counter>,
    rate_limited: Family<LimitLabels, Counter>,
    tls_failures: Family<ReasonLabels, Counter>,
    closed: Family<ReasonLabels, Counter>,
    connections: Family<ListenerLabel, Gauge>,
}

/// The inbound metrics of one registry; [`listener`](Self::listener) gives each
/// listener's handle. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct ServerMetrics {
    families: Arc<Families>,
}

impl ServerMetrics {
    /// Registers the inbound metrics in `registry` (once per registry).
    pub fn register(registry: &mut Registry) -> Self {
        let seconds = || Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        let bytes = || Histogram::new(exponential_buckets(64.0, 4.0, 12));
        let families = Families {
            http: Family::new_with_constructor(seconds),
            rpc: Family::new_with_constructor(seconds),
            request_size: Family::new_with_constructor(bytes),
            response_size: Family::new_with_constructor(bytes),
            authz: Family::default(),
            rate_limited: Family::default(),
            tls_failures: Family::default(),
            closed: Family::default(),
            connections: Family::default(),
        };
        registry.register_with_unit(
            "http_server_request_duration",
            "Duration of inbound HTTP requests, to the end of the response body",
            Unit::Seconds,
            families.http.clone(),
        );
        registry.register_with_unit(
            "rpc_server_duration",
            "Duration of inbound gRPC calls, to the end of the response",
            Unit::Seconds,
            families.rpc.clone(),
        );
        registry.register_with_unit(
            "http_server_request_body_size",
            "Size of inbound request bodies",
            Unit::Bytes,
            families.request_size.clone(),
        );
        registry.register_with_unit(
            "http_server_response_body_size",
            "Size of response bodies",
            Unit::Bytes,
            families.response_size.clone(),
        );
        registry.register(
            "mesh_server_authz",
            "Authorization decisions by policy, rule and outcome",
            families.authz.clone(),
        );
        registry.register(
            "mesh_server_rate_limited",
            "Requests refused by the local rate limit",
            families.rate_limited.clone(),
        );
        registry.register(
            "mesh_server_tls_handshake_failures",
            "Refused or failed TLS handshakes by reason",
            families.tls_failures.clone(),
        );
        registry.register(
            "mesh_server_connections",
            "Open connections, TLS handshakes included",
            families.connections.clone(),
        );
        registry.register(
            "mesh_server_connections_closed",
            "Connections the server closed or shut down on its own, by reason",
            families.closed.clone(),
        );
        Self {
            families: Arc::new(families),
        }
    }

    /// The handle of the listener named `name`.
    pub fn listener(&self, name: &str) -> ListenerMetrics {
        ListenerMetrics(Arc::new(Listener::new(
            Arc::from(name),
            self.families.clone(),
            false,
        )))
    }
}

#[derive(Debug)]
struct Listener {
    name: Arc<str>,
    families: Arc<Families>,
    client_label: bool,
    /// The gRPC paths named in labels, by path: written only when a path is named.
    rpc_names: RwLock<HashMap<Box<str>, RpcLabelNames>>,
    /// `_OTHER`, as service and method.
    rpc_other: RpcLabelNames,
    /// Handles of the common HTTP series, made on first use: recording then hashes no
    /// labels.
    cache: Cache,
    /// Its open connections' gauge.
    connections: Gauge,
}

impl Listener {
    fn new(name: Arc<str>, families: Arc<Families>, client_label: bool) -> Self {
        let other = Arc::<str>::from("_OTHER");
        let connections = families
            .connections
            .get_or_create(&ListenerLabel {
                listener: name.clone(),
            })
            .clone();
        Self {
            connections,
            name,
            families,
            client_label,
            rpc_names: RwLock::new(HashMap::new()),
            rpc_other: (other.clone(), other),
            cache: Cache::new(),
        }
    }
}

/// One open connection in its listener's `mesh_server_connections`, until dropped.
#[derive(Debug)]
pub struct OpenConnection(Gauge);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Statuses whose duration series have a cached handle.
const CACHED_STATUSES: [u16; 24] = [
    200, 201, 202, 204, 206, 301, 302, 304, 307, 308, 400, 401, 403, 404, 405, 408, 409, 413, 429,
    431, 500, 502, 503, 504,
];

const METHODS: [&str; 10] = [
    "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "CONNECT", "TRACE", "_OTHER",
];

const VERSIONS: [&str; 6] = ["0.9", "1.0", "1.1", "2", "3", "_OTHER"];

#[derive(Debug)]
struct Cache {
    /// By method, version and status.
    durations: Box<[OnceLock<Histogram>]>,
    request_sizes: [OnceLock<Histogram>; METHODS.len()],
    response_sizes: [OnceLock<Histogram>; METHODS.len()],
}

impl Cache {
    fn new() -> Self {
        let n = METHODS.len() * VERSIONS.len() * CACHED_STATUSES.len();
        Self {
            durations: (0..n).map(|_| OnceLock::new()).collect(),
            request_sizes: Default::default(),
            response_sizes: Default::default(),
        }
    }
}

/// One listener's metrics: a `Layer` for its request metrics, and the counters the
/// authorization, rate-limit and TLS parts feed.
#[derive(Clone, Debug)]
pub struct ListenerMetrics(Arc<Listener>);

impl ListenerMetrics {
    /// Adds the client's identity as a `client` label on request metrics (one series per
    /// client: only for a known, small set of clients).
    pub fn with_client_label(self) -> Self {
        let l = &self.0;
        Self(Arc::new(Listener::new(
            l.name.clone(),
            l.families.clone(),
            true,
        )))
    }

    /// The listener's name.
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// A counter of `outcome` (`allow`, `deny`, `audit`) for `rule` of `policy`.
    pub fn authz_counter(
        &self,
        policy: &str,
        rule: Option<&str>,
        outcome: &'static str,
    ) -> Counter {
        self.0
            .families
            .authz
            .get_or_create(&AuthzLabels {
                listener: self.0.name.clone(),
                policy: Arc::from(policy),
                rule: Arc::from(rule.unwrap_or("default")),
                outcome,
            })
            .clone()
    }

    /// The counter of refusals by `limit` (`client`, `total`).
    pub fn rate_limited_counter(&self, limit: &'static str) -> Counter {
        self.0
            .families
            .rate_limited
            .get_or_create(&LimitLabels {
                listener: self.0.name.clone(),
                limit,
            })
            .clone()
    }

    /// Counts a TLS handshake that failed for `reason`.
    pub fn tls_failure(&self, reason: &'static str) {
        self.0
            .families
            .tls_failures
            .get_or_create(&ReasonLabels {
                listener: self.0.name.clone(),
                reason,
            })
            .inc();
    }

    /// Counts a connection open until the guard it returns is dropped.
    pub fn connection_opened(&self) -> OpenConnection {
        self.0.connections.inc();
        OpenConnection(self.0.connections.clone())
    }

    /// Counts a connection the server closed (or shut down) on its own, for `reason`.
    pub fn connection_closed(&self, reason: &'static str) {
        self.0
            .families
            .closed
            .get_or_create(&ReasonLabels {
                listener: self.0.name.clone(),
                reason,
            })
            .inc();
    }

    /// The label names of a gRPC call to `path`, at its request: one hash lookup, and no
    /// allocation unless the path may still be named.
    fn rpc_name(&self, path: &str) -> RpcName {
        if rpc_path(path).is_none() {
            return RpcName::Other;
        }
        let Ok(names) = self.0.rpc_names.read() else {
            return RpcName::Other;
        };
        match names.get(path) {
            Some((service, method)) => RpcName::Known(service.clone(), method.clone()),
            None if names.len() >= MAX_RPC_NAMES => RpcName::Other,
            None => RpcName::New(Box::from(path)),
        }
    }

    /// Names `path`, whose answer showed that its method exists, within the bound.
    fn name_rpc(&self, path: Box<str>) -> RpcLabelNames {
        let l = &*self.0;
        let Some((service, method)) = rpc_path(&path) else {
            return l.rpc_other.clone();
        };
        let entry = (Arc::<str>::from(service), Arc::<str>::from(method));
        let Ok(mut names) = l.rpc_names.write() else {
            return l.rpc_other.clone();
        };
        if let Some(found) = names.get(&*path) {
            return found.clone();
        }
        if names.len() >= MAX_RPC_NAMES {
            return l.rpc_other.clone();
        }
        names.insert(path, entry.clone());
        entry
    }
}

impl<S> Layer<S> for ListenerMetrics {
    type Service = InboundMetrics<S>;

    fn layer(&self, inner: S) -> InboundMetrics<S> {
        InboundMetrics {
            inner,
            metrics: Some(self.clone()),
            access_log: None,
        }
    }
}

/// Records each request's duration, status and body sizes; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct InboundMetrics<S> {
    inner: S,
    /// `None`: measures nothing (a server without metrics).
    metrics: Option<ListenerMetrics>,
    /// The server's access log, written at the same points as the metrics.
    access_log: Option<Recorder>,
}

impl<S> InboundMetrics<S> {
    /// Passes requests through unmeasured.
    #[cfg(feature = "server")]
    pub(crate) fn disabled(inner: S) -> Self {
        Self {
            inner,
            metrics: None,
            access_log: None,
        }
    }

    /// Writes `log` too, at the request's end (the server's access log, with no layer of
    /// its own: see [`Recorder`]).
    #[cfg(feature = "server")]
    pub(crate) fn with_access_log(mut self, log: Recorder) -> Self {
        self.access_log = Some(log);
        self
    }
}

fn method_index(method: &Method) -> usize {
    match *method {
        Method::GET => 0,
        Method::POST => 1,
        Method::PUT => 2,
        Method::DELETE => 3,
        Method::HEAD => 4,
        Method::OPTIONS => 5,
        Method::PATCH => 6,
        Method::CONNECT => 7,
        Method::TRACE => 8,
        _ => 9,
    }
}

fn version_index(version: Version) -> usize {
    match version {
        Version::HTTP_09 => 0,
        Version::HTTP_10 => 1,
        Version::HTTP_11 => 2,
        Version::HTTP_2 => 3,
        Version::HTTP_3 => 4,
        _ => 5,
    }
}

/// What a response's end needs to record its request.
#[derive(Debug)]
struct Pending {
    metrics: ListenerMetrics,
    started: Instant,
    method: usize,
    version: usize,
    client: Option<PeerIdentity>,
    /// The service and method, for a gRPC call.
    rpc: Option<RpcName>,
    /// Whether the response is the mesh's own answer (`x-mesh-error`).
    mesh_answer: bool,
    request_size: Option<u64>,
}

impl Pending {
    fn record(self, status: u16, grpc_status: Option<u16>, response_size: u64) {
        let l = &*self.metrics.0;
        let elapsed = self.started.elapsed().as_secs_f64();
        let client = if l.client_label {
            self.client.map(|p| Arc::from(p.to_string()))
        } else {
            None
        };
        match self.rpc {
            Some(name) => {
                let (service, method) = match name {
                    RpcName::Known(service, method) => (service, method),
                    // The method exists and the caller got through: see the module docs.
                    RpcName::New(path)
                        if status == 200
                            && !self.mesh_answer
                            && grpc_status.is_some_and(|c| !matches!(c, 7 | 12 | 16)) =>
                    {
                        self.metrics.name_rpc(path)
                    }
                    RpcName::New(_) | RpcName::Other => l.rpc_other.clone(),
                };
                l.families
                    .rpc
                    .get_or_create(&RpcLabels {
                        listener: l.name.clone(),
                        service,
                        method,
                        // A call that ended with no status has the code a gRPC client
                        // makes of its HTTP status: UNKNOWN for a 200.
                        code: grpc_status
                            .unwrap_or_else(|| grpc::Code::for_http_status(status) as u16),
                        client,
                    })
                    .observe(elapsed);
            }
            None => {
                let labels = || HttpLabels {
                    listener: l.name.clone(),
                    method: METHODS[self.method],
                    status,
                    version: VERSIONS[self.version],
                    client: client.clone(),
                };
                let cached = CACHED_STATUSES
                    .iter()
                    .position(|&s| s == status)
                    .filter(|_| client.is_none())
                    .map(|s| {
                        (self.method * VERSIONS.len() + self.version) * CACHED_STATUSES.len() + s
                    })
                    .and_then(|i| l.cache.durations.get(i));
                match cached {
                    Some(slot) => slot
                        .get_or_init(|| l.families.http.get_or_create(&labels()).clone())
                        .observe(elapsed),
                    None => l.families.http.get_or_create(&labels()).observe(elapsed),
                }
            }
        }
        let sizes = || SizeLabels {
            listener: l.name.clone(),
            http_request_method: METHODS[self.method],
        };
        if let Some(size) = self.request_size
            && let Some(slot) = l.cache.request_sizes.get(self.method)
        {
            slot.get_or_init(|| l.families.request_size.get_or_create(&sizes()).clone())
                .observe(size as f64);
        }
        if let Some(slot) = l.cache.response_sizes.get(self.method) {
            slot.get_or_init(|| l.families.response_size.get_or_create(&sizes()).clone())
                .observe(response_size as f64);
        }
    }
}

impl<S, B, RB> Service<Request<B>> for InboundMetrics<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    B: Body,
    RB: Body,
{
    type Response = Response<MeteredBody<RB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let entry = self.access_log.as_ref().and_then(|log| log.start(&req));
        let Some(metrics) = &self.metrics else {
            return ResponseFuture {
                inner: self.inner.call(req),
                pending: None,
                entry,
            };
        };
        let grpc = mesh_core::classify::is_grpc(req.headers());
        let pending = Pending {
            metrics: metrics.clone(),
            started: Instant::now(),
            method: method_index(req.method()),
            version: version_index(req.version()),
            client: req.extensions().get::<PeerIdentity>().cloned(),
            rpc: grpc.then(|| metrics.rpc_name(req.uri().path())),
            mesh_answer: false,
            // The declared size (Content-Length, or an empty body); a streamed request
            // body of unknown length is not measured.
            request_size: req.body().size_hint().exact(),
        };
        ResponseFuture {
            inner: self.inner.call(req),
            pending: Some(pending),
            entry,
        }
    }
}

pin_project! {
    /// The response future of [`InboundMetrics`].
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        pending: Option<Pending>,
        entry: Option<Box<Entry>>,
    }

    impl<F> PinnedDrop for ResponseFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(entry) = this.project().entry.take() {
                entry.emit(Outcome::Cancelled);
            }
        }
    }
}

impl<F, RB, E> std::future::Future for ResponseFuture<F>
where
    F: std::future::Future<Output = Result<Response<RB>, E>>,
    RB: Body,
{
    type Output = Result<Response<MeteredBody<RB>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.inner.poll(cx));
        let mut entry = this.entry.take();
        crate::access_log::answered(&mut entry, &result);
        let Some(pending) = this.pending.take() else {
            return Poll::Ready(result.map(|r| {
                r.map(|body| {
                    let mut body = MeteredBody::new(body, None, 0);
                    body.entry = entry;
                    body.end_if_empty();
                    body
                })
            }));
        };
        Poll::Ready(match result {
            Ok(resp) => {
                let mut pending = pending;
                // Read only where it decides something: a gRPC path not named yet.
                pending.mesh_answer = matches!(pending.rpc, Some(RpcName::New(_)))
                    && resp.headers().contains_key(crate::body::MESH_ERROR);
                let status = resp.status().as_u16();
                let grpc_status = pending
                    .rpc
                    .is_some()
                    .then(|| grpc_status(resp.headers()))
                    .flatten();
                let (parts, body) = resp.into_parts();
                let mut body = MeteredBody::new(body, Some(pending), status);
                body.grpc_status = grpc_status;
                body.entry = entry;
                body.end_if_empty();
                Ok(Response::from_parts(parts, body))
            }
            Err(e) => {
                // The service failed: hyper answers 500 or resets; count it so.
                pending.record(500, Some(13), 0);
                Err(e)
            }
        })
    }
}

/// The `grpc-status` in `headers`, if any: a code from 0 to 16, where a number outside
/// that range or a value that is no number is `UNKNOWN` (2), as gRPC clients read it
/// ([`grpc::parse_status`]). The access log reads it so too.
pub(crate) fn grpc_status(headers: &HeaderMap) -> Option<u16> {
    let value = headers.get("grpc-status")?;
    Some(grpc::parse_status(value).map_or(2, |code| u16::from(code as u8)))
}

pin_project! {
    /// A response body that records its request's metrics at its end (or when dropped).
    #[derive(Debug)]
    pub struct MeteredBody<B> {
        #[pin]
        inner: B,
        pending: Option<Pending>,
        status: u16,
        grpc_status: Option<u16>,
        size: u64,
        entry: Option<Box<Entry>>,
    }

    impl<B> PinnedDrop for MeteredBody<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(pending) = this.pending.take() {
                pending.record(*this.status, *this.grpc_status, *this.size);
            }
            if let Some(entry) = this.entry.take() {
                entry.emit(Outcome::BodyDropped);
            }
        }
    }
}

impl<B> MeteredBody<B> {
    fn new(inner: B, pending: Option<Pending>, status: u16) -> Self {
        Self {
            inner,
            pending,
            status,
            grpc_status: None,
            size: 0,
            entry: None,
        }
    }

    /// Records and logs a body that has ended already (an empty one).
    fn end_if_empty(&mut self)
    where
        B: Body,
    {
        if self.inner.is_end_stream() {
            if let Some(pending) = self.pending.take() {
                pending.record(self.status, self.grpc_status, self.size);
            }
            if let Some(entry) = self.entry.take() {
                entry.emit(Outcome::Complete);
            }
        }
    }
}

impl<B: Body> Body for MeteredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let mut this = self.project();
        let frame = std::task::ready!(this.inner.as_mut().poll_frame(cx));
        // A broken response (an error frame) did not complete: without a status it counts
        // by its HTTP status (a 200 as UNKNOWN), and names no path.
        if let Some(Ok(frame)) = &frame {
            if let Some(data) = frame.data_ref() {
                *this.size += data.remaining() as u64;
            } else if let Some(trailers) = frame.trailers_ref()
                && let Some(code) = grpc_status(trailers)
            {
                *this.grpc_status = Some(code);
            }
        }
        if (frame.is_none() || this.inner.is_end_stream())
            && let Some(pending) = this.pending.take()
        {
            pending.record(*this.status, *this.grpc_status, *this.size);
        }
        crate::access_log::polled(this.entry, &frame, || this.inner.is_end_stream());
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
