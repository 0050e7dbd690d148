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

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<http::Response<ResponseBody<B>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(result) = this.inner.poll(cx) {
            // A request timeout goes on bounding the body; a try's ends with its head.
            let timer = this
                .timer
                .take()
                .filter(|timer| timer.kind == Kind::Request);
            return Poll::Ready(match result {
                Ok(response) => Ok(response.map(|inner| ResponseBody { inner, timer })),
                Err(e) => Err(e.into()),
            });
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

pin_project! {
    /// The body of a [`Timeout`](super::Timeout)'s response. Under a request timeout it
    /// fails with [`RequestTimeout`] when the deadline passes before it ends: the timeout
    /// bounds the whole exchange, a streamed answer included (as Gateway API's request
    /// timeout and Envoy's route timeout do). Under a per-try timeout it passes the body
    /// through: a try is bounded to its response head, the point where it is committed.
    #[derive(Debug)]
    pub struct ResponseBody<B> {
        #[pin]
        inner: B,
        timer: Option<Pin<Box<Timer>>>,
    }
}

impl<B> ResponseBody<B> {
    /// The body as it came, without a timer.
    pub fn into_inner(self) -> B {
        self.inner
    }
}

impl<B> http_body::Body for ResponseBody<B>
where
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, BoxError>>> {
        let this = self.project();
        if let Some(timer) = this.timer.as_mut() {
            // Checked before every frame, not only when the body waits: a body that
            // always has a frame ready (a fast stream to a slow reader) would otherwise
            // outlive its deadline. The clock is read rather than the timer polled: a
            // reader that never waits may never let the runtime fire the timer.
            let timer = timer.as_mut().project();
            if timer.sleep.deadline() <= Instant::now() || timer.sleep.poll(cx).is_ready() {
                let timeout = *timer.timeout;
                // Once: the body is over.
                *this.timer = None;
                return Poll::Ready(Some(Err(RequestTimeout(timeout).into())));
            }
        }
        this.inner
            .poll_frame(cx)
            .map(|frame| frame.map(|f| f.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
