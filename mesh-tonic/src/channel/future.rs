//! The response future of a [`MeshChannel`](super::MeshChannel).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::Response;
use mesh_core::error::BoxError;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use super::GrpcBody;
use crate::status::status_from_error;

pin_project! {
    /// The response future of a [`MeshChannel`](super::MeshChannel): the mesh client's
    /// future, raced against the call's deadline, with errors as [`tonic::Status`].
    pub struct ResponseFuture<B>
    where
        B: http_body::Body<Data = Bytes>,
        B: Send,
        B: 'static,
        B::Error: Into<BoxError>,
    {
        #[pin]
        state: State<B>,
        deadline: Option<Instant>,
        service: Arc<str>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<B>
    where
        B: http_body::Body<Data = Bytes>,
        B: Send,
        B: 'static,
        B::Error: Into<BoxError>,
    {
        Failed { status: Option<tonic::Status> },
        Sending {
            #[pin]
            call: mesh_tower::client::ResponseFuture<B>,
            #[pin]
            timer: Option<Sleep>,
        },
    }
}

impl<B> ResponseFuture<B>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    pub(super) fn new(
        call: mesh_tower::client::ResponseFuture<B>,
        deadline: Option<Instant>,
        service: Arc<str>,
    ) -> Self {
        Self {
            state: State::Sending {
                call,
                timer: deadline.map(tokio::time::sleep_until),
            },
            deadline,
            service,
        }
    }

    pub(super) fn failed(status: tonic::Status, service: Arc<str>) -> Self {
        Self {
            state: State::Failed {
                status: Some(status),
            },
            deadline: None,
            service,
        }
    }
}

impl<B> fmt::Debug for ResponseFuture<B>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("service", &self.service)
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl<B> Future for ResponseFuture<B>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<GrpcBody>, tonic::Status>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.state.project() {
            StateProj::Failed { status } => Poll::Ready(Err(status.take().unwrap_or_else(|| {
                tonic::Status::internal("mesh-tonic: response future polled after completion")
            }))),
            StateProj::Sending { call, timer } => {
                if let Poll::Ready(result) = call.poll(cx) {
                    return Poll::Ready(match result {
                        Ok(response) => {
                            let service = this.service.clone();
                            Ok(response.map(|b| GrpcBody::new(b, *this.deadline, service)))
                        }
                        Err(error) => Err(status_from_error(error, this.service)),
                    });
                }
                if let Some(timer) = timer.as_pin_mut() {
                    ready!(timer.poll(cx));
                    return Poll::Ready(Err(deadline_exceeded(this.service)));
                }
                Poll::Pending
            }
        }
    }
}

/// The status of a call whose deadline passed.
pub(super) fn deadline_exceeded(service: &str) -> tonic::Status {
    tonic::Status::deadline_exceeded(format!("{service}: deadline exceeded"))
}
