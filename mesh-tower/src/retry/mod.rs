//! Retries with a budget and body replay, as a layer over any
//! `Service<http::Request<ReplayBody>>` — the piece tower's own `Retry` cannot give HTTP
//! services whose requests are not `Clone` (hyper's, tonic's).
//!
//! [`RetryLayer`] makes a [`Retry`]: it takes `http::Request<B>` for any body `B` of
//! `Bytes` and sends each try to the service below as `http::Request<ReplayBody>`.
//!
//! 1. **Body.** A body whose size is known to be within `max_replay_body` (64 KiB) — a
//!    complete body, or one with a `Content-Length` — is collected and replayed byte for
//!    byte on each retry. A stream of unknown size is sent as it comes and teed: a retry
//!    replays what was sent, then reads on, as long as everything sent fits in the cap;
//!    past it, the request is committed to its try. Bodies known to be larger are sent
//!    once and not retried (see [`body`]).
//! 2. **Each try** waits for the inner service's readiness within the response future, so
//!    a timeout above bounds it; [`Retry`] itself is always ready.
//! 3. **Retryable?** Connection failures, and HTTP/2 streams the server refused
//!    (`REFUSED_STREAM`: not processed, RFC 9113 8.7), for any method and any gRPC policy
//!    (the request never reached the application); for
//!    idempotent methods (or all when `non_idempotent` is set): answers whose status is in
//!    `statuses` (default 5xx) or whose gRPC code is in `grpc_codes` (default
//!    `UNAVAILABLE`), per-try timeouts and broken connections. At most `max_retries`
//!    (default 2) retries, each taken from the [`budget`] (default 20 % of requests plus
//!    10/s over 10 s), shared by every request of the layer.
//! 4. **Back-off** 25–250 ms with jitter ([`crate::backoff`]), or the server's
//!    `Retry-After` / `grpc-retry-pushback-ms` if longer; a negative gRPC pushback forbids
//!    retrying, and so does a wait longer than [`MAX_PUSHBACK`] (10 s): the caller gets
//!    the server's answer at once. A retry whose back-off would end past the request's
//!    [`Deadline`](crate::timeout::Deadline) is not made.
//! 5. **Rate limited elsewhere** (`retry_rate_limited_elsewhere`, default on): a request
//!    answered 429 / `RESOURCE_EXHAUSTED` is retried once, at once, when that is safe: an
//!    HTTP request whose method may be retried, a gRPC call whose `grpc_codes` name
//!    `RESOURCE_EXHAUSTED`, or any request a mesh proxy's rate limit refused (its answer
//!    marked `x-mesh-error`, which no application can set: no application saw it). It is
//!    marked [`Elsewhere`], which a balancer honours by sending it only to an endpoint
//!    that is not rate limiting ([`crate::balance`] does). When there is none the balancer
//!    says [`NoElsewhere`](error::NoElsewhere) and the caller gets the 429 it answered to,
//!    as it does when the try elsewhere reaches no application (no connection, a
//!    refused stream); a try elsewhere that may have run ends as its own failure.
//!    Other rate-limited answers are retried only when their status is in `statuses`, and
//!    never sooner than their pushback.
//!
//! 6. **gRPC** (`content-type: application/grpc…`), after gRFC A6: the policy's
//!    `grpc_codes` alone say what is retried, whatever the method (every call is a POST)
//!    and whatever class the classification gives the code (an answer that is not
//!    gRPC's counts by the code its HTTP status maps to: a 503 is `UNAVAILABLE`, a 500
//!    `UNKNOWN`);
//!    a try that broke without an answer or timed out counts as `UNAVAILABLE`, as a gRPC
//!    client's own status does in A6 (the server may have run such a call: a policy for
//!    methods that must not run twice names no code, and then only the refused streams
//!    and failed connections above are retried); at most 5 attempts
//!    whatever `max_retries` says; each retry carries `grpc-previous-rpc-attempts`; a
//!    server's `grpc-retry-pushback-ms` is the delay (negative: no retry); a response
//!    head without `grpc-status` commits the call (its trailers are the caller's). The
//!    caller's deadline — a [`Deadline`](crate::timeout::Deadline), the request timeout's,
//!    or the request's own `grpc-timeout` — goes to each try as a `grpc-timeout` of the
//!    time left, and no try starts past it
//!    ([`DeadlineExceeded`](crate::timeout::DeadlineExceeded), nothing sent).
//!
//! Every retry carries [`Retried`], so that a balancer below sends it to another endpoint
//! than the try before when it can.
//!
//! When no retry is made, the last answer (or error) is returned as it is; an error that
//! the budget kept from being retried comes wrapped in
//! [`BudgetExhausted`](error::BudgetExhausted).
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::{BodyExt, Full};
//! use mesh_tower::retry::{ReplayBody, RetryLayer};
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let calls = Arc::new(AtomicUsize::new(0));
//! let seen = calls.clone();
//! // Fails the first try, then echoes the body.
//! let mut client = ServiceBuilder::new()
//!     .layer(RetryLayer::default())
//!     .service_fn(move |req: Request<ReplayBody>| {
//!         let first = seen.fetch_add(1, Ordering::Relaxed) == 0;
//!         async move {
//!             let body = req.into_body().collect().await?.to_bytes();
//!             let status = if first { 503 } else { 200 };
//!             Ok::<_, mesh_core::error::BoxError>(Response::builder().status(status).body(body)?)
//!         }
//!     });
//! let req = Request::put("http://users/42").body(Full::new(Bytes::from("{\"name\":\"ada\"}")))?;
//! let resp = ServiceExt::<Request<Full<Bytes>>>::ready(&mut client).await?.call(req).await?;
//! assert_eq!(resp.status(), 200);
//! assert_eq!(resp.into_body(), "{\"name\":\"ada\"}");
//! assert_eq!(calls.load(Ordering::Relaxed), 2);
//! # Ok(()) }
//! ```

pub mod body;
pub mod budget;
#[cfg(test)]
mod carry_tests;
#[cfg(test)]
mod decision_tests;
pub mod error;
mod future;
#[cfg(test)]
mod grpc_tests;
mod layer;
mod policy;
mod service;

/// The longest wait a server's `Retry-After` or `grpc-retry-pushback-ms` gets a retry
/// after: 10 s. A server that asks for longer gets its answer passed to the caller, not a
/// retry held that long (a header's value is the server's to choose, and holding every
/// request it answers for an hour, or 10^20 seconds, is not a proxy's call to make).
pub const MAX_PUSHBACK: std::time::Duration = std::time::Duration::from_secs(10);

pub use self::body::ReplayBody;
pub use self::budget::RetryBudget;
pub use self::future::ResponseFuture;
pub use self::layer::RetryLayer;
pub use self::policy::RetryPolicy;
pub use self::service::Retry;

/// A request extension on every retry (not on first tries): a balancer sends it to
/// another endpoint than the last try's when one is ready, as
/// [`crate::balance::Balance`] does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retried;

/// A request extension: send this request only to an endpoint that is not rate limiting,
/// or fail it with [`NoElsewhere`](error::NoElsewhere). Set by [`Retry`] on the retry of
/// a rate-limited answer; honoured by [`crate::balance::Balance`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Elsewhere;

/// A request extension that replaces, for this request, the policy and budget of the
/// [`Retry`] it passes through: how a route's retry settings apply on top of a backend
/// service's (see [`crate::route`]). What counts as a failure stays the service's: the
/// service's [`Classifier`](mesh_core::classify::Classifier) still classifies answers.
/// Cheap to clone; clones share the budget.
///
/// ```
/// use mesh_tower::retry::{RetryBudget, RetryOverride, RetryPolicy};
///
/// let route = RetryOverride::new(RetryPolicy { max_retries: 5, ..RetryPolicy::default() }, RetryBudget::default());
/// let mut req = http::Request::new(());
/// req.extensions_mut().insert(route.clone());
/// assert_eq!(req.extensions().get::<RetryOverride>().map(|r| r.policy().max_retries), Some(5));
/// ```
#[derive(Clone, Debug)]
pub struct RetryOverride(std::sync::Arc<(RetryPolicy, RetryBudget)>);

impl RetryOverride {
    /// Retries by `policy` within `budget` instead of the service's.
    pub fn new(policy: RetryPolicy, budget: RetryBudget) -> Self {
        Self(std::sync::Arc::new((policy, budget)))
    }

    /// The policy.
    pub fn policy(&self) -> &RetryPolicy {
        &self.0.0
    }

    /// The budget.
    pub fn budget(&self) -> &RetryBudget {
        &self.0.1
    }
}
