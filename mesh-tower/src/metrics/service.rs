use std::task::{Context, Poll};

use http::{Request, Response};
use tokio::time::Instant;
use tower_service::Service;

use super::{EndpointMetrics, ResponseBody, ResponseFuture};
use crate::load::{Cost, Load};

/// Records one endpoint's answers and errors; made by [`EndpointMetrics`] as a layer.
#[derive(Clone, Debug)]
pub struct Metrics<S> {
    inner: S,
    metrics: Option<EndpointMetrics>,
}

impl<S> Metrics<S> {
    /// Records `inner`'s traffic in `metrics` (none: pass through).
    pub fn new(inner: S, metrics: Option<EndpointMetrics>) -> Self {
        Self { inner, metrics }
    }

    /// The endpoint's series.
    pub fn metrics(&self) -> Option<&EndpointMetrics> {
        self.metrics.as_ref()
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

impl<S: Load> Load for Metrics<S> {
    fn load(&self, now: Instant) -> Cost {
        self.inner.load(now)
    }
}

impl<S, B, RB> Service<Request<B>> for Metrics<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
{
    type Response = Response<ResponseBody<RB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        ResponseFuture::new(self.inner.call(req), self.metrics.clone())
    }
}
