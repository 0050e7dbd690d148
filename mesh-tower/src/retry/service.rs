use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use mesh_core::error::BoxError;
use tower_service::Service;

use super::layer::Shared;
use super::{ReplayBody, ResponseFuture};

/// Retries failed tries; see the [module docs](super). Clones share the policy and the
/// budget.
#[derive(Clone, Debug)]
pub struct Retry<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> Retry<S> {
    pub(super) fn from_parts(inner: S, shared: Arc<Shared>) -> Self {
        Self { inner, shared }
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

    /// [`call`](Service::call) by shared reference (the future holds its own clone of
    /// the inner service either way), with a deadline from the caller as well as any
    /// [`Deadline`](crate::timeout::Deadline) the request carries.
    pub(crate) fn call_ref<B, RB>(
        &self,
        req: Request<B>,
        deadline: Option<tokio::time::Instant>,
    ) -> ResponseFuture<S, S::Future, RB>
    where
        S: Service<Request<ReplayBody>, Response = Response<RB>> + Clone,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        ResponseFuture::new(self.inner.clone(), self.shared.clone(), req, deadline)
    }
}

impl<S, B, RB> Service<Request<B>> for Retry<S>
where
    S: Service<Request<ReplayBody>, Response = Response<RB>> + Clone,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<RB>;
    type Error = BoxError;
    type Future = ResponseFuture<S, S::Future, RB>;

    /// Always ready: each try waits for the inner service's readiness inside the response
    /// future, so a timeout above bounds that wait too.
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        self.call_ref(req, None)
    }
}
