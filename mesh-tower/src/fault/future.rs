use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::{HeaderValue, Request, Response, StatusCode};
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower_service::Service;

use super::service::Guard;
use super::{Abort, header_name};
use crate::body::ResponseBody;

pin_project! {
    /// The response future of a [`Fault`](super::Fault): the inner service's response, a
    /// delay before it, or an abort answer.
    #[derive(Debug)]
    pub struct ResponseFuture<F, S, B> {
        #[pin]
        state: State<F, S, B>,
    }
}

pin_project! {
    #[project = StateProj]
    #[derive(Debug)]
    enum State<F, S, B> {
        Inner { #[pin] inner: F, delayed: bool },
        // Boxed: few requests are delayed, and the future of the others stays small.
        Delay { delay: Pin<Box<Delay<S, B>>> },
        // `None` once answered.
        Local { abort: Option<Abort> },
    }
}

pin_project! {
    #[derive(Debug)]
    struct Delay<S, B> {
        #[pin]
        sleep: Sleep,
        // The ready service and the request, for a delay without an abort.
        call: Option<(S, Request<B>)>,
        abort: Option<Abort>,
        // Freed with the delay, when it ends or the future is dropped.
        _guard: Guard,
    }
}

impl<F, S, B> ResponseFuture<F, S, B> {
    pub(super) fn inner(inner: F) -> Self {
        Self {
            state: State::Inner {
                inner,
                delayed: false,
            },
        }
    }

    pub(super) fn local(abort: Abort) -> Self {
        Self {
            state: State::Local { abort: Some(abort) },
        }
    }

    pub(super) fn delayed(
        delay: Duration,
        call: Option<(S, Request<B>)>,
        abort: Option<Abort>,
        guard: Guard,
    ) -> Self {
        Self {
            state: State::Delay {
                delay: Box::pin(Delay {
                    sleep: tokio::time::sleep(delay),
                    call,
                    abort,
                    _guard: guard,
                }),
            },
        }
    }
}

impl<F, S, B, RB, E> Future for ResponseFuture<F, S, B>
where
    F: Future<Output = Result<Response<RB>, E>>,
    S: Service<Request<B>, Future = F>,
{
    type Output = Result<Response<ResponseBody<RB>>, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let next = match self.as_mut().project().state.project() {
                StateProj::Inner { inner, delayed } => {
                    let mut response = ready!(inner.poll(cx))?.map(ResponseBody::inner);
                    if *delayed {
                        response
                            .headers_mut()
                            .append(header_name(), HeaderValue::from_static("delay"));
                    }
                    return Poll::Ready(Ok(response));
                }
                StateProj::Delay { delay } => {
                    let delay = delay.as_mut().project();
                    ready!(delay.sleep.poll(cx));
                    match (delay.abort.take(), delay.call.take()) {
                        (Some(abort), _) => State::Local { abort: Some(abort) },
                        (None, Some((mut service, req))) => State::Inner {
                            inner: service.call(req),
                            delayed: true,
                        },
                        // Not reached (a delay has an abort or a call); polled again
                        // after the state was replaced otherwise.
                        (None, None) => State::Local { abort: None },
                    }
                }
                StateProj::Local { abort } => {
                    return Poll::Ready(Ok(match abort.take() {
                        Some(abort) => abort.response(),
                        // Polled after completion: an error status rather than a panic.
                        None => {
                            let mut response = Response::new(ResponseBody::empty());
                            *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                            response
                        }
                    }));
                }
            };
            // Drops the delay, and with it the slot under the cap.
            self.as_mut().project().state.set(next);
        }
    }
}
