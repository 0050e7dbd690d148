//! `MeshClient`: a balanced, resilient, rate-limit-aware HTTP client for one service,
//! composed from this crate's layers over hyper connections.
//!
//! A request walks the stack top to bottom, each layer once:
//!
//! ```text
//! MeshClient
//!   timeout::Timeout (request)     the whole request, retries and response body included; sets its Deadline
//!   retry::Retry                   classes, idempotency, budget, body replay, back-off,
//!                                  429 retried elsewhere
//!   balance::Balance               P2C over Load, tiers, zone preference, readiness,
//!                                  fail-fast after 3 s; fed by discovery
//!     per endpoint (EndpointStack):
//!     breaker::Breaker             ejection gate as readiness; outcomes off the path
//!     metrics::Metrics             answers, errors, try durations, load gauge
//!     load::PeakEwma               RTT and in-flight, 429 penalty
//!     timeout::Timeout (per try)   a timed-out try is this endpoint's failure
//!     connect::EndpointClient      HTTP/1.1 pool or one HTTP/2 connection on hyper 1,
//!                                  plaintext or mTLS
//! ```
//!
//! The per-try timeout sits in each endpoint's stack rather than above the balancer, so
//! that the breaker counts a timed-out try as a failure and the load estimate rises by
//! it; the request's retries still see it as a [`TryTimeout`](error::TryTimeout).
//!
//! Every layer is usable alone: `examples/compose` puts [`RetryLayer`](crate::retry::RetryLayer),
//! [`BreakerLayer`](crate::breaker::BreakerLayer) and [`Balance`]
//! in front of a plain hyper client. The pieces in this order are what
//! [`MeshClientBuilder::build`] puts together.

mod builder;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use mesh_core::error::BoxError;
use pin_project_lite::pin_project;
use tower_service::Service;
use tracing::Instrument;

use crate::balance::{Balance, Slot};
use crate::breaker::Breaker;
use crate::connect::EndpointClient;
use crate::load::PeakEwma;
use crate::metrics::Metrics;
use crate::retry::{ReplayBody, Retry};
use crate::timeout::Timeout;

pub use self::builder::{BuildError, MeshClientBuilder};

/// The errors a [`MeshClient`] caller may find in an error (or its chain), re-exported
/// from the layers that raise them.
pub mod error {
    pub use crate::balance::error::{NoEndpoints, NoReadyEndpoints};
    pub use crate::connect::{ConnectError, SendError};
    pub use crate::retry::error::BudgetExhausted;
    pub use crate::timeout::{RequestTimeout, TryTimeout};
}

/// One endpoint's stack in a [`MeshClient`].
pub type EndpointStack =
    Breaker<Metrics<PeakEwma<Timeout<EndpointClient<ReplayBody>, crate::timeout::EachTry>>>>;

/// The body of a [`MeshClient`] response: bounded by the request timeout, if any, to its
/// end.
pub type ResponseBody = crate::timeout::ResponseBody<
    crate::breaker::ResponseBody<
        crate::metrics::ResponseBody<crate::load::ResponseBody<crate::connect::Body<ReplayBody>>>,
    >,
>;

type Stack = Timeout<Retry<Balance<EndpointStack>>>;

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
    stack: Stack,
    service: Arc<str>,
    metrics: Option<crate::metrics::ClientMetrics>,
}

impl fmt::Debug for MeshClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshClient")
            .field("service", &self.service)
            .field("balance", self.balance())
            .finish_non_exhaustive()
    }
}

impl MeshClient {
    /// Starts building a client fed by `discovery`.
    pub fn builder(discovery: mesh_core::discover::BoxDiscover) -> MeshClientBuilder {
        MeshClientBuilder::new(discovery)
    }

    fn balance(&self) -> &Balance<EndpointStack> {
        self.stack.get_ref().get_ref()
    }

    /// The current endpoints and their stacks, for inspection (dashboards, tests): each
    /// stack reports its [`Load`](crate::load::Load), and its breaker's
    /// [`handle`](Breaker::handle).
    pub fn endpoints(&self) -> Vec<Arc<Slot<EndpointStack>>> {
        self.balance().endpoints()
    }

    /// Waits until discovery has given at least one endpoint: `true` then, `false` if
    /// discovery ended without any. Not bounded: wrap it in a timeout.
    pub async fn discovered(&self) -> bool {
        self.balance().discovered().await
    }

    /// The client's metrics, when registered with [`MeshClientBuilder::metrics`].
    pub fn metrics(&self) -> Option<&crate::metrics::ClientMetrics> {
        self.metrics.as_ref()
    }

    /// Sends one request through the whole stack.
    pub fn send<B>(&self, req: Request<B>) -> ResponseFuture<B>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let span = tracing::debug_span!(
            "mesh_client",
            service = %self.service,
            http.request.method = %req.method(),
            url.path = req.uri().path(),
        );
        // `Timeout` and `Retry` are always ready: readiness is awaited per try, inside
        // the response future. Called by reference, so that only the retry future's own
        // clone of the balancer is made, and handed the deadline directly rather than in
        // a request extension.
        let fut = self.stack.call_with(req, |req, deadline| {
            self.stack.get_ref().call_ref(req, deadline)
        });
        ResponseFuture {
            inner: fut.instrument(span),
        }
    }
}

type StackFuture<B> = <Stack as Service<Request<B>>>::Future;

pin_project! {
    /// The response future of a [`MeshClient`].
    pub struct ResponseFuture<B>
    where
        B: http_body::Body<Data = Bytes>,
        B: Send,
        B: 'static,
        B::Error: Into<BoxError>,
    {
        #[pin]
        inner: tracing::instrument::Instrumented<StackFuture<B>>,
    }
}

impl<B> fmt::Debug for ResponseFuture<B>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<B> Future for ResponseFuture<B>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<ResponseBody>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.poll(cx)
    }
}

impl<B> Service<Request<B>> for MeshClient
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody>;
    type Error = BoxError;
    type Future = ResponseFuture<B>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Endpoint readiness is awaited per try, when an endpoint is picked.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        self.send(req)
    }
}
