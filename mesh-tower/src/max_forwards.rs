//! `Max-Forwards` at a proxy (RFC 9110 §7.6.2): how many more intermediaries a `TRACE`
//! or `OPTIONS` request may pass, so that a client can probe, or stop a loop at, any
//! hop of the chain.
//!
//! [`MaxForwards`] looks only at `TRACE` and `OPTIONS` requests (every other method goes
//! by untouched; the check is one comparison of the method). When such a request carries
//! `Max-Forwards`:
//!
//! - **zero**: the request is not forwarded. The proxy answers it as the final recipient:
//!   an `OPTIONS` with `200` and no content; a `TRACE` with `200` and the request it
//!   received as `message/http` content (RFC 9110 §9.3.8), less the fields that may carry
//!   credentials (`Authorization`, `Proxy-Authorization`, `Cookie`), which the RFC asks a
//!   recipient to leave out;
//! - **more than zero**: it goes on with the value decremented, as a single field (a value
//!   past 64 bits counts as the largest that fits, the "maximum supported value" of the
//!   RFC).
//!
//! With several fields the smallest counts. A value that is not a decimal number is
//! ignored; with no valid value the request goes on unchanged, as with no field at all.
//!
//! **Refusing `TRACE`.** With [`MaxForwardsLayer::refuse_trace`], every `TRACE` is
//! answered `405 Method Not Allowed` (with an `Allow` field naming the methods that do go
//! on, and `x-mesh-error: true`), whatever its `Max-Forwards`, and goes no further.
//! mesh-proxy refuses it on edge listeners, whose clients are outside the mesh: a caller
//! there could otherwise send `TRACE` with `Max-Forwards: 1` and read back what the next
//! proxy received, mesh-internal fields included. nginx refuses `TRACE` the same way.
//!
//! In the mesh each proxy is a hop: a request from an application through its outbound
//! proxy and the peer's inbound proxy takes two. The layer sits above each proxy's routing
//! and forwarding (mesh-proxy puts it on every HTTP listener), and is usable alone in any
//! `ServiceBuilder`:
//!
//! ```
//! use http::{Method, Request, Response};
//! use mesh_tower::max_forwards::MaxForwardsLayer;
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let proxy = ServiceBuilder::new()
//!     .layer(MaxForwardsLayer::new())
//!     .service_fn(|req: Request<String>| async move {
//!         // The next hop sees one fewer.
//!         let left = req.headers()["max-forwards"].to_str().unwrap().to_owned();
//!         Ok::<_, std::convert::Infallible>(Response::new(left))
//!     });
//! let probe = |n: &str| {
//!     Request::builder()
//!         .method(Method::OPTIONS)
//!         .uri("*")
//!         .header("max-forwards", n)
//!         .body(String::new())
//!         .unwrap()
//! };
//! let next = proxy.clone().oneshot(probe("3")).await.unwrap();
//! assert!(!next.body().is_local());
//! // Zero: this hop answers.
//! let here = proxy.oneshot(probe("0")).await.unwrap();
//! assert_eq!(here.status(), 200);
//! assert!(here.body().is_local());
//! # }
//! ```

use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::{Method, Request, Response};
use tower::Layer;
use tower_service::Service;

use crate::body::{ResponseBody, ResponseFuture};

/// Applies [`MaxForwards`].
#[derive(Clone, Copy, Debug, Default)]
pub struct MaxForwardsLayer {
    refuse_trace: bool,
}

impl MaxForwardsLayer {
    /// The layer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Answers every `TRACE` with `405`, neither reflected nor forwarded (see the [module
    /// docs](self)). Off by default.
    pub fn refuse_trace(mut self) -> Self {
        self.refuse_trace = true;
        self
    }
}

impl<S> Layer<S> for MaxForwardsLayer {
    type Service = MaxForwards<S>;

    fn layer(&self, inner: S) -> MaxForwards<S> {
        MaxForwards {
            inner,
            refuse_trace: self.refuse_trace,
        }
    }
}

/// Honours `Max-Forwards` on `TRACE` and `OPTIONS` requests; see the [module
/// docs](self).
#[derive(Clone, Debug)]
pub struct MaxForwards<S> {
    inner: S,
    refuse_trace: bool,
}

impl<S> MaxForwards<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S, B, RB> Service<Request<B>> for MaxForwards<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
{
    type Response = Response<ResponseBody<RB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, RB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let method = req.method();
        if self.refuse_trace && *method == Method::TRACE {
            return ResponseFuture::local(refusal());
        }
        if (*method == Method::OPTIONS || *method == Method::TRACE)
            && let Some(left) = req
                .headers()
                .get_all(header::MAX_FORWARDS)
                .iter()
                .filter_map(|v| parse(v.as_bytes()))
                .min()
        {
            if left == 0 {
                return ResponseFuture::local(answer(&req));
            }
            req.headers_mut()
                .insert(header::MAX_FORWARDS, HeaderValue::from(left - 1));
        }
        ResponseFuture::inner(self.inner.call(req))
    }
}

/// A `Max-Forwards` value: `1*DIGIT`, saturating at `u64::MAX`.
fn parse(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |n, &b| {
        b.is_ascii_digit()
            .then(|| n.saturating_mul(10).saturating_add(u64::from(b - b'0')))
    })
}

/// The answer of the final recipient: `200` to an `OPTIONS`, and to a `TRACE` its request
/// as `message/http`.
fn answer<B, RB>(req: &Request<B>) -> Response<ResponseBody<RB>> {
    if req.method() != Method::TRACE {
        let mut response = Response::new(ResponseBody::empty());
        response
            .headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(0));
        return response;
    }
    let message = reflect(req);
    let length = message.len();
    let mut response = Response::new(ResponseBody::local(message));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("message/http"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    response
}

/// The methods a listener that refuses `TRACE` still forwards, for the `Allow` field its
/// `405` must carry (RFC 9110 §15.5.6): every method of RFC 9110 and `PATCH` but `TRACE`
/// (extension methods go on too).
const ALLOWED: HeaderValue =
    HeaderValue::from_static("GET, HEAD, POST, PUT, DELETE, CONNECT, OPTIONS, PATCH");

/// The answer to a refused `TRACE`.
fn refusal<RB>() -> Response<ResponseBody<RB>> {
    const WHY: &str = "TRACE is not served on this listener\n";
    let mut response = Response::new(ResponseBody::local(Bytes::from_static(WHY.as_bytes())));
    *response.status_mut() = http::StatusCode::METHOD_NOT_ALLOWED;
    let headers = response.headers_mut();
    headers.insert(header::ALLOW, ALLOWED);
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(WHY.len()));
    headers.insert(crate::body::MESH_ERROR, HeaderValue::from_static("true"));
    response
}

/// The request head as received (HTTP/1.1 syntax), without fields that may carry
/// credentials.
fn reflect<B>(req: &Request<B>) -> Bytes {
    let mut out = BytesMut::with_capacity(256);
    out.put_slice(req.method().as_str().as_bytes());
    out.put_u8(b' ');
    match req.uri().path_and_query() {
        Some(target) => out.put_slice(target.as_str().as_bytes()),
        None => out.put_u8(b'*'),
    }
    out.put_slice(match req.version() {
        http::Version::HTTP_10 => b" HTTP/1.0\r\n",
        _ => b" HTTP/1.1\r\n",
    });
    if !req.headers().contains_key(header::HOST)
        && let Some(authority) = req.uri().authority()
    {
        out.put_slice(b"host: ");
        out.put_slice(authority.as_str().as_bytes());
        out.put_slice(b"\r\n");
    }
    for (name, value) in req.headers() {
        if *name == header::AUTHORIZATION
            || *name == header::PROXY_AUTHORIZATION
            || *name == header::COOKIE
        {
            continue;
        }
        out.put_slice(name.as_str().as_bytes());
        out.put_slice(b": ");
        out.put_slice(value.as_bytes());
        out.put_slice(b"\r\n");
    }
    out.put_slice(b"\r\n");
    out.freeze()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use http::StatusCode;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    /// What reached the next hop: its `Max-Forwards` fields, or `None` when the layer
    /// answered.
    async fn through(
        method: Method,
        fields: &[&'static str],
    ) -> Result<Vec<String>, Response<ResponseBody<String>>> {
        let next = tower::service_fn(|req: Request<()>| async move {
            let seen: Vec<String> = req
                .headers()
                .get_all(header::MAX_FORWARDS)
                .iter()
                .map(|v| v.to_str().unwrap().to_owned())
                .collect();
            Ok::<_, std::convert::Infallible>(Response::new(seen.join(",")))
        });
        let mut req = Request::builder()
            .method(method)
            .uri("http://users.example/a?b=1");
        for field in fields {
            req = req.header(header::MAX_FORWARDS, *field);
        }
        let resp = MaxForwardsLayer::new()
            .layer(next)
            .oneshot(req.body(()).unwrap())
            .await
            .unwrap();
        if resp.body().is_local() {
            return Err(resp);
        }
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8(body.to_vec()).unwrap();
        Ok(text
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect())
    }

    #[tokio::test]
    async fn trace_and_options_count_down_and_stop_at_zero() {
        for method in [Method::OPTIONS, Method::TRACE] {
            assert_eq!(through(method.clone(), &["5"]).await.unwrap(), ["4"]);
            assert_eq!(through(method.clone(), &["1"]).await.unwrap(), ["0"]);
            // The smallest of several fields counts; one value goes on.
            assert_eq!(through(method.clone(), &["9", "2"]).await.unwrap(), ["1"]);
            assert_eq!(through(method.clone(), &["x", "4"]).await.unwrap(), ["3"]);
            // Past 64 bits: the largest value that fits.
            for huge in ["18446744073709551615", "99999999999999999999999"] {
                assert_eq!(
                    through(method.clone(), &[huge]).await.unwrap(),
                    ["18446744073709551614"]
                );
            }
            // Not a number: left as it is.
            for odd in ["", "-1", "1.5", " 3", "0x10"] {
                assert_eq!(
                    through(method.clone(), &[odd]).await.unwrap(),
                    [odd]
                        .iter()
                        .filter(|s| !s.is_empty())
                        .map(|s| s.to_string())
                        .collect::<Vec<_>>(),
                    "{odd:?}"
                );
            }
            assert!(through(method.clone(), &[]).await.unwrap().is_empty());
            let answered = through(method.clone(), &["0"]).await.unwrap_err();
            assert_eq!(answered.status(), StatusCode::OK, "{method}");
        }
        // Other methods go by untouched, whatever the value.
        for method in [Method::GET, Method::POST, Method::DELETE] {
            assert_eq!(through(method.clone(), &["0"]).await.unwrap(), ["0"]);
            assert_eq!(through(method, &["3"]).await.unwrap(), ["3"]);
        }
    }

    #[tokio::test]
    async fn the_last_hop_answers_options_empty_and_reflects_trace_without_credentials() {
        let next = tower::service_fn(|_req: Request<()>| async move {
            Ok::<_, std::convert::Infallible>(Response::new(String::from("forwarded")))
        });
        let layer = MaxForwardsLayer::new();
        let options = Request::options("*")
            .header(header::MAX_FORWARDS, "0")
            .header(header::HOST, "users.example")
            .body(())
            .unwrap();
        let resp = layer.layer(next).oneshot(options).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()[header::CONTENT_LENGTH], "0");
        assert!(
            resp.into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .is_empty()
        );

        let trace = Request::builder()
            .method(Method::TRACE)
            .uri("http://users.example/probe?x=1")
            .header(header::MAX_FORWARDS, "0")
            .header("x-request-id", "abc")
            .header(header::AUTHORIZATION, "Bearer secret")
            .header(header::COOKIE, "session=secret")
            .header(header::PROXY_AUTHORIZATION, "Basic secret")
            .body(())
            .unwrap();
        let resp = layer.layer(next).oneshot(trace).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "message/http");
        let length: usize = resp.headers()[header::CONTENT_LENGTH]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body.len(), length);
        assert_eq!(
            body,
            "TRACE /probe?x=1 HTTP/1.1\r\nhost: users.example\r\nmax-forwards: 0\r\nx-request-id: abc\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn a_listener_that_refuses_trace_answers_405_whatever_the_count() {
        let forwarded = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = forwarded.clone();
        let next = tower::service_fn(move |_req: Request<()>| {
            seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            async move { Ok::<_, std::convert::Infallible>(Response::new(String::new())) }
        });
        let svc = MaxForwardsLayer::new().refuse_trace().layer(next);
        let request = |method: Method, count: Option<&'static str>| {
            let mut req = Request::builder()
                .method(method)
                .uri("http://users.example/probe");
            if let Some(count) = count {
                req = req.header(header::MAX_FORWARDS, count);
            }
            req.body(()).unwrap()
        };
        for count in [None, Some("0"), Some("1"), Some("70")] {
            let resp = svc
                .clone()
                .oneshot(request(Method::TRACE, count))
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED, "{count:?}");
            let allow = resp.headers()[header::ALLOW].to_str().unwrap().to_owned();
            assert!(
                allow.contains("GET") && allow.contains("OPTIONS"),
                "{allow}"
            );
            assert!(!allow.contains("TRACE"), "{allow}");
            assert_eq!(resp.headers()[crate::body::MESH_ERROR], "true");
            let length = resp.headers()[header::CONTENT_LENGTH].clone();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(length, body.len().to_string().as_str());
            assert_eq!(body, "TRACE is not served on this listener\n");
        }
        assert_eq!(forwarded.load(std::sync::atomic::Ordering::Relaxed), 0);
        // OPTIONS and other methods are as without it.
        let resp = svc
            .clone()
            .oneshot(request(Method::OPTIONS, Some("0")))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(resp.body().is_local());
        for method in [Method::OPTIONS, Method::GET] {
            let resp = svc
                .clone()
                .oneshot(request(method, Some("3")))
                .await
                .unwrap();
            assert!(!resp.body().is_local());
        }
        assert_eq!(forwarded.load(std::sync::atomic::Ordering::Relaxed), 2);
    }
}
