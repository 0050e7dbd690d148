//! The mock mesh: real HTTP servers on loopback with scripted behaviour (feature
//! `test-util`).
//!
//! A [`MockEndpoint`] serves HTTP/1.1 and HTTP/2 on `127.0.0.1`, in plaintext or behind
//! SPIFFE mTLS ([`MockEndpoint::spawn_mtls`]). Every request is answered according to its
//! current [`Behavior`], which can be replaced while the endpoint runs:
//!
//! - **latency**: fixed, or uniform between two bounds (seeded randomness);
//! - **errors**: a share of requests answered with an error status (default 503);
//! - **rate limiting**: a share answered `429` with an optional `Retry-After`;
//! - **resets**: a share whose connection is dropped without an answer;
//! - **hang**: requests that are never answered.
//!
//! Other requests get `200` with the request body echoed back, so retried bodies can be
//! checked byte for byte. Every answer carries `x-mock-endpoint: <name>`. [`Stats`] counts
//! what the endpoint did, and [`MockEndpoint::kill`] stops it abruptly (listener and open
//! connections), as a crashed process would.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use mesh_spiffe::MtlsAcceptor;

/// How long requests take.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Latency {
    /// Exactly this long.
    Fixed(Duration),
    /// Uniformly between the two bounds.
    Uniform(Duration, Duration),
}

/// How a mock endpoint answers. Shares are probabilities from 0 to 1, drawn per request in
/// this order: reset, rate limit, error; the rest succeed.
#[derive(Clone, Debug, PartialEq)]
pub struct Behavior {
    /// Time before answering (default: none).
    pub latency: Latency,
    /// Share of requests answered with `error_status` (default 0).
    pub error_rate: f64,
    /// The error status (default 503).
    pub error_status: StatusCode,
    /// Share of requests answered 429 (default 0).
    pub rate_limited: f64,
    /// The `Retry-After` sent with 429s, in whole seconds (default: none).
    pub retry_after: Option<u64>,
    /// Share of requests whose connection is reset without an answer (default 0).
    pub reset_rate: f64,
    /// Never answer (default false).
    pub hang: bool,
}

impl Default for Behavior {
    fn default() -> Self {
        Self {
            latency: Latency::Fixed(Duration::ZERO),
            error_rate: 0.0,
            error_status: StatusCode::SERVICE_UNAVAILABLE,
            rate_limited: 0.0,
            retry_after: None,
            reset_rate: 0.0,
            hang: false,
        }
    }
}

impl Behavior {
    /// Healthy, answering after `latency`.
    pub fn latency(latency: Duration) -> Self {
        Self {
            latency: Latency::Fixed(latency),
            ..Self::default()
        }
    }

    /// Failing every request with `status`.
    pub fn failing(status: StatusCode) -> Self {
        Self {
            error_rate: 1.0,
            error_status: status,
            ..Self::default()
        }
    }

    /// Answering every request 429, with `Retry-After: retry_after` if given.
    pub fn rate_limited(retry_after: Option<u64>) -> Self {
        Self {
            rate_limited: 1.0,
            retry_after,
            ..Self::default()
        }
    }
}

/// What a mock endpoint did.
#[derive(Debug, Default)]
pub struct Stats {
    /// Requests received.
    pub requests: AtomicU64,
    /// Answered 200.
    pub ok: AtomicU64,
    /// Answered with the error status.
    pub errors: AtomicU64,
    /// Answered 429.
    pub rate_limited: AtomicU64,
    /// Connections reset.
    pub resets: AtomicU64,
    /// Connections accepted.
    pub connections: AtomicU64,
}

impl Stats {
    /// Requests received so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

/// A scripted HTTP server on loopback. Dropping it kills it.
pub struct MockEndpoint {
    name: Arc<str>,
    addr: SocketAddr,
    behavior: watch::Sender<Behavior>,
    stats: Arc<Stats>,
    bodies: Arc<Mutex<Vec<Bytes>>>,
    tasks: Mutex<Option<JoinSet<()>>>,
}

impl fmt::Debug for MockEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MockEndpoint")
            .field("name", &self.name)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// A request was told to reset its connection.
#[derive(Debug, thiserror::Error)]
#[error("mock endpoint reset the connection")]
struct Reset;

impl MockEndpoint {
    /// Starts a plaintext endpoint on `127.0.0.1` with an ephemeral port.
    pub async fn spawn(name: &str, behavior: Behavior) -> std::io::Result<Self> {
        Self::start(name, behavior, None).await
    }

    /// Starts an endpoint that accepts only mTLS clients `acceptor` authorizes.
    pub async fn spawn_mtls(
        name: &str,
        behavior: Behavior,
        acceptor: MtlsAcceptor,
    ) -> std::io::Result<Self> {
        Self::start(name, behavior, Some(acceptor)).await
    }

    async fn start(
        name: &str,
        behavior: Behavior,
        acceptor: Option<MtlsAcceptor>,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (behavior, _) = watch::channel(behavior);
        let ctx = Ctx {
            name: Arc::from(name),
            behavior: behavior.subscribe(),
            stats: Arc::new(Stats::default()),
            bodies: Arc::new(Mutex::new(Vec::new())),
        };
        let mut tasks = JoinSet::new();
        let accept_ctx = ctx.clone();
        tasks.spawn(async move {
            // Connections live in their own set, dropped (aborted) with the accept task.
            let mut conns = JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    // Out of descriptors or similar: wait instead of spinning.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                accept_ctx.stats.connections.fetch_add(1, Ordering::Relaxed);
                let ctx = accept_ctx.clone();
                let acceptor = acceptor.clone();
                conns.spawn(async move {
                    match acceptor {
                        None => serve(tcp, ctx).await,
                        Some(acceptor) => {
                            if let Ok((tls, _peer)) = acceptor.accept(tcp).await {
                                serve(tls, ctx).await;
                            }
                        }
                    }
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Ok(Self {
            name: ctx.name,
            addr,
            behavior,
            stats: ctx.stats,
            bodies: ctx.bodies,
            tasks: Mutex::new(Some(tasks)),
        })
    }

    /// The endpoint's name, sent as `x-mock-endpoint`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces its behaviour; requests already waiting keep the old one.
    pub fn set_behavior(&self, behavior: Behavior) {
        self.behavior.send_replace(behavior);
    }

    /// What it did so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The bodies of the requests it answered 200, in order.
    pub fn bodies(&self) -> Vec<Bytes> {
        self.bodies.lock().map(|b| b.clone()).unwrap_or_default()
    }

    /// Stops it at once: the listener closes and open connections are dropped.
    pub fn kill(&self) {
        if let Ok(mut tasks) = self.tasks.lock() {
            tasks.take();
        }
    }
}

impl Drop for MockEndpoint {
    fn drop(&mut self) {
        self.kill();
    }
}

#[derive(Clone)]
struct Ctx {
    name: Arc<str>,
    behavior: watch::Receiver<Behavior>,
    stats: Arc<Stats>,
    bodies: Arc<Mutex<Vec<Bytes>>>,
}

async fn serve<IO>(io: IO, ctx: Ctx)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| answer(req, ctx.clone()));
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let _ = builder.serve_connection(TokioIo::new(io), service).await;
}

async fn answer(req: Request<Incoming>, ctx: Ctx) -> Result<Response<Full<Bytes>>, Reset> {
    ctx.stats.requests.fetch_add(1, Ordering::Relaxed);
    let behavior = ctx.behavior.borrow().clone();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let (delay, roll) = {
        let mut rng = fastrand::Rng::new();
        let delay = match behavior.latency {
            Latency::Fixed(d) => d,
            Latency::Uniform(lo, hi) if hi > lo => lo + (hi - lo).mul_f64(rng.f64()),
            Latency::Uniform(lo, _) => lo,
        };
        (delay, rng.f64())
    };
    if behavior.hang {
        std::future::pending::<()>().await;
    }
    if !delay.is_zero() {
        // Even a zero sleep waits for the timer's next millisecond tick.
        tokio::time::sleep(delay).await;
    }
    let mut threshold = behavior.reset_rate;
    if roll < threshold {
        ctx.stats.resets.fetch_add(1, Ordering::Relaxed);
        return Err(Reset);
    }
    threshold += behavior.rate_limited;
    let mut resp = if roll < threshold {
        ctx.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
        let mut resp = Response::new(Full::new(Bytes::from_static(b"rate limited")));
        *resp.status_mut() = StatusCode::TOO_MANY_REQUESTS;
        if let Some(secs) = behavior.retry_after {
            resp.headers_mut()
                .insert(http::header::RETRY_AFTER, secs.into());
        }
        resp
    } else if roll < threshold + behavior.error_rate {
        ctx.stats.errors.fetch_add(1, Ordering::Relaxed);
        let mut resp = Response::new(Full::new(Bytes::from_static(b"mock error")));
        *resp.status_mut() = behavior.error_status;
        resp
    } else {
        ctx.stats.ok.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut bodies) = ctx.bodies.lock() {
            bodies.push(body.clone());
        }
        Response::new(Full::new(body))
    };
    if let Ok(name) = http::HeaderValue::from_str(&ctx.name) {
        resp.headers_mut().insert("x-mock-endpoint", name);
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Empty;
    use hyper_util::client::legacy::Client;

    async fn get(addr: SocketAddr) -> Result<(StatusCode, http::HeaderMap), String> {
        let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let resp = client
            .get(
                format!("http://{addr}/")
                    .parse()
                    .map_err(|e| format!("{e}"))?,
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok((resp.status(), resp.headers().clone()))
    }

    #[tokio::test]
    async fn scripted_behaviours_change_while_running() {
        let ep = MockEndpoint::spawn("a", Behavior::default()).await.unwrap();
        let (status, headers) = get(ep.addr()).await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["x-mock-endpoint"], "a");

        ep.set_behavior(Behavior::failing(StatusCode::BAD_GATEWAY));
        assert_eq!(get(ep.addr()).await.unwrap().0, StatusCode::BAD_GATEWAY);

        ep.set_behavior(Behavior::rate_limited(Some(2)));
        let (status, headers) = get(ep.addr()).await.unwrap();
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(headers["retry-after"], "2");

        ep.set_behavior(Behavior {
            reset_rate: 1.0,
            ..Behavior::default()
        });
        assert!(get(ep.addr()).await.is_err());

        ep.set_behavior(Behavior {
            hang: true,
            ..Behavior::default()
        });
        let hung = tokio::time::timeout(Duration::from_millis(200), get(ep.addr())).await;
        assert!(hung.is_err(), "a hanging endpoint answered");

        let s = ep.stats();
        assert_eq!(s.ok.load(Ordering::Relaxed), 1);
        assert_eq!(s.errors.load(Ordering::Relaxed), 1);
        assert_eq!(s.rate_limited.load(Ordering::Relaxed), 1);
        assert_eq!(s.resets.load(Ordering::Relaxed), 1);
        assert_eq!(s.requests(), 5);
    }

    #[tokio::test]
    async fn latency_is_applied_and_kill_stops_everything() {
        let ep = MockEndpoint::spawn("slow", Behavior::latency(Duration::from_millis(150)))
            .await
            .unwrap();
        let started = tokio::time::Instant::now();
        get(ep.addr()).await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(150));
        ep.kill();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(get(ep.addr()).await.is_err(), "a killed endpoint answered");
    }
}
