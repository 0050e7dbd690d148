//! A `Router` over two `MeshClient` backends on loopback: a 95/5 split, route metrics,
//! a route's retry and timeout applied through a real client stack, and a reload.
#![cfg(feature = "test-util")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Empty;
use mesh_core::Endpoint;
use mesh_core::config::{
    BackendRef, PathMatch, RetryConfig, RouteConfig, RouteMatch, TimeoutConfig,
};
use mesh_core::discover::StaticDiscovery;
use mesh_core::error::is_caused_by;
use mesh_tower::MeshClient;
use mesh_tower::client::error::RequestTimeout;
use mesh_tower::mock::{Behavior, MockEndpoint};
use mesh_tower::route::{RouteMetrics, Router, Routes};
use tower::ServiceExt;

fn client(name: &str, endpoints: &[&MockEndpoint]) -> MeshClient {
    let discovery = StaticDiscovery::new(endpoints.iter().map(|e| Endpoint::new(e.addr())));
    let retry = RetryConfig {
        enabled: false,
        ..RetryConfig::default()
    };
    MeshClient::builder(Box::pin(discovery))
        .service_name(name)
        .plaintext()
        .retry(retry)
        .build()
        .unwrap()
}

fn route(name: &str, prefix: &str, backends: &[(&str, u32)]) -> RouteConfig {
    RouteConfig {
        name: name.into(),
        hosts: vec!["users.example.org".into()],
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
    Request::get(format!("http://users.example.org:8080{path}"))
        .body(Empty::new())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_95_5_split_over_two_mesh_clients_on_loopback() {
    let stable_ep = MockEndpoint::spawn("stable", Behavior::default())
        .await
        .unwrap();
    let canary_ep = MockEndpoint::spawn("canary", Behavior::default())
        .await
        .unwrap();
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = RouteMetrics::register(&mut registry);
    let routes = Routes::builder()
        .backend("users", client("users", &[&stable_ep]))
        .backend("users-v2", client("users-v2", &[&canary_ep]))
        .route(route(
            "users",
            "/api/users",
            &[("users", 95), ("users-v2", 5)],
        ))
        .metrics(&metrics)
        .seed(5)
        .build()
        .unwrap();
    let router = Router::new(routes);

    let n = 2_000u64;
    let mut tasks = Vec::new();
    for worker in 0..8 {
        let router = router.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..n / 8 {
                let resp = router
                    .clone()
                    .oneshot(get(&format!("/api/users/{worker}-{i}")))
                    .await
                    .unwrap();
                assert_eq!(resp.status(), StatusCode::OK);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let stable = stable_ep.stats().requests();
    let canary = canary_ep.stats().requests();
    assert_eq!(stable + canary, n, "every request reached one backend");
    // Binomial(2000, 0.05): mean 100, standard deviation ~9.7; 5 sigma either way.
    assert!((51..150).contains(&canary), "canary got {canary} of {n}");

    let resp = router.clone().oneshot(get("/api/other")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        stable_ep.stats().requests() + canary_ep.stats().requests(),
        n
    );

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let line = format!(r#"mesh_route_requests_total{{route="users",backend="users-v2"}} {canary}"#);
    assert!(text.contains(&line), "{line} missing from\n{text}");
    assert!(text.contains(&format!(
        r#"mesh_route_responses_total{{route="users",status_class="2xx"}} {n}"#
    )));

    // A reload: all of the route to the canary, from the next request on.
    router.replace(
        Routes::builder()
            .backend("users", client("users", &[&stable_ep]))
            .backend("users-v2", client("users-v2", &[&canary_ep]))
            .route(route(
                "users",
                "/api/users",
                &[("users", 0), ("users-v2", 1)],
            ))
            .build()
            .unwrap(),
    );
    for _ in 0..20 {
        let resp = router.clone().oneshot(get("/api/users/1")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    }
    assert_eq!(canary_ep.stats().requests(), canary + 20);
}

#[tokio::test]
async fn a_routes_retry_and_timeout_apply_through_the_client_stack() {
    // Fails 503 every time; the client itself does not retry.
    let failing = MockEndpoint::spawn(
        "failing",
        Behavior::failing(StatusCode::SERVICE_UNAVAILABLE),
    )
    .await
    .unwrap();
    let slow = MockEndpoint::spawn("slow", Behavior::latency(Duration::from_millis(500)))
        .await
        .unwrap();
    let mut retried = route("retried", "/retried", &[("failing", 1)]);
    retried.retry = Some(RetryConfig {
        max_retries: 2,
        ..RetryConfig::default()
    });
    let mut hasty = route("hasty", "/hasty", &[("slow", 1)]);
    hasty.timeout = Some(TimeoutConfig {
        request: Some(Duration::from_millis(50)),
        per_try: None,
    });
    let routes = Routes::builder()
        .backend("failing", client("failing", &[&failing]))
        .backend("slow", client("slow", &[&slow]))
        .routes([route("plain", "/plain", &[("failing", 1)]), retried, hasty])
        .build()
        .unwrap();
    let router = Router::new(routes);

    let resp = router.clone().oneshot(get("/plain")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        failing.stats().requests(),
        1,
        "the client's policy: no retry"
    );

    let resp = router.clone().oneshot(get("/retried")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        failing.stats().requests(),
        4,
        "the route's policy: two retries"
    );

    let started = tokio::time::Instant::now();
    let err = router.clone().oneshot(get("/hasty")).await.unwrap_err();
    assert!(is_caused_by::<RequestTimeout>(err.as_ref()), "{err}");
    assert!(started.elapsed() < Duration::from_millis(400));
}
