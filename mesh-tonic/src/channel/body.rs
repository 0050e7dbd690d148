//! [`GrpcBody`]: a mesh client's response body, with body errors as [`tonic::Status`] and
//! the call's deadline.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use mesh_tower::client::ResponseBody;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use super::future::deadline_exceeded;
use crate::status::status_from_error;

pin_project! {
    /// The response body of a [`MeshChannel`](super::MeshChannel) call. Its errors are
    /// [`tonic::Status`] (mapped as in [`crate::status`]); when the call has a deadline
    /// and it passes before the body ends, the body fails with `DEADLINE_EXCEEDED` and
    /// the stream is reset. The default body is empty.
    #[derive(Default)]
    pub struct GrpcBody {
        #[pin]
        inner: Option<ResponseBody>,
        #[pin]
        timer: Option<Sleep>,
        service: Option<Arc<str>>,
    }
}

impl GrpcBody {
    pub(super) fn new(inner: ResponseBody, deadline: Option<Instant>, service: Arc<str>) -> Self {
        Self {
            inner: Some(inner),
            timer: deadline.map(tokio::time::sleep_until),
            service: Some(service),
        }
    }

    fn service(&self) -> &str {
        self.service.as_deref().unwrap_or("mesh")
    }
}

impl fmt::Debug for GrpcBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcBody")
            .field("service", &self.service())
            .field("deadline", &self.timer.as_ref().map(Sleep::deadline))
            .finish_non_exhaustive()
    }
}

impl Body for GrpcBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let mut this = self.project();
        let Some(inner) = this.inner.as_mut().as_pin_mut() else {
            return Poll::Ready(None);
        };
        let service = this.service.as_deref().unwrap_or("mesh");
        // Checked before every frame, not only when the inner body waits: hyper buffers up
        // to the stream's flow-control window, so a server sending faster than the caller
        // reads keeps the inner body ready past the deadline. The clock is read first: a
        // caller that finds a frame at every poll may never yield to the runtime, and once
        // its task's budget is spent the timer answers `Pending` whatever the time.
        if let Some(timer) = this.timer.as_pin_mut()
            && (timer.deadline() <= Instant::now() || timer.poll(cx).is_ready())
        {
            let status = deadline_exceeded(service);
            // Dropping the inner body resets the stream.
            this.inner.set(None);
            return Poll::Ready(Some(Err(status)));
        }
        match inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
            Poll::Ready(Some(Err(error))) => {
                this.inner.set(None);
                Poll::Ready(Some(Err(status_from_error(error, service))))
            }
            Poll::Ready(None) => {
                this.inner.set(None);
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}
