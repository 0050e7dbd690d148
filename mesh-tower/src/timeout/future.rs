use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use mesh_core::error::BoxError;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use super::{EachTry, Kind, RequestTimeout, TryTimeout, WholeRequest};

pin_project! {
    /// The response future of a [`Timeout`](super::Timeout): under a request timeout
    /// ([`WholeRequest`]) its answer's body goes on being bounded ([`ResponseBody`]);
    /// under a per-try timeout ([`EachTry`]) the answer is passed as it is.
    #[derive(Debug)]
    pub struct ResponseFuture<F, K = WholeRequest> {
        #[pin]
        inner: F,
        // Boxed: most stacks run without one, and the future stays small.
        timer: Option<Pin<Box<Timer>>>,
        kind: PhantomData<fn() -> K>,
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

impl<F, K> ResponseFuture<F, K> {
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
            kind: PhantomData,
        }
    }
}

/// The inner future's answer, or the timeout's error once its timer fires; with the
/// timer, taken out, when the answer came first.
#[allow(clippy::type_complexity)]
fn poll_timed<F: Future>(
    inner: Pin<&mut F>,
    timer: &mut Option<Pin<Box<Timer>>>,
    cx: &mut Context<'_>,
) -> Poll<Result<(F::Output, Option<Pin<Box<Timer>>>), BoxError>> {
    if let Poll::Ready(output) = inner.poll(cx) {
        return Poll::Ready(Ok((output, timer.take())));
    }
    let Some(timer) = timer.as_mut() else {
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

impl<F, B, E> Future for ResponseFuture<F, WholeRequest>
where
    F: Future<Output = Result<http::Response<B>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<http::Response<ResponseBody<B>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        // The timer goes on bounding the body.
        let (result, timer) = std::task::ready!(poll_timed(this.inner, this.timer, cx))?;
        Poll::Ready(match result {
            Ok(response) => Ok(response.map(|inner| ResponseBody { inner, timer })),
            Err(e) => Err(e.into()),
        })
    }
}

impl<F, T, E> Future for ResponseFuture<F, EachTry>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        // A try ends with its answer's head: the timer goes.
        let (result, _) = std::task::ready!(poll_timed(this.inner, this.timer, cx))?;
        Poll::Ready(result.map_err(Into::into))
    }
}

pin_project! {
    /// The body of a request timeout's ([`WholeRequest`]) response: it fails with
    /// [`RequestTimeout`] when the deadline passes before it ends, so that the timeout
    /// bounds the whole exchange, a streamed answer included (as Gateway API's request
    /// timeout and Envoy's route timeout do). A per-try timeout ([`EachTry`]) bounds a
    /// try to its response head, where it is committed, and leaves the body as it is.
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
