//! `MeshClient`: a balanced, resilient, rate-limit-aware HTTP client for one service.
//!
//! A request goes through, in order:
//!
//! 1. **Request timeout** (optional): the deadline for the whole request, retries
//!    included. Nothing is retried past it, and no back-off sleeps past it.
//! 2. **Body preparation**: when retries are on, a body whose size is known to be within
//!    `max_replay_body` (64 KiB) is buffered for replay; larger bodies and streams of
//!    unknown size are sent once, as they come, and not retried (see [`body`]).
//! 3. **Each try**: the balancer picks an endpoint ([`crate::balance`]); the try runs under
//!    the per-try timeout on that endpoint's connection ([`crate::connect`]); its RTT
//!    feeds the endpoint's peak-EWMA load.
//! 4. **Classification** ([`mesh_core::classify`]) of the answer: failures (5xx, gRPC
//!    UNAVAILABLE, …, connection errors, per-try timeouts) feed the endpoint's circuit
//!    breaker; rate-limited answers (429, RESOURCE_EXHAUSTED) penalize the endpoint's load
//!    for their `Retry-After` / pushback period (default 1 s, at most 30 s) and count as
//!    neither success nor failure. A gRPC status in trailers is classified when the
//!    trailers arrive.
//! 5. **Retry decision**: a failed try is retried when its class is retryable (connection
//!    failures for any method — the request never left; for idempotent methods, or all
//!    when `non_idempotent` is set: statuses in `retry.statuses`, codes in
//!    `retry.grpc_codes`, per-try timeouts and broken connections), the body can be
//!    replayed, fewer than
//!    `max_retries` retries were made, the **budget** allows it (20 % of requests plus
//!    10/s over 10 s, [`crate::retry::budget`]), and the back-off (25–250 ms with jitter, or
//!    the server's `Retry-After` if longer) ends before the deadline. Rate-limited answers
//!    are retried only if 429 is among `retry.statuses`, and never sooner than their
//!    pushback; a negative gRPC pushback forbids retrying.
//!
//! When no retry happens, the last answer (or error) is returned as it is.

pub mod body;
mod builder;
pub mod error;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Request, Response};
use mesh_core::classify::{Backoff as Pushback, Class, Classifier, CodeSet, StatusSet};
use mesh_core::error::BoxError;
use tokio::time::Instant;
use tracing::Instrument;

use self::body::{RequestBody, ResponseBody};
use crate::backoff::Backoff;
use crate::balance::pool::{PoolHandle, Slot};
use crate::balance::{self, ZonePreference};

pub use self::builder::MeshClientBuilder;

/// Retry settings, resolved from configuration.
#[derive(Clone, Debug)]
pub(crate) struct RetryPolicy {
    pub(crate) enabled: bool,
    pub(crate) max_retries: u32,
    pub(crate) statuses: StatusSet,
    pub(crate) grpc_codes: CodeSet,
    pub(crate) non_idempotent: bool,
    pub(crate) max_replay_body: usize,
    pub(crate) backoff: Backoff,
}

/// Rate-limit settings, resolved from configuration.
#[derive(Clone, Debug)]
pub(crate) struct RateLimitPolicy {
    pub(crate) default_penalty: Duration,
    pub(crate) max_penalty: Duration,
}

pub(crate) struct Inner {
    pub(crate) service: Arc<str>,
    pub(crate) pool: PoolHandle<RequestBody>,
    pub(crate) zone: ZonePreference,
    pub(crate) classifier: Classifier,
    pub(crate) retry: RetryPolicy,
    pub(crate) budget: crate::retry::budget::RetryBudget,
    pub(crate) rate_limit: RateLimitPolicy,
    pub(crate) request_timeout: Option<Duration>,
    pub(crate) per_try_timeout: Option<Duration>,
    pub(crate) metrics: Option<crate::metrics::ClientMetrics>,
}

/// A client for one mesh service. Cheap to clone; clones share endpoints, connections,
/// load, breakers and the retry budget. Build it with [`MeshClient::builder`], or with
/// [`MeshClientBuilder::from_config`] from a `[services.NAME]` section.
///
/// ```no_run
/// use bytes::Bytes;
/// use http_body_util::Empty;
/// use mesh_core::{Endpoint, discover::StaticDiscovery};
/// use mesh_spiffe::{CredentialStore, Mtls};
/// use mesh_tower::MeshClient;
///
/// # async fn example(credentials: CredentialStore) -> Result<(), mesh_core::error::BoxError> {
/// let discovery = StaticDiscovery::new([
///     Endpoint::new("10.0.0.7:4143".parse()?),
///     Endpoint::new("10.0.0.8:4143".parse()?),
/// ]);
/// let mut registry = prometheus_client::registry::Registry::default();
/// let users = MeshClient::builder(Box::pin(discovery))
///     .service_name("users")
///     .mtls(Mtls::new(credentials)) // or `.plaintext()`, explicitly
///     .server_identity("spiffe://example.org/ns/prod/sa/users".parse()?)
///     .metrics(&mut registry)
///     .build()?;
///
/// // A `tower::Service<http::Request<B>>`; `send` is the same without `poll_ready`.
/// let response = users
///     .send(http::Request::get("http://users/v1/users/42").body(Empty::<Bytes>::new())?)
///     .await?;
/// assert!(response.status().is_success());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct MeshClient {
    inner: Arc<Inner>,
}

impl fmt::Debug for MeshClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshClient")
            .field("pool", &self.inner.pool)
            .finish_non_exhaustive()
    }
}

impl MeshClient {
    /// Starts building a client fed by `discovery`.
    pub fn builder(discovery: mesh_core::discover::BoxDiscover) -> MeshClientBuilder {
        MeshClientBuilder::new(discovery)
    }

    /// The current endpoints, for inspection (dashboards, tests).
    pub fn endpoints(&self) -> Vec<Arc<Slot<RequestBody>>> {
        self.inner.pool.load().endpoints.clone()
    }

    /// The client's metrics, when registered with [`MeshClientBuilder::metrics`].
    pub fn metrics(&self) -> Option<&crate::metrics::ClientMetrics> {
        self.inner.metrics.as_ref()
    }

    /// Sends one request through the whole stack.
    pub async fn send<B>(&self, req: Request<B>) -> Result<Response<ResponseBody>, BoxError>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let inner = self.inner.clone();
        let span = tracing::debug_span!(
            "mesh_client",
            service = %inner.service,
            http.request.method = %req.method(),
            url.path = req.uri().path(),
        );
        let deadline = inner.request_timeout.map(|t| Instant::now() + t);
        let fut = async move {
            match deadline {
                Some(at) => tokio::time::timeout_at(at, call(inner.clone(), req, deadline))
                    .await
                    .unwrap_or_else(|_| {
                        Err(error::RequestTimeout(inner.request_timeout.unwrap_or_default()).into())
                    }),
                None => call(inner, req, None).await,
            }
        };
        fut.instrument(span).await
    }
}

impl<B> tower_service::Service<Request<B>> for MeshClient
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Endpoint readiness is decided per request, when an endpoint is picked.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { this.send(req).await })
    }
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// The outcome of one try.
// Lives on the stack for one try; boxing the answer would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
enum Try {
    Answer(Response<ResponseBody>, Option<Class>),
    Failed(BoxError, bool),
}

async fn call<B>(
    inner: Arc<Inner>,
    req: Request<B>,
    deadline: Option<Instant>,
) -> Result<Response<ResponseBody>, BoxError>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let (mut parts, body) = req.into_parts();
    let policy = &inner.retry;
    let retries_on = policy.enabled && policy.max_retries > 0;
    // Failed answers are retried only for idempotent methods (unless configured); a
    // connect failure is retried for any method, since the request never left.
    let idempotent = policy.non_idempotent || is_idempotent(&parts.method);
    let mut prepared = if retries_on {
        body::prepare(body, policy.max_replay_body).await?
    } else {
        body::once(body)
    };
    inner.budget.deposit();
    let mut rng = fastrand::Rng::new();
    let mut extensions = Some(std::mem::take(&mut parts.extensions));
    let mut retries = 0u32;
    loop {
        let Some(body) = prepared.next() else {
            return Err("request body already consumed".into());
        };
        let mut req = Request::new(body);
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = parts.uri.clone();
        *req.version_mut() = parts.version;
        // A body that cannot be replayed allows no further try: hand the headers over.
        *req.headers_mut() = if prepared.is_replayable() {
            parts.headers.clone()
        } else {
            std::mem::take(&mut parts.headers)
        };
        if let Some(ext) = extensions.take() {
            *req.extensions_mut() = ext;
        }

        let pool = inner.pool.ready().await;
        let Some(slot) = balance::pick(&pool, inner.zone, &mut rng) else {
            return Err(error::NoEndpoints.into());
        };
        drop(pool);
        let outcome = try_once(&inner, &slot, req)
            .instrument(tracing::debug_span!("try", server.address = %slot.label, retries))
            .await;

        let now = SystemTime::now();
        let max_penalty = inner.rate_limit.max_penalty;
        let (retryable, pushback) = match &outcome {
            Try::Answer(resp, Some(Class::Failure)) => (
                idempotent && is_retryable_answer(&inner, resp),
                mesh_core::classify::pushback(resp.headers(), now, max_penalty),
            ),
            Try::Answer(resp, Some(Class::RateLimited)) => (
                idempotent && policy.statuses.contains(resp.status()),
                mesh_core::classify::pushback(resp.headers(), now, max_penalty),
            ),
            Try::Answer(..) => (false, Pushback::Unspecified),
            Try::Failed(e, retryable) => (
                is_connect_error(e.as_ref()) || idempotent && *retryable,
                Pushback::Unspecified,
            ),
        };
        if !retries_on
            || !retryable
            || !prepared.is_replayable()
            || retries >= policy.max_retries
            || pushback == Pushback::DoNotRetry
        {
            return finish(outcome);
        }
        if !inner.budget.withdraw() {
            tracing::debug!("retry budget exhausted");
            if let Some(m) = &inner.metrics {
                m.budget_exhausted();
            }
            return finish(outcome);
        }
        let mut delay = policy.backoff.delay(retries, &mut rng);
        if let Pushback::After(d) = pushback {
            delay = delay.max(d);
        }
        if deadline.is_some_and(|at| Instant::now() + delay >= at) {
            return finish(outcome);
        }
        retries += 1;
        if let Some(m) = &inner.metrics {
            m.retried();
        }
        tracing::debug!(retries, ?delay, "retrying");
        drop(outcome);
        tokio::time::sleep(delay).await;
    }
}

fn finish(outcome: Try) -> Result<Response<ResponseBody>, BoxError> {
    match outcome {
        Try::Answer(resp, _) => Ok(resp),
        Try::Failed(e, _) => Err(e),
    }
}

fn is_connect_error(e: &(dyn std::error::Error + 'static)) -> bool {
    mesh_core::error::find_cause::<hyper_util::client::legacy::Error>(e)
        .is_some_and(|e| e.is_connect())
}

fn is_retryable_answer(inner: &Inner, resp: &Response<ResponseBody>) -> bool {
    if mesh_core::classify::is_grpc(resp.headers()) && resp.status() == http::StatusCode::OK {
        return resp
            .headers()
            .get(mesh_core::classify::GRPC_STATUS)
            .and_then(|v| mesh_core::classify::grpc::parse_status(v).ok())
            .is_some_and(|code| inner.retry.grpc_codes.contains(code));
    }
    inner.retry.statuses.contains(resp.status())
}

/// Sends one try to `slot` and classifies what came back.
async fn try_once(inner: &Inner, slot: &Arc<Slot<RequestBody>>, req: Request<RequestBody>) -> Try {
    let in_flight = slot.load.start();
    let started = Instant::now();
    let sent = slot.client.send(req);
    let result = match inner.per_try_timeout {
        Some(t) => match tokio::time::timeout(t, sent).await {
            Ok(r) => r.map_err(BoxError::from),
            Err(_) => Err(error::TryTimeout(t).into()),
        },
        None => sent.await.map_err(BoxError::from),
    };
    let now = Instant::now();
    let took = now.saturating_duration_since(started);
    match result {
        Ok(resp) => {
            in_flight.complete(now);
            let class = inner
                .classifier
                .classify_response(resp.status(), resp.headers());
            if let Some(m) = &inner.metrics {
                m.response(slot, resp.status(), class, took);
            }
            if class == Some(Class::RateLimited) {
                let penalty = match mesh_core::classify::pushback(
                    resp.headers(),
                    SystemTime::now(),
                    inner.rate_limit.max_penalty,
                ) {
                    Pushback::After(d) => d,
                    Pushback::Unspecified | Pushback::DoNotRetry => {
                        inner.rate_limit.default_penalty
                    }
                };
                slot.load
                    .penalize(now, penalty.min(inner.rate_limit.max_penalty));
            }
            let pending = match (class, &slot.breaker) {
                (Some(c), Some(b)) => {
                    b.record(c);
                    None
                }
                (None, Some(b)) => Some((inner.classifier.clone(), b.clone())),
                (_, None) => None,
            };
            let resp = resp.map(|body| ResponseBody::new(body, pending));
            Try::Answer(resp, class)
        }
        Err(e) => {
            if mesh_core::error::is_caused_by::<error::TryTimeout>(e.as_ref()) {
                // A try that timed out took at least the timeout: that is what the next
                // request would wait, so it feeds the load estimate.
                in_flight.complete(now);
            } else {
                // A fast failure says nothing about latency.
                drop(in_flight);
            }
            if let Some(b) = &slot.breaker {
                b.record(Class::Failure);
            }
            if let Some(m) = &inner.metrics {
                m.error(slot);
            }
            let retryable = is_connect_error(e.as_ref())
                || mesh_core::error::is_caused_by::<error::TryTimeout>(e.as_ref())
                || mesh_core::error::find_cause::<hyper::Error>(e.as_ref()).is_some();
            Try::Failed(e, retryable)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotent_methods() {
        for m in [
            Method::GET,
            Method::HEAD,
            Method::PUT,
            Method::DELETE,
            Method::OPTIONS,
        ] {
            assert!(is_idempotent(&m), "{m}");
        }
        for m in [Method::POST, Method::PATCH, Method::CONNECT] {
            assert!(!is_idempotent(&m), "{m}");
        }
    }
}
