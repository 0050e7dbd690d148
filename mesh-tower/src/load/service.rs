use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tokio::time::Instant;
use tower_service::Service;

use super::layer::Shared;
use super::{Cost, EndpointLoad, Load, ResponseFuture};

/// Measures one endpoint's load; see the [module docs](super). Clones share the load.
#[derive(Clone, Debug)]
pub struct PeakEwma<S> {
    inner: S,
    load: EndpointLoad,
    shared: Arc<Shared>,
}

impl<S> PeakEwma<S> {
    pub(super) fn from_parts(inner: S, load: EndpointLoad, shared: Arc<Shared>) -> Self {
        Self {
            inner,
            load,
            shared,
        }
    }

    /// The shared load handle.
    pub fn handle(&self) -> &EndpointLoad {
        &self.load
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

impl<S> Load for PeakEwma<S> {
    fn load(&self, now: Instant) -> Cost {
        self.load.cost(now)
    }
}

impl<S, B, RB> Service<Request<B>> for PeakEwma<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
{
    type Response = Response<super::ResponseBody<RB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let in_flight = self.load.start();
        ResponseFuture::new(self.inner.call(req), in_flight, self.shared.clone())
    }
}
