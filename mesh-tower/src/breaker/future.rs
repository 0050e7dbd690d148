use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::Response;
use mesh_core::classify::Class;
use pin_project_lite::pin_project;

use super::gate::Permit;
use super::{BreakerHandle, ResponseBody};

pin_project! {
    /// The response future of a [`Breaker`](super::Breaker): reports the answer's class
    /// (or the failure) to the breaker, and wraps the body to report a status that comes
    /// in gRPC trailers.
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        handle: Option<BreakerHandle>,
        permit: Option<Permit>,
    }
}

impl<F> ResponseFuture<F> {
    pub(super) fn new(inner: F, handle: Option<BreakerHandle>, permit: Option<Permit>) -> Self {
        Self {
            inner,
            handle,
            permit,
        }
    }
}

/// Whether a failed try's error (the endpoint client's [`SendError`], or boxed) says
/// nothing of the endpoint: it is the request's own doing ([`is_request_error`]), or the
/// request found no free connection and was not sent ([`PoolOverflow`]).
///
/// [`SendError`]: crate::connect::SendError
/// [`is_request_error`]: crate::connect::is_request_error
/// [`PoolOverflow`]: crate::connect::PoolOverflow
fn caused_by_the_request<E: 'static>(e: &E) -> bool {
    // Nor a connect that failed for want of this host's resources (file descriptors).
    let blameless = |e: &(dyn std::error::Error + 'static)| {
        crate::connect::is_request_error(e)
            || crate::connect::is_pool_overflow(e)
            || mesh_core::error::find_cause::<crate::connect::ConnectError>(e)
                .is_some_and(crate::connect::ConnectError::is_local)
    };
    let any = e as &dyn std::any::Any;
    if let Some(e) = any.downcast_ref::<mesh_core::error::BoxError>() {
        return blameless(e.as_ref());
    }
    any.downcast_ref::<crate::connect::SendError>()
        .is_some_and(|e| blameless(e))
}

impl<F, RB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
    E: 'static,
{
    type Output = Result<Response<ResponseBody<RB>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let Some(handle) = this.handle.take() else {
            return Poll::Ready(result.map(|r| r.map(|b| ResponseBody::new(b, None))));
        };
        let permit = this.permit.take();
        match result {
            Ok(resp) => {
                let class = handle
                    .classifier()
                    .classify_response(resp.status(), resp.headers());
                let pending = match class {
                    Some(class) => {
                        handle.record_outcome(class, permit.as_ref().and_then(Permit::round));
                        if let Some(p) = permit {
                            p.consume();
                        }
                        None
                    }
                    // A gRPC status to come in the trailers: the body reports it.
                    None => Some((handle, permit)),
                };
                Poll::Ready(Ok(resp.map(|b| ResponseBody::new(b, pending))))
            }
            Err(e) => {
                // A try the request itself failed (its body stalled, its client left) says
                // nothing of the endpoint: not counted, and a probe's permit is not spent.
                if !caused_by_the_request(&e) {
                    handle.record_outcome(Class::Failure, permit.as_ref().and_then(Permit::round));
                    if let Some(p) = permit {
                        p.consume();
                    }
                }
                Poll::Ready(Err(e))
            }
        }
    }
}
