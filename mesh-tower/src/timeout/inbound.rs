//! The caller's gRPC deadline on the serving side.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower::Layer;
use tower_service::Service;

use super::Deadline;
use crate::body::{ResponseBody, grpc_answer};

/// gRPC's `DEADLINE_EXCEEDED`.
const DEADLINE_EXCEEDED: u16 = 4;
/// gRPC's `INTERNAL`: what gRPC servers answer a malformed `grpc-timeout` with.
const INTERNAL: u16 = 13;

/// Serves gRPC requests within their caller's deadline: a request's `grpc-timeout`
/// becomes a [`Deadline`] extension the handler can read (and pass on to its own calls,
/// where the client stack re-encodes the time left), and when the deadline passes before
/// the handler answers, the caller gets a trailers-only `DEADLINE_EXCEEDED` and the
/// handler's future is dropped. A malformed `grpc-timeout` is answered `INTERNAL`, naming
/// it, without calling the handler. Requests without one pass through untouched.
///
/// The deadline bounds the response head; a streaming answer already under way is left
/// to end as the handler ends it (the caller's own deadline ends the call at its side).
///
/// ```
/// use std::time::Duration;
/// use http::{Request, Response};
/// use mesh_tower::timeout::{Deadline, GrpcDeadlineLayer};
/// use tower::{ServiceBuilder, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// let slow = ServiceBuilder::new()
///     .layer(GrpcDeadlineLayer::new())
///     .service_fn(|req: Request<()>| async move {
///         assert!(req.extensions().get::<Deadline>().is_some());
///         tokio::time::sleep(Duration::from_secs(5)).await;
///         Ok::<_, std::convert::Infallible>(Response::new(()))
///     });
/// let call = Request::post("/users.v1.Users/Get")
///     .header("content-type", "application/grpc")
///     .header("grpc-timeout", "100m")
///     .body(())?;
/// let resp = slow.oneshot(call).await?;
/// assert_eq!(resp.headers()["grpc-status"], "4");
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct GrpcDeadlineLayer {
    _priv: (),
}

impl GrpcDeadlineLayer {
    /// The layer.
    pub fn new() -> Self {
        Self::default()
    }
}

impl<S> Layer<S> for GrpcDeadlineLayer {
    type Service = GrpcDeadline<S>;

    fn layer(&self, inner: S) -> GrpcDeadline<S> {
        GrpcDeadline { inner }
    }
}

/// Serves gRPC requests within their caller's deadline; see [`GrpcDeadlineLayer`].
#[derive(Clone, Debug)]
pub struct GrpcDeadline<S> {
    inner: S,
}

impl<S, B, RB> Service<Request<B>> for GrpcDeadline<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
{
    type Response = Response<ResponseBody<RB>>;
    type Error = S::Error;
    type Future = InboundFuture<S::Future, RB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let Some(value) = req.headers().get(&super::GRPC_TIMEOUT) else {
            return InboundFuture::inner(self.inner.call(req), None);
        };
        let timeout = match mesh_core::classify::grpc::parse_timeout(value) {
            Ok(t) => t,
            Err(e) => {
                tracing::debug!(error = %e, "malformed grpc-timeout");
                return InboundFuture::local(grpc_answer(INTERNAL, "malformed grpc-timeout"));
            }
        };
        let Some(at) = Instant::now().checked_add(timeout) else {
            // Further away than time can say: no deadline.
            return InboundFuture::inner(self.inner.call(req), None);
        };
        let earlier = req.extensions().get::<Deadline>().map(|d| d.0);
        let at = earlier.map_or(at, |e| e.min(at));
        req.extensions_mut().insert(Deadline(at));
        InboundFuture::inner(self.inner.call(req), Some(at))
    }
}

pin_project! {
    /// The response future of a [`GrpcDeadline`].
    #[derive(Debug)]
    pub struct InboundFuture<F, B> {
        #[pin]
        state: State<F, B>,
    }
}

pin_project! {
    #[project = StateProj]
    #[derive(Debug)]
    enum State<F, B> {
        Inner {
            #[pin]
            inner: F,
            // Boxed: only requests with a deadline have one.
            sleep: Option<Pin<Box<Sleep>>>,
        },
        Local { response: Option<Response<ResponseBody<B>>> },
    }
}

impl<F, B> InboundFuture<F, B> {
    fn inner(inner: F, at: Option<Instant>) -> Self {
        Self {
            state: State::Inner {
                inner,
                sleep: at.map(|at| Box::pin(tokio::time::sleep_until(at))),
            },
        }
    }

    fn local(response: Response<ResponseBody<B>>) -> Self {
        Self {
            state: State::Local {
                response: Some(response),
            },
        }
    }
}

impl<F, B, E> Future for InboundFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        match this.state.as_mut().project() {
            StateProj::Inner { inner, sleep } => {
                if let Poll::Ready(result) = inner.poll(cx) {
                    return Poll::Ready(result.map(|r| r.map(ResponseBody::inner)));
                }
                match sleep.as_mut().map(|s| s.as_mut().poll(cx)) {
                    Some(Poll::Ready(())) => {
                        tracing::debug!("the caller's deadline passed");
                        let answer = grpc_answer(DEADLINE_EXCEEDED, "deadline exceeded");
                        // Drop the handler's future now: its work is of no use.
                        this.state.set(State::Local { response: None });
                        Poll::Ready(Ok(answer))
                    }
                    _ => Poll::Pending,
                }
            }
            StateProj::Local { response } => match response.take() {
                Some(r) => Poll::Ready(Ok(r)),
                None => Poll::Ready(Ok(grpc_answer(INTERNAL, "polled after completion"))),
            },
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use super::*;
    use tower::ServiceExt;

    fn handler(
        latency: Duration,
    ) -> impl Service<Request<()>, Response = Response<()>, Error = std::convert::Infallible> + Clone
    {
        tower::service_fn(move |req: Request<()>| async move {
            let deadline = req.extensions().get::<Deadline>().map(|d| d.0);
            tokio::time::sleep(latency).await;
            let mut resp = Response::new(());
            if let Some(at) = deadline {
                let left = at.saturating_duration_since(Instant::now());
                resp.headers_mut()
                    .insert("x-left-ms", (left.as_millis() as u64).into());
            }
            Ok(resp)
        })
    }

    fn call(timeout: Option<&str>) -> Request<()> {
        let mut req = Request::post("/a.B/C").header("content-type", "application/grpc");
        if let Some(t) = timeout {
            req = req.header("grpc-timeout", t);
        }
        req.body(()).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn the_handler_sees_the_deadline_and_a_late_one_is_answered_deadline_exceeded() {
        let svc = GrpcDeadlineLayer::new().layer(handler(Duration::from_millis(40)));
        let resp = svc.clone().oneshot(call(Some("100m"))).await.unwrap();
        assert_eq!(resp.headers()["x-left-ms"], "60");
        assert!(!resp.body().is_local());

        let started = Instant::now();
        let resp = svc.clone().oneshot(call(Some("10m"))).await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_millis(10));
        assert_eq!(resp.headers()["grpc-status"], "4");

        // No grpc-timeout: no deadline, untouched.
        let resp = svc.oneshot(call(None)).await.unwrap();
        assert!(resp.headers().get("x-left-ms").is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_malformed_timeout_is_answered_internal_without_calling_the_handler() {
        let svc = GrpcDeadlineLayer::new().layer(tower::service_fn(|_req: Request<()>| async {
            Ok::<Response<()>, std::convert::Infallible>(called())
        }));
        for bad in ["", "100", "123456789S", "-1S", "1x"] {
            let resp = svc.clone().oneshot(call(Some(bad))).await.unwrap();
            assert_eq!(resp.headers()["grpc-status"], "13", "{bad:?}");
            assert_eq!(resp.headers()["grpc-message"], "malformed grpc-timeout");
            assert!(resp.headers().get("x-called").is_none(), "the handler ran");
        }
        let resp = svc.oneshot(call(Some("1S"))).await.unwrap();
        assert_eq!(resp.headers()["x-called"], "1");
    }

    fn called() -> Response<()> {
        let mut resp = Response::new(());
        resp.headers_mut().insert("x-called", "1".parse().unwrap());
        resp
    }
}
