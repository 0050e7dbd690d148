//! Access-log lines, captured by a subscriber of the test's own. Each scenario runs
//! through the layer and through the inbound metrics that write the server's log.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use tower::{Service, ServiceExt};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context as LayerContext, SubscriberExt};

use super::*;

/// The fields of each access-log event, as text.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<BTreeMap<String, String>>>>);

struct Fields(BTreeMap<String, String>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().to_string(), format!("{value:?}"));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
}

impl<S: Subscriber> tracing_subscriber::Layer<S> for Lines {
    fn on_event(&self, event: &Event<'_>, _cx: LayerContext<'_, S>) {
        if event.metadata().target() == TARGET {
            let mut fields = Fields(BTreeMap::new());
            event.record(&mut fields);
            self.0.lock().unwrap().push(fields.0);
        }
    }
}

impl Lines {
    fn take(&self) -> Vec<BTreeMap<String, String>> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

fn capture() -> (Lines, tracing::subscriber::DefaultGuard) {
    let lines = Lines::default();
    let subscriber = tracing_subscriber::registry().with(lines.clone());
    (lines, tracing::subscriber::set_default(subscriber))
}

fn ok_service(
    body: &'static str,
) -> impl Service<
    Request<Empty<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Full<Bytes>>, Infallible>>,
> + Clone {
    tower::service_fn(move |_req: Request<Empty<Bytes>>| async move {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
            body.as_bytes(),
        ))))
    })
}

/// A logged service, its body boxed so that both ways of logging compare.
type Logged = tower::util::BoxService<
    Request<Empty<Bytes>>,
    Response<http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>>,
    BoxError,
>;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// `make()`'s service logged as `listener`: by the layer, and by the inbound metrics
/// (`MeshServer`'s way), each with its switch.
fn both<S, RB>(listener: &str, make: impl Fn() -> S) -> Vec<(&'static str, Logged, AccessLogHandle)>
where
    S: Service<Request<Empty<Bytes>>, Response = Response<RB>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    RB: http_body::Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    fn boxed<B>(
        resp: Response<B>,
    ) -> Response<http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        resp.map(|b| b.map_err(Into::into).boxed_unsync())
    }
    let layer = AccessLogLayer::new(listener);
    #[allow(unused_mut)]
    let mut ways = vec![(
        "layer",
        Logged::new(layer.layer(make()).map_response(boxed).map_err(Into::into)),
        layer.handle().clone(),
    )];
    #[cfg(feature = "server")]
    {
        let layer = AccessLogLayer::new(listener);
        ways.push((
            "metrics",
            Logged::new(
                crate::metrics::server::InboundMetrics::disabled(make())
                    .with_access_log(layer.recorder())
                    .map_response(boxed)
                    .map_err(Into::into),
            ),
            layer.handle().clone(),
        ));
    }
    ways
}

/// `GET /`, with no body.
fn get() -> Request<Empty<Bytes>> {
    Request::get("/").body(Empty::new()).unwrap()
}

/// `svc`'s answer to `req`.
async fn call(
    svc: &mut Logged,
    req: Request<Empty<Bytes>>,
) -> Result<Response<http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>>, BoxError> {
    svc.ready().await?.call(req).await
}

#[tokio::test]
async fn a_request_is_logged_once_when_its_body_ends() {
    let (lines, _guard) = capture();
    for (way, mut svc, _) in both("public", || ok_service("hello")) {
        let mut req = Request::get("http://users.prod/a/b?c=d")
            .header("user-agent", "curl/8 \"quoted\" x=y")
            .body(Empty::new())
            .unwrap();
        #[cfg(feature = "server")]
        req.extensions_mut()
            .insert(crate::server::ClientAddr("10.0.0.9:4711".parse().unwrap()));
        req.headers_mut()
            .insert("host", http::HeaderValue::from_static("users.prod:80"));
        let resp = call(&mut svc, req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        // Nothing until the body ended.
        assert!(lines.take().is_empty(), "{way}");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "hello");
        let logged = lines.take();
        assert_eq!(logged.len(), 1, "{way}: {logged:?}");
        let line = &logged[0];
        assert_eq!(line["listener"], "public", "{way}");
        assert_eq!(line["method"], "GET");
        assert_eq!(line["uri"], "/a/b?c=d");
        assert_eq!(line["host"], "users.prod:80");
        assert_eq!(line["user_agent"], "curl/8 \"quoted\" x=y");
        assert_eq!(line["version"], "HTTP/1.1");
        assert_eq!(line["status"], "200");
        assert_eq!(line["grpc.status"], "-");
        assert_eq!(line["response_bytes"], "5", "{way}");
        assert_eq!(line["outcome"], "complete", "{way}");
        assert_eq!(line["client.id"], "-");
        assert_eq!(line["server.id"], "-");
        #[cfg(feature = "server")]
        assert_eq!(line["client.addr"], "10.0.0.9:4711");
        assert!(line["duration_us"].parse::<u64>().is_ok(), "{line:?}");
        assert_eq!(line["message"], "request");
    }
}

#[tokio::test]
async fn a_disabled_log_writes_nothing_until_switched_on() {
    let (lines, _guard) = capture();
    for (way, mut svc, handle) in both("quiet", || ok_service("x")) {
        handle.set_enabled(false);
        let resp = call(&mut svc, get()).await.unwrap();
        resp.into_body().collect().await.unwrap();
        assert!(lines.take().is_empty(), "{way}");
        assert!(!handle.is_enabled());
        handle.set_enabled(true);
        let resp = call(&mut svc, get()).await.unwrap();
        resp.into_body().collect().await.unwrap();
        let logged = lines.take();
        assert_eq!(logged.len(), 1, "{way}");
        // No Host and a relative URI: the host is unknown.
        assert_eq!(logged[0]["host"], "-");
        assert_eq!(logged[0]["uri"], "/");
    }
    assert!(!AccessLogLayer::disabled("off").handle().is_enabled());
}

#[tokio::test]
async fn an_empty_body_is_logged_at_once_and_a_dropped_one_when_dropped() {
    let (lines, _guard) = capture();
    let empty = || {
        tower::service_fn(|_req: Request<Empty<Bytes>>| async {
            Ok::<_, Infallible>(
                Response::builder()
                    .status(StatusCode::NO_CONTENT)
                    .body(Empty::<Bytes>::new())
                    .unwrap(),
            )
        })
    };
    for (way, mut svc, _) in both("l", empty) {
        let resp = call(&mut svc, get()).await.unwrap();
        let logged = lines.take();
        assert_eq!(logged.len(), 1, "{way}");
        assert_eq!(
            (logged[0]["status"].as_str(), logged[0]["outcome"].as_str()),
            ("204", "complete")
        );
        drop(resp);
        assert!(lines.take().is_empty(), "{way}: logged once only");
    }
    for (way, mut svc, _) in both("l", || ok_service("unread")) {
        let resp = call(&mut svc, get()).await.unwrap();
        drop(resp);
        let logged = lines.take();
        assert_eq!(logged.len(), 1, "{way}");
        assert_eq!(
            (
                logged[0]["outcome"].as_str(),
                logged[0]["response_bytes"].as_str()
            ),
            ("body_dropped", "0"),
            "{way}"
        );
    }
}

#[tokio::test]
async fn errors_and_cancelled_requests_are_logged_without_a_status() {
    let (lines, _guard) = capture();
    let failing = || {
        tower::service_fn(|_req: Request<Empty<Bytes>>| async {
            Err::<Response<Empty<Bytes>>, _>("refused")
        })
    };
    for (way, mut svc, _) in both("l", failing) {
        let err = call(&mut svc, get()).await;
        assert!(err.is_err());
        let logged = lines.take();
        assert_eq!(logged.len(), 1, "{way}");
        assert_eq!(
            (logged[0]["status"].as_str(), logged[0]["outcome"].as_str()),
            ("-", "error"),
            "{way}"
        );
    }
    let hanging = || {
        tower::service_fn(|_req: Request<Empty<Bytes>>| {
            std::future::pending::<Result<Response<Empty<Bytes>>, Infallible>>()
        })
    };
    for (way, mut svc, _) in both("l", hanging) {
        let fut = svc.ready().await.unwrap().call(get());
        drop(fut);
        let logged = lines.take();
        assert_eq!(logged.len(), 1, "{way}");
        assert_eq!(
            (logged[0]["status"].as_str(), logged[0]["outcome"].as_str()),
            ("-", "cancelled"),
            "{way}"
        );
    }
}

#[tokio::test]
async fn a_grpc_status_is_read_from_trailers() {
    let (lines, _guard) = capture();
    let grpc = || {
        tower::service_fn(|_req: Request<Empty<Bytes>>| async {
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static("14"));
            let body = http_body_util::StreamBody::new(futures_util::stream::iter([
                Ok::<_, Infallible>(http_body::Frame::data(Bytes::from_static(b"\0\0\0\0\0"))),
                Ok(http_body::Frame::trailers(trailers)),
            ]));
            Ok::<_, Infallible>(Response::new(body))
        })
    };
    for (way, mut svc, _) in both("grpc", grpc) {
        let req = Request::post("/echo.Echo/Say")
            .version(http::Version::HTTP_2)
            .body(Empty::new())
            .unwrap();
        let resp = call(&mut svc, req).await.unwrap();
        resp.into_body().collect().await.unwrap();
        let logged = lines.take();
        assert_eq!(logged.len(), 1, "{way}");
        let line = &logged[0];
        assert_eq!(line["grpc.status"], "14", "{way}");
        assert_eq!(line["response_bytes"], "5");
        assert_eq!(line["version"], "HTTP/2.0");
        assert_eq!(line["method"], "POST");
        assert_eq!(line["outcome"], "complete", "{way}");
    }
}

/// A `grpc-status` is read as gRPC clients and the metrics read it: a code outside 0–16,
/// or a value that is no plain number (`+5`, which `u16::from_str` would take), is
/// UNKNOWN (2).
#[tokio::test]
async fn a_grpc_status_is_read_as_the_metrics_read_it() {
    let (lines, _guard) = capture();
    for (sent, logged) in [
        ("14", "14"),
        ("007", "7"),
        ("+5", "2"),
        ("99", "2"),
        ("4294967296", "2"),
        ("12345678901", "2"),
        ("x", "2"),
        ("", "2"),
    ] {
        let answer = move || {
            tower::service_fn(move |_req: Request<Empty<Bytes>>| async move {
                let mut resp = Response::new(Empty::<Bytes>::new());
                resp.headers_mut()
                    .insert("grpc-status", http::HeaderValue::from_static(sent));
                Ok::<_, Infallible>(resp)
            })
        };
        for (way, mut svc, _) in both("grpc", answer) {
            let req = Request::post("/echo.Echo/Say")
                .version(http::Version::HTTP_2)
                .header("content-type", "application/grpc")
                .body(Empty::new())
                .unwrap();
            let resp = call(&mut svc, req).await.unwrap();
            resp.into_body().collect().await.unwrap();
            let line = lines.take();
            assert_eq!(line.len(), 1, "{way} {sent:?}");
            assert_eq!(line[0]["grpc.status"], logged, "{way} {sent:?}");
        }
    }
}

#[tokio::test]
async fn trailers_end_a_body_and_bodiless_answers_are_complete() {
    let (lines, _guard) = capture();
    // A body still "open" after its trailers, as a chunked HTTP/1.1 one is: servers poll
    // no further, so the trailers are its end.
    let with_trailers = || {
        tower::service_fn(|_req: Request<Empty<Bytes>>| async {
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
            let frames = futures_util::stream::iter([
                Ok::<_, Infallible>(http_body::Frame::data(Bytes::from_static(b"abc"))),
                Ok(http_body::Frame::trailers(trailers)),
            ])
            .chain(futures_util::stream::pending());
            Ok::<_, Infallible>(Response::new(http_body_util::StreamBody::new(frames)))
        })
    };
    for (way, mut svc, _) in both("l", with_trailers) {
        let resp = call(&mut svc, get()).await.unwrap();
        let mut body = resp.into_body();
        assert!(body.frame().await.unwrap().unwrap().is_data());
        assert!(lines.take().is_empty(), "{way}");
        assert!(body.frame().await.unwrap().unwrap().is_trailers());
        drop(body);
        let logged = lines.take();
        assert_eq!(logged.len(), 1, "{way}: {logged:?}");
        assert_eq!(
            (
                logged[0]["outcome"].as_str(),
                logged[0]["grpc.status"].as_str(),
                logged[0]["response_bytes"].as_str()
            ),
            ("complete", "0", "3"),
            "{way}"
        );
    }

    // An answer to HEAD, and a 304, have no body to send: complete at once, although
    // the server drops their bodies unread.
    let not_modified = || {
        tower::service_fn(|_req: Request<Empty<Bytes>>| async {
            Ok::<_, Infallible>(
                Response::builder()
                    .status(StatusCode::NOT_MODIFIED)
                    .body(Full::new(Bytes::from_static(b"ignored")))
                    .unwrap(),
            )
        })
    };
    let head = both("l", || ok_service("x"))
        .into_iter()
        .map(|(way, svc, _)| (way, http::Method::HEAD, svc));
    let not_modified = both("l", not_modified)
        .into_iter()
        .map(|(way, svc, _)| (way, http::Method::GET, svc));
    for (way, method, mut svc) in head.chain(not_modified) {
        let req = Request::builder()
            .method(method.clone())
            .uri("/")
            .body(Empty::new())
            .unwrap();
        let resp = call(&mut svc, req).await.unwrap();
        drop(resp);
        let logged = lines.take();
        assert_eq!(logged.len(), 1, "{way} {method}: {logged:?}");
        assert_eq!(logged[0]["outcome"], "complete", "{way} {method}");
    }
}

#[tokio::test]
async fn a_clients_long_text_is_cut() {
    let (lines, _guard) = capture();
    for (way, mut svc, _) in both("l", || ok_service("x")) {
        let long = "é".repeat(3000);
        let req = Request::get(format!("/{}", "a".repeat(5000)))
            .header("user-agent", long.as_str())
            .body(Empty::new())
            .unwrap();
        let resp = call(&mut svc, req).await.unwrap();
        resp.into_body().collect().await.unwrap();
        let logged = lines.take();
        for field in ["uri", "user_agent"] {
            let value = &logged[0][field];
            assert!(value.ends_with('…'), "{way} {field}");
            assert!(
                value.len() <= MAX_FIELD + '…'.len_utf8(),
                "{way} {field}: {}",
                value.len()
            );
        }
    }
}
