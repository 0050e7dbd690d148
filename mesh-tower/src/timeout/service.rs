use std::fmt;
use std::marker::PhantomData;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Request;
use mesh_core::error::BoxError;
use tokio::time::Instant;
use tower_service::Service;

use super::{Deadline, EachTry, Kind, ResponseBody, ResponseFuture, TimeoutOverride, WholeRequest};

/// A request timeout (`K` = [`WholeRequest`], the default) or a per-try one
/// ([`EachTry`]); see the [module docs](super).
pub struct Timeout<S, K = WholeRequest> {
    inner: S,
    timeout: Option<Duration>,
    kind: Kind,
    marker: PhantomData<fn() -> K>,
}

impl<S: Clone, K> Clone for Timeout<S, K> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            timeout: self.timeout,
            kind: self.kind,
            marker: PhantomData,
        }
    }
}

impl<S: fmt::Debug, K> fmt::Debug for Timeout<S, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Timeout")
            .field("inner", &self.inner)
            .field("timeout", &self.timeout)
            .field("kind", &self.kind)
            .finish()
    }
}

impl<S, K> Timeout<S, K> {
    pub(super) fn new(inner: S, timeout: Option<Duration>, kind: Kind) -> Self {
        Self {
            inner,
            timeout,
            kind,
            marker: PhantomData,
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B, RB> Service<Request<B>> for Timeout<S, WholeRequest>
where
    S: Service<Request<B>, Response = http::Response<RB>>,
    S::Error: Into<BoxError>,
{
    type Response = http::Response<ResponseBody<RB>>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, WholeRequest>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let timer = start(self.timeout, self.kind, &mut req);
        ResponseFuture::new(self.inner.call(req), timer)
    }
}

impl<S, B> Service<Request<B>> for Timeout<S, EachTry>
where
    S: Service<Request<B>>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, EachTry>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let timer = start(self.timeout, self.kind, &mut req);
        ResponseFuture::new(self.inner.call(req), timer)
    }
}

#[cfg(all(feature = "balance", feature = "breaker"))]
impl<S> Timeout<S, WholeRequest> {
    /// Times the future `call` makes of `req`, for a caller that reaches the inner
    /// service by shared reference and hands it the deadline itself: `call` gets the
    /// request and its deadline (this timeout's, or an earlier [`Deadline`] the request
    /// carries), and no extension is inserted — which would cost two allocations.
    pub(crate) fn call_with<B, F>(
        &self,
        req: Request<B>,
        call: impl FnOnce(Request<B>, Option<Instant>) -> F,
    ) -> ResponseFuture<F> {
        let over = req.extensions().get::<TimeoutOverride>();
        let own = TimeoutOverride::apply(over, self.kind, self.timeout);
        let carried = if self.kind == Kind::Request {
            super::carried_deadline(&req)
        } else {
            None
        };
        let Some((until, timeout)) = earliest(own, carried) else {
            return ResponseFuture::new(call(req, None), None);
        };
        ResponseFuture::new(call(req, Some(until)), Some((until, timeout, self.kind)))
    }
}

/// The timer of one request, and (for a request timeout) its [`Deadline`], unless an
/// earlier one is set. A request timeout ends at the earliest of its own timeout and
/// the deadline the request carries.
fn start<B>(
    timeout: Option<Duration>,
    kind: Kind,
    req: &mut Request<B>,
) -> Option<(Instant, Duration, Kind)> {
    let own = TimeoutOverride::apply(req.extensions().get(), kind, timeout);
    if kind == Kind::Try {
        let timeout = own?;
        if mesh_core::classify::is_grpc(req.headers()) {
            lower_grpc_timeout(req, timeout);
        }
        // A bound past the clock's range (`Duration::MAX`, say) is none.
        return Instant::now()
            .checked_add(timeout)
            .map(|at| (at, timeout, kind));
    }
    let carried = super::carried_deadline(req);
    let (until, timeout) = earliest(own, carried)?;
    if carried.is_none_or(|at| at > until) {
        req.extensions_mut().insert(Deadline(until));
    }
    Some((until, timeout, kind))
}

/// The earlier of `now + own` and `carried`, with how long from now that is.
fn earliest(own: Option<Duration>, carried: Option<Instant>) -> Option<(Instant, Duration)> {
    // No timeout and no deadline (the default): no clock read, about 30 ns a request.
    if own.is_none() && carried.is_none() {
        return None;
    }
    let now = Instant::now();
    let own = own.and_then(|t| now.checked_add(t));
    let until = match (own, carried) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => a.or(b)?,
    };
    Some((until, until.saturating_duration_since(now)))
}

/// Lowers a gRPC try's `grpc-timeout` to `timeout` when that is shorter (or when it has
/// none): the server learns the try's own bound.
fn lower_grpc_timeout<B>(req: &mut Request<B>, timeout: Duration) {
    let name = super::GRPC_TIMEOUT;
    let current = req
        .headers()
        .get(&name)
        .and_then(|v| mesh_core::classify::grpc::parse_timeout(v).ok());
    if current.is_none_or(|c| c > timeout) {
        req.headers_mut()
            .insert(name, mesh_core::classify::grpc::encode_timeout(timeout));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Duration;

    use http::{Request, Response};
    use tower::{ServiceBuilder, ServiceExt};

    use super::super::TimeoutLayer;

    type Stalled = http_body_util::StreamBody<
        futures_util::stream::Pending<Result<http_body::Frame<bytes::Bytes>, std::io::Error>>,
    >;

    /// An answer whose head comes at once and whose body then stalls.
    async fn stalled(_req: Request<()>) -> Result<Response<Stalled>, std::convert::Infallible> {
        Ok(Response::new(http_body_util::StreamBody::new(
            futures_util::stream::pending(),
        )))
    }

    /// A request timeout bounds the body to its end: a body that stalls past the deadline
    /// fails with `RequestTimeout`. A per-try timeout ends with the head.
    #[tokio::test(start_paused = true)]
    async fn a_request_timeout_bounds_the_body_and_a_try_timeout_the_head() {
        use http_body_util::BodyExt;
        let svc = ServiceBuilder::new()
            .layer(TimeoutLayer::request(Some(Duration::from_secs(2))))
            .service_fn(stalled);
        let started = tokio::time::Instant::now();
        let mut body = svc.oneshot(Request::new(())).await.unwrap().into_body();
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(err.is::<super::super::RequestTimeout>(), "{err}");
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        let svc = ServiceBuilder::new()
            .layer(TimeoutLayer::per_try(Some(Duration::from_secs(2))))
            .service_fn(stalled);
        let mut body = svc.oneshot(Request::new(())).await.unwrap().into_body();
        let read = tokio::time::timeout(Duration::from_secs(60), body.frame()).await;
        assert!(read.is_err(), "a try's timeout does not bound its body");
    }

    /// A body that always has a frame ready is cut at the deadline too.
    #[tokio::test(start_paused = true)]
    async fn a_request_timeout_cuts_a_body_that_never_waits() {
        use http_body_util::BodyExt;
        let svc = ServiceBuilder::new()
            .layer(TimeoutLayer::request(Some(Duration::from_secs(2))))
            .service_fn(|_req: Request<()>| async {
                let frames = futures_util::stream::repeat_with(|| {
                    Ok::<_, std::io::Error>(http_body::Frame::data(bytes::Bytes::from_static(b"x")))
                });
                Ok::<_, std::convert::Infallible>(Response::new(http_body_util::StreamBody::new(
                    frames,
                )))
            });
        let mut body = svc.oneshot(Request::new(())).await.unwrap().into_body();
        let mut frames = 0;
        let err = loop {
            match body.frame().await.unwrap() {
                Ok(_) => frames += 1,
                Err(e) => break e,
            }
            tokio::time::advance(Duration::from_millis(100)).await;
        };
        assert!(err.is::<super::super::RequestTimeout>(), "{err}");
        assert_eq!(frames, 20);
    }

    /// A per-try bound past the clock's range (`Duration::MAX`, from a route's override,
    /// say) bounds nothing, and panics nowhere.
    #[tokio::test(start_paused = true)]
    async fn a_bound_past_the_clocks_range_is_none() {
        let per_try = ServiceBuilder::new()
            .layer(TimeoutLayer::per_try(Some(Duration::MAX)))
            .service_fn(slow);
        per_try.oneshot(Request::new(())).await.unwrap();
        let request = ServiceBuilder::new()
            .layer(TimeoutLayer::request(Some(Duration::MAX)))
            .service_fn(slow);
        request.oneshot(Request::new(())).await.unwrap();
    }

    async fn slow(_req: Request<()>) -> Result<Response<()>, std::convert::Infallible> {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Ok(Response::new(()))
    }
}
