use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use mesh_core::error::BoxError;
use pin_project_lite::pin_project;

pin_project! {
    #[project = StateProj]
    #[derive(Debug)]
    enum State<F> {
        Endpoint { #[pin] inner: F },
        Failed { error: Option<BoxError> },
    }
}

pin_project! {
    /// The response future of a [`Balance`](super::Balance): the picked endpoint's, or the
    /// balancer's own failure.
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
    }
}

impl<F> ResponseFuture<F> {
    pub(super) fn new(inner: F) -> Self {
        Self {
            state: State::Endpoint { inner },
        }
    }

    pub(super) fn failed(error: BoxError) -> Self {
        Self {
            state: State::Failed { error: Some(error) },
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
        match self.project().state.project() {
            StateProj::Endpoint { inner } => inner.poll(cx).map_err(Into::into),
            StateProj::Failed { error } => Poll::Ready(Err(error
                .take()
                .unwrap_or_else(|| "balancer future polled after completion".into()))),
        }
    }
}
