//! One mock endpoint: a scripted application behind a real `MeshServer` (SPIFFE mTLS,
//! HTTP/1.1 and HTTP/2), reached through its [link](crate::link).
//!
//! A request walks, top to bottom:
//!
//! ```text
//! link            TCP relay on the advertised address: kill, restart, partition
//! MeshServer      mTLS with the endpoint's own SVID; PeerIdentity on each request
//! record          appends Authz and LimitedByServer events, as the layers below decide
//! Authorize       the service's policy (mesh-tower's AuthorizeLayer; allow-all by default)
//! RateLimit       the service's server-side limit (mesh-tower's RateLimitLayer; none by default)
//! app             the Script: latency, then reset / 429 / error / success; a Request event
//!                 (Cancelled if the request is dropped before the app answers)
//! ```
//!
//! The authorization and rate-limit layers are the ones `MeshServer` composes, in the same
//! order, run inside the application rather than by the server so that each decision can
//! be recorded (the server's own policy is left at allow-all).

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use mesh_core::error::BoxError;
use mesh_spiffe::PeerIdentity;
use mesh_tonic::test_util::EchoService;
use mesh_tonic::test_util::echo::echo_server::EchoServer;
use mesh_tower::authz::AuthzDecision;
use mesh_tower::server::Server;
use tokio::sync::watch;
use tower_service::Service;

use crate::events::{
    AuthzEvent, Decision, EndpointChange, EndpointEvent, EndpointRef, Event, Log, Outcome,
    RequestEvent,
};
use crate::link::Link;
use crate::script::{Script, Verdict};

pub(crate) type Body = UnsyncBoxBody<Bytes, BoxError>;
type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The stack each mock endpoint serves; see [`crate::service::scripted_stack`].
pub(crate) type Stack = Record<
    mesh_tower::authz::Authorize<
        tower::util::MapRequest<
            mesh_tower::ratelimit::RateLimit<App>,
            fn(Request<Incoming>) -> Request<Incoming>,
        >,
    >,
>;

/// What one endpoint's application and recorder share.
#[derive(Debug)]
pub(crate) struct Core {
    pub(crate) at: EndpointRef,
    pub(crate) script: watch::Sender<Script>,
    rng: Mutex<fastrand::Rng>,
    pub(crate) log: Log,
    /// Whether the service's authorization decisions are recorded (a policy was set).
    recording: Arc<AtomicBool>,
}

impl Core {
    pub(crate) fn new(
        at: EndpointRef,
        script: Script,
        seed: u64,
        log: Log,
        recording: Arc<AtomicBool>,
    ) -> Self {
        warn_unless_read_as_written(&at, &script);
        Self {
            at,
            script: watch::Sender::new(script),
            rng: Mutex::new(fastrand::Rng::with_seed(seed)),
            log,
            recording,
        }
    }

    /// Replaces the script; requests already past their draw keep the old one.
    pub(crate) fn set_script(&self, script: Script) {
        warn_unless_read_as_written(&self.at, &script);
        self.script.send_replace(script);
    }

    fn draw(&self, script: &Script) -> (Duration, Verdict) {
        match self.rng.lock() {
            Ok(mut rng) => script.draw(&mut rng),
            // A poisoned generator (a panic elsewhere): draw from a fresh one.
            Err(_) => script.draw(&mut fastrand::Rng::new()),
        }
    }
}

fn warn_unless_read_as_written(at: &EndpointRef, script: &Script) {
    if let Err(error) = script.check() {
        tracing::warn!(endpoint = %at, %error, "mock endpoint script not read as written");
    }
}

/// The per-request record shared by the recorder and the layers below it.
#[derive(Clone, Debug, Default)]
struct Slot(Arc<SlotInner>);

#[derive(Debug, Default)]
struct SlotInner {
    decision: OnceLock<AuthzDecision>,
    reached: AtomicBool,
}

/// Below `Authorize`: notes the decision that admitted the request.
pub(crate) fn mark(req: Request<Incoming>) -> Request<Incoming> {
    if let (Some(slot), Some(decision)) = (
        req.extensions().get::<Slot>(),
        req.extensions().get::<AuthzDecision>(),
    ) {
        let _ = slot.0.decision.set(decision.clone());
    }
    req
}

/// The scripted application.
#[derive(Clone, Debug)]
pub(crate) struct App {
    pub(crate) core: Arc<Core>,
    pub(crate) echo: EchoServer<EchoService>,
}

#[derive(Debug, thiserror::Error)]
#[error("mock endpoint reset the request")]
struct Reset;

fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into())
        .map_err(|e| match e {})
        .boxed_unsync()
}

fn grpc_answer(code: i32, message: &'static str, pushback: Option<Duration>) -> Response<Body> {
    let mut resp = Response::new(Empty::new().map_err(|e| match e {}).boxed_unsync());
    let headers = resp.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert("grpc-status", HeaderValue::from(code));
    headers.insert("grpc-message", HeaderValue::from_static(message));
    if let Some(p) = pushback {
        headers.insert(
            "grpc-retry-pushback-ms",
            HeaderValue::from(u64::try_from(p.as_millis()).unwrap_or(u64::MAX)),
        );
    }
    resp
}

fn http_answer(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp
}

/// `Retry-After` for `after`: whole seconds, rounded up (saturating: `Duration::MAX`
/// asks for `u64::MAX` seconds).
fn retry_after_secs(after: Duration) -> u64 {
    after
        .as_secs()
        .saturating_add(u64::from(after.subsec_nanos() > 0))
}

/// The `grpc-status` of a trailers-only gRPC answer (`None` when the header is absent:
/// the status travels in the trailers, after the body).
fn grpc_status<B>(resp: &Response<B>) -> Option<i32> {
    resp.headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// One request's [`RequestEvent`], logged once: with the outcome the application reached,
/// or, if its future is dropped first (a client's cancellation or try timeout, a killed
/// connection), as [`Outcome::Cancelled`].
struct Pending {
    log: Log,
    event: Option<RequestEvent>,
}

impl Pending {
    fn log(&mut self, outcome: Outcome) {
        if let Some(mut event) = self.event.take() {
            event.outcome = outcome;
            self.log.push(Event::Request(event));
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.log(Outcome::Cancelled);
    }
}

impl Service<Request<Incoming>> for App {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Response<Body>, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        // Set now, not when the future first runs: the recorder reads it as soon as the
        // layers above have called through.
        if let Some(slot) = req.extensions().get::<Slot>() {
            slot.0.reached.store(true, Ordering::Relaxed);
        }
        let core = self.core.clone();
        let mut echo = self.echo.clone();
        let grpc = mesh_core::classify::is_grpc(req.headers());
        let mut pending = Pending {
            log: core.log.clone(),
            event: Some(RequestEvent {
                endpoint: core.at.clone(),
                peer: req
                    .extensions()
                    .get::<PeerIdentity>()
                    .map(|p| p.id().clone()),
                method: req.method().clone(),
                path: req.uri().path().to_owned(),
                grpc,
                outcome: Outcome::Cancelled,
            }),
        };
        Box::pin(async move {
            let script = core.script.borrow().clone();
            let (delay, verdict) = core.draw(&script);
            if verdict == Verdict::Hang {
                pending.log(Outcome::Hung);
                std::future::pending::<()>().await;
            }
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let name = HeaderValue::from_str(&format!("{}-{}", core.at.service, core.at.index))
                .unwrap_or(HeaderValue::from_static("mock"));
            let mut resp = match verdict {
                Verdict::Hang | Verdict::Reset => {
                    pending.log(Outcome::Reset);
                    return Err(Box::new(Reset) as BoxError);
                }
                Verdict::RateLimited => {
                    pending.log(Outcome::RateLimited {
                        retry_after: script.retry_after,
                    });
                    if grpc {
                        grpc_answer(8, "rate limited", script.retry_after)
                    } else {
                        let mut resp = http_answer(StatusCode::TOO_MANY_REQUESTS, "rate limited");
                        if let Some(after) = script.retry_after {
                            resp.headers_mut().insert(
                                http::header::RETRY_AFTER,
                                HeaderValue::from(retry_after_secs(after)),
                            );
                        }
                        resp
                    }
                }
                Verdict::Error => {
                    let (status, grpc_code) = if grpc {
                        (StatusCode::OK, Some(script.grpc_error_code))
                    } else {
                        (script.error_status, None)
                    };
                    pending.log(Outcome::Error { status, grpc_code });
                    if grpc {
                        grpc_answer(script.grpc_error_code, "mock error", None)
                    } else {
                        http_answer(script.error_status, "mock error")
                    }
                }
                Verdict::Ok if grpc => {
                    let resp = match echo.call(req).await {
                        Ok(resp) => resp,
                        Err(never) => match never {},
                    };
                    // tonic answers an unknown method (or a failed call) trailers-only,
                    // its status in the headers.
                    match grpc_status(&resp) {
                        Some(code) if code != 0 => pending.log(Outcome::Error {
                            status: resp.status(),
                            grpc_code: Some(code),
                        }),
                        _ => pending.log(Outcome::Ok),
                    }
                    resp.map(|b| b.map_err(BoxError::from).boxed_unsync())
                }
                Verdict::Ok => {
                    let body = req.into_body().collect().await?.to_bytes();
                    pending.log(Outcome::Ok);
                    http_answer(StatusCode::OK, body)
                }
            };
            resp.headers_mut().insert("x-mock-endpoint", name);
            Ok(resp)
        })
    }
}

/// Above `Authorize`: records what the layers below decided.
#[derive(Clone, Debug)]
pub(crate) struct Record<S> {
    pub(crate) inner: S,
    pub(crate) core: Arc<Core>,
}

impl<S, RB> Service<Request<Incoming>> for Record<S>
where
    S: Service<Request<Incoming>, Response = Response<RB>> + Send + 'static,
    S::Future: Send + 'static,
    RB: 'static,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<RB>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Incoming>) -> Self::Future {
        let slot = Slot::default();
        req.extensions_mut().insert(slot.clone());
        let peer = req
            .extensions()
            .get::<PeerIdentity>()
            .map(|p| p.id().clone());
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let grpc = mesh_core::classify::is_grpc(req.headers());
        let core = &self.core;
        let fut = self.inner.call(req);
        // `Authorize` and `RateLimit` decide in `call`, before any future runs, and `App`
        // marks the slot in its `call`: what the slot holds now is what they decided.
        // Logged here, when decided, so that the decision precedes the request's own
        // event and is there for requests that hang or are cancelled.
        let decision = slot.0.decision.get();
        if core.recording.load(Ordering::Relaxed) {
            let decision = match decision {
                Some(d) => Decision::Allowed {
                    policy: d.policy().to_owned(),
                    rule: d.rule().map(str::to_owned),
                    audit: d.is_audit(),
                },
                None => Decision::Denied {
                    policy: core.at.service.to_string(),
                },
            };
            core.log.push(Event::Authz(AuthzEvent {
                endpoint: core.at.clone(),
                peer: peer.clone(),
                method: method.clone(),
                path: path.clone(),
                decision,
            }));
        }
        if decision.is_some() && !slot.0.reached.load(Ordering::Relaxed) {
            core.log.push(Event::Request(RequestEvent {
                endpoint: core.at.clone(),
                peer,
                method,
                path,
                grpc,
                outcome: Outcome::LimitedByServer,
            }));
        }
        Box::pin(fut)
    }
}

/// A handle on one mock endpoint. Cheap to clone; every clone controls the same endpoint.
/// The endpoint runs until its service and every handle are dropped.
#[derive(Clone)]
pub struct MockEndpoint {
    pub(crate) inner: Arc<EndpointInner>,
}

pub(crate) struct EndpointInner {
    pub(crate) core: Arc<Core>,
    pub(crate) link: Link,
    /// The backend server, shut down (gracefully, briefly) when the endpoint is dropped.
    pub(crate) _server: Server,
    pub(crate) echo: EchoService,
}

impl fmt::Debug for MockEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MockEndpoint")
            .field("endpoint", &self.inner.core.at)
            .field("running", &self.inner.link.is_running())
            .field("partitioned", &self.inner.link.is_partitioned())
            .finish_non_exhaustive()
    }
}

impl MockEndpoint {
    /// Logs a change of this endpoint in the mesh's event log.
    pub(crate) fn changed(&self, change: EndpointChange) {
        self.inner.core.log.push(Event::Endpoint(EndpointEvent {
            endpoint: self.inner.core.at.clone(),
            change,
        }));
    }

    /// Which endpoint this is.
    pub fn at(&self) -> &EndpointRef {
        &self.inner.core.at
    }

    /// Its index in its service.
    pub fn index(&self) -> usize {
        self.inner.core.at.index
    }

    /// The address clients reach it at (what discovery gives).
    pub fn addr(&self) -> SocketAddr {
        self.inner.core.at.addr
    }

    /// Its current script.
    pub fn script(&self) -> Script {
        self.inner.core.script.borrow().clone()
    }

    /// Replaces its script; requests already past their draw keep the old one.
    pub fn set_script(&self, script: impl Into<Script>) {
        self.inner.core.set_script(script.into());
        self.changed(EndpointChange::Scripted);
    }

    /// Kills it: the listener closes and every open connection is dropped, as when a
    /// process dies. Their answers are lost: a request in flight whose application had
    /// not answered yet is logged as [`Outcome::Cancelled`] once its server notices the
    /// connection is gone; one it had answered stays logged with that answer.
    pub fn kill(&self) {
        self.inner.link.kill();
        self.changed(EndpointChange::Killed);
    }

    /// Listens again on the same address after a [`kill`](Self::kill) (or, if it is
    /// running, kills it first).
    pub async fn restart(&self) -> std::io::Result<()> {
        self.inner.link.restart().await?;
        self.changed(EndpointChange::Restarted);
        Ok(())
    }

    /// Whether it is listening (not killed).
    pub fn is_running(&self) -> bool {
        self.inner.link.is_running()
    }

    /// Cuts it off: a black hole where connections are accepted but no byte moves either
    /// way, so handshakes and requests hang until clients time out.
    pub fn partition(&self) {
        self.inner.link.set_partitioned(true);
        self.changed(EndpointChange::Partitioned);
    }

    /// Ends a partition; bytes held meanwhile are delivered.
    pub fn heal(&self) {
        self.inner.link.set_partitioned(false);
        self.changed(EndpointChange::Healed);
    }

    /// gRPC calls its `Echo` service answered.
    pub fn grpc_calls(&self) -> u64 {
        self.inner.echo.calls()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_to_whole_seconds_and_saturates() {
        assert_eq!(retry_after_secs(Duration::ZERO), 0);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(5)), 5);
        assert_eq!(retry_after_secs(Duration::from_millis(5001)), 6);
        assert_eq!(retry_after_secs(Duration::MAX), u64::MAX);
    }
}
