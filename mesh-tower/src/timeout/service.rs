use std::task::{Context, Poll};
use std::time::Duration;

use http::Request;
use mesh_core::error::BoxError;
use tokio::time::Instant;
use tower_service::Service;

use super::{Deadline, Kind, ResponseFuture, TimeoutOverride};

/// A request or per-try timeout; see the [module docs](super).
#[derive(Clone, Debug)]
pub struct Timeout<S> {
    inner: S,
    timeout: Option<Duration>,
    kind: Kind,
}

impl<S> Timeout<S> {
    pub(super) fn new(inner: S, timeout: Option<Duration>, kind: Kind) -> Self {
        Self {
            inner,
            timeout,
            kind,
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

impl<S, B> Service<Request<B>> for Timeout<S>
where
    S: Service<Request<B>>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let timer = start(self.timeout, self.kind, &mut req);
        ResponseFuture::new(self.inner.call(req), timer)
    }
}

#[cfg(all(feature = "balance", feature = "breaker"))]
impl<S> Timeout<S> {
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
        let Some(timeout) = TimeoutOverride::apply(over, self.kind, self.timeout) else {
            return ResponseFuture::new(call(req, None), None);
        };
        let deadline = Instant::now() + timeout;
        let earlier = req.extensions().get::<Deadline>().map(|d| d.0);
        let until = earlier.map_or(deadline, |at| at.min(deadline));
        ResponseFuture::new(call(req, Some(until)), Some((deadline, timeout, self.kind)))
    }
}

/// The timer of one request, and (for a request timeout) its [`Deadline`], unless an
/// earlier one is set.
fn start<B>(
    timeout: Option<Duration>,
    kind: Kind,
    req: &mut Request<B>,
) -> Option<(Instant, Duration, Kind)> {
    let timeout = TimeoutOverride::apply(req.extensions().get(), kind, timeout)?;
    let deadline = Instant::now() + timeout;
    if kind == Kind::Request {
        let earlier = req.extensions().get::<Deadline>().map(|d| d.0);
        if earlier.is_none_or(|at| at > deadline) {
            req.extensions_mut().insert(Deadline(deadline));
        }
    }
    Some((deadline, timeout, kind))
}
