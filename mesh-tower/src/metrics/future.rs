use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::Response;
use pin_project_lite::pin_project;
use tokio::time::Instant;

use super::{EndpointMetrics, ResponseBody};

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
    type Output = Result<Response<ResponseBody<RB>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let Some((metrics, started)) = this.metrics.take() else {
            return Poll::Ready(result.map(|r| r.map(|b| ResponseBody::new(b, None))));
        };
        Poll::Ready(match result {
            Ok(resp) => {
                // `Some`: a gRPC answer whose class waits for its trailers.
                let pending = metrics.response(resp.status(), resp.headers(), started.elapsed());
                Ok(resp.map(|b| ResponseBody::new(b, pending)))
            }
            Err(e) => {
                metrics.error();
                Err(e)
            }
        })
    }
}
