use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Response;
use pin_project_lite::pin_project;

use crate::body::ResponseBody;

pin_project! {
    #[project = StateProj]
    #[derive(Debug)]
    enum State<F, B> {
        Allowed { #[pin] inner: F },
        // `None` once answered.
        Denied { response: Option<Response<ResponseBody<B>>> },
    }
}

pin_project! {
    /// The response future of [`Authorize`](super::Authorize): the inner service's, or the
    /// refusal.
    #[derive(Debug)]
    pub struct ResponseFuture<F, B> {
        #[pin]
        state: State<F, B>,
    }
}

impl<F, B> ResponseFuture<F, B> {
    pub(super) fn allowed(inner: F) -> Self {
        Self {
            state: State::Allowed { inner },
        }
    }

    pub(super) fn denied(response: Response<ResponseBody<B>>) -> Self {
        Self {
            state: State::Denied {
                response: Some(response),
            },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Allowed { inner } => inner
                .poll(cx)
                .map(|r| r.map(|resp| resp.map(ResponseBody::inner))),
            StateProj::Denied { response } => match response.take() {
                Some(response) => Poll::Ready(Ok(response)),
                // Polled after completion: refuse again rather than panic.
                None => Poll::Ready(Ok(super::service::refusal(false))),
            },
        }
    }
}
