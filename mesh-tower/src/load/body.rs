//! A response body that penalizes its endpoint for a `RESOURCE_EXHAUSTED` found in
//! trailers.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use http_body::{Body, Frame, SizeHint};
use mesh_core::classify::{Backoff as Pushback, Class};
use pin_project_lite::pin_project;
use tokio::time::Instant;

use super::EndpointLoad;
use super::layer::Shared;

pin_project! {
    /// A response body from a [`PeakEwma`](super::PeakEwma). A gRPC answer whose status
    /// comes in its trailers (a call that fails after its head, a streaming call that
    /// runs into a server's limit) penalizes the endpoint when they say
    /// `RESOURCE_EXHAUSTED`, for their `grpc-retry-pushback-ms` (see the [module
    /// docs](super)), as an answer that says so in its head does. Other bodies pass
    /// through untouched.
    pub struct ResponseBody<B> {
        #[pin]
        inner: B,
        pending: Option<(EndpointLoad, Arc<Shared>)>,
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
    pub(super) fn new(inner: B, pending: Option<(EndpointLoad, Arc<Shared>)>) -> Self {
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
        if this.pending.is_some()
            && let Poll::Ready(ready) = &polled
            && let Some(trailers) = crate::body::grpc_status_settled(ready)
            && let Some((load, shared)) = this.pending.take()
            && let Some(trailers) = trailers
            && shared.classifier.classify_trailers(Some(trailers)) == Class::RateLimited
        {
            let max = shared.penalty.max;
            let period = match mesh_core::classify::pushback(trailers, SystemTime::now(), max) {
                Pushback::After(d) => d,
                Pushback::Unspecified | Pushback::DoNotRetry => shared.penalty.default,
            };
            load.penalize(Instant::now(), period.min(max));
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::convert::Infallible;
    use std::time::Duration;

    use bytes::Bytes;
    use http::{HeaderMap, Request, Response};
    use http_body::Frame;
    use http_body_util::{BodyExt, StreamBody};
    use tower::{Layer, Service, ServiceExt};

    use crate::load::{Load, PeakEwmaLayer};

    type Frames = StreamBody<
        futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>,
    >;

    /// A gRPC answer: a head without a status, a message, then `trailers`.
    fn grpc(trailers: &[(&'static str, &'static str)]) -> Response<Frames> {
        let mut map = HeaderMap::new();
        for (name, value) in trailers {
            map.insert(*name, value.parse().unwrap());
        }
        let frames = vec![
            Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\0"))),
            Ok(Frame::trailers(map)),
        ];
        Response::builder()
            .header("content-type", "application/grpc")
            .body(StreamBody::new(futures_util::stream::iter(frames)))
            .unwrap()
    }

    /// RESOURCE_EXHAUSTED in the trailers penalizes the endpoint for the pushback they
    /// name, once the body is read; another status does not.
    #[tokio::test(start_paused = true)]
    async fn resource_exhausted_in_trailers_penalizes_for_its_pushback() {
        for (trailers, penalized) in [
            (
                &[("grpc-status", "8"), ("grpc-retry-pushback-ms", "2000")][..],
                true,
            ),
            (&[("grpc-status", "0")][..], false),
            (&[("grpc-status", "14")][..], false),
        ] {
            let mut endpoint =
                PeakEwmaLayer::new().layer(tower::service_fn(|_req: Request<()>| async {
                    Ok::<_, Infallible>(grpc(trailers))
                }));
            let resp = endpoint
                .ready()
                .await
                .unwrap()
                .call(Request::new(()))
                .await
                .unwrap();
            // Not yet: the status is still to come.
            assert!(!endpoint.load(tokio::time::Instant::now()).penalized);
            resp.into_body().collect().await.unwrap();
            let cost = endpoint.load(tokio::time::Instant::now());
            assert_eq!(cost.penalized, penalized, "{trailers:?}");
            if penalized {
                // For the pushback named: 2 s, not the default 1 s.
                tokio::time::advance(Duration::from_millis(1500)).await;
                assert!(endpoint.load(tokio::time::Instant::now()).penalized);
                tokio::time::advance(Duration::from_millis(600)).await;
                assert!(!endpoint.load(tokio::time::Instant::now()).penalized);
            }
        }
    }
}
