//! Forwarding requests as a proxy: to a local application, and between mesh proxies.
//!
//! - [`strip_hop_by_hop`]: the connection-specific header fields a proxy must not pass
//!   on (RFC 9110 §7.6.1, and HTTP/2 forbids them outright, RFC 9113 §8.2.2):
//!   `Connection` and every field it names (but `Host`, `Content-Length`, `Trailer` and
//!   `TE`, which the next hop needs whatever a sender says), `Keep-Alive`, `Proxy-Connection`,
//!   `Transfer-Encoding` (and a `Content-Length` beside it, RFC 9112 §6.3), `Upgrade`,
//!   and `TE`, which goes on as exactly `trailers` when any of its fields lists that. An
//!   HTTP/1.1 request that asks to switch protocols, and its `101`, keep `Upgrade` and
//!   `Connection: upgrade` on an HTTP/1.1 hop ([`crate::upgrade`]). Requests lose them on
//!   every hop, and so do answers: an application's ([`Forward`]) and a service's
//!   ([`AnswerErrors`]).
//! - **Upgrades across the mesh.** [`ToMesh`] sends an HTTP/1.1 `GET` that asks to switch
//!   (one protocol: WebSocket, say) as an HTTP/2 extended CONNECT (RFC 8441) with the
//!   protocol as `:protocol`; the peer's [`Forward`] restores the `GET` with `Upgrade` for
//!   the application and answers its `101` with `200`, which the client's proxy's
//!   [`Tunnel`](crate::upgrade::Tunnel) turns back into a `101`.
//! - **Between proxies, HTTP/2 always.** [`ToMeshLayer`] sends an HTTP/1.x request to a
//!   peer proxy as HTTP/2, marked with [`ORIG_PROTO`] (`mesh-orig-proto: HTTP/1.1`), so
//!   that many HTTP/1.1 connections from an application share one multiplexed mTLS
//!   connection between the proxies (as linkerd's `l5d-orig-proto` does); the peer's
//!   [`Forward`] restores the request to its version before it reaches the application.
//! - [`Forward`]: the inbound proxy's last hop, to the local application at one address:
//!   HTTP/1.1 over a connection pool, or HTTP/2 (gRPC) over one connection, as the
//!   request came (or as [`ORIG_PROTO`] says it came). It always overwrites the
//!   identity header (default [`DEFAULT_IDENTITY_HEADER`]) with the peer's verified
//!   SPIFFE ID, or removes it when there is none, so the application cannot be fooled by
//!   a client that sends one (nor by one spelled with `_` for any `-`, which CGI, WSGI
//!   and FastCGI servers take for the same header, nor by one sent as a trailer:
//!   [`NoIdentityTrailers`]). An application that is down is answered 502 (connection
//!   refused or reset) or 504 (connect timeout), with the reason in a text body (gRPC:
//!   trailers-only `UNAVAILABLE`), never a hang.
//! - [`AnswerErrorsLayer`]: an outbound proxy's answer when the client stack fails a
//!   request — 503 when the service has no (ready) endpoint, 504 when its timeout or
//!   deadline passed, 502 otherwise — with the cause in a text body, or a trailers-only
//!   `UNAVAILABLE` / `DEADLINE_EXCEEDED` for gRPC: the application always gets an answer.

use std::fmt;
use std::net::SocketAddr;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use mesh_core::error::BoxError;
use tower::Layer;
use tower_service::Service;

use crate::body::{ResponseBody, grpc_answer, text_answer};
use crate::connect::{self, ConnectSettings, EndpointClient};
use mesh_core::config::Protocol;

/// The header that carries an HTTP/1.x request's version across an HTTP/2 hop between
/// proxies.
pub const ORIG_PROTO: HeaderName = HeaderName::from_static("mesh-orig-proto");

/// The header [`Forward`] puts the peer's SPIFFE ID in, unless told another.
pub const DEFAULT_IDENTITY_HEADER: HeaderName = HeaderName::from_static("x-mesh-client-id");

/// Removes the connection-specific fields from `headers` (see the [module docs](self)).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none of these: one pass over the few names present (standard
    // names compare as enum tags) is cheaper than a hashed lookup for each.
    if !headers.keys().any(is_connection_specific) {
        return;
    }
    // Read before `Connection` may name it away.
    let framed = headers.contains_key(header::TRANSFER_ENCODING);
    // Fields named by `Connection` are connection-specific too (split as bytes: a value
    // with other bytes beside the names still names them), except those the next hop
    // needs whatever a sender says: `Host` (named, it would be dropped after the
    // request was checked and routed by it, and the application given its own address
    // instead), the body's `Content-Length` and `Trailer`, and `TE`, which RFC 9110
    // §10.1.4 has every sender of it name, and which is handled below.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .filter_map(|name| HeaderName::from_bytes(name.trim_ascii()).ok())
        .filter(|name| {
            ![
                header::HOST,
                header::CONTENT_LENGTH,
                header::TRAILER,
                header::TE,
            ]
            .contains(name)
        })
        .collect();
    for name in named {
        headers.remove(name);
    }
    // A message framed by `Transfer-Encoding` keeps a `Content-Length` only by mistake (or
    // to smuggle): RFC 9112 §6.3 has an intermediary remove it before forwarding, or the
    // next hop would frame the body by it. Also when `Connection` names
    // `Transfer-Encoding` (found by the `request_head` fuzz target).
    if framed {
        headers.remove(header::CONTENT_LENGTH);
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
    // `TE` goes on as exactly `trailers` when any of its fields lists it, else not at all:
    // HTTP/2 allows no other value (RFC 9113 §8.2.2), and a peer resets a stream that
    // carries one, counting it against the connection every client of that peer shares.
    let mut te = headers.get_all(header::TE).iter();
    match (te.next(), te.next()) {
        (None, _) => {}
        // Exactly: hyper's HTTP/2 client passes on `trailers` only in lower case.
        (Some(only), None) if only.as_bytes() == b"trailers" => {}
        _ => {
            let trailers = headers.get_all(header::TE).iter().any(|v| {
                v.as_bytes()
                    .split(|&b| b == b',')
                    .any(|m| m.trim_ascii().eq_ignore_ascii_case(b"trailers"))
            });
            headers.remove(header::TE);
            if trailers {
                headers.insert(header::TE, HeaderValue::from_static("trailers"));
            }
        }
    }
}

/// [`strip_hop_by_hop`] on an HTTP/1.1 message, but keeping `Upgrade` and `Connection:
/// upgrade` when it asks to switch protocols (a request) or switches (a `101`); see
/// [`crate::upgrade`]. Returns the protocol when it kept them.
#[inline]
pub(crate) fn strip_keeping_upgrade(headers: &mut HeaderMap) -> Option<HeaderValue> {
    // Most requests carry none: the look stays in the caller, the work out of line.
    if !headers.keys().any(is_connection_specific) {
        return None;
    }
    strip_found_keeping_upgrade(headers)
}

/// [`strip_keeping_upgrade`] once a connection-specific field is seen.
#[inline(never)]
fn strip_found_keeping_upgrade(headers: &mut HeaderMap) -> Option<HeaderValue> {
    let upgrade = crate::upgrade::requested(headers);
    strip_hop_by_hop(headers);
    if let Some(protocol) = &upgrade {
        crate::upgrade::set_upgrade_fields(headers, protocol.clone());
    }
    upgrade
}

/// [`strip_hop_by_hop`] on an answer, but a `101` keeps its `Upgrade` and `Connection:
/// upgrade`.
fn strip_answer<B>(resp: &mut Response<B>) {
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        strip_keeping_upgrade(resp.headers_mut());
    } else {
        strip_hop_by_hop(resp.headers_mut());
    }
}

/// Whether `name` is one of the fields [`strip_hop_by_hop`] may remove (`TE` included,
/// which it keeps when it is exactly `trailers`).
fn is_connection_specific(name: &HeaderName) -> bool {
    // One look at the name: its length rules out nearly every field a request carries.
    let name = name.as_str();
    matches!(name.len(), 2 | 7 | 10 | 16 | 17)
        && matches!(
            name,
            "te" | "upgrade"
                | "connection"
                | "keep-alive"
                | "proxy-connection"
                | "transfer-encoding"
        )
}

/// Sends requests to a peer proxy as HTTP/2; see the [module docs](self).
#[derive(Clone, Copy, Debug)]
pub struct ToMeshLayer {
    enabled: bool,
}

impl Default for ToMeshLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl ToMeshLayer {
    /// The layer.
    pub fn new() -> Self {
        Self { enabled: true }
    }

    /// A layer that only strips connection-specific headers and leaves the version as it
    /// is: for a service that is not a mesh proxy (plaintext, or any HTTP/1.1 server), so
    /// that stacks toward both kinds share one type.
    pub fn passthrough() -> Self {
        Self { enabled: false }
    }
}

impl<S> Layer<S> for ToMeshLayer {
    type Service = ToMesh<S>;

    fn layer(&self, inner: S) -> ToMesh<S> {
        ToMesh {
            inner,
            enabled: self.enabled,
        }
    }
}

/// Sends requests to a peer proxy as HTTP/2; see [`ToMeshLayer`].
#[derive(Clone, Debug)]
pub struct ToMesh<S> {
    inner: S,
    enabled: bool,
}

impl<S, B> Service<Request<B>> for ToMesh<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> S::Future {
        let upgrade = if req.version() == Version::HTTP_11 {
            strip_keeping_upgrade(req.headers_mut())
        } else {
            strip_hop_by_hop(req.headers_mut());
            None
        };
        if !self.enabled {
            return self.inner.call(req);
        }
        let orig = match req.version() {
            Version::HTTP_10 => Some("HTTP/1.0"),
            Version::HTTP_11 | Version::HTTP_09 => Some("HTTP/1.1"),
            _ => None,
        };
        req.headers_mut().remove(ORIG_PROTO);
        // An upgrade crosses as an extended CONNECT (RFC 8441), `GET` only: see
        // `crate::upgrade`. Any other crosses as an ordinary request.
        // The peer's `200` comes back as it is, with the switched stream's `OnUpgrade`:
        // `crate::upgrade::Tunnel` answers the client's `101`.
        if let Some(protocol) = upgrade {
            req.headers_mut().remove(header::CONNECTION);
            req.headers_mut().remove(header::UPGRADE);
            // `:protocol` is one token (RFC 8441); a list of choices crosses as an
            // ordinary request.
            if req.method() == http::Method::GET
                && let Ok(name) = protocol.to_str()
                && !name.contains(',')
            {
                req.extensions_mut()
                    .insert(hyper::ext::Protocol::from(name));
                *req.method_mut() = http::Method::CONNECT;
            }
        }
        if let Some(orig) = orig {
            req.headers_mut()
                .insert(ORIG_PROTO, HeaderValue::from_static(orig));
            // `Host` travels as `:authority` (the URI's) in HTTP/2. One that is no
            // authority goes on as it came, as the connection passes it on (dropped, the
            // application would be given the endpoint's address in its place).
            let moved = req.uri().authority().is_some()
                || req
                    .headers()
                    .get(header::HOST)
                    .cloned()
                    .is_some_and(|host| with_authority(&mut req, &host));
            if moved {
                req.headers_mut().remove(header::HOST);
            }
            *req.version_mut() = Version::HTTP_2;
        }
        self.inner.call(req)
    }
}

/// Gives an origin-form request the authority `host` (its `Host` header), so that the
/// name the caller used survives a hop where only the URI carries it; false, the request
/// untouched, when `host` is no authority.
fn with_authority<B>(req: &mut Request<B>, host: &HeaderValue) -> bool {
    let Ok(authority) = http::uri::Authority::try_from(host.as_bytes()) else {
        return false;
    };
    let mut parts = req.uri().clone().into_parts();
    parts.scheme = Some(http::uri::Scheme::HTTP);
    parts.authority = Some(authority);
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    match http::Uri::from_parts(parts) {
        Ok(uri) => {
            *req.uri_mut() = uri;
            true
        }
        Err(_) => false,
    }
}

/// The inbound proxy's hop to the local application; see the [module docs](self).
pub struct Forward<B> {
    http1: EndpointClient<NoIdentityTrailers<B>>,
    http2: EndpointClient<NoIdentityTrailers<B>>,
    identity_header: HeaderName,
    target: SocketAddr,
}

pin_project_lite::pin_project! {
    /// A request body on its way to the application through [`Forward`]: its trailers
    /// lose the identity header, in every spelling, as its head does. Only the proxy says
    /// who the peer is; a client's trailer must not (HTTP/2 trailers are passed on, and
    /// HTTP/1.1 ones the client lists in `Trailer`).
    pub struct NoIdentityTrailers<B> {
        #[pin]
        inner: B,
        // `None` for a request without a body: nothing to watch.
        identity: Option<HeaderName>,
    }
}

impl<B> fmt::Debug for NoIdentityTrailers<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NoIdentityTrailers").finish_non_exhaustive()
    }
}

impl<B> http_body::Body for NoIdentityTrailers<B>
where
    B: http_body::Body,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let mut frame = std::task::ready!(this.inner.poll_frame(cx));
        if let (Some(name), Some(Ok(frame))) = (this.identity.as_ref(), frame.as_mut())
            && let Some(trailers) = frame.trailers_mut()
        {
            remove_every_spelling(trailers, name);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Removes `name` from `headers`, and every field spelled as `name` with `_` for any of
/// its `-` (`x_mesh_client_id`, `x-mesh_client-id`): CGI, WSGI and FastCGI servers map
/// them all to the same variable (`HTTP_X_MESH_CLIENT_ID`).
fn remove_every_spelling(headers: &mut HeaderMap, name: &HeaderName) {
    headers.remove(name);
    let want = name.as_str().as_bytes();
    if !want.contains(&b'-') {
        return;
    }
    let aliases: Vec<HeaderName> = headers
        .keys()
        .filter(|k| {
            let k = k.as_str().as_bytes();
            k.len() == want.len()
                && k.contains(&b'_')
                && k.iter()
                    .zip(want)
                    .all(|(&a, &b)| a == b || (a == b'_' && b == b'-'))
        })
        .cloned()
        .collect();
    for alias in aliases {
        headers.remove(alias);
    }
}

impl<B> Clone for Forward<B> {
    fn clone(&self) -> Self {
        Self {
            http1: self.http1.clone(),
            http2: self.http2.clone(),
            identity_header: self.identity_header.clone(),
            target: self.target,
        }
    }
}

impl<B> fmt::Debug for Forward<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Forward")
            .field("target", &self.target)
            .field("identity_header", &self.identity_header)
            .finish_non_exhaustive()
    }
}

impl<B> Forward<B>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    /// Forwards to the application at `target` (plaintext, on the same host), putting the
    /// peer's identity in [`DEFAULT_IDENTITY_HEADER`].
    pub fn new(target: SocketAddr) -> Self {
        let settings = |protocol| ConnectSettings {
            protocol,
            ..ConnectSettings::plaintext()
        };
        Self {
            http1: EndpointClient::new(target, settings(Protocol::Http1)),
            http2: EndpointClient::new(target, settings(Protocol::Http2)),
            identity_header: DEFAULT_IDENTITY_HEADER,
            target,
        }
    }

    /// Puts the peer's identity in `name` instead.
    pub fn identity_header(mut self, name: HeaderName) -> Self {
        self.identity_header = name;
        self
    }

    /// How the HTTP/1.1 pool to the application stands (connections open, requests
    /// waiting, requests refused), for metrics.
    pub fn pool_status(&self) -> connect::PoolStatus {
        self.http1.pool_status()
    }

    /// Bounds the HTTP/1.1 connections to the application (default
    /// [`PoolConfig::default`](mesh_core::config::PoolConfig::default): 1,024 connections,
    /// 1,024 requests waiting, 90 s idle, 60 s for a stalled request body; see
    /// [`crate::connect`]). A request that finds the pool full and the line too is answered
    /// 503 (gRPC: `UNAVAILABLE`).
    pub fn pool(mut self, config: mesh_core::config::PoolConfig) -> Self {
        let settings = ConnectSettings {
            protocol: Protocol::Http1,
            pool: config,
            ..ConnectSettings::plaintext()
        };
        self.http1 = EndpointClient::new(self.target, settings);
        self
    }
}

impl<B> Service<Request<B>> for Forward<B>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<connect::Body<NoIdentityTrailers<B>>>>;
    type Error = std::convert::Infallible;
    type Future = ForwardFuture<B>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness of the application is awaited per request (connect, back-off).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let grpc = mesh_core::classify::is_grpc(req.headers());
        // Only a peer proxy's HTTP/2 request says what it came as: on an HTTP/1.x request
        // the header is a client's own, and goes.
        let orig = req
            .headers_mut()
            .remove(ORIG_PROTO)
            .filter(|_| req.version() == Version::HTTP_2);
        // An HTTP/1.1 upgrade that crossed the mesh as an extended CONNECT goes back to
        // `GET` with `Upgrade` (see `crate::upgrade`).
        let tunnelled = if orig.is_some() && req.method() == http::Method::CONNECT {
            req.extensions_mut()
                .remove::<hyper::ext::Protocol>()
                .and_then(|p| HeaderValue::from_str(p.as_str()).ok())
        } else {
            None
        };
        let tunnelled = match tunnelled {
            Some(protocol) => {
                strip_hop_by_hop(req.headers_mut());
                crate::upgrade::set_upgrade_fields(req.headers_mut(), protocol);
                *req.method_mut() = http::Method::GET;
                true
            }
            None if req.version() == Version::HTTP_11 => {
                strip_keeping_upgrade(req.headers_mut());
                false
            }
            None => {
                strip_hop_by_hop(req.headers_mut());
                false
            }
        };
        let identity = req
            .extensions()
            .get::<mesh_spiffe::PeerIdentity>()
            .and_then(|p| HeaderValue::from_str(&p.to_string()).ok());
        let headers = req.headers_mut();
        remove_every_spelling(headers, &self.identity_header);
        if let Some(id) = identity {
            headers.insert(self.identity_header.clone(), id);
        }
        let http1 = match orig.as_ref().map(HeaderValue::as_bytes) {
            // HTTP/1.0 frames a request body by its length only: one of unknown length
            // (it lost its `Content-Length` on the way) goes as HTTP/1.1, chunked, rather
            // than be sent empty.
            Some(b"HTTP/1.0")
                if req.body().is_end_stream() || req.body().size_hint().exact().is_some() =>
            {
                *req.version_mut() = Version::HTTP_10;
                true
            }
            Some(_) => {
                *req.version_mut() = Version::HTTP_11;
                true
            }
            None => req.version() < Version::HTTP_2,
        };
        if http1 && req.headers().get(header::HOST).is_none() {
            // From `:authority`: the application sees the name the caller used.
            if let Some(host) = req
                .uri()
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            {
                req.headers_mut().insert(header::HOST, host);
            }
        }
        let client = if http1 { &self.http1 } else { &self.http2 };
        // Trailers come only after a body: a request that has none needs no watch.
        let watch = (!req.body().is_end_stream()).then(|| self.identity_header.clone());
        let req = req.map(|inner| NoIdentityTrailers {
            inner,
            identity: watch,
        });
        ForwardFuture {
            inner: client.send(req),
            target: self.target,
            grpc,
            tunnelled,
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of a [`Forward`].
    pub struct ForwardFuture<B> {
        #[pin]
        inner: connect::ResponseFuture<NoIdentityTrailers<B>>,
        target: SocketAddr,
        grpc: bool,
        tunnelled: bool,
    }
}

impl<B> fmt::Debug for ForwardFuture<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ForwardFuture")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl<B> std::future::Future for ForwardFuture<B>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    type Output = Result<
        Response<ResponseBody<connect::Body<NoIdentityTrailers<B>>>>,
        std::convert::Infallible,
    >;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.inner.poll(cx));
        Poll::Ready(Ok(match result {
            Ok(mut resp) if *this.tunnelled => {
                // The client's proxy waits for a successful CONNECT: `2xx` means switched.
                if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                    *resp.status_mut() = StatusCode::OK;
                    *resp.version_mut() = Version::HTTP_2;
                } else if resp.status().is_success() {
                    tracing::info!(target = %this.target, status = %resp.status(), "the application answered an upgrade without switching: answered 502");
                    return Poll::Ready(Ok(text_answer(
                        StatusCode::BAD_GATEWAY,
                        format!(
                            "the application answered the upgrade with {} without switching protocols\n",
                            resp.status()
                        ),
                    )));
                }
                strip_hop_by_hop(resp.headers_mut());
                resp.headers_mut().remove(crate::body::MESH_ERROR);
                resp.map(ResponseBody::inner)
            }
            Ok(mut resp) => {
                strip_answer(&mut resp);
                // Only the mesh marks its own answers: an application's mark (a gateway
                // copying a mesh answer's fields, say) would have a 429 of its own taken
                // for a limiter's, which no application saw, and retried.
                resp.headers_mut().remove(crate::body::MESH_ERROR);
                resp.map(ResponseBody::inner)
            }
            Err(e) => {
                let error = &e as &(dyn std::error::Error + 'static);
                let timeout = mesh_core::error::find_cause::<connect::ConnectError>(error)
                    .is_some_and(|c| matches!(c, connect::ConnectError::Timeout { .. }));
                // The request's own failure (a stalled body) and a full pool are not the
                // application's: each gets its own status, and the reason.
                let (status, code, what) = if connect::is_request_error(error) {
                    let (status, code, _) = status_of(error);
                    (status, code, "the request failed")
                } else if connect::is_pool_overflow(error) {
                    let not_sent = "the request was not sent to the application";
                    (StatusCode::SERVICE_UNAVAILABLE, 14, not_sent)
                } else if timeout {
                    let silent = "the application did not answer";
                    (StatusCode::GATEWAY_TIMEOUT, 14, silent)
                } else {
                    (
                        StatusCode::BAD_GATEWAY,
                        14,
                        "the application did not answer",
                    )
                };
                tracing::warn!(target = %this.target, error = %e, "{what}");
                if *this.grpc {
                    grpc_answer(code, what)
                } else {
                    text_answer(status, format!("{what} at {}: {e}\n", this.target))
                }
            }
        }))
    }
}

/// Answers the requests a service failed; see the [module docs](self).
///
/// By default an answer's body is the error's whole message: which service, which
/// endpoints, why (a refused connect, an ejection, a timeout), for the local application
/// and whoever debugs it. [`brief`](Self::brief) answers with the status's reason alone,
/// for listeners that face clients outside the mesh, who should not learn the mesh's
/// addresses and internal errors; the whole message is then logged, at `info` once a
/// second and at `debug` otherwise. Brief layers also make answers marked
/// [`MESH_ERROR`](crate::body::MESH_ERROR) brief: a peer proxy's, say.
#[derive(Clone, Copy, Debug, Default)]
pub struct AnswerErrorsLayer {
    brief: bool,
}

impl AnswerErrorsLayer {
    /// The layer, answering with the error's whole message.
    pub fn new() -> Self {
        Self::default()
    }

    /// The layer, answering with the status's reason alone (`service unavailable`,
    /// `gateway timeout`, `bad gateway`).
    pub fn brief() -> Self {
        Self { brief: true }
    }
}

impl<S> Layer<S> for AnswerErrorsLayer {
    type Service = AnswerErrors<S>;

    fn layer(&self, inner: S) -> AnswerErrors<S> {
        AnswerErrors {
            inner,
            brief: self.brief,
        }
    }
}

/// Answers the requests a service failed; see [`AnswerErrorsLayer`].
#[derive(Clone, Debug)]
pub struct AnswerErrors<S> {
    inner: S,
    brief: bool,
}

impl<S, B, RB> Service<Request<B>> for AnswerErrors<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<RB>>;
    type Error = std::convert::Infallible;
    type Future = AnswerErrorsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // A service that cannot become ready fails each request instead.
        match self.inner.poll_ready(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(_) => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        AnswerErrorsFuture {
            grpc: mesh_core::classify::is_grpc(req.headers()),
            brief: self.brief,
            inner: self.inner.call(req),
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of an [`AnswerErrors`].
    #[derive(Debug)]
    pub struct AnswerErrorsFuture<F> {
        #[pin]
        inner: F,
        grpc: bool,
        brief: bool,
    }
}

impl<F, RB, E> std::future::Future for AnswerErrorsFuture<F>
where
    F: std::future::Future<Output = Result<Response<RB>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<ResponseBody<RB>>, std::convert::Infallible>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.inner.poll(cx));
        Poll::Ready(Ok(match result {
            // An answer the mesh made further on (a peer proxy's, say) names what it could
            // not reach: brief listeners keep only its status.
            Ok(resp)
                if *this.brief
                    && resp.headers().contains_key(crate::body::MESH_ERROR)
                    && !mesh_core::classify::is_grpc(resp.headers()) =>
            {
                let status = resp.status();
                if brief_log_due() {
                    tracing::info!(%status, "a mesh error answer from further on, made brief (more within a second at debug)");
                } else {
                    tracing::debug!(%status, "a mesh error answer from further on, made brief");
                }
                let mut brief = brief_answer(status);
                // When to come back is for the client: a peer limiter's 429 (or a 503)
                // keeps its `Retry-After` and RateLimit fields; they name nothing inside.
                for name in KEPT_IN_BRIEF {
                    for value in resp.headers().get_all(&name) {
                        brief.headers_mut().append(name.clone(), value.clone());
                    }
                }
                brief
            }
            Ok(mut resp) => {
                // A plaintext HTTP/1.1 service's connection-specific fields are its own.
                strip_answer(&mut resp);
                resp.map(ResponseBody::inner)
            }
            Err(e) => {
                let e: BoxError = e.into();
                let (status, code, message) = status_of(e.as_ref());
                // A brief answer hides the cause from the client: the log keeps it, at
                // info once a second (an outage must not flood it), else at debug.
                if *this.brief && brief_log_due() {
                    tracing::info!(error = %e, %status, "answering a failed request briefly (more within a second at debug)");
                } else {
                    tracing::debug!(error = %e, %status, "answering a failed request");
                }
                if *this.grpc {
                    grpc_answer(code, message)
                } else if *this.brief {
                    brief_answer(status)
                } else {
                    text_answer(status, format!("{e}\n"))
                }
            }
        }))
    }
}

/// Whether a brief answer's cause goes to the log at info now (once a second), rather
/// than at debug.
fn brief_log_due() -> bool {
    static BRIEF: crate::throttle::Throttle = crate::throttle::Throttle::new();
    BRIEF.due().is_some()
}

/// The fields of a mesh error answer from further on that a brief answer keeps.
const KEPT_IN_BRIEF: [http::header::HeaderName; 3] = [
    http::header::RETRY_AFTER,
    http::header::HeaderName::from_static("ratelimit"),
    http::header::HeaderName::from_static("ratelimit-policy"),
];

/// `status` with its reason alone for a body (`service unavailable`).
fn brief_answer<B>(status: StatusCode) -> Response<ResponseBody<B>> {
    let reason = status.canonical_reason().unwrap_or("error");
    text_answer(status, format!("{}\n", reason.to_ascii_lowercase()))
}

/// The HTTP status, gRPC code and gRPC message (which names no address or error) for a
/// failed request.
fn status_of(e: &(dyn std::error::Error + 'static)) -> (StatusCode, u16, &'static str) {
    use mesh_core::error::is_caused_by;
    if is_caused_by::<connect::BodyReadTimeout>(e) {
        // The client's body stalled: a 408 (gRPC: CANCELLED).
        return (StatusCode::REQUEST_TIMEOUT, 1, "the request body stalled");
    }
    if is_caused_by::<connect::GrpcOverHttp1>(e) {
        // Not sent: the service's settings cannot carry gRPC.
        return (
            StatusCode::BAD_GATEWAY,
            13,
            "gRPC needs HTTP/2, and the service is reached over HTTP/1.1: set its protocol = \"grpc\"",
        );
    }
    if connect::is_pool_overflow(e) {
        // Not sent: every connection to the endpoint was busy, and the line full.
        return (StatusCode::SERVICE_UNAVAILABLE, 14, "unavailable");
    }
    if is_caused_by::<crate::timeout::RequestTimeout>(e)
        || is_caused_by::<crate::timeout::DeadlineExceeded>(e)
    {
        return (StatusCode::GATEWAY_TIMEOUT, 4, "deadline exceeded");
    }
    #[cfg(feature = "balance")]
    if is_caused_by::<crate::balance::error::NoEndpoints>(e)
        || is_caused_by::<crate::balance::error::NoReadyEndpoints>(e)
    {
        return (StatusCode::SERVICE_UNAVAILABLE, 14, "unavailable");
    }
    (StatusCode::BAD_GATEWAY, 14, "unavailable")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    #[test]
    fn connection_specific_fields_are_stripped_and_te_trailers_kept() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive, x-secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        h.insert("proxy-connection", "close".parse().unwrap());
        h.insert(header::TE, "trailers".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        let mut names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["te", "x-kept"]);
        // Framed by Transfer-Encoding: a Content-Length beside it goes too.
        let mut framed = HeaderMap::new();
        framed.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        framed.insert(header::CONTENT_LENGTH, "5".parse().unwrap());
        strip_hop_by_hop(&mut framed);
        assert!(framed.is_empty(), "{framed:?}");
        // Also when Connection names Transfer-Encoding.
        let mut framed = HeaderMap::new();
        framed.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        framed.insert(header::CONTENT_LENGTH, "5".parse().unwrap());
        framed.insert(header::CONNECTION, "transfer-encoding".parse().unwrap());
        strip_hop_by_hop(&mut framed);
        assert!(framed.is_empty(), "{framed:?}");
        let mut plain = HeaderMap::new();
        plain.insert(header::CONTENT_LENGTH, "5".parse().unwrap());
        plain.insert(header::CONNECTION, "close".parse().unwrap());
        strip_hop_by_hop(&mut plain);
        assert_eq!(plain.len(), 1, "a Content-Length alone stays");
        h.insert(header::TE, "gzip".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert!(h.get(header::TE).is_none(), "TE other than trailers goes");
    }

    /// Every `TE` field counts, not only the first: `TE: trailers` beside `TE: gzip` (or
    /// `TE: gzip, trailers`) leaves exactly `trailers`, the one value HTTP/2 allows, so a
    /// peer's HTTP/2 server never resets the stream for it.
    #[test]
    fn te_fields_are_all_read_and_only_trailers_goes_on() {
        for fields in [
            &["trailers", "gzip"][..],
            &["gzip", "trailers"],
            &["gzip, TRAILERS"],
            &["deflate", "gzip;q=0.5 , trailers"],
        ] {
            let mut h = HeaderMap::new();
            for f in fields {
                h.append(header::TE, f.parse().unwrap());
            }
            strip_hop_by_hop(&mut h);
            let te: Vec<_> = h.get_all(header::TE).iter().collect();
            assert_eq!(te, ["trailers"], "{fields:?}");
        }
        for fields in [&["gzip", "deflate"][..], &["gzip, chunked"]] {
            let mut h = HeaderMap::new();
            for f in fields {
                h.append(header::TE, f.parse().unwrap());
            }
            strip_hop_by_hop(&mut h);
            assert!(h.get(header::TE).is_none(), "{fields:?}");
        }
        // A `Connection` value with bytes beyond ASCII still names its fields.
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_bytes(b"x-secret, \xe9t\xe9").unwrap(),
        );
        h.insert("x-secret", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty(), "{h:?}");
    }

    /// `Connection` cannot remove what the next hop needs: `Host` (else the application
    /// would get its own address for it), the body's `Content-Length` and `Trailer`, and
    /// `TE`, which every sender of it names there (RFC 9110 §10.1.4) and which goes on
    /// as `trailers` in lower case, the only spelling hyper's HTTP/2 client passes on.
    #[test]
    fn connection_cannot_name_away_host_length_trailer_or_te() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            "host, content-length, trailer, te, x-gone".parse().unwrap(),
        );
        h.insert(header::HOST, "app.example".parse().unwrap());
        h.insert(header::CONTENT_LENGTH, "5".parse().unwrap());
        h.insert(header::TRAILER, "x-checksum".parse().unwrap());
        h.insert(header::TE, "Trailers".parse().unwrap());
        h.insert("x-gone", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        let mut kept: Vec<String> = h
            .iter()
            .map(|(n, v)| format!("{n}={}", v.to_str().unwrap()))
            .collect();
        kept.sort_unstable();
        assert_eq!(
            kept,
            [
                "content-length=5",
                "host=app.example",
                "te=trailers",
                "trailer=x-checksum"
            ]
        );
    }

    /// A client naming `Host` in `Connection` does not get the application's own address
    /// put in its place.
    #[tokio::test]
    async fn the_application_sees_the_host_a_client_named_in_connection() {
        use http_body_util::{BodyExt, Full};
        let target = reporting_app(|req| async move {
            req.headers()
                .get(header::HOST)
                .map_or("none".to_owned(), |h| h.to_str().unwrap().to_owned())
        })
        .await;
        let forward = Forward::<Full<Bytes>>::new(target);
        let req = Request::get("/")
            .version(Version::HTTP_11)
            .header(header::HOST, "app.example")
            .header(header::CONNECTION, "host")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = forward.oneshot(req).await.unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "app.example");
    }

    /// An application cannot mark its answer as the mesh's own (`x-mesh-error`): a 429
    /// of its own would be taken for a mesh limiter's, which no application saw, and
    /// retried whatever its method.
    #[tokio::test]
    async fn an_applications_mesh_error_mark_is_removed() {
        use http_body_util::{BodyExt, Full};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let app = hyper::service::service_fn(|_req| async {
                let mut resp = Response::new(Full::new(Bytes::from_static(b"slow down")));
                *resp.status_mut() = StatusCode::TOO_MANY_REQUESTS;
                resp.headers_mut()
                    .insert(crate::body::MESH_ERROR, HeaderValue::from_static("true"));
                Ok::<_, std::convert::Infallible>(resp)
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), app)
                .await;
        });
        let forward = Forward::<Full<Bytes>>::new(target);
        let req = Request::post("/order")
            .version(Version::HTTP_11)
            .header(header::HOST, "app")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = forward.oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(resp.headers().get(crate::body::MESH_ERROR).is_none());
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "slow down");
    }

    /// `mesh-orig-proto` is a peer proxy's word only on HTTP/2: a client's HTTP/1.1
    /// request carrying it goes on as HTTP/1.1. And a request that came as HTTP/1.0 but
    /// lost its length on the way goes as HTTP/1.1, its body whole, not empty.
    #[tokio::test]
    async fn orig_proto_is_a_peers_word_and_never_empties_a_body() {
        use http_body_util::{BodyExt, StreamBody};
        for (version, body_known, seen) in [
            (Version::HTTP_11, true, "HTTP/1.1 hello"),
            (Version::HTTP_2, true, "HTTP/1.0 hello"),
            (Version::HTTP_2, false, "HTTP/1.1 hello"),
        ] {
            let target = reporting_app(|req| async move {
                let version = format!("{:?}", req.version());
                let body = req.into_body().collect().await.unwrap().to_bytes();
                format!("{version} {}", String::from_utf8_lossy(&body))
            })
            .await;
            type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, std::convert::Infallible>;
            let forward = Forward::<Body>::new(target);
            let body = if body_known {
                http_body_util::Full::new(Bytes::from_static(b"hello")).boxed_unsync()
            } else {
                let chunks = futures_util::stream::iter([Ok::<_, std::convert::Infallible>(
                    http_body::Frame::data(Bytes::from_static(b"hello")),
                )]);
                StreamBody::new(chunks).boxed_unsync()
            };
            let req = Request::post("http://app/")
                .version(version)
                .header(header::HOST, "app")
                .header(ORIG_PROTO, "HTTP/1.0")
                .body(body)
                .unwrap();
            let resp = forward.oneshot(req).await.unwrap();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, seen, "{version:?}, length known: {body_known}");
        }
    }

    /// An HTTP/1.1 application on loopback for one connection, answering each request
    /// with what `report` says of it.
    async fn reporting_app<F, Fut>(report: F) -> SocketAddr
    where
        F: Fn(Request<hyper::body::Incoming>) -> Fut + Send + Copy + 'static,
        Fut: std::future::Future<Output = String> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let app = hyper::service::service_fn(move |req| async move {
                let seen = report(req).await;
                Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(
                    Bytes::from(seen),
                )))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), app)
                .await;
        });
        target
    }

    /// The application behind [`Forward`] never sees a client's own identity header,
    /// in either spelling, whatever its case or number.
    #[tokio::test]
    async fn a_clients_identity_header_never_reaches_the_application() {
        use http_body_util::{BodyExt, Full};
        let target = reporting_app(|req| async move {
            let seen: Vec<String> = req
                .headers()
                .iter()
                .filter(|(name, _)| name.as_str().contains("client"))
                .map(|(name, value)| format!("{name}={}", value.to_str().unwrap()))
                .collect();
            seen.join(" ")
        })
        .await;
        let forward = Forward::<Full<Bytes>>::new(target)
            .identity_header(HeaderName::from_static("x-client-id"));
        let req = Request::get("/")
            .version(Version::HTTP_11)
            .header(header::HOST, "app")
            .header("X-Client-Id", "spiffe://example.org/spoofed")
            .header("x-client-id", "spiffe://example.org/again")
            .header("x_client_id", "spiffe://example.org/underscored")
            .header("X_Client_ID", "spiffe://example.org/shouting")
            .header("x-client_id", "spiffe://example.org/mixed")
            .header("X_Client-Id", "spiffe://example.org/mixed-again")
            .header("x_client_idx", "kept too")
            .header("x-client-idx", "kept")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = forward.oneshot(req).await.unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "x-client-idx=kept x_client_idx=kept too");
    }

    /// Nor as a trailer: the application sees the client's other trailers, not that one.
    #[tokio::test]
    async fn a_clients_identity_trailer_never_reaches_the_application() {
        use http_body_util::{BodyExt, StreamBody};
        let target = reporting_app(|req| async move {
            let collected = req.into_body().collect().await.unwrap();
            let mut seen: Vec<String> = collected
                .trailers()
                .map(|t| t.keys().map(|k| k.as_str().to_owned()).collect())
                .unwrap_or_default();
            seen.sort();
            seen.join(" ")
        })
        .await;
        type Frames = StreamBody<
            futures_util::stream::Iter<
                std::vec::IntoIter<Result<http_body::Frame<Bytes>, std::convert::Infallible>>,
            >,
        >;
        let forward = Forward::<Frames>::new(target);
        let mut trailers = HeaderMap::new();
        trailers.insert(
            "x-mesh-client-id",
            "spiffe://example.org/spoofed".parse().unwrap(),
        );
        trailers.insert(
            "x_mesh_client_id",
            "spiffe://example.org/again".parse().unwrap(),
        );
        trailers.insert("x-checksum", "abc".parse().unwrap());
        let body = StreamBody::new(futures_util::stream::iter(vec![
            Ok(http_body::Frame::data(Bytes::from_static(b"data"))),
            Ok(http_body::Frame::trailers(trailers)),
        ]));
        let req = Request::post("/upload")
            .version(Version::HTTP_11)
            .header(header::HOST, "app")
            .header(
                header::TRAILER,
                "x-mesh-client-id, x_mesh_client_id, x-checksum",
            )
            .body(body)
            .unwrap();
        let resp = forward.oneshot(req).await.unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "x-checksum");
    }

    /// A client's body that stalls past the pool's `body_read_timeout` is answered 408
    /// (the request's doing, not a 502 blaming the application), and an HTTP/2 client's
    /// `TE: trailers` reaches an HTTP/1.1 application named in `Connection`.
    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_is_answered_408_and_te_is_named_in_connection() {
        use http_body_util::BodyExt;
        let target = reporting_app(|req| async move {
            let named = |name| {
                req.headers()
                    .get_all(name)
                    .iter()
                    .map(|v| v.to_str().unwrap())
                    .collect::<Vec<_>>()
                    .join(",")
            };
            let seen = format!(
                "te={} connection={}",
                named(header::TE),
                named(header::CONNECTION)
            );
            let _ = req.into_body().collect().await;
            seen
        })
        .await;
        let pool = mesh_core::config::PoolConfig {
            body_read_timeout: std::time::Duration::from_secs(5),
            ..Default::default()
        };
        let forward = Forward::<BoxBody>::new(target).pool(pool);
        let whole = Request::post("/a")
            .version(Version::HTTP_2)
            .header(header::TE, "trailers")
            .header(ORIG_PROTO, "HTTP/1.1")
            .body(http_body_util::Full::new(Bytes::from_static(b"x")).boxed_unsync())
            .unwrap();
        let resp = forward.clone().oneshot(whole).await.unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "te=trailers connection=te");
        let stalled = http_body_util::StreamBody::new(futures_util::stream::pending::<
            Result<http_body::Frame<Bytes>, std::convert::Infallible>,
        >());
        let req = Request::post("/upload")
            .version(Version::HTTP_11)
            .header(header::HOST, "app")
            .header(header::CONTENT_LENGTH, "10")
            .body(stalled.boxed_unsync())
            .unwrap();
        let resp = forward.oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::REQUEST_TIMEOUT);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&body);
        assert!(
            text.contains("the request body sent nothing for 5s"),
            "{text}"
        );
    }

    type BoxBody = http_body_util::combinators::UnsyncBoxBody<Bytes, std::convert::Infallible>;

    /// The request `layer`'s service hands on, for `req`.
    async fn sent_through(layer: ToMeshLayer, req: Request<()>) -> Request<()> {
        let seen = tower::service_fn(|req: Request<()>| async move {
            Ok::<_, std::convert::Infallible>(Response::new(req))
        });
        layer.layer(seen).oneshot(req).await.unwrap().into_body()
    }

    #[tokio::test]
    async fn http1_requests_go_to_peers_as_http2_with_their_version_and_host() {
        let req = Request::get("/users?id=7")
            .version(Version::HTTP_11)
            .header(header::HOST, "users.example.org:8080")
            .header(header::CONNECTION, "close")
            .body(())
            .unwrap();
        let sent = sent_through(ToMeshLayer::new(), req).await;
        assert_eq!(sent.version(), Version::HTTP_2);
        assert_eq!(sent.headers()[ORIG_PROTO], "HTTP/1.1");
        assert_eq!(sent.uri(), "http://users.example.org:8080/users?id=7");
        assert!(sent.headers().get(header::HOST).is_none());
        assert!(sent.headers().get(header::CONNECTION).is_none());

        // A Host that is no authority (an empty one, or one the server would have
        // refused) cannot become the URI's: it goes on as it came, not dropped.
        for host in ["", "caf%C3%A9.example"] {
            let req = Request::get("/users")
                .version(Version::HTTP_11)
                .header(header::HOST, host)
                .body(())
                .unwrap();
            let sent = sent_through(ToMeshLayer::new(), req).await;
            assert_eq!(sent.version(), Version::HTTP_2);
            assert_eq!(sent.uri(), "/users", "{host:?}");
            assert_eq!(sent.headers()[header::HOST], host);
        }
        // An absolute-form request's authority is the URI's: its Host goes.
        let req = Request::get("http://users.example.org/x")
            .version(Version::HTTP_11)
            .header(header::HOST, "other.example")
            .body(())
            .unwrap();
        let sent = sent_through(ToMeshLayer::new(), req).await;
        assert_eq!(sent.uri(), "http://users.example.org/x");
        assert!(sent.headers().get(header::HOST).is_none());

        // Passthrough: the version stays; connection-specific fields still go.
        let req = Request::get("/")
            .header(header::UPGRADE, "h2c")
            .body(())
            .unwrap();
        let sent = sent_through(ToMeshLayer::passthrough(), req).await;
        assert_eq!(sent.version(), Version::HTTP_11);
        assert!(sent.headers().get(ORIG_PROTO).is_none());
        assert!(sent.headers().get(header::UPGRADE).is_none());
    }

    /// `GET /chat` asking to switch to WebSocket, with a hop's own field beside.
    fn websocket_request(method: http::Method) -> Request<()> {
        Request::builder()
            .method(method)
            .uri("/chat")
            .header(header::HOST, "chat.example")
            .header(header::CONNECTION, "Upgrade, x-secret")
            .header("x-secret", "1")
            .header(header::UPGRADE, "websocket")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .body(())
            .unwrap()
    }

    #[tokio::test]
    async fn upgrades_cross_to_peers_as_extended_connect() {
        let sent = std::sync::Arc::new(std::sync::Mutex::new(None));
        let record = sent.clone();
        let peer = tower::service_fn(move |req: Request<()>| {
            let upgrade = req.method() == http::Method::CONNECT;
            *record.lock().unwrap() = Some(req);
            async move {
                // The peer's answer to a successful extended CONNECT.
                let status = if upgrade { 200 } else { 404 };
                Ok::<_, std::convert::Infallible>(
                    Response::builder().status(status).body(()).unwrap(),
                )
            }
        });
        let resp = ToMeshLayer::new()
            .layer(peer.clone())
            .oneshot(websocket_request(http::Method::GET))
            .await
            .unwrap();
        let req = sent.lock().unwrap().take().unwrap();
        assert_eq!(req.method(), http::Method::CONNECT);
        assert_eq!(req.version(), Version::HTTP_2);
        assert_eq!(
            req.extensions()
                .get::<hyper::ext::Protocol>()
                .map(|p| p.as_str()),
            Some("websocket")
        );
        assert_eq!(req.uri(), "http://chat.example/chat");
        assert_eq!(req.headers()[ORIG_PROTO], "HTTP/1.1");
        assert_eq!(
            req.headers()["sec-websocket-key"],
            "dGhlIHNhbXBsZSBub25jZQ=="
        );
        for gone in ["connection", "upgrade", "x-secret"] {
            assert!(req.headers().get(gone).is_none(), "{gone} crossed");
        }
        // The peer's answer comes back as it is (`Tunnel` answers the client's `101`).
        assert_eq!(resp.status(), StatusCode::OK);

        // Another method than GET has no HTTP/2 form: it crosses as an ordinary request.
        let resp = ToMeshLayer::new()
            .layer(peer.clone())
            .oneshot(websocket_request(http::Method::POST))
            .await
            .unwrap();
        let req = sent.lock().unwrap().take().unwrap();
        assert_eq!(req.method(), http::Method::POST);
        assert!(req.extensions().get::<hyper::ext::Protocol>().is_none());
        assert!(req.headers().get(header::UPGRADE).is_none());
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);

        // Passthrough (an HTTP/1.1 server): the upgrade's own fields stay, no others.
        ToMeshLayer::passthrough()
            .layer(peer)
            .oneshot(websocket_request(http::Method::GET))
            .await
            .unwrap();
        let req = sent.lock().unwrap().take().unwrap();
        assert_eq!(req.method(), http::Method::GET);
        assert_eq!(req.headers()[header::UPGRADE], "websocket");
        assert_eq!(req.headers()[header::CONNECTION], "upgrade");
        assert!(req.headers().get("x-secret").is_none());
    }

    /// A service's own connection-specific fields do not reach the outbound client; a
    /// `101`'s `Upgrade` and `Connection: upgrade` do.
    #[tokio::test]
    async fn answers_lose_the_services_connection_specific_fields() {
        let answering = |status: u16| {
            AnswerErrorsLayer::new().layer(tower::service_fn(move |_req: Request<()>| async move {
                Response::builder()
                    .status(status)
                    .header(header::CONNECTION, "keep-alive, x-hop")
                    .header("keep-alive", "timeout=5")
                    .header("x-hop", "1")
                    .header("proxy-connection", "keep-alive")
                    .header("x-end", "kept")
                    .body(())
                    .map_err(BoxError::from)
            }))
        };
        let resp = answering(200).oneshot(Request::new(())).await.unwrap();
        let names: Vec<&str> = resp.headers().keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["x-end"]);
        let switching =
            AnswerErrorsLayer::new().layer(tower::service_fn(|_req: Request<()>| async {
                Response::builder()
                    .status(101)
                    .header(header::CONNECTION, "upgrade")
                    .header(header::UPGRADE, "websocket")
                    .header("keep-alive", "timeout=5")
                    .body(())
                    .map_err(BoxError::from)
            }));
        let resp = switching.oneshot(Request::new(())).await.unwrap();
        assert_eq!(resp.headers()[header::UPGRADE], "websocket");
        assert_eq!(resp.headers()[header::CONNECTION], "upgrade");
        assert!(resp.headers().get("keep-alive").is_none());
    }

    #[tokio::test]
    async fn failed_requests_are_answered_with_the_status_their_cause_calls_for() {
        let failing = |e: fn() -> BoxError| {
            AnswerErrorsLayer::new().layer(tower::service_fn(move |_req: Request<()>| async move {
                Err::<Response<()>, BoxError>(e())
            }))
        };
        let timeout =
            failing(|| crate::timeout::RequestTimeout(std::time::Duration::from_secs(1)).into());
        let resp = timeout.oneshot(Request::new(())).await.unwrap();
        assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
        let other = failing(|| "connection reset".into());
        let resp = other.clone().oneshot(Request::new(())).await.unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
        let grpc = Request::post("/a.B/C")
            .header("content-type", "application/grpc")
            .body(())
            .unwrap();
        let resp = other.oneshot(grpc).await.unwrap();
        assert_eq!(resp.headers()["grpc-status"], "14");
        let stalled = failing(|| connect::BodyReadTimeout(connect::BODY_READ_TIMEOUT).into());
        let resp = stalled.oneshot(Request::new(())).await.unwrap();
        assert_eq!(resp.status(), StatusCode::REQUEST_TIMEOUT);
        assert!(!connect::is_request_error(&std::io::Error::other("reset")));
        let full = failing(|| {
            connect::PoolOverflow {
                addr: "10.0.0.7:8080".parse().unwrap(),
                connections: 2,
                pending: 0,
            }
            .into()
        });
        let resp = full.oneshot(Request::new(())).await.unwrap();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    /// A gRPC call's answer carries the code its cause calls for, and a message that says
    /// the same: a stalled request body is CANCELLED, not "unavailable".
    #[tokio::test]
    async fn failed_grpc_calls_are_answered_with_a_code_and_a_message_that_agree() {
        let failing = |e: fn() -> BoxError| {
            AnswerErrorsLayer::brief().layer(tower::service_fn(
                move |_req: Request<()>| async move { Err::<Response<()>, BoxError>(e()) },
            ))
        };
        let grpc = || {
            Request::post("/a.B/C")
                .header("content-type", "application/grpc")
                .body(())
                .unwrap()
        };
        for (error, code, message) in [
            (
                (|| connect::BodyReadTimeout(connect::BODY_READ_TIMEOUT).into())
                    as fn() -> BoxError,
                "1",
                "the request body stalled",
            ),
            (
                || crate::timeout::RequestTimeout(std::time::Duration::from_secs(1)).into(),
                "4",
                "deadline exceeded",
            ),
            (|| "connection reset".into(), "14", "unavailable"),
        ] {
            let resp = failing(error).oneshot(grpc()).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            assert_eq!(resp.headers()["grpc-status"], code);
            assert_eq!(resp.headers()["grpc-message"], message);
        }
    }

    #[tokio::test]
    async fn brief_answers_keep_the_mesh_internals_to_themselves() {
        use http_body_util::BodyExt;
        let failing = |layer: AnswerErrorsLayer| {
            layer.layer(tower::service_fn(|_req: Request<()>| async {
                Err::<Response<http_body_util::Empty<bytes::Bytes>>, BoxError>(
                    crate::balance::error::NoReadyEndpoints {
                        service: "users".into(),
                        endpoints: 1,
                        waited: std::time::Duration::from_secs(3),
                        causes: vec!["10.0.0.7:8080: ejected by its circuit breaker".into()],
                    }
                    .into(),
                )
            }))
        };
        let body = |resp: Response<ResponseBody<http_body_util::Empty<bytes::Bytes>>>| async move {
            assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            String::from_utf8(bytes.to_vec()).unwrap()
        };
        let detailed = failing(AnswerErrorsLayer::new());
        let text = body(detailed.oneshot(Request::new(())).await.unwrap()).await;
        assert!(text.contains("10.0.0.7:8080: ejected"), "{text}");
        let brief = failing(AnswerErrorsLayer::brief());
        let text = body(brief.oneshot(Request::new(())).await.unwrap()).await;
        assert_eq!(text, "service unavailable\n");
    }

    /// A peer limiter's 429, made brief at an edge listener, still tells the client when
    /// to come back; what else it said stays out.
    #[tokio::test]
    async fn brief_answers_keep_when_to_come_back() {
        let peer = AnswerErrorsLayer::brief().layer(tower::service_fn(|_req: Request<()>| async {
            let resp = Response::builder()
                .status(StatusCode::TOO_MANY_REQUESTS)
                .header(crate::body::MESH_ERROR, "true")
                .header(http::header::RETRY_AFTER, "2")
                .header("ratelimit", "\"client\";r=0;t=2")
                .header("ratelimit-policy", "\"client\";q=10;w=1")
                .header("x-mesh-detail", "10.0.0.7:4143")
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap();
            Ok::<_, BoxError>(resp)
        }));
        let resp = peer.oneshot(Request::new(())).await.unwrap();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        let headers = resp.headers();
        assert_eq!(headers[http::header::RETRY_AFTER], "2");
        assert_eq!(headers["ratelimit"], "\"client\";r=0;t=2");
        assert_eq!(headers["ratelimit-policy"], "\"client\";q=10;w=1");
        assert!(headers.get("x-mesh-detail").is_none());
    }
}
