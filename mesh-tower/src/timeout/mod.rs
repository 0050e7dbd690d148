//! Request and per-try timeouts as layers, with typed errors.
//!
//! [`TimeoutLayer::request`] bounds a whole request — retries and back-offs included when
//! it sits above [`crate::retry`], and the response body to its end — and fails it with
//! [`RequestTimeout`] (the body, past its head, with a [`RequestTimeout`] error). It also puts the
//! request's [`Deadline`] in its extensions, so that the retry layer below never starts a
//! back-off that would end past it. [`TimeoutLayer::per_try`] bounds one try, up to its
//! response head (where the try is committed), and fails it with [`TryTimeout`]; in [`MeshClient`](crate::MeshClient) it sits in each endpoint's
//! stack, below the breaker and the load measurement, so a timed-out try counts as that
//! endpoint's failure and raises its latency estimate.
//!
//! **Deadlines.** A request timeout ends at the earliest of its own timeout, a
//! [`Deadline`] the request already carries, and for a gRPC request, the deadline its
//! `grpc-timeout` header gives (the caller's, propagated). The retry layer carries the
//! deadline to every try, never starts one past it (failing with
//! [`DeadlineExceeded`] before sending when it has passed), and re-encodes a gRPC try's
//! `grpc-timeout` as the time left; a per-try timeout lowers it further when shorter.
//!
//! On the serving side, [`GrpcDeadlineLayer`] turns a caller's `grpc-timeout` into the
//! request's [`Deadline`] and answers `DEADLINE_EXCEEDED` when it passes first.
//!
//! tower's own `Timeout` has the same timing but one error type for both uses and no
//! deadline for the layers below, hence this module. A layer built with `None` passes
//! everything through, so a stack keeps one type whether or not a timeout is set.
//!
//! ```
//! use std::time::Duration;
//! use http::{Request, Response};
//! use mesh_tower::timeout::{TimeoutLayer, TryTimeout};
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let mut slow = ServiceBuilder::new()
//!     .layer(TimeoutLayer::per_try(Some(Duration::from_millis(100))))
//!     .service_fn(|_req: Request<()>| async {
//!         tokio::time::sleep(Duration::from_secs(1)).await;
//!         Ok::<_, std::convert::Infallible>(Response::new(()))
//!     });
//! let err = slow.ready().await?.call(Request::new(())).await.unwrap_err();
//! assert!(err.is::<TryTimeout>());
//! assert_eq!(err.to_string(), "try timed out after 100ms");
//! # Ok(()) }
//! ```

pub mod error;
mod future;
mod inbound;
mod layer;
mod service;

pub use self::error::{DeadlineExceeded, RequestTimeout, TryTimeout};
pub use self::future::{ResponseBody, ResponseFuture};

pub use self::inbound::{GrpcDeadline, GrpcDeadlineLayer, InboundFuture};
pub use self::layer::TimeoutLayer;
pub use self::service::Timeout;

/// When a request must be done by, as a request extension set by
/// [`TimeoutLayer::request`] (or by the application, or an inbound layer from the
/// caller's `grpc-timeout`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadline(pub tokio::time::Instant);

/// The `grpc-timeout` header name, parsed once: a lookup by `&str` parses it each time.
pub(crate) const GRPC_TIMEOUT: http::HeaderName =
    http::HeaderName::from_static(mesh_core::classify::GRPC_TIMEOUT);

/// The deadline a request carries: its [`Deadline`] extension, or the one its
/// `grpc-timeout` header gives from now, whichever is earlier.
pub fn carried_deadline<B>(req: &http::Request<B>) -> Option<tokio::time::Instant> {
    let ext = req.extensions().get::<Deadline>().map(|d| d.0);
    let grpc = req
        .headers()
        .get(&GRPC_TIMEOUT)
        .and_then(|v| mesh_core::classify::grpc::parse_timeout(v).ok())
        .and_then(|t| tokio::time::Instant::now().checked_add(t));
    match (ext, grpc) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// A request extension that replaces, for this request, the timeouts of the
/// [`Timeout`]s it passes through: `request` that of a [`TimeoutLayer::request`],
/// `per_try` that of a [`TimeoutLayer::per_try`] (on every try: the retry layer carries
/// it to each). `None` keeps the layer's own. How a route's timeouts apply on top of a
/// backend service's (see [`crate::route`]).
///
/// ```
/// use std::time::Duration;
/// use http::{Request, Response};
/// use mesh_tower::timeout::{RequestTimeout, TimeoutLayer, TimeoutOverride};
/// use tower::{Service, ServiceBuilder, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// let mut svc = ServiceBuilder::new()
///     .layer(TimeoutLayer::request(Some(Duration::from_secs(10))))
///     .service_fn(|_req: Request<()>| async {
///         tokio::time::sleep(Duration::from_secs(1)).await;
///         Ok::<_, std::convert::Infallible>(Response::new(()))
///     });
/// let mut req = Request::new(());
/// req.extensions_mut().insert(TimeoutOverride { request: Some(Duration::from_millis(200)), per_try: None });
/// let err = svc.ready().await?.call(req).await.unwrap_err();
/// assert!(err.is::<RequestTimeout>());
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimeoutOverride {
    /// The whole request's timeout, in place of the layer's.
    pub request: Option<std::time::Duration>,
    /// Each try's timeout, in place of the layer's.
    pub per_try: Option<std::time::Duration>,
}

impl TimeoutOverride {
    /// The timeout a layer of `kind` applies: this override's, or else `own`.
    pub(crate) fn apply(
        over: Option<&Self>,
        kind: Kind,
        own: Option<std::time::Duration>,
    ) -> Option<std::time::Duration> {
        let over = over.and_then(|o| match kind {
            Kind::Request => o.request,
            Kind::Try => o.per_try,
        });
        over.or(own)
    }
}

/// A [`Timeout`] of the whole request ([`TimeoutLayer::request`]): it bounds the
/// response body too ([`ResponseBody`]).
#[derive(Clone, Copy, Debug)]
pub enum WholeRequest {}

/// A [`Timeout`] of each try ([`TimeoutLayer::per_try`]): it bounds a try up to its
/// response head, and passes the answer on as it is.
#[derive(Clone, Copy, Debug)]
pub enum EachTry {}

/// Which timeout a layer applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Request,
    Try,
}
