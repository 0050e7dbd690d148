//! The response body of [`AccessLog`](super::AccessLog).

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::{Entry, Outcome};

pin_project! {
    /// A response body that logs its request when it ends: at its last frame (data
    /// that ends it, or trailers), at an error, or when dropped before its end.
    #[derive(Debug)]
    pub struct LoggedBody<B> {
        #[pin]
        inner: B,
        entry: Option<Box<Entry>>,
    }

    impl<B> PinnedDrop for LoggedBody<B> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(entry) = this.project().entry.take() {
                entry.emit(Outcome::BodyDropped);
            }
        }
    }
}

impl<B> LoggedBody<B> {
    /// `inner`, logging `entry` when it ends; a body that has ended already (an empty
    /// one) logs at once.
    pub(super) fn new(inner: B, mut entry: Option<Box<Entry>>) -> Self
    where
        B: Body,
    {
        if inner.is_end_stream()
            && let Some(entry) = entry.take()
        {
            entry.emit(Outcome::Complete);
        }
        Self { inner, entry }
    }

    /// The wrapped body.
    pub fn get_ref(&self) -> &B {
        &self.inner
    }
}

impl<B: Body> Body for LoggedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let mut this = self.project();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        super::polled(this.entry, &frame, || this.inner.is_end_stream());
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
