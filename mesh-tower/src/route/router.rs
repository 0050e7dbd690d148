//! The `Router` service: a compiled route set over named backends, swappable at run time.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::task::{Context, Poll, ready};

use arc_swap::ArcSwap;
use http::{Request, Response, StatusCode};
use mesh_core::config::{ClassificationConfig, RouteConfig};
use pin_project_lite::pin_project;
use tower::Layer;
use tower_service::Service;

use super::error::RouterError;
use super::metrics::{RouteHandles, RouteMetrics};
use super::{RouteTable, WeightedSplit};
use crate::body::{ResponseBody, grpc_answer, text_answer};
use crate::fault::{Dice, Fault, FaultLayer, derive_seed};
use crate::retry::{RetryBudget, RetryOverride, RetryPolicy};
use crate::timeout::TimeoutOverride;

/// gRPC's `UNIMPLEMENTED`: what a gRPC request that no route takes is answered with.
const UNIMPLEMENTED: u16 = 12;

/// A compiled set of routes over named backends: what a [`Router`] routes by. Build it
/// with [`Routes::builder`]; swap it into a running router with [`Router::replace`].
pub struct Routes<S> {
    table: RouteTable,
    routes: Box<[Route<S>]>,
    default: Option<Backend<S>>,
    unmatched: Option<prometheus_client::metrics::counter::Counter>,
    dice: Dice,
}

impl<S: Clone> Clone for Routes<S> {
    fn clone(&self) -> Self {
        Self {
            table: self.table.clone(),
            routes: self.routes.clone(),
            default: self.default.clone(),
            unmatched: self.unmatched.clone(),
            dice: self.dice.clone(),
        }
    }
}

impl<S> fmt::Debug for Routes<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Routes")
            .field("routes", &self.table.names().collect::<Vec<_>>())
            .field("default", &self.default.as_ref().map(|b| &*b.name))
            .finish_non_exhaustive()
    }
}

struct Route<S> {
    name: Arc<str>,
    split: WeightedSplit,
    backends: Box<[Backend<S>]>,
    retry: Option<RetryOverride>,
    timeouts: Option<TimeoutOverride>,
    metrics: Option<Arc<RouteHandles>>,
}

impl<S: Clone> Clone for Route<S> {
    fn clone(&self) -> Self {
        Self {
            name: self.name.clone(),
            split: self.split.clone(),
            backends: self.backends.clone(),
            retry: self.retry.clone(),
            timeouts: self.timeouts,
            metrics: self.metrics.clone(),
        }
    }
}

/// One backend of a route: the service, behind the route's fault injection if it has
/// one.
struct Backend<S> {
    name: Arc<str>,
    target: Target<S>,
    requests: Option<prometheus_client::metrics::counter::Counter>,
}

impl<S: Clone> Clone for Backend<S> {
    fn clone(&self) -> Self {
        Self {
            name: self.name.clone(),
            target: self.target.clone(),
            requests: self.requests.clone(),
        }
    }
}

#[derive(Clone)]
enum Target<S> {
    Plain(S),
    Faulted(Fault<S>),
}

impl<S> Routes<S> {
    /// Starts a route set: add backends, routes and (optionally) a default backend.
    pub fn builder() -> RoutesBuilder<S> {
        RoutesBuilder {
            backends: HashMap::new(),
            routes: Vec::new(),
            default: None,
            metrics: None,
            seed: None,
        }
    }

    /// The compiled route table, for inspection.
    pub fn table(&self) -> &RouteTable {
        &self.table
    }
}

/// Builds [`Routes`]; see [`Routes::builder`].
pub struct RoutesBuilder<S> {
    backends: HashMap<String, S>,
    routes: Vec<RouteConfig>,
    default: Option<String>,
    metrics: Option<RouteMetrics>,
    seed: Option<u64>,
}

impl<S> fmt::Debug for RoutesBuilder<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RoutesBuilder")
            .field("backends", &self.backends.keys().collect::<Vec<_>>())
            .field("routes", &self.routes.len())
            .field("default", &self.default)
            .finish_non_exhaustive()
    }
}

impl<S: Clone> RoutesBuilder<S> {
    /// A backend the routes may name (`backends[].service`), typically a
    /// [`MeshClient`](crate::MeshClient). A backend of the same name is replaced.
    pub fn backend(mut self, name: impl Into<String>, service: S) -> Self {
        self.backends.insert(name.into(), service);
        self
    }

    /// A route; routes are matched by precedence across all of them (see the
    /// [module docs](super)), and ties keep the order they were added in.
    pub fn route(mut self, route: RouteConfig) -> Self {
        self.routes.push(route);
        self
    }

    /// Routes, as [`route`](Self::route) each.
    pub fn routes(mut self, routes: impl IntoIterator<Item = RouteConfig>) -> Self {
        self.routes.extend(routes);
        self
    }

    /// The backend requests no route takes go to, instead of being answered 404 (gRPC:
    /// `UNIMPLEMENTED`).
    pub fn default_backend(mut self, name: impl Into<String>) -> Self {
        self.default = Some(name.into());
        self
    }

    /// Counts requests by route and backend, and times them by route, in `metrics`.
    pub fn metrics(mut self, metrics: &RouteMetrics) -> Self {
        self.metrics = Some(metrics.clone());
        self
    }

    /// Draws the weighted picks from a splitmix64 sequence seeded with `seed` (shared by
    /// every request of these routes) instead of the thread's generator, so that a test
    /// sees the same sequence of backends every run. Route faults are drawn the same
    /// way, each backend of each route from a sequence of its own derived from `seed`
    /// (independent of the picks and of one another).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Compiles the routes; an error names the route and what is wrong with it.
    pub fn build(self) -> Result<Routes<S>, RouterError> {
        let table = RouteTable::new(&self.routes)?;
        let mut seen = std::collections::HashSet::new();
        let mut routes = Vec::with_capacity(self.routes.len());
        for (route_index, config) in self.routes.iter().enumerate() {
            let route = |reason: String| RouterError::Route {
                route: config.name.clone(),
                reason,
            };
            if !seen.insert(config.name.as_str()) {
                return Err(route("another route has the same name".into()));
            }
            let weights: Vec<u32> = config.backends.iter().map(|b| b.weight).collect();
            let split = WeightedSplit::new(&weights).map_err(|e| route(e.to_string()))?;
            let fault = config
                .fault
                .as_ref()
                .map(|f| FaultLayer::from_config(f).map_err(|e| route(e.to_string())))
                .transpose()?;
            let handles = self.metrics.as_ref().map(|m| {
                let backends: Vec<&str> =
                    config.backends.iter().map(|b| b.service.as_str()).collect();
                Arc::new(m.route(&config.name, &backends))
            });
            let backends = config
                .backends
                .iter()
                .enumerate()
                .map(|(backend_index, b)| {
                    let service = self
                        .backends
                        .get(&b.service)
                        .ok_or_else(|| route(format!("no backend named `{}`", b.service)))?;
                    Ok(Backend {
                        name: Arc::from(b.service.as_str()),
                        target: match (&fault, self.seed) {
                            // Each backend's faults from a sequence of its own: from the
                            // picks' seed itself, the n-th fault draw would equal the n-th
                            // pick, and faults would follow the backend choice.
                            (Some(layer), Some(seed)) => {
                                let stream =
                                    ((route_index as u64 + 1) << 32) | (backend_index as u64 + 1);
                                let layer = layer.clone().seed(derive_seed(seed, stream));
                                Target::Faulted(layer.layer(service.clone()))
                            }
                            (Some(layer), None) => Target::Faulted(layer.layer(service.clone())),
                            (None, _) => Target::Plain(service.clone()),
                        },
                        requests: self
                            .metrics
                            .as_ref()
                            .map(|m| m.requests(&config.name, &b.service)),
                    })
                })
                .collect::<Result<Box<[_]>, RouterError>>()?;
            let retry = config
                .retry
                .as_ref()
                .map(|r| {
                    if !(0.0..=1.0).contains(&r.budget.ratio) {
                        return Err(route("retry.budget.ratio must be between 0 and 1".into()));
                    }
                    // The classification is the backend service's: the retry layer
                    // keeps using its own classifier.
                    let policy = RetryPolicy::from_config(r, &ClassificationConfig::default())
                        .map_err(|e| route(format!("retry.backoff: {e}")))?;
                    let budget =
                        RetryBudget::new(r.budget.ratio, r.budget.min_per_second, r.budget.ttl);
                    Ok(RetryOverride::new(policy, budget))
                })
                .transpose()?;
            let timeouts = config.timeout.as_ref().map(|t| TimeoutOverride {
                request: t.request,
                per_try: t.per_try,
            });
            routes.push(Route {
                name: Arc::from(config.name.as_str()),
                split,
                backends,
                retry,
                timeouts,
                metrics: handles,
            });
        }
        let default = self
            .default
            .map(|name| {
                let service = self
                    .backends
                    .get(&name)
                    .ok_or_else(|| RouterError::DefaultBackend(name.clone()))?;
                Ok::<_, RouterError>(Backend {
                    requests: self.metrics.as_ref().map(|m| m.requests("", &name)),
                    name: Arc::from(name),
                    target: Target::Plain(service.clone()),
                })
            })
            .transpose()?;
        Ok(Routes {
            table,
            routes: routes.into_boxed_slice(),
            default,
            unmatched: self.metrics.as_ref().map(RouteMetrics::unmatched),
            dice: match self.seed {
                Some(seed) => Dice::Seeded(Arc::new(AtomicU64::new(seed))),
                None => Dice::Thread,
            },
        })
    }
}

/// Sends each request to the backend its route selects; see the [module docs](super).
///
/// Clones share one route set, which [`replace`](Self::replace) swaps atomically: a
/// request is routed by the set that was current when it was called, and requests in
/// flight finish on the backends they were sent to, so a reload drops nothing.
///
/// Always ready: each request waits for its backend's readiness in its response future
/// (on a clone of the backend, so backends should be cheap to clone, as
/// [`MeshClient`](crate::MeshClient) is).
pub struct Router<S> {
    routes: Arc<ArcSwap<Routes<S>>>,
}

impl<S> Clone for Router<S> {
    fn clone(&self) -> Self {
        Self {
            routes: self.routes.clone(),
        }
    }
}

impl<S> fmt::Debug for Router<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Router")
            .field("routes", &**self.routes.load())
            .finish()
    }
}

impl<S> Router<S> {
    /// A router over `routes`.
    pub fn new(routes: Routes<S>) -> Self {
        Self {
            routes: Arc::new(ArcSwap::from_pointee(routes)),
        }
    }

    /// Routes every request from now on by `routes` (for every clone of this router),
    /// and returns the set it replaces. Requests already called are unaffected.
    pub fn replace(&self, routes: Routes<S>) -> Arc<Routes<S>> {
        self.routes.swap(Arc::new(routes))
    }

    /// The current route set.
    pub fn routes(&self) -> Arc<Routes<S>> {
        self.routes.load_full()
    }
}

impl<S, B, RB> Service<Request<B>> for Router<S>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone,
{
    type Response = Response<ResponseBody<RB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, B, RB>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let routes = self.routes.load();
        let Some(selected) = routes.table.select(&req) else {
            if let Some(c) = &routes.unmatched {
                c.inc();
            }
            return match &routes.default {
                Some(backend) => {
                    let span = tracing::debug_span!("route", route = "", backend = %backend.name);
                    ResponseFuture::send(backend, req, None, span)
                }
                None => {
                    tracing::debug!(path = req.uri().path(), "no route");
                    ResponseFuture::local(no_route(&req))
                }
            };
        };
        let route = &routes.routes[selected.route];
        let pick = if route.backends.len() == 1 {
            0
        } else {
            route.split.pick_from(routes.dice.roll())
        };
        let backend = &route.backends[pick];
        if let Some(retry) = &route.retry {
            req.extensions_mut().insert(retry.clone());
        }
        if let Some(timeouts) = route.timeouts {
            req.extensions_mut().insert(timeouts);
        }
        let span = tracing::debug_span!("route", route = %route.name, backend = %backend.name);
        ResponseFuture::send(backend, req, route.metrics.clone(), span)
    }
}

/// The answer to a request no route takes: 404, or `UNIMPLEMENTED` for gRPC.
fn no_route<B, RB>(req: &Request<B>) -> Response<ResponseBody<RB>> {
    if mesh_core::classify::is_grpc(req.headers()) {
        grpc_answer(UNIMPLEMENTED, "no route for this method")
    } else {
        text_answer(StatusCode::NOT_FOUND, "no route\n")
    }
}

/// A [`Router`] as a layer: requests no route takes go to the service it wraps (the
/// routes' own default backend, if they have one, is replaced by it).
///
/// ```
/// use mesh_core::config::{BackendRef, PathMatch, RouteConfig, RouteMatch};
/// use mesh_tower::route::{RouterLayer, Routes};
/// use tower::{ServiceBuilder, ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// let answer = |who: &'static str| service_fn(move |_req: http::Request<()>| async move {
///     Ok::<_, std::convert::Infallible>(http::Response::new(who))
/// });
/// let canary = RouteConfig {
///     name: "canary".into(),
///     hosts: vec![],
///     matches: vec![RouteMatch { path: Some(PathMatch::Prefix("/v2".into())), ..Default::default() }],
///     backends: vec![BackendRef { service: "v2".into(), weight: 1 }],
///     retry: None,
///     timeout: None,
///     fault: None,
/// };
/// let routes = Routes::builder().backend("v2", answer("v2")).route(canary).build()?;
/// let svc = ServiceBuilder::new().layer(RouterLayer::new(routes)).service(answer("v1"));
///
/// let v2 = svc.clone().oneshot(http::Request::get("/v2/users").body(())?).await?;
/// let v1 = svc.oneshot(http::Request::get("/v1/users").body(())?).await?;
/// assert_eq!(format!("{v2:?}").contains("v2"), true);
/// assert_eq!(format!("{v1:?}").contains("v1"), true);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RouterLayer<S> {
    routes: Routes<S>,
}

impl<S> fmt::Debug for RouterLayer<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouterLayer")
            .field("routes", &self.routes)
            .finish()
    }
}

impl<S> RouterLayer<S> {
    /// A layer routing by `routes`, with the wrapped service as the default backend.
    pub fn new(routes: Routes<S>) -> Self {
        Self { routes }
    }
}

impl<S: Clone> Layer<S> for RouterLayer<S> {
    type Service = Router<S>;

    fn layer(&self, inner: S) -> Router<S> {
        let mut routes = self.routes.clone();
        routes.default = Some(Backend {
            name: Arc::from("default"),
            target: Target::Plain(inner),
            requests: None,
        });
        Router::new(routes)
    }
}

pin_project! {
    /// The response future of a [`Router`]: its backend's response, or a 404 /
    /// `UNIMPLEMENTED` answer when no route takes the request.
    pub struct ResponseFuture<S, B, RB>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S, B, RB>,
        // The route's metrics and when the request was sent, for routes with metrics.
        timing: Option<(Arc<RouteHandles>, tokio::time::Instant)>,
        span: tracing::Span,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, B, RB>
    where
        S: Service<Request<B>>,
    {
        // Waiting for the backend's readiness.
        Ready { target: Option<Target<S>>, req: Option<Request<B>> },
        Plain { #[pin] fut: S::Future },
        Faulted { #[pin] fut: crate::fault::ResponseFuture<S::Future, S, B> },
        Local { response: Option<Response<ResponseBody<RB>>> },
    }
}

impl<S, B, RB> fmt::Debug for ResponseFuture<S, B, RB>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<S, B, RB> ResponseFuture<S, B, RB>
where
    S: Service<Request<B>> + Clone,
{
    fn send(
        backend: &Backend<S>,
        req: Request<B>,
        metrics: Option<Arc<RouteHandles>>,
        span: tracing::Span,
    ) -> Self {
        if let Some(c) = &backend.requests {
            c.inc();
        }
        Self {
            state: State::Ready {
                target: Some(backend.target.clone()),
                req: Some(req),
            },
            timing: metrics.map(|m| (m, tokio::time::Instant::now())),
            span,
        }
    }

    fn local(response: Response<ResponseBody<RB>>) -> Self {
        Self {
            state: State::Local {
                response: Some(response),
            },
            timing: None,
            span: tracing::Span::none(),
        }
    }
}

impl<S, B, RB> Future for ResponseFuture<S, B, RB>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone,
{
    type Output = Result<Response<ResponseBody<RB>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let _entered = this.span.enter();
        let output = loop {
            match this.state.as_mut().project() {
                StateProj::Ready { target, req } => {
                    let ready = match target.as_mut() {
                        Some(Target::Plain(s)) => s.poll_ready(cx),
                        Some(Target::Faulted(s)) => s.poll_ready(cx),
                        None => unreachable_state(),
                    };
                    if let Err(e) = ready!(ready) {
                        break Err(e);
                    }
                    let (Some(target), Some(req)) = (target.take(), req.take()) else {
                        unreachable_state()
                    };
                    match target {
                        Target::Plain(mut s) => {
                            let fut = s.call(req);
                            this.state.set(State::Plain { fut });
                        }
                        Target::Faulted(mut s) => {
                            let fut = s.call(req);
                            this.state.set(State::Faulted { fut });
                        }
                    }
                }
                StateProj::Plain { fut } => {
                    break ready!(fut.poll(cx)).map(|r| r.map(ResponseBody::inner));
                }
                StateProj::Faulted { fut } => break ready!(fut.poll(cx)),
                StateProj::Local { response } => match response.take() {
                    Some(r) => break Ok(r),
                    None => unreachable_state(),
                },
            }
        };
        if let Some((metrics, sent)) = this.timing.take() {
            metrics.record(output.as_ref().ok().map(Response::status), sent.elapsed());
        }
        Poll::Ready(output)
    }
}

/// A future polled after it completed, or a state entered without its parts: a bug
/// in this module, never reached by input.
#[track_caller]
fn unreachable_state() -> ! {
    panic!("route::ResponseFuture polled after completion")
}
