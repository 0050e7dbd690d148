//! The response future of [`AccessLog`](super::AccessLog).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::Response;
use pin_project_lite::pin_project;

use super::body::LoggedBody;
use super::{Entry, Outcome};

pin_project! {
    /// The answer of an [`AccessLog`](super::AccessLog): the inner service's, its body
    /// wrapped to log the request when it ends. Dropped before the response, it logs the
    /// request as `cancelled`.
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        entry: Option<Box<Entry>>,
    }

    impl<F> PinnedDrop for ResponseFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(entry) = this.project().entry.take() {
                entry.emit(Outcome::Cancelled);
            }
        }
    }
}

impl<F> ResponseFuture<F> {
    pub(super) fn new(inner: F, entry: Option<Box<Entry>>) -> Self {
        Self { inner, entry }
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: http_body::Body,
{
    type Output = Result<Response<LoggedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let mut entry = this.entry.take();
        super::answered(&mut entry, &result);
        Poll::Ready(result.map(|resp| resp.map(|body| LoggedBody::new(body, entry))))
    }
}
