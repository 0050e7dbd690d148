use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use mesh_core::error::BoxError;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use super::{Kind, RequestTimeout, TryTimeout};

pin_project! {
    /// The response future of a [`Timeout`](super::Timeout).
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        #[pin]
        sleep: Option<Sleep>,
        timeout: Duration,
        kind: Kind,
    }
}

impl<F> ResponseFuture<F> {
    pub(super) fn new(inner: F, timer: Option<(Instant, Duration, Kind)>) -> Self {
        let (sleep, timeout, kind) = match timer {
            Some((at, timeout, kind)) => (Some(tokio::time::sleep_until(at)), timeout, kind),
            None => (None, Duration::ZERO, Kind::Try),
        };
        Self {
            inner,
            sleep,
            timeout,
            kind,
        }
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(result) = this.inner.poll(cx) {
            return Poll::Ready(result.map_err(Into::into));
        }
        match this.sleep.as_pin_mut().map(|sleep| sleep.poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(Err(match this.kind {
                Kind::Request => RequestTimeout(*this.timeout).into(),
                Kind::Try => TryTimeout(*this.timeout).into(),
            })),
            _ => Poll::Pending,
        }
    }
}
