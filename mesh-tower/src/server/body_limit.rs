//! Refuses requests that declare a body larger than the server's bound.

use std::task::{Context, Poll};

use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body::Body;
use tower_service::Service;

use crate::body::{ResponseBody, ResponseFuture, text_answer};

/// Answers 413 to a request whose declared size (`Content-Length`, as hyper read it)
/// exceeds `max`; passes every other request on.
#[derive(Clone, Debug)]
pub(super) struct BodyLimit<S> {
    pub(super) inner: S,
    pub(super) max: Option<u64>,
}

impl<S, B, RB> Service<Request<B>> for BodyLimit<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    B: Body,
{
    type Response = Response<ResponseBody<RB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, RB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let declared = req.body().size_hint().exact();
        if let (Some(max), Some(size)) = (self.max, declared)
            && size > max
        {
            tracing::debug!(size, max, "request body over the bound");
            let mut response = text_answer(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body of {size} bytes exceeds the limit of {max}\n"),
            );
            let headers = response.headers_mut();
            // The body is not read: the connection cannot carry another request.
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            return ResponseFuture::local(response);
        }
        ResponseFuture::inner(self.inner.call(req))
    }
}
