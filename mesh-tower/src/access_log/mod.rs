//! Access logs: one structured [`tracing`] event per request, at `INFO` on the target
//! [`TARGET`] (`mesh_access`), once its response has ended.
//!
//! [`AccessLog`] wraps a service. When a request arrives it notes the time, the method,
//! the request target, the protocol version, `Host` (or the URI's authority), `User-Agent`,
//! the client's address ([`ClientAddr`](crate::server::ClientAddr), set by
//! [`MeshServer`](crate::server::MeshServer)) and the client's verified identity
//! ([`PeerIdentity`], set by mTLS). When the response's body has ended it emits one event
//! with those and what happened:
//!
//! | field | value |
//! |---|---|
//! | `listener` | the name given to [`AccessLogLayer::new`] |
//! | `client.addr`, `client.id` | the client's address and SPIFFE ID, or `-` |
//! | `server.id` | the identity the answering peer proved (a response's [`PeerIdentity`], as the mesh client sets it), or `-` |
//! | `method`, `uri`, `version`, `host`, `user_agent` | from the request (`uri`: its path and query, or the whole target when it has none, as for `CONNECT`); the client's text is cut at 1 KiB, marked `…` |
//! | `status` | the response's status, or `-` when there was none |
//! | `grpc.status` | a gRPC call's status (from trailers, or headers for a trailers-only answer; a code outside 0–16 or no number is `2`, UNKNOWN, as the metrics count it), or `-` |
//! | `response_bytes` | body bytes sent |
//! | `duration_us` | from the request's arrival to the end of its response body |
//! | `outcome` | `complete` (the body's end, its trailers, or a response with no body to send: to `HEAD`, a 1xx, 204 or 304); `body_error` (the body failed midway); `body_dropped` (dropped before its end: the client went away); `error` (the service failed with no response); `cancelled` (the request was dropped before its response) |
//!
//! Every field is always present (`-` when unknown), so that lines can be parsed by
//! position as well as by name; with `tracing-subscriber`'s JSON formatter (mesh-proxy's
//! `--log-format json`) each event is one JSON object. A request the layer never sees
//! has no line: one the server refuses before any service is called (hyper's own 400,
//! 408 or 431 for a malformed or slow head), or one whose service failed to become
//! ready.
//!
//! **Cost.** A disabled layer (see [`AccessLogHandle`], which switches a running one)
//! costs a relaxed atomic load per request, plus what any layer costs: one more move of the
//! inner future and of the response. In mesh-proxy that was 2–3% of the CPU per request
//! (1.2% of the instructions), so [`MeshServer`](crate::server::MeshServer) does not stack
//! this layer: its inbound metrics, which wrap every request already, write the same line
//! at the same points (`MeshServerBuilder::access_log`). An enabled log allocates the
//! request's entry once, clones a few reference-counted values, and reads the clock
//! twice; formatting and writing the line are the subscriber's (a write to stderr per line
//! with `tracing-subscriber`'s default writer).
//!
//! ```
//! use mesh_tower::access_log::AccessLogLayer;
//! use tower::ServiceBuilder;
//! # use http::{Request, Response};
//! # use http_body_util::Full;
//! # use bytes::Bytes;
//!
//! let svc = ServiceBuilder::new()
//!     .layer(AccessLogLayer::new("public"))
//!     .service_fn(|_req: Request<Full<Bytes>>| async {
//!         Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from("ok"))))
//!     });
//! # let _ = svc;
//! ```

mod body;
mod future;

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use http::{HeaderValue, Method, Request, Response, Uri, Version};
use mesh_spiffe::PeerIdentity;
use tokio::time::Instant;
use tower::Layer;
use tower_service::Service;

use crate::metrics::server::grpc_status;

pub use body::LoggedBody;
pub use future::ResponseFuture;

/// The `tracing` target of access-log events.
pub const TARGET: &str = "mesh_access";

/// Logs each request its [`AccessLog`] serves; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct AccessLogLayer {
    listener: Arc<str>,
    handle: AccessLogHandle,
}

impl AccessLogLayer {
    /// Logs every request as served by `listener` (a name for the log lines).
    pub fn new(listener: impl Into<Arc<str>>) -> Self {
        Self {
            listener: listener.into(),
            handle: AccessLogHandle(Arc::new(AtomicBool::new(true))),
        }
    }

    /// Logs nothing until enabled through its [`handle`](Self::handle).
    pub fn disabled(listener: impl Into<Arc<str>>) -> Self {
        let layer = Self::new(listener);
        layer.handle.set_enabled(false);
        layer
    }

    /// The switch of this layer and of every service it made.
    pub fn handle(&self) -> &AccessLogHandle {
        &self.handle
    }
}

impl<S> Layer<S> for AccessLogLayer {
    type Service = AccessLog<S>;

    fn layer(&self, inner: S) -> AccessLog<S> {
        AccessLog {
            inner,
            listener: self.listener.clone(),
            handle: self.handle.clone(),
        }
    }
}

/// Switches an [`AccessLogLayer`]'s logging on and off while it runs. Cheap to clone.
#[derive(Clone, Debug)]
pub struct AccessLogHandle(Arc<AtomicBool>);

impl AccessLogHandle {
    /// Logs the requests that arrive from now on, or stops.
    pub fn set_enabled(&self, enabled: bool) {
        self.0.store(enabled, Ordering::Relaxed);
    }

    /// Whether requests arriving now are logged.
    pub fn is_enabled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Logs each request `S` serves; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct AccessLog<S> {
    inner: S,
    listener: Arc<str>,
    handle: AccessLogHandle,
}

impl<S> AccessLog<S> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The wrapped service, unwrapped.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B, RB> Service<Request<B>> for AccessLog<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    RB: http_body::Body,
{
    type Response = Response<LoggedBody<RB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let entry = self
            .handle
            .is_enabled()
            .then(|| Box::new(Entry::new(&self.listener, &req)));
        ResponseFuture::new(self.inner.call(req), entry)
    }
}

/// The access log of a layer that already wraps each request's future and body, so that
/// logging costs it no layer of its own: `MeshServer`'s inbound metrics log through one
/// (a layer more is one more move of every request's future and response: 2–3% of the
/// proxy's CPU per request, measured, for a log that is usually off).
#[derive(Clone, Debug)]
pub(crate) struct Recorder {
    listener: Arc<str>,
    handle: AccessLogHandle,
}

impl AccessLogLayer {
    /// This layer's log, for a layer that logs for it.
    #[cfg(feature = "server")]
    pub(crate) fn recorder(&self) -> Recorder {
        Recorder {
            listener: self.listener.clone(),
            handle: self.handle.clone(),
        }
    }
}

impl Recorder {
    /// The entry of `req`, when the log is on.
    pub(crate) fn start<B>(&self, req: &Request<B>) -> Option<Box<Entry>> {
        self.handle
            .is_enabled()
            .then(|| Box::new(Entry::new(&self.listener, req)))
    }
}

/// What is known of one request, then of its answer, until its line is written.
#[derive(Debug)]
pub(crate) struct Entry {
    listener: Arc<str>,
    start: Instant,
    method: Method,
    uri: Uri,
    version: Version,
    host: Option<HeaderValue>,
    user_agent: Option<HeaderValue>,
    client_addr: Option<SocketAddr>,
    client_id: Option<PeerIdentity>,
    server_id: Option<PeerIdentity>,
    status: Option<u16>,
    grpc_status: Option<u16>,
    response_bytes: u64,
}

/// How a request ended, for its line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Complete,
    BodyError,
    BodyDropped,
    Error,
    Cancelled,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Complete => "complete",
            Outcome::BodyError => "body_error",
            Outcome::BodyDropped => "body_dropped",
            Outcome::Error => "error",
            Outcome::Cancelled => "cancelled",
        }
    }
}

impl Entry {
    fn new<B>(listener: &Arc<str>, req: &Request<B>) -> Self {
        let headers = req.headers();
        #[cfg(feature = "server")]
        let client_addr = req
            .extensions()
            .get::<crate::server::ClientAddr>()
            .map(|a| a.0);
        #[cfg(not(feature = "server"))]
        let client_addr = None;
        Self {
            listener: listener.clone(),
            start: Instant::now(),
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            host: headers.get(http::header::HOST).cloned(),
            user_agent: headers.get(http::header::USER_AGENT).cloned(),
            client_addr,
            client_id: req.extensions().get::<PeerIdentity>().cloned(),
            server_id: None,
            status: None,
            grpc_status: None,
            response_bytes: 0,
        }
    }

    /// Notes the response's head.
    fn respond<B>(&mut self, resp: &Response<B>) {
        self.status = Some(resp.status().as_u16());
        self.server_id = resp.extensions().get::<PeerIdentity>().cloned();
        if let Some(code) = grpc_status(resp.headers()) {
            self.grpc_status = Some(code);
        }
    }

    /// Notes a frame of the response body; whether it ends the body (trailers do:
    /// servers poll no further).
    fn frame<D: bytes::Buf>(&mut self, frame: &http_body::Frame<D>) -> bool {
        if let Some(data) = frame.data_ref() {
            self.response_bytes += data.remaining() as u64;
            return false;
        }
        if let Some(trailers) = frame.trailers_ref() {
            if let Some(code) = grpc_status(trailers) {
                self.grpc_status = Some(code);
            }
            return true;
        }
        false
    }

    /// Whether the response has no body to send, whatever its body holds: an answer to
    /// `HEAD`, or a 1xx, 204 or 304 (RFC 9110 §6.4.1); the server drops such a body
    /// unread, which is the response's end, not an abandoned one.
    fn bodiless(&self) -> bool {
        self.method == Method::HEAD
            || self
                .status
                .is_some_and(|s| (100..200).contains(&s) || s == 204 || s == 304)
    }

    /// Writes the line. What the client chose (the target, `Host`, `User-Agent`) is
    /// passed as text, which the formatter quotes and escapes (`fmt`) or encodes (JSON):
    /// a client cannot forge fields or lines with spaces or quotes of its own.
    pub(crate) fn emit(&self, outcome: Outcome) {
        let duration_us = u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX);
        let whole;
        let uri = match self.uri.path_and_query() {
            Some(pq) => pq.as_str(),
            None => {
                whole = self.uri.to_string();
                &whole
            }
        };
        let host = match (&self.host, self.uri.authority()) {
            (Some(h), _) => String::from_utf8_lossy(h.as_bytes()),
            (None, Some(a)) => std::borrow::Cow::Borrowed(a.as_str()),
            (None, None) => std::borrow::Cow::Borrowed("-"),
        };
        let user_agent = match &self.user_agent {
            Some(ua) => String::from_utf8_lossy(ua.as_bytes()),
            None => std::borrow::Cow::Borrowed("-"),
        };
        let (uri, host, user_agent) = (capped(uri), capped(&host), capped(&user_agent));
        tracing::info!(
            target: TARGET,
            listener = %self.listener,
            client.addr = %Dash(self.client_addr.as_ref().map(|a| a as &dyn fmt::Display)),
            client.id = %Dash(self.client_id.as_ref().map(|p| p.id() as &dyn fmt::Display)),
            server.id = %Dash(self.server_id.as_ref().map(|p| p.id() as &dyn fmt::Display)),
            method = %self.method,
            uri = &*uri,
            version = ?self.version,
            host = &*host,
            user_agent = &*user_agent,
            status = %Dash(self.status.as_ref().map(|s| s as &dyn fmt::Display)),
            grpc.status = %Dash(self.grpc_status.as_ref().map(|s| s as &dyn fmt::Display)),
            response_bytes = self.response_bytes,
            duration_us,
            outcome = outcome.as_str(),
            "request"
        );
    }
}

/// Notes a service's answer in `entry`, and writes the line at once when nothing more
/// will come: an error, or a response with no body to send.
pub(crate) fn answered<B, E>(entry: &mut Option<Box<Entry>>, result: &Result<Response<B>, E>) {
    let Some(e) = entry.as_mut() else {
        return;
    };
    let outcome = match result {
        Ok(resp) => {
            e.respond(resp);
            e.bodiless().then_some(Outcome::Complete)
        }
        Err(_) => Some(Outcome::Error),
    };
    if let Some(outcome) = outcome
        && let Some(e) = entry.take()
    {
        e.emit(outcome);
    }
}

/// Notes what a poll of the response body gave, and writes the line when the body ended
/// (`ended`: whether the body says it has, after a data frame).
pub(crate) fn polled<D: bytes::Buf, E>(
    entry: &mut Option<Box<Entry>>,
    frame: &Option<Result<http_body::Frame<D>, E>>,
    ended: impl FnOnce() -> bool,
) {
    let Some(e) = entry.as_mut() else {
        return;
    };
    let outcome = match frame {
        Some(Ok(frame)) => (e.frame(frame) || ended()).then_some(Outcome::Complete),
        Some(Err(_)) => Some(Outcome::BodyError),
        None => Some(Outcome::Complete),
    };
    if let Some(outcome) = outcome
        && let Some(e) = entry.take()
    {
        e.emit(outcome);
    }
}

/// The longest text a client chose that a line carries, in bytes; past it, the start and
/// `…`: a client cannot make each of its requests a 64 KiB log line.
const MAX_FIELD: usize = 1024;

/// `text`, cut to [`MAX_FIELD`] bytes at a character boundary.
fn capped(text: &str) -> std::borrow::Cow<'_, str> {
    if text.len() <= MAX_FIELD {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut end = MAX_FIELD;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!("{}…", &text[..end]))
}

/// A value, or `-` when there is none.
struct Dash<'a>(Option<&'a dyn fmt::Display>);

impl fmt::Display for Dash<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(v) => v.fmt(f),
            None => f.write_str("-"),
        }
    }
}

#[cfg(test)]
mod tests;
