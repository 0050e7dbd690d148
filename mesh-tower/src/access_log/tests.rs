//! Access-log lines, captured by a subscriber of the test's own.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
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

#[tokio::test]
async fn a_request_is_logged_once_when_its_body_ends() {
    let (lines, _guard) = capture();
    let mut svc = AccessLogLayer::new("public").layer(ok_service("hello"));
    let mut req = Request::get("http://users.prod/a/b?c=d")
        .header("user-agent", "curl/8 \"quoted\" x=y")
        .body(Empty::new())
        .unwrap();
    #[cfg(feature = "server")]
    req.extensions_mut()
        .insert(crate::server::ClientAddr("10.0.0.9:4711".parse().unwrap()));
    req.headers_mut()
        .insert("host", http::HeaderValue::from_static("users.prod:80"));
    let resp = svc.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    // Nothing until the body ended.
    assert!(lines.take().is_empty());
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "hello");
    let logged = lines.take();
    assert_eq!(logged.len(), 1, "{logged:?}");
    let line = &logged[0];
    assert_eq!(line["listener"], "public");
    assert_eq!(line["method"], "GET");
    assert_eq!(line["uri"], "/a/b?c=d");
    assert_eq!(line["host"], "users.prod:80");
    assert_eq!(line["user_agent"], "curl/8 \"quoted\" x=y");
    assert_eq!(line["version"], "HTTP/1.1");
    assert_eq!(line["status"], "200");
    assert_eq!(line["grpc.status"], "-");
    assert_eq!(line["response_bytes"], "5");
    assert_eq!(line["outcome"], "complete");
    assert_eq!(line["client.id"], "-");
    assert_eq!(line["server.id"], "-");
    #[cfg(feature = "server")]
    assert_eq!(line["client.addr"], "10.0.0.9:4711");
    assert!(line["duration_us"].parse::<u64>().is_ok(), "{line:?}");
    assert_eq!(line["message"], "request");
}

#[tokio::test]
async fn a_disabled_layer_logs_nothing_until_switched_on() {
    let (lines, _guard) = capture();
    let layer = AccessLogLayer::disabled("quiet");
    let handle = layer.handle().clone();
    let mut svc = layer.layer(ok_service("x"));
    let get = || Request::get("/").body(Empty::<Bytes>::new()).unwrap();
    let resp = svc.ready().await.unwrap().call(get()).await.unwrap();
    resp.into_body().collect().await.unwrap();
    assert!(lines.take().is_empty());
    assert!(!handle.is_enabled());
    handle.set_enabled(true);
    let resp = svc.ready().await.unwrap().call(get()).await.unwrap();
    resp.into_body().collect().await.unwrap();
    let logged = lines.take();
    assert_eq!(logged.len(), 1);
    // No Host and a relative URI: the host is unknown.
    assert_eq!(logged[0]["host"], "-");
    assert_eq!(logged[0]["uri"], "/");
}

#[tokio::test]
async fn an_empty_body_is_logged_at_once_and_a_dropped_one_when_dropped() {
    let (lines, _guard) = capture();
    let empty = tower::service_fn(|_req: Request<Empty<Bytes>>| async {
        Ok::<_, Infallible>(
            Response::builder()
                .status(StatusCode::NO_CONTENT)
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
    });
    let mut svc = AccessLogLayer::new("l").layer(empty);
    let resp = svc
        .ready()
        .await
        .unwrap()
        .call(Request::get("/").body(Empty::new()).unwrap())
        .await
        .unwrap();
    let logged = lines.take();
    assert_eq!(logged.len(), 1);
    assert_eq!(
        (logged[0]["status"].as_str(), logged[0]["outcome"].as_str()),
        ("204", "complete")
    );
    drop(resp);
    assert!(lines.take().is_empty(), "logged once only");

    let mut svc = AccessLogLayer::new("l").layer(ok_service("unread"));
    let resp = svc
        .ready()
        .await
        .unwrap()
        .call(Request::get("/").body(Empty::new()).unwrap())
        .await
        .unwrap();
    drop(resp);
    let logged = lines.take();
    assert_eq!(logged.len(), 1);
    assert_eq!(
        (
            logged[0]["outcome"].as_str(),
            logged[0]["response_bytes"].as_str()
        ),
        ("body_dropped", "0")
    );
}

#[tokio::test]
async fn errors_and_cancelled_requests_are_logged_without_a_status() {
    let (lines, _guard) = capture();
    let failing = tower::service_fn(|_req: Request<Empty<Bytes>>| async {
        Err::<Response<Empty<Bytes>>, _>("refused")
    });
    let mut svc = AccessLogLayer::new("l").layer(failing);
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(Request::get("/").body(Empty::new()).unwrap())
        .await;
    assert!(err.is_err());
    let logged = lines.take();
    assert_eq!(
        (logged[0]["status"].as_str(), logged[0]["outcome"].as_str()),
        ("-", "error")
    );

    let hanging = tower::service_fn(|_req: Request<Empty<Bytes>>| {
        std::future::pending::<Result<Response<Empty<Bytes>>, Infallible>>()
    });
    let mut svc = AccessLogLayer::new("l").layer(hanging);
    let fut = svc
        .ready()
        .await
        .unwrap()
        .call(Request::get("/").body(Empty::new()).unwrap());
    drop(fut);
    let logged = lines.take();
    assert_eq!(
        (logged[0]["status"].as_str(), logged[0]["outcome"].as_str()),
        ("-", "cancelled")
    );
}

#[tokio::test]
async fn a_grpc_status_is_read_from_trailers() {
    let (lines, _guard) = capture();
    let grpc = tower::service_fn(|_req: Request<Empty<Bytes>>| async {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("14"));
        let body = http_body_util::StreamBody::new(futures_util::stream::iter([
            Ok::<_, Infallible>(http_body::Frame::data(Bytes::from_static(b"\0\0\0\0\0"))),
            Ok(http_body::Frame::trailers(trailers)),
        ]));
        Ok::<_, Infallible>(Response::new(body))
    });
    let mut svc = AccessLogLayer::new("grpc").layer(grpc);
    let req = Request::post("/echo.Echo/Say")
        .version(http::Version::HTTP_2)
        .body(Empty::new())
        .unwrap();
    let resp = svc.ready().await.unwrap().call(req).await.unwrap();
    resp.into_body().collect().await.unwrap();
    let logged = lines.take();
    assert_eq!(logged.len(), 1);
    let line = &logged[0];
    assert_eq!(line["grpc.status"], "14");
    assert_eq!(line["response_bytes"], "5");
    assert_eq!(line["version"], "HTTP/2.0");
    assert_eq!(line["method"], "POST");
}
