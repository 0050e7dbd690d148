//! Timeouts, deadlines, zone preference and metrics of the client stack, against mock
//! endpoints on loopback (plaintext here; the mTLS paths are covered by `scenarios.rs`).
#![cfg(feature = "test-util")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use mesh_core::Endpoint;
use mesh_core::config::{BreakerConfig, RetryConfig, TimeoutConfig, ZoneConfig};
use mesh_core::discover::StaticDiscovery;
use mesh_core::error::is_caused_by;
use mesh_tower::MeshClient;
use mesh_tower::client::error::{NoReadyEndpoints, RequestTimeout};
use mesh_tower::mock::{Behavior, MockEndpoint};
use tokio::time::Instant;

fn get() -> Request<Empty<Bytes>> {
    Request::get("http://users/").body(Empty::new()).unwrap()
}

fn client(endpoints: impl IntoIterator<Item = Endpoint>) -> mesh_tower::MeshClientBuilder {
    MeshClient::builder(Box::pin(StaticDiscovery::new(endpoints))).plaintext()
}

fn timeouts(request: Option<u64>, per_try: Option<u64>) -> TimeoutConfig {
    TimeoutConfig {
        request: request.map(Duration::from_millis),
        per_try: per_try.map(Duration::from_millis),
    }
}

#[tokio::test]
async fn the_request_timeout_bounds_everything() {
    let hung = MockEndpoint::spawn(
        "hung",
        Behavior {
            hang: true,
            ..Behavior::default()
        },
    )
    .await
    .unwrap();
    let client = client([Endpoint::new(hung.addr())])
        .timeout(timeouts(Some(300), None))
        .build()
        .unwrap();
    let started = Instant::now();
    let err = client.send(get()).await.unwrap_err();
    assert!(is_caused_by::<RequestTimeout>(err.as_ref()), "{err}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(800),
        "{took:?}"
    );
}

#[tokio::test]
async fn per_try_timeouts_are_retried_elsewhere_and_steer_traffic_away() {
    // The hung endpoint is in the local zone, so it is tried first.
    let hung = MockEndpoint::spawn(
        "hung",
        Behavior {
            hang: true,
            ..Behavior::default()
        },
    )
    .await
    .unwrap();
    let ok = MockEndpoint::spawn("ok", Behavior::default())
        .await
        .unwrap();
    let client = client([
        Endpoint::new(hung.addr()).with_zone("a"),
        Endpoint::new(ok.addr()).with_zone("b"),
    ])
    .zone(Some("a".into()), ZoneConfig::default())
    .timeout(timeouts(Some(3000), Some(100)))
    .build()
    .unwrap();
    for _ in 0..20 {
        let started = Instant::now();
        let resp = client.send(get()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(started.elapsed() < Duration::from_millis(500));
    }
    // Its timed-out try counted as a 100 ms RTT: traffic spilled away after one try.
    assert_eq!(hung.stats().requests(), 1);
    assert_eq!(ok.stats().requests(), 20);
}

#[tokio::test]
async fn no_retry_waits_past_the_deadline() {
    // 429 is made retryable, but its Retry-After (5 s) ends after the 400 ms deadline:
    // the answer comes back at once instead of a sleep into the timeout.
    let limited = MockEndpoint::spawn("limited", Behavior::rate_limited(Some(5)))
        .await
        .unwrap();
    let retry: RetryConfig = toml::from_str("statuses = [429, \"5xx\"]").unwrap();
    let client = client([Endpoint::new(limited.addr())])
        .retry(retry)
        .timeout(timeouts(Some(400), None))
        .build()
        .unwrap();
    let started = Instant::now();
    let resp = client.send(get()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(
        started.elapsed() < Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(limited.stats().requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_zone_first_and_spill_over_beyond_the_band() {
    let mut eps = Vec::new();
    for name in ["a1", "a2", "b1", "b2"] {
        eps.push(
            MockEndpoint::spawn(name, Behavior::latency(Duration::from_millis(2)))
                .await
                .unwrap(),
        );
    }
    let zoned = eps.iter().map(|e| {
        Endpoint::new(e.addr()).with_zone(if e.name().starts_with('a') { "a" } else { "b" })
    });
    let client = client(zoned)
        .zone(Some("a".into()), ZoneConfig::default())
        .build()
        .unwrap();
    let local = |eps: &[MockEndpoint]| eps[0].stats().requests() + eps[1].stats().requests();
    let total = |eps: &[MockEndpoint]| eps.iter().map(|e| e.stats().requests()).sum::<u64>();
    for _ in 0..200 {
        client.send(get()).await.unwrap();
    }
    assert!(
        local(&eps) as f64 > 0.95 * total(&eps) as f64,
        "{} of {}",
        local(&eps),
        total(&eps)
    );

    // The local zone slows down 25-fold: traffic spills to the other zone.
    for e in &eps[..2] {
        e.set_behavior(Behavior::latency(Duration::from_millis(50)));
    }
    let (l0, t0) = (local(&eps), total(&eps));
    let run = |client: MeshClient| async move {
        for _ in 0..50 {
            client.send(get()).await.unwrap();
        }
    };
    futures_util::future::join_all((0..4).map(|_| run(client.clone()))).await;
    let (dl, dt) = (local(&eps) - l0, total(&eps) - t0);
    assert!((dl as f64) < 0.5 * dt as f64, "{dl} of {dt} stayed local");
}

#[tokio::test]
async fn metrics_are_recorded_in_the_hosts_registry() {
    let ok = MockEndpoint::spawn("ok", Behavior::default())
        .await
        .unwrap();
    let bad = MockEndpoint::spawn("bad", Behavior::failing(StatusCode::SERVICE_UNAVAILABLE))
        .await
        .unwrap();
    let mut registry = prometheus_client::registry::Registry::default();
    // The failing endpoint is local, so it is tried (and retried) until its breaker
    // ejects it; then the healthy remote one serves.
    let client = client([
        Endpoint::new(ok.addr()).with_zone("b"),
        Endpoint::new(bad.addr()).with_zone("a"),
    ])
    .zone(Some("a".into()), ZoneConfig::default())
    .service_name("users")
    .metrics(&mut registry)
    .build()
    .unwrap();
    for _ in 0..30 {
        let resp = client.send(get()).await.unwrap();
        let _ = resp.into_body().collect().await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await; // breaker task
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let ok_line = format!(
        "mesh_client_responses_total{{service=\"users\",server_address=\"{}\",http_response_status_code=\"200\",class=\"success\"}}",
        ok.addr()
    );
    let bad_line = format!(
        "mesh_client_responses_total{{service=\"users\",server_address=\"{}\",http_response_status_code=\"503\",class=\"failure\"}}",
        bad.addr()
    );
    for want in [
        ok_line.as_str(),
        bad_line.as_str(),
        "mesh_client_retries_total{service=\"users\"}",
        "mesh_client_try_duration_seconds_bucket{le=",
        "mesh_client_breaker_transitions_total{service=\"users\"",
        "state=\"ejected\"",
        "mesh_client_endpoint_load{service=\"users\"",
    ] {
        assert!(text.contains(want), "missing {want} in\n{text}");
    }
    assert!(client.metrics().unwrap().retries() > 0);
}

#[tokio::test]
async fn a_client_built_from_configuration_applies_its_policies() {
    let ep = MockEndpoint::spawn(
        "a",
        Behavior {
            hang: true,
            ..Behavior::default()
        },
    )
    .await
    .unwrap();
    let config = mesh_core::config::MeshConfig::from_toml(&format!(
        r#"
        [services.users]
        discovery = {{ kind = "static", endpoints = [{{ addr = "{}" }}] }}
        tls = "plaintext"
        timeout = {{ request = "250ms" }}
        "#,
        ep.addr()
    ))
    .unwrap();
    let users = &config.services["users"];
    let discovery = mesh_core::discover::from_config(&users.discovery)
        .await
        .unwrap();
    let client = mesh_tower::MeshClientBuilder::from_config("users", users, discovery)
        .build()
        .unwrap();
    let started = Instant::now();
    let err = client.send(get()).await.unwrap_err();
    assert!(is_caused_by::<RequestTimeout>(err.as_ref()), "{err}");
    assert!(started.elapsed() < Duration::from_millis(700));

    // mTLS in configuration needs credentials from the caller: building without them fails.
    let mtls: mesh_core::config::ServiceConfig = toml::from_str(
        "discovery = { kind = \"static\", endpoints = [{ addr = \"127.0.0.1:1\" }] }\nserver_identity = \"spiffe://example.org/*\"",
    )
    .unwrap();
    let discovery = Box::pin(StaticDiscovery::new([]));
    let err = mesh_tower::MeshClientBuilder::from_config("x", &mtls, discovery)
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("choose mTLS"), "{err}");
}

/// When no endpoint becomes ready, the error says why, endpoint by endpoint: connects
/// refused (with the socket's error and when the next may start), or a breaker's ejection.
#[tokio::test]
async fn no_ready_endpoint_says_why_for_each() {
    // Two ports nobody listens on: every connect is refused.
    let mut closed = Vec::new();
    for _ in 0..2 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        closed.push(listener.local_addr().unwrap());
    }
    let refused = client(closed.iter().map(|a| Endpoint::new(*a)))
        .fail_fast(Duration::from_millis(300))
        .build()
        .unwrap();
    let mut message = String::new();
    // The first tries meet the refusals themselves; once both back off, the balancer
    // gives up with its reasons.
    for _ in 0..5 {
        let err = refused.send(get()).await.unwrap_err();
        if let Some(e) = mesh_core::error::find_cause::<NoReadyEndpoints>(err.as_ref()) {
            message = e.to_string();
            assert_eq!(e.causes.len(), 2, "{message}");
            break;
        }
    }
    for addr in &closed {
        let (_, reason) = message
            .split_once(&format!("{addr}: "))
            .unwrap_or_else(|| panic!("{addr} not named: {message}"));
        assert!(reason.contains(" failed connect"), "{message}");
        assert!(
            reason.contains(&format!("(the last: connecting to {addr}: ")),
            "{message}"
        );
    }
    assert!(message.contains("refused"), "{message}");
    assert!(message.contains(", the next in "), "{message}");

    // An endpoint whose breaker ejected it, beside one that refuses connects (a breaker
    // always leaves one endpoint in: alone, a failing one would not be ejected).
    let failing = MockEndpoint::spawn(
        "failing",
        Behavior {
            error_rate: 1.0,
            ..Behavior::default()
        },
    )
    .await
    .unwrap();
    let ejecting = client([Endpoint::new(failing.addr()), Endpoint::new(closed[0])])
        .circuit_breaker(BreakerConfig {
            consecutive_failures: 2,
            max_ejected_share: 1.0,
            ..BreakerConfig::default()
        })
        .retry(RetryConfig {
            max_retries: 0,
            ..RetryConfig::default()
        })
        .fail_fast(Duration::from_millis(300))
        .build()
        .unwrap();
    let mut message = String::new();
    for _ in 0..20 {
        match ejecting.send(get()).await {
            Ok(resp) => assert!(resp.status().is_server_error(), "{}", resp.status()),
            Err(err) => {
                if let Some(e) = mesh_core::error::find_cause::<NoReadyEndpoints>(err.as_ref()) {
                    message = e.to_string();
                    break;
                }
            }
        }
    }
    assert!(
        message.contains(&format!(
            "{}: ejected by its circuit breaker",
            failing.addr()
        )),
        "{message}"
    );
    assert!(message.contains(&format!("{}: ", closed[0])), "{message}");
}
