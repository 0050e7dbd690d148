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
        // Boxed: most stacks run without one, and the future stays small.
        timer: Option<Pin<Box<Timer>>>,
    }
}

pin_project! {
    #[derive(Debug)]
    struct Timer {
        #[pin]
        sleep: Sleep,
        timeout: Duration,
        kind: Kind,
    }
}

impl<F> ResponseFuture<F> {
    pub(super) fn new(inner: F, timer: Option<(Instant, Duration, Kind)>) -> Self {
        Self {
            inner,
            timer: timer.map(|(at, timeout, kind)| {
                Box::pin(Timer {
                    sleep: tokio::time::sleep_until(at),
                    timeout,
                    kind,
                })
            }),
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
        let Some(timer) = this.timer.as_mut() else {
            return Poll::Pending;
        };
        let timer = timer.as_mut().project();
        match timer.sleep.poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(match timer.kind {
                Kind::Request => RequestTimeout(*timer.timeout).into(),
                Kind::Try => TryTimeout(*timer.timeout).into(),
            })),
            Poll::Pending => Poll::Pending,
        }
    }
}
