use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::Response;
use pin_project_lite::pin_project;
use tokio::time::Instant;

use super::EndpointMetrics;

pin_project! {
    /// The response future of [`Metrics`](super::Metrics).
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        metrics: Option<(EndpointMetrics, Instant)>,
    }
}

impl<F> ResponseFuture<F> {
    pub(super) fn new(inner: F, metrics: Option<EndpointMetrics>) -> Self {
        Self {
            inner,
            metrics: metrics.map(|m| (m, Instant::now())),
        }
    }
}

impl<F, RB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        if let Some((metrics, started)) = this.metrics.take() {
            match &result {
                Ok(resp) => metrics.response(resp.status(), resp.headers(), started.elapsed()),
                Err(_) => metrics.error(),
            }
        }
        Poll::Ready(result)
    }
}
