//! The response body and future of layers that may answer a request themselves
//! (authorization, rate limiting): the inner service's, or a small one of the layer's own.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body::{Body, Frame, SizeHint};
use mesh_core::error::BoxError;
use pin_project_lite::pin_project;

pin_project! {
    #[project = KindProj]
    #[derive(Debug)]
    enum Kind<B> {
        Inner { #[pin] body: B },
        // `None` once sent, or when empty.
        Local { data: Option<Bytes> },
    }
}

pin_project! {
    /// The inner service's body, or a complete one a layer answered with.
    #[derive(Debug)]
    pub struct ResponseBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

impl<B> ResponseBody<B> {
    /// The inner service's body.
    pub fn inner(body: B) -> Self {
        Self {
            kind: Kind::Inner { body },
        }
    }

    /// A complete body of the layer's own (empty when `data` is).
    pub fn local(data: Bytes) -> Self {
        Self {
            kind: Kind::Local {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }

    /// An empty body (a gRPC trailers-only answer, a refusal without text).
    pub fn empty() -> Self {
        Self {
            kind: Kind::Local { data: None },
        }
    }

    /// Whether the layer answered (rather than the inner service).
    pub fn is_local(&self) -> bool {
        matches!(self.kind, Kind::Local { .. })
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            KindProj::Inner { body } => body.poll_frame(cx).map_err(Into::into),
            KindProj::Local { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner { body } => body.is_end_stream(),
            Kind::Local { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body } => body.size_hint(),
            Kind::Local { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

pin_project! {
    #[project = StateProj]
    #[derive(Debug)]
    enum State<F, B> {
        Inner { #[pin] inner: F },
        // `None` once answered.
        Local { response: Option<Response<ResponseBody<B>>> },
    }
}

pin_project! {
    /// The response future of a layer that may answer itself: the inner service's, or the
    /// layer's own answer.
    #[derive(Debug)]
    pub struct ResponseFuture<F, B> {
        #[pin]
        state: State<F, B>,
    }
}

impl<F, B> ResponseFuture<F, B> {
    /// Passes the inner service's answer on.
    pub fn inner(inner: F) -> Self {
        Self {
            state: State::Inner { inner },
        }
    }

    /// Answers with `response`.
    pub fn local(response: Response<ResponseBody<B>>) -> Self {
        Self {
            state: State::Local {
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
            StateProj::Inner { inner } => inner
                .poll(cx)
                .map(|r| r.map(|resp| resp.map(ResponseBody::inner))),
            StateProj::Local { response } => match response.take() {
                Some(response) => Poll::Ready(Ok(response)),
                // Polled after completion: an error status rather than a panic.
                None => {
                    let mut response = Response::new(ResponseBody::empty());
                    *response.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
                    Poll::Ready(Ok(response))
                }
            },
        }
    }
}

/// A layer's own answer to a gRPC request: trailers-only (HTTP 200, `grpc-status` and
/// `grpc-message` in the only header block, no message), marked with [`MESH_ERROR`].
pub(crate) fn grpc_answer<B>(code: u16, message: &'static str) -> Response<ResponseBody<B>> {
    let mut response = Response::new(ResponseBody::empty());
    *response.headers_mut() = grpc_answer_headers(code, message);
    response
}

/// The header block of [`grpc_answer`]. Out of line and cold, as [`text_answer_headers`]:
/// the layers that answer for themselves do so rarely, and their `call` stays small
/// enough for the compiler to inline the next layer's into it.
#[cold]
#[inline(never)]
fn grpc_answer_headers(code: u16, message: &'static str) -> http::HeaderMap {
    let mut headers = http::HeaderMap::with_capacity(4);
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert("grpc-status", HeaderValue::from(code));
    headers.insert("grpc-message", HeaderValue::from_static(message));
    headers.insert(MESH_ERROR, HeaderValue::from_static("true"));
    headers
}

/// Marks the answers the mesh makes itself (a refused request, an unreachable service or
/// application, a missing route), as opposed to the application's: `x-mesh-error: true`.
/// A client can tell the two apart (and a retry knows that a request a mesh limiter
/// refused reached no application); an edge listener's brief answers
/// ([`AnswerErrorsLayer::brief`](crate::forward::AnswerErrorsLayer::brief)) replace the
/// body of any answer so marked, a peer proxy's included, with the status's reason (a
/// gRPC answer, whose message names no internals, stays as it is).
pub const MESH_ERROR: http::HeaderName = http::HeaderName::from_static("x-mesh-error");

/// A layer's own answer to an HTTP request: `status` with a plain-text body, marked with
/// [`MESH_ERROR`].
pub(crate) fn text_answer<B>(
    status: StatusCode,
    text: impl Into<Bytes>,
) -> Response<ResponseBody<B>> {
    let mut response = Response::new(ResponseBody::local(text.into()));
    *response.status_mut() = status;
    *response.headers_mut() = text_answer_headers();
    response
}

/// The header block of [`text_answer`], out of line (see [`grpc_answer_headers`]).
#[cold]
#[inline(never)]
fn text_answer_headers() -> http::HeaderMap {
    let mut headers = http::HeaderMap::with_capacity(2);
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(MESH_ERROR, HeaderValue::from_static("true"));
    headers
}

/// Where a gRPC answer's status can be known, from one polled frame of its body: at its
/// trailers (`Some(Some(trailers))`), or at the end of the stream or an error without
/// them (`Some(None)`, a failure when classified); `None` for a data frame. The bodies
/// that count an answer at its status (the breaker's, the client metrics') share it.
pub(crate) fn grpc_status_settled<D, E>(
    ready: &Option<Result<Frame<D>, E>>,
) -> Option<Option<&http::HeaderMap>> {
    match ready {
        Some(Ok(frame)) => frame.trailers_ref().map(Some),
        Some(Err(_)) | None => Some(None),
    }
}
