//! Each layer alone over plain services (`service_fn` and a scripted test endpoint), with
//! paused time, and the layers composed without `MeshClient`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use mesh_core::Endpoint;
use mesh_core::discover::StaticDiscovery;
use mesh_core::error::BoxError;
use mesh_tower::backoff::Backoff;
use mesh_tower::balance::Balance;
use mesh_tower::balance::error::{NoEndpoints, NoReadyEndpoints};
use mesh_tower::breaker::{BreakerLayer, BreakerPolicy};
use mesh_tower::load::{Cost, Load, PeakEwmaLayer};
use mesh_tower::retry::error::BudgetExhausted;
use mesh_tower::retry::{ReplayBody, RetryBudget, RetryLayer, RetryPolicy};
use mesh_tower::timeout::TryTimeout;
use prometheus_client::metrics::counter::Counter;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

fn noop() -> Context<'static> {
    Context::from_waker(Waker::noop())
}

fn status(code: u16) -> Response<Bytes> {
    Response::builder().status(code).body(Bytes::new()).unwrap()
}

fn addr(i: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::from(([10, 0, 0, 1], 8000 + i))
}

fn discovery(n: u16) -> mesh_core::discover::BoxDiscover {
    Box::pin(StaticDiscovery::new((0..n).map(|i| Endpoint::new(addr(i)))))
}

fn get() -> Request<Full<Bytes>> {
    Request::get("http://users/").body(Full::default()).unwrap()
}

/// Waits for `svc` to be ready, then sends it `req`.
async fn send<S>(svc: &mut S, req: Request<Full<Bytes>>) -> Result<S::Response, S::Error>
where
    S: Service<Request<Full<Bytes>>>,
    S::Error: std::fmt::Debug,
{
    ServiceExt::<Request<Full<Bytes>>>::ready(svc)
        .await?
        .call(req)
        .await
}

/// Waits until the balancer's discovery task has published `n` endpoints.
async fn filled<S>(balance: &Balance<S>, n: usize) {
    while balance.endpoints().len() < n {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn retry_replays_a_post_body_byte_for_byte_through_a_flaky_service() {
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let seen = bodies.clone();
    let policy = RetryPolicy {
        non_idempotent: true,
        ..RetryPolicy::default()
    };
    let mut client = ServiceBuilder::new()
        .layer(RetryLayer::new(policy, RetryBudget::default()))
        .service_fn(move |req: Request<ReplayBody>| {
            let seen = seen.clone();
            async move {
                let body = req.into_body().collect().await?.to_bytes();
                let mut seen = seen.lock().unwrap();
                seen.push(body.clone());
                // The first two tries fail.
                let code = if seen.len() < 3 { 503 } else { 200 };
                Ok::<_, BoxError>(Response::builder().status(code).body(body)?)
            }
        });
    let payload: Bytes = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    let req = Request::post("http://users/")
        .body(Full::new(payload.clone()))
        .unwrap();
    let resp = send(&mut client, req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.into_body(), payload);
    let bodies = bodies.lock().unwrap();
    assert_eq!(bodies.len(), 3);
    assert!(bodies.iter().all(|b| *b == payload), "a replay differed");
}

#[tokio::test(start_paused = true)]
async fn an_exhausted_budget_stops_retries_and_says_so() {
    let calls = Arc::new(AtomicUsize::new(0));
    let (retries, exhausted) = (Counter::default(), Counter::default());
    // No reserve and no share of requests: no retry is ever allowed.
    let layer = RetryLayer::new(
        RetryPolicy::default(),
        RetryBudget::new(0.0, 0, Duration::from_secs(10)),
    )
    .counters(retries.clone(), exhausted.clone());
    let c = calls.clone();
    let mut failing = layer.layer(tower::service_fn(move |_req: Request<ReplayBody>| {
        c.fetch_add(1, Ordering::Relaxed);
        async { Ok::<_, Infallible>(status(503)) }
    }));
    let resp = send(&mut failing, get()).await.unwrap();
    assert_eq!(resp.status(), 503, "the answer is passed on");
    assert_eq!(calls.load(Ordering::Relaxed), 1, "no retry");
    assert_eq!((retries.get(), exhausted.get()), (0, 1));

    // A failure without an answer comes back wrapped, naming both causes.
    let mut timing_out = layer.layer(tower::service_fn(|_req: Request<ReplayBody>| async {
        Err::<Response<Bytes>, BoxError>(TryTimeout(Duration::from_millis(50)).into())
    }));
    let err = send(&mut timing_out, get()).await.unwrap_err();
    assert!(err.is::<BudgetExhausted>(), "{err}");
    assert_eq!(
        err.to_string(),
        "retry budget exhausted; last try: try timed out after 50ms"
    );
}

fn breaker_layer(failures: u32) -> BreakerLayer {
    let policy = BreakerPolicy {
        consecutive_failures: failures,
        success_rate: None,
        backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(1), 0.0).unwrap(),
        count_rate_limited: false,
    };
    let layer = BreakerLayer::new(policy, 1.0);
    layer.budget().add_endpoint(); // a second endpoint, so this one may be ejected
    layer
}

/// Lets breaker tasks handle what was reported.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn the_breaker_is_unready_while_ejected_and_admits_one_probe() {
    let healthy = Arc::new(AtomicBool::new(false));
    let h = healthy.clone();
    let mut a = breaker_layer(2).layer(tower::service_fn(move |_req: Request<()>| {
        let code = if h.load(Ordering::Relaxed) { 200 } else { 503 };
        async move { Ok::<_, Infallible>(status(code)) }
    }));
    for _ in 0..2 {
        let resp = a
            .ready()
            .await
            .unwrap()
            .call(Request::new(()))
            .await
            .unwrap();
        assert_eq!(resp.status(), 503);
    }
    settle().await;
    assert!(a.poll_ready(&mut noop()).is_pending(), "ejected but ready");
    assert!(!a.handle().unwrap().gate().may_admit());
    // A waiting `ready()` is woken by the gate when probation starts, not before.
    let mut b = a.clone();
    let mut waiting = pin!(async move {
        b.ready().await.unwrap();
        b
    });
    assert!(futures_poll(&mut waiting).is_pending());
    tokio::time::advance(Duration::from_millis(999)).await;
    settle().await;
    assert!(futures_poll(&mut waiting).is_pending());
    tokio::time::advance(Duration::from_millis(1)).await;
    settle().await;
    // Probation: `b` took the single probe permit; nobody else is ready.
    let Poll::Ready(mut b) = futures_poll(&mut waiting) else {
        panic!("the probe was not admitted");
    };
    assert!(a.poll_ready(&mut noop()).is_pending(), "a second probe");
    let mut c = a.clone();
    assert!(c.poll_ready(&mut noop()).is_pending(), "a second probe");
    // An unused permit is returned when its holder goes away.
    drop(b);
    assert!(
        c.poll_ready(&mut noop()).is_ready(),
        "the permit was not returned"
    );
    healthy.store(true, Ordering::Relaxed);
    let resp = c.call(Request::new(())).await.unwrap();
    assert_eq!(resp.status(), 200);
    settle().await;
    // Reinstated: everyone is ready again.
    assert!(a.poll_ready(&mut noop()).is_ready());
    b = a.clone();
    assert!(b.poll_ready(&mut noop()).is_ready());
    assert!(b.handle().unwrap().gate().is_open());
}

fn futures_poll<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
    std::pin::Pin::new(f).poll(&mut noop())
}

/// A scripted endpoint: its readiness is switched by the test, and it counts calls and
/// readiness polls. Its `Load` always claims it is ready, so the balancer must find out
/// through `poll_ready`.
#[derive(Clone)]
struct Scripted {
    id: usize,
    ready: Arc<AtomicBool>,
    wakers: Arc<Mutex<Vec<Waker>>>,
    polls: Arc<AtomicUsize>,
    calls: Arc<Vec<AtomicUsize>>,
}

impl Load for Scripted {
    fn load(&self, _: Instant) -> Cost {
        Cost {
            unready: false,
            penalized: false,
            cost: 1.0,
        }
    }
}

impl Service<Request<()>> for Scripted {
    type Response = Response<Bytes>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Response<Bytes>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.polls.fetch_add(1, Ordering::Relaxed);
        if self.ready.load(Ordering::Relaxed) {
            return Poll::Ready(Ok(()));
        }
        self.wakers.lock().unwrap().push(cx.waker().clone());
        Poll::Pending
    }

    fn call(&mut self, _: Request<()>) -> Self::Future {
        self.calls[self.id].fetch_add(1, Ordering::Relaxed);
        std::future::ready(Ok(status(200)))
    }
}

struct Script {
    ready: Vec<Arc<AtomicBool>>,
    wakers: Arc<Mutex<Vec<Waker>>>,
    polls: Arc<AtomicUsize>,
    calls: Arc<Vec<AtomicUsize>>,
}

impl Script {
    fn new(ready: &[bool]) -> Self {
        Self {
            ready: ready
                .iter()
                .map(|r| Arc::new(AtomicBool::new(*r)))
                .collect(),
            wakers: Arc::default(),
            polls: Arc::default(),
            calls: Arc::new(ready.iter().map(|_| AtomicUsize::new(0)).collect()),
        }
    }

    fn balance(&self) -> Balance<Scripted> {
        let (ready, wakers, polls, calls) = (
            self.ready.clone(),
            self.wakers.clone(),
            self.polls.clone(),
            self.calls.clone(),
        );
        Balance::builder()
            .seed(7)
            .build(discovery(ready.len() as u16), move |e: &Endpoint| {
                let id = usize::from(e.addr().port() - 8000);
                Some(Scripted {
                    id,
                    ready: ready[id].clone(),
                    wakers: wakers.clone(),
                    polls: polls.clone(),
                    calls: calls.clone(),
                })
            })
    }

    fn set_ready(&self, i: usize) {
        self.ready[i].store(true, Ordering::Relaxed);
        for w in self.wakers.lock().unwrap().drain(..) {
            w.wake();
        }
    }

    fn calls(&self) -> Vec<usize> {
        self.calls
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }
}

#[tokio::test(start_paused = true)]
async fn the_balancer_never_calls_an_unready_endpoint() {
    let script = Script::new(&[true, false, false]);
    let mut balance = script.balance();
    filled(&balance, 3).await;
    for _ in 0..1000 {
        balance
            .ready()
            .await
            .unwrap()
            .call(Request::new(()))
            .await
            .unwrap();
    }
    assert_eq!(script.calls(), [1000, 0, 0]);
}

#[tokio::test(start_paused = true)]
async fn with_no_ready_endpoint_the_balancer_waits_without_spinning_then_fails_fast() {
    let script = Script::new(&[false, false]);
    let mut balance = script.balance();
    filled(&balance, 2).await;

    // Woken by readiness: an endpoint that becomes ready takes the request.
    let started = Instant::now();
    let mut waiting = pin!(balance.ready());
    assert!(futures_poll(&mut waiting).is_pending());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let polls = script.polls.load(Ordering::Relaxed);
    assert!(polls <= 16, "{polls} readiness polls while nothing changed");
    script.set_ready(1);
    let ready = waiting.await.unwrap();
    ready.call(Request::new(())).await.unwrap();
    assert_eq!(script.calls(), [0, 1]);
    assert_eq!(started.elapsed(), Duration::from_secs(1));

    // Nothing becomes ready: a typed error after the fail-fast timeout (3 s).
    let script = Script::new(&[false, false]);
    let mut balance = script.balance();
    filled(&balance, 2).await;
    let started = Instant::now();
    let err = balance.ready().await.unwrap_err();
    assert_eq!(started.elapsed(), Duration::from_secs(3));
    let err = err.downcast::<NoReadyEndpoints>().unwrap();
    assert_eq!(err.endpoints, 2);
    assert!(script.polls.load(Ordering::Relaxed) <= 16, "it spun");
    // Told nothing about why: the message says what it knows.
    assert!(err.causes.is_empty());
    assert!(err.to_string().ends_with("after failed connects"), "{err}");

    // Told how to ask: each endpoint's reason, the first five, then how many more.
    let script = Script::new(&[false; 7]);
    let mut balance = script
        .balance()
        .with_unready_reasons(|s: &Scripted, _| Some(format!("reason {}", s.id)));
    filled(&balance, 7).await;
    let err = balance.ready().await.unwrap_err();
    let err = err.downcast::<NoReadyEndpoints>().unwrap();
    assert_eq!(err.causes.len(), 6, "{err}");
    assert_eq!(err.causes[5], "and 2 more");
    assert!(
        err.to_string()
            .contains("after failed connects (10.0.0.1:8000: reason 0; 10.0.0.1:8001: reason 1;"),
        "{err}"
    );

    // No endpoints and discovery over: at once.
    let mut empty: Balance<Scripted> = Balance::builder()
        .service_name("users")
        .build(discovery(0), |_: &Endpoint| None);
    let started = Instant::now();
    let err = empty.ready().await.unwrap_err();
    assert!(err.is::<NoEndpoints>());
    assert_eq!(err.to_string(), "no endpoints for `users`");
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test(start_paused = true)]
async fn load_tracking_never_leaks_in_flight_counts_on_cancellation() {
    let mut endpoint = PeakEwmaLayer::new().layer(tower::service_fn(|_req: Request<()>| async {
        tokio::time::sleep(Duration::from_secs(60)).await;
        Ok::<_, Infallible>(status(200))
    }));
    let load = endpoint.handle().clone();
    let mut futures = Vec::new();
    for _ in 0..5 {
        futures.push(endpoint.ready().await.unwrap().call(Request::new(())));
    }
    assert_eq!(load.in_flight(), 5);
    let cost = endpoint.load(Instant::now()).cost;
    // Cancelled after 2 s: the count drops, and 2 s is taken as a lower bound on the RTT.
    let timed_out = tokio::time::timeout(Duration::from_secs(2), futures.pop().unwrap()).await;
    assert!(timed_out.is_err());
    drop(futures);
    assert_eq!(load.in_flight(), 0);
    assert_eq!(load.rtt_estimate(Instant::now()), Duration::from_secs(2));
    assert!(endpoint.load(Instant::now()).cost > cost);
}

/// An endpoint stack like `MeshClient`'s, over a `service_fn` answering `code`.
fn endpoint_stack(
    breaker: &BreakerLayer,
    load: &PeakEwmaLayer,
    code: u16,
    calls: Arc<AtomicUsize>,
) -> impl Service<
    Request<ReplayBody>,
    Response = Response<EndpointBody>,
    Error = Infallible,
    Future: Send,
>
+ Load
+ Clone
+ Send
+ Sync
+ 'static
+ use<> {
    ServiceBuilder::new()
        .layer(breaker.clone())
        .layer(load.clone())
        .service_fn(move |_req: Request<ReplayBody>| {
            calls.fetch_add(1, Ordering::Relaxed);
            let resp = match code {
                429 => Response::builder()
                    .status(429)
                    .header("retry-after", "1")
                    .body(Bytes::new()),
                code => Response::builder().status(code).body(Bytes::new()),
            };
            async move { Ok::<_, Infallible>(resp.unwrap()) }
        })
}

/// The body of an endpoint stack's response in these tests.
type EndpointBody = mesh_tower::breaker::ResponseBody<mesh_tower::load::ResponseBody<Bytes>>;

/// Sends `n` GETs through `client`; returns the statuses the caller saw that were not 200.
async fn not_ok<S>(client: &mut S, n: usize) -> Vec<StatusCode>
where
    S: Service<Request<Full<Bytes>>, Response = Response<EndpointBody>>,
    S::Error: std::fmt::Debug,
{
    let mut seen = Vec::new();
    for _ in 0..n {
        let resp = send(client, get()).await.unwrap();
        if resp.status() != StatusCode::OK {
            seen.push(resp.status());
        }
        tokio::time::advance(Duration::from_millis(10)).await;
    }
    seen
}

#[tokio::test(start_paused = true)]
async fn retry_breaker_and_balancer_composed_over_plain_services_lose_nothing() {
    // Endpoint 0 answers 200, 1 always 503, 2 always 429.
    let calls: Vec<Arc<AtomicUsize>> = (0..3).map(|_| Arc::default()).collect();
    let codes = [200, 503, 429];
    let breaker = BreakerLayer::default(); // 7 consecutive failures eject
    let load = PeakEwmaLayer::new();
    let c = calls.clone();
    let balance = Balance::builder()
        .seed(3)
        .build(discovery(3), move |e: &Endpoint| {
            let id = usize::from(e.addr().port() - 8000);
            Some(endpoint_stack(&breaker, &load, codes[id], c[id].clone()))
        });
    filled(&balance, 3).await;
    let mut client = ServiceBuilder::new()
        .layer(RetryLayer::default())
        .service(balance);
    let seen = not_ok(&mut client, 300).await;
    assert!(seen.is_empty(), "callers saw failures: {seen:?}");
    let calls: Vec<usize> = calls.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    assert!(
        calls[1] >= 7 && calls[1] < 30,
        "the 503 endpoint: {calls:?}"
    );
    assert!(
        calls[2] >= 1 && calls[2] < 60,
        "the 429 endpoint: {calls:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_429_is_retried_on_another_endpoint_and_callers_see_none() {
    let calls: Vec<Arc<AtomicUsize>> = (0..3).map(|_| Arc::default()).collect();
    let codes = [200, 200, 429];
    let breaker = BreakerLayer::disabled();
    let load = PeakEwmaLayer::new();
    let c = calls.clone();
    let balance = Balance::builder()
        .seed(5)
        .build(discovery(3), move |e: &Endpoint| {
            let id = usize::from(e.addr().port() - 8000);
            Some(endpoint_stack(&breaker, &load, codes[id], c[id].clone()))
        });
    filled(&balance, 3).await;
    let (retries, exhausted) = (Counter::default(), Counter::default());
    let mut client = ServiceBuilder::new()
        .layer(RetryLayer::default().counters(retries.clone(), exhausted.clone()))
        .service(balance);
    // 2 s of traffic: the 429 endpoint's 1 s penalty expires once, so it is tried again.
    let seen = not_ok(&mut client, 200).await;
    assert!(seen.is_empty(), "callers saw 429s: {seen:?}");
    let limited = calls[2].load(Ordering::Relaxed);
    assert!(
        limited >= 2,
        "the rate-limited endpoint was never tried ({limited})"
    );
    assert_eq!(retries.get(), limited as u64, "one retry per 429");
    assert_eq!(exhausted.get(), 0);

    // When every endpoint rate-limits, the caller gets the 429, not an error.
    let breaker = BreakerLayer::disabled();
    let load = PeakEwmaLayer::new();
    let all = Arc::new(AtomicUsize::new(0));
    let a = all.clone();
    let balance = Balance::builder().build(discovery(2), move |_: &Endpoint| {
        Some(endpoint_stack(&breaker, &load, 429, a.clone()))
    });
    filled(&balance, 2).await;
    let mut client = RetryLayer::default().layer(balance);
    let seen = not_ok(&mut client, 1).await;
    assert_eq!(seen, [StatusCode::TOO_MANY_REQUESTS]);
    assert_eq!(all.load(Ordering::Relaxed), 2, "tried once elsewhere");
    // Both are penalized now: no other endpoint can take the retry, which is not sent.
    let seen = not_ok(&mut client, 1).await;
    assert_eq!(seen, [StatusCode::TOO_MANY_REQUESTS]);
    assert_eq!(all.load(Ordering::Relaxed), 3);
}
