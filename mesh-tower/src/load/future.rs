use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::SystemTime;

use http::Response;
use mesh_core::classify::{Backoff as Pushback, Class};
use pin_project_lite::pin_project;
use tokio::time::Instant;

use super::layer::Shared;
use super::{InFlight, ResponseBody};

pin_project! {
    /// The response future of [`PeakEwma`](super::PeakEwma): records the round trip at
    /// the response head, and the rate-limit penalty of a rate-limited answer.
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        in_flight: Option<InFlight>,
        shared: Arc<Shared>,
    }

    impl<F> PinnedDrop for ResponseFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            // Cancelled before an answer: the time so far is a lower bound on the RTT.
            if let Some(in_flight) = this.project().in_flight.take() {
                in_flight.abandon(Instant::now());
            }
        }
    }
}

impl<F> ResponseFuture<F> {
    pub(super) fn new(inner: F, in_flight: InFlight, shared: Arc<Shared>) -> Self {
        Self {
            inner,
            in_flight: Some(in_flight),
            shared,
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
        let now = Instant::now();
        let Some(in_flight) = this.in_flight.take() else {
            return Poll::Ready(result.map(|r| r.map(|b| ResponseBody::new(b, None))));
        };
        let mut pending = None;
        match &result {
            Ok(resp) => {
                let shared = &**this.shared;
                let class = shared
                    .classifier
                    .classify_response(resp.status(), resp.headers());
                if class.is_none() {
                    // A gRPC status to come in the trailers: the body judges it.
                    pending = Some((in_flight.load().clone(), this.shared.clone()));
                }
                if class == Some(Class::RateLimited) {
                    let max = shared.penalty.max;
                    let period =
                        match mesh_core::classify::pushback(resp.headers(), SystemTime::now(), max)
                        {
                            Pushback::After(d) => d,
                            Pushback::Unspecified | Pushback::DoNotRetry => shared.penalty.default,
                        };
                    in_flight.load().penalize(now, period.min(max));
                }
                in_flight.complete(now);
            }
            Err(_) => in_flight.abandon(now),
        }
        Poll::Ready(result.map(|r| r.map(|b| ResponseBody::new(b, pending))))
    }
}
