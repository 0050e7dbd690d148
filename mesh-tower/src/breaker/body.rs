//! A response body that reports a gRPC status found in trailers to the breaker.

use std::pin::Pin;
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};
use mesh_core::classify::Class;
use pin_project_lite::pin_project;

use super::BreakerHandle;
use super::gate::Permit;

pin_project! {
    /// A response body from a [`Breaker`](super::Breaker). For gRPC responses whose status
    /// comes in the trailers, the status is classified when they arrive (or the stream ends
    /// or fails without them) and reported to the endpoint's breaker. Other bodies pass
    /// through untouched.
    pub struct ResponseBody<B> {
        #[pin]
        inner: B,
        pending: Option<(BreakerHandle, Option<Permit>)>,
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
    pub(super) fn new(inner: B, pending: Option<(BreakerHandle, Option<Permit>)>) -> Self {
        Self { inner, pending }
    }

    /// The inner body.
    pub fn into_inner(self) -> B {
        self.inner
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
        if let Poll::Ready(ready) = &polled {
            let settled = crate::body::grpc_status_settled(ready);
            if let Some(trailers) = settled
                && let Some((handle, permit)) = this.pending.take()
            {
                let class = match ready {
                    Some(Err(_)) => Class::Failure,
                    _ => handle.classifier().classify_trailers(trailers),
                };
                handle.record_outcome(class, permit.as_ref().and_then(Permit::round));
                if let Some(p) = permit {
                    p.consume();
                }
            }
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
