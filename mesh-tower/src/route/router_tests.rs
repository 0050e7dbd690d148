//! The `Router`: unmatched answers, splits, per-route policy, faults, metrics, swaps.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use mesh_core::config::{
    BackendRef, FaultConfig, FaultHeader, PathMatch, RetryConfig, RouteConfig, RouteMatch,
    TimeoutConfig,
};
use mesh_core::error::BoxError;
use tower::util::BoxCloneSyncService;
use tower::{ServiceBuilder, ServiceExt};

use super::{RouteMetrics, Router, RouterError, Routes};
use crate::retry::{ReplayBody, RetryLayer, RetryPolicy};
use crate::timeout::{RequestTimeout, TimeoutLayer, TryTimeout};

type Backend = BoxCloneSyncService<Request<Empty<Bytes>>, Response<Full<Bytes>>, BoxError>;

/// A backend answering 200 with its name, counting its requests.
fn named(name: &'static str, count: Arc<AtomicUsize>) -> Backend {
    BoxCloneSyncService::new(tower::service_fn(move |_req: Request<Empty<Bytes>>| {
        count.fetch_add(1, Ordering::Relaxed);
        async move { Ok::<_, BoxError>(Response::new(Full::new(Bytes::from(name)))) }
    }))
}

fn route(name: &str, prefix: &str, backends: &[(&str, u32)]) -> RouteConfig {
    RouteConfig {
        name: name.into(),
        hosts: vec![],
        matches: vec![RouteMatch {
            path: Some(PathMatch::Prefix(prefix.into())),
            ..Default::default()
        }],
        backends: backends
            .iter()
            .map(|&(service, weight)| BackendRef {
                service: service.into(),
                weight,
            })
            .collect(),
        retry: None,
        timeout: None,
        fault: None,
    }
}

fn get(path: &str) -> Request<Empty<Bytes>> {
    Request::get(format!("http://users.example.org{path}"))
        .body(Empty::new())
        .unwrap()
}

async fn body<B: http_body::Body>(resp: Response<B>) -> String
where
    B::Error: std::fmt::Debug,
{
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

#[tokio::test]
async fn unmatched_requests_get_404_or_unimplemented_unless_a_default_backend_is_set() {
    let count = Arc::new(AtomicUsize::new(0));
    let routes = Routes::builder()
        .backend("v1", named("v1", count.clone()))
        .route(route("api", "/api", &[("v1", 1)]))
        .build()
        .unwrap();
    let router = Router::new(routes);
    let resp = router.clone().oneshot(get("/other")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert!(resp.body().is_local());

    let grpc = Request::post("http://users.example.org/users.v1.Users/Get")
        .header("content-type", "application/grpc")
        .body(Empty::new())
        .unwrap();
    let resp = router.clone().oneshot(grpc).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["grpc-status"], "12");
    assert_eq!(
        count.load(Ordering::Relaxed),
        0,
        "nothing reached a backend"
    );

    let resp = router.clone().oneshot(get("/api/users")).await.unwrap();
    assert_eq!(body(resp).await, "v1");

    let with_default = Routes::builder()
        .backend("v1", named("v1", count.clone()))
        .backend("fallback", named("fallback", count.clone()))
        .route(route("api", "/api", &[("v1", 1)]))
        .default_backend("fallback")
        .build()
        .unwrap();
    let resp = Router::new(with_default)
        .oneshot(get("/other"))
        .await
        .unwrap();
    assert_eq!(body(resp).await, "fallback");
}

#[test]
fn bad_route_sets_say_which_route_and_what() {
    let count = Arc::new(AtomicUsize::new(0));
    let build = |routes: Vec<RouteConfig>| {
        Routes::builder()
            .backend("v1", named("v1", count.clone()))
            .routes(routes)
            .build()
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        build(vec![route("api", "/api", &[("v2", 1)])]),
        "route `api`: no backend named `v2`"
    );
    assert_eq!(
        build(vec![route("api", "/api", &[("v1", 0)])]),
        "route `api`: every backend has weight 0: nothing would be sent"
    );
    assert_eq!(
        build(vec![
            route("api", "/api", &[("v1", 1)]),
            route("api", "/b", &[("v1", 1)])
        ]),
        "route `api`: another route has the same name"
    );
    let mut faulty = route("api", "/api", &[("v1", 1)]);
    faulty.fault = Some(FaultConfig {
        delay: None,
        delay_ratio: 1.0,
        abort_status: Some(503),
        abort_ratio: 1.5,
        abort_grpc_code: None,
        header: None,
    });
    assert_eq!(
        build(vec![faulty]),
        "route `api`: fault abort_ratio 1.5 is not a ratio from 0 to 1"
    );
    let mut regex = route("api", "/api", &[("v1", 1)]);
    regex.matches[0].path = Some(PathMatch::Regex("(".into()));
    assert!(build(vec![regex]).starts_with("route `api`, matches[0]:"));
    let err = Routes::builder()
        .backend("v1", named("v1", count.clone()))
        .default_backend("nope")
        .build()
        .unwrap_err();
    assert!(matches!(err, RouterError::DefaultBackend(ref n) if n == "nope"));
}

#[tokio::test]
async fn a_seeded_split_sends_each_backend_its_share_and_zero_weights_nothing() {
    let counts: Vec<_> = (0..3).map(|_| Arc::new(AtomicUsize::new(0))).collect();
    let routes = Routes::builder()
        .backend("stable", named("stable", counts[0].clone()))
        .backend("canary", named("canary", counts[1].clone()))
        .backend("off", named("off", counts[2].clone()))
        .route(route(
            "users",
            "/",
            &[("stable", 95), ("canary", 5), ("off", 0)],
        ))
        .seed(11)
        .build()
        .unwrap();
    let router = Router::new(routes);
    let n = 20_000;
    for _ in 0..n {
        router.clone().oneshot(get("/u")).await.unwrap();
    }
    let canary = counts[1].load(Ordering::Relaxed) as f64;
    // Binomial(20 000, 0.05): mean 1000, standard deviation ~31; 5 sigma either way.
    assert!((845.0..1155.0).contains(&canary), "canary got {canary}");
    assert_eq!(counts[2].load(Ordering::Relaxed), 0);
    assert_eq!(
        counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum::<usize>(),
        n
    );
}

type Replayed = BoxCloneSyncService<Request<Empty<Bytes>>, Response<Full<Bytes>>, BoxError>;

/// A backend with its own retry (none) and request timeout (10 s) over a service that
/// fails the first `failures` tries with 503 and takes `latency` per try.
fn backend_with_policy(failures: usize, latency: Duration, tries: Arc<AtomicUsize>) -> Replayed {
    let svc = ServiceBuilder::new()
        .map_response(|r: Response<crate::timeout::ResponseBody<Full<Bytes>>>| {
            r.map(crate::timeout::ResponseBody::into_inner)
        })
        .layer(TimeoutLayer::request(Some(Duration::from_secs(10))))
        .layer(RetryLayer::new(RetryPolicy::never(), Default::default()))
        .layer(TimeoutLayer::per_try(None))
        .service(tower::service_fn(move |_req: Request<ReplayBody>| {
            let n = tries.fetch_add(1, Ordering::Relaxed);
            async move {
                tokio::time::sleep(latency).await;
                let status = if n < failures { 503 } else { 200 };
                Ok::<_, BoxError>(
                    Response::builder()
                        .status(status)
                        .body(Full::new(Bytes::new()))?,
                )
            }
        }));
    BoxCloneSyncService::new(svc)
}

#[tokio::test(start_paused = true)]
async fn a_routes_retry_and_timeouts_replace_the_backends() {
    let tries = Arc::new(AtomicUsize::new(0));
    let backend = backend_with_policy(2, Duration::from_millis(10), tries.clone());
    let mut retried = route("retried", "/retried", &[("b", 1)]);
    retried.retry = Some(RetryConfig {
        max_retries: 3,
        ..RetryConfig::default()
    });
    let mut hasty = route("hasty", "/hasty", &[("b", 1)]);
    hasty.timeout = Some(TimeoutConfig {
        request: Some(Duration::from_millis(5)),
        per_try: None,
    });
    let mut per_try = route("per-try", "/per-try", &[("b", 1)]);
    per_try.timeout = Some(TimeoutConfig {
        request: None,
        per_try: Some(Duration::from_millis(2)),
    });
    let routes = Routes::builder()
        .backend("b", backend)
        .routes([
            route("plain", "/plain", &[("b", 1)]),
            retried,
            hasty,
            per_try,
        ])
        .build()
        .unwrap();
    let router = Router::new(routes);

    // The backend's own policy: no retry, so its first failure is the answer.
    let resp = router.clone().oneshot(get("/plain")).await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(tries.load(Ordering::Relaxed), 1);

    // The route's: up to 3 retries, so the third try's 200 is.
    tries.store(0, Ordering::Relaxed);
    let resp = router.clone().oneshot(get("/retried")).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(tries.load(Ordering::Relaxed), 3);

    // The route's request timeout (5 ms) instead of the backend's 10 s.
    let err = router.clone().oneshot(get("/hasty")).await.unwrap_err();
    assert!(err.is::<RequestTimeout>(), "{err}");

    // The route's per-try timeout, though the backend has none.
    let err = router.clone().oneshot(get("/per-try")).await.unwrap_err();
    assert!(
        mesh_core::error::is_caused_by::<TryTimeout>(err.as_ref()),
        "{err}"
    );
}

#[tokio::test(start_paused = true)]
async fn route_faults_apply_to_their_route_only_and_may_need_a_header() {
    let count = Arc::new(AtomicUsize::new(0));
    let mut broken = route("broken", "/broken", &[("v1", 1)]);
    broken.fault = Some(FaultConfig {
        delay: None,
        delay_ratio: 1.0,
        abort_status: Some(503),
        abort_ratio: 1.0,
        abort_grpc_code: None,
        header: None,
    });
    let mut targeted = route("targeted", "/targeted", &[("v1", 1)]);
    targeted.fault = Some(FaultConfig {
        delay: Some(Duration::from_secs(1)),
        delay_ratio: 1.0,
        abort_status: None,
        abort_ratio: 1.0,
        abort_grpc_code: Some(8),
        header: Some(FaultHeader {
            name: "x-chaos".into(),
            value: Some("on".into()),
        }),
    });
    let routes = Routes::builder()
        .backend("v1", named("v1", count.clone()))
        .routes([broken, targeted, route("fine", "/fine", &[("v1", 1)])])
        .build()
        .unwrap();
    let router = Router::new(routes);

    let resp = router.clone().oneshot(get("/broken")).await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["x-mesh-fault"], "abort");
    let resp = router.clone().oneshot(get("/fine")).await.unwrap();
    assert_eq!(body(resp).await, "v1");
    let resp = router.clone().oneshot(get("/targeted")).await.unwrap();
    assert_eq!(body(resp).await, "v1", "no header: no fault");
    assert_eq!(count.load(Ordering::Relaxed), 2);

    let grpc = Request::post("http://users.example.org/targeted/M")
        .header("content-type", "application/grpc")
        .header("x-chaos", "on")
        .body(Empty::new())
        .unwrap();
    let started = tokio::time::Instant::now();
    let resp = router.clone().oneshot(grpc).await.unwrap();
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(1),
        "delayed, then aborted"
    );
    assert_eq!(resp.headers()["grpc-status"], "8");
    assert_eq!(
        count.load(Ordering::Relaxed),
        2,
        "the abort never reached v1"
    );
}

/// Seeded, each backend's faults come from a sequence of its own: two routes with the
/// same fault abort different requests, the same way every run. (From the one seed, every
/// backend drew the same sequence: the k-th request of each was aborted alike, and a
/// route's first pick equalled its first fault draw.)
#[tokio::test]
async fn seeded_faults_differ_between_backends_and_repeat_between_runs() {
    let run = || async {
        let fault = FaultConfig {
            delay: None,
            delay_ratio: 1.0,
            abort_status: Some(503),
            abort_ratio: 0.5,
            abort_grpc_code: None,
            header: None,
        };
        let mut one = route("one", "/one", &[("a", 1)]);
        one.fault = Some(fault.clone());
        let mut two = route("two", "/two", &[("b", 1)]);
        two.fault = Some(fault);
        let count = Arc::new(AtomicUsize::new(0));
        let routes = Routes::builder()
            .backend("a", named("a", count.clone()))
            .backend("b", named("b", count.clone()))
            .routes([one, two])
            .seed(7)
            .build()
            .unwrap();
        let router = Router::new(routes);
        let mut aborted = (Vec::new(), Vec::new());
        for _ in 0..200 {
            for (path, log) in [("/one", &mut aborted.0), ("/two", &mut aborted.1)] {
                let resp = router.clone().oneshot(get(path)).await.unwrap();
                log.push(resp.status() == StatusCode::SERVICE_UNAVAILABLE);
            }
        }
        aborted
    };
    let (one, two) = run().await;
    assert_eq!(
        (one.clone(), two.clone()),
        run().await,
        "the same every run"
    );
    let differ = one.iter().zip(&two).filter(|(x, y)| x != y).count();
    // Independent halves differ in about 100 of 200 places; identical ones in none.
    assert!((60..=140).contains(&differ), "{differ} of 200 differ");
    for log in [&one, &two] {
        let n = log.iter().filter(|a| **a).count();
        assert!((60..=140).contains(&n), "{n} of 200 aborted");
    }
}

#[tokio::test]
async fn metrics_count_by_route_and_backend() {
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = RouteMetrics::register(&mut registry);
    let count = Arc::new(AtomicUsize::new(0));
    let routes = Routes::builder()
        .backend("v1", named("v1", count.clone()))
        .route(route("api", "/api", &[("v1", 1)]))
        .metrics(&metrics)
        .build()
        .unwrap();
    let router = Router::new(routes);
    for path in ["/api/a", "/api/b", "/nowhere"] {
        router.clone().oneshot(get(path)).await.unwrap();
    }
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    for line in [
        r#"mesh_route_requests_total{route="api",backend="v1"} 2"#,
        r#"mesh_route_responses_total{route="api",status_class="2xx"} 2"#,
        r#"mesh_route_request_duration_seconds_count{route="api"} 2"#,
        "mesh_route_unmatched_total 1",
    ] {
        assert!(text.contains(line), "{line} missing from\n{text}");
    }
    // A reload's new set keeps the route's series while the old set goes; a set without
    // the route (the last holding it gone) removes them.
    let encode = |registry: &prometheus_client::registry::Registry| {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
        text
    };
    let next = Routes::builder()
        .backend("v1", named("v1", count.clone()))
        .route(route("api", "/api", &[("v1", 1)]))
        .metrics(&metrics)
        .build()
        .unwrap();
    drop(router);
    let text = encode(&registry);
    assert!(
        text.contains(r#"mesh_route_requests_total{route="api",backend="v1"} 2"#),
        "{text}"
    );
    let without = Routes::builder()
        .backend("v1", named("v1", count.clone()))
        .route(route("other", "/other", &[("v1", 1)]))
        .metrics(&metrics)
        .build()
        .unwrap();
    drop(next);
    let text = encode(&registry);
    assert!(!text.contains(r#"route="api""#), "{text}");
    assert!(text.contains(r#"route="other""#), "{text}");
    drop(without);
}

/// Swapping route sets while requests are in flight loses none: each is answered by a
/// backend of the set that routed it, and requests after a swap use the new set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapping_tables_under_load_loses_no_request() {
    let v1 = Arc::new(AtomicUsize::new(0));
    let v2 = Arc::new(AtomicUsize::new(0));
    let slow = |name: &'static str, count: Arc<AtomicUsize>| -> Backend {
        BoxCloneSyncService::new(tower::service_fn(move |_req: Request<Empty<Bytes>>| {
            count.fetch_add(1, Ordering::Relaxed);
            async move {
                tokio::task::yield_now().await;
                Ok::<_, BoxError>(Response::new(Full::new(Bytes::from(name))))
            }
        }))
    };
    let set = |backend: &'static str| {
        Routes::builder()
            .backend("v1", slow("v1", v1.clone()))
            .backend("v2", slow("v2", v2.clone()))
            .route(route("api", "/api", &[(backend, 1)]))
            .build()
            .unwrap()
    };
    let router = Router::new(set("v1"));
    let per_task = 500;
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let router = router.clone();
            tokio::spawn(async move {
                let mut answered = 0;
                for _ in 0..per_task {
                    let resp = router.clone().oneshot(get("/api/x")).await.unwrap();
                    assert_eq!(resp.status(), StatusCode::OK);
                    let who = body(resp).await;
                    assert!(who == "v1" || who == "v2", "{who}");
                    answered += 1;
                }
                answered
            })
        })
        .collect();
    let mut swaps = 0;
    while !tasks.iter().all(|t| t.is_finished()) {
        router.replace(set(if swaps % 2 == 0 { "v2" } else { "v1" }));
        swaps += 1;
        tokio::task::yield_now().await;
    }
    let mut answered = 0;
    for t in tasks {
        answered += t.await.unwrap();
    }
    assert_eq!(answered, 8 * per_task);
    assert_eq!(
        v1.load(Ordering::Relaxed) + v2.load(Ordering::Relaxed),
        8 * per_task
    );
    assert!(
        swaps > 1,
        "the table was swapped under load ({swaps} times)"
    );

    router.replace(set("v2"));
    let before = v2.load(Ordering::Relaxed);
    let resp = router.clone().oneshot(get("/api/after")).await.unwrap();
    assert_eq!(body(resp).await, "v2");
    assert_eq!(v2.load(Ordering::Relaxed), before + 1);
}

#[test]
fn a_router_is_a_service_of_any_clone_backend() {
    fn is_service<S: tower_service::Service<Request<Empty<Bytes>>> + Clone + Send + Sync>(_: &S) {}
    let r = Router::new(
        Routes::builder()
            .backend(
                "v1",
                tower::service_fn(|_req: Request<Empty<Bytes>>| async {
                    Ok::<_, Infallible>(Response::new(()))
                }),
            )
            .build()
            .unwrap(),
    );
    is_service(&r);
}
