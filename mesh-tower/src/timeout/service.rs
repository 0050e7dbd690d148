use std::task::{Context, Poll};
use std::time::Duration;

use http::Request;
use mesh_core::error::BoxError;
use tokio::time::Instant;
use tower_service::Service;

use super::{Deadline, Kind, ResponseFuture};

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
        let Some(timeout) = self.timeout else {
            return ResponseFuture::new(self.inner.call(req), None);
        };
        let deadline = Instant::now() + timeout;
        if self.kind == Kind::Request {
            let earlier = req.extensions().get::<Deadline>().map(|d| d.0);
            if earlier.is_none_or(|at| at > deadline) {
                req.extensions_mut().insert(Deadline(deadline));
            }
        }
        ResponseFuture::new(self.inner.call(req), Some((deadline, timeout, self.kind)))
    }
}
