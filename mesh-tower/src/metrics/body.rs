//! A response body that counts a gRPC answer whose status comes in the trailers.

use std::pin::Pin;
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};
use mesh_core::classify::Class;
use pin_project_lite::pin_project;

use super::EndpointMetrics;

pin_project! {
    /// A response body from [`Metrics`](super::Metrics). A gRPC answer whose status is not
    /// in its headers is counted when the status can be known: at its trailers (classified
    /// by the endpoint's classifier), or at the end of the stream or an error without them
    /// (a failure); a body dropped before then counts as `cancelled`. Other bodies were
    /// counted at their head and pass through untouched.
    pub struct ResponseBody<B> {
        #[pin]
        inner: B,
        pending: Option<EndpointMetrics>,
    }

    impl<B> PinnedDrop for ResponseBody<B> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(metrics) = this.project().pending.take() {
                metrics.count_grpc(None);
            }
        }
    }
}

impl<B> std::fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody")
            .field("pending", &self.pending.is_some())
            .finish_non_exhaustive()
    }
}

impl<B> ResponseBody<B> {
    pub(super) fn new(inner: B, pending: Option<EndpointMetrics>) -> Self {
        Self { inner, pending }
    }
}

impl<B: Body> Body for ResponseBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        // Counted once the status can be known: at the trailers frame, or at the end of
        // the stream (or an error) without them.
        if let Poll::Ready(ready) = &polled
            && let Some(trailers) = crate::body::grpc_status_settled(ready)
            && let Some(metrics) = this.pending.take()
        {
            let class = match ready {
                Some(Err(_)) => Class::Failure,
                _ => metrics.classify_trailers(trailers),
            };
            metrics.count_grpc(Some(class));
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
