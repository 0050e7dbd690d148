//! Scenario tests of the client stack on loopback with SPIFFE mTLS: mock endpoints with
//! scripted behaviour, and the whole `MeshClient` in front of them.
#![cfg(feature = "test-util")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use mesh_core::config::{BreakerConfig, PoolConfig, Protocol, RetryConfig};
use mesh_core::discover::{BoxDiscover, Change, StaticDiscovery};
use mesh_core::{Endpoint, SpiffeId};
use mesh_spiffe::test_ca::TestCa;
use mesh_spiffe::{Authorizer, CredentialStore, Mtls, MtlsAcceptor};
use mesh_tower::MeshClient;
use mesh_tower::mock::{Behavior, MockEndpoint};
use tokio::sync::mpsc;
use tokio::time::Instant;

const SERVER_ID: &str = "spiffe://example.org/ns/prod/sa/users";

struct Mesh {
    ca: TestCa,
    client_mtls: Mtls,
}

impl Mesh {
    fn new() -> Self {
        let mut ca = TestCa::new("example.org").unwrap();
        let svid = ca.issue("spiffe://example.org/ns/prod/sa/web").unwrap();
        let client_mtls = Mtls::new(CredentialStore::with(svid, ca.bundle_set().unwrap()));
        Self { ca, client_mtls }
    }

    async fn endpoint(&mut self, name: &str, behavior: Behavior) -> MockEndpoint {
        let svid = self.ca.issue(SERVER_ID).unwrap();
        let mtls = Mtls::new(CredentialStore::with(svid, self.ca.bundle_set().unwrap()));
        let acceptor = MtlsAcceptor::new(
            &mtls,
            Authorizer::trust_domain(self.ca.trust_domain().clone()),
        )
        .unwrap();
        MockEndpoint::spawn_mtls(name, behavior, acceptor)
            .await
            .unwrap()
    }

    fn client(&self, discovery: BoxDiscover) -> mesh_tower::MeshClientBuilder {
        MeshClient::builder(discovery)
            .mtls(self.client_mtls.clone())
            .server_identity(SERVER_ID.parse().unwrap())
    }
}

fn endpoints(eps: &[&MockEndpoint]) -> BoxDiscover {
    Box::pin(StaticDiscovery::new(
        eps.iter().map(|e| Endpoint::new(e.addr())),
    ))
}

fn get() -> Request<Empty<Bytes>> {
    Request::get("http://users/").body(Empty::new()).unwrap()
}

/// Runs `workers` concurrent request loops for `duration`; returns (ok, failed, latencies).
async fn load(
    client: &MeshClient,
    workers: usize,
    duration: Duration,
) -> (u64, u64, Vec<Duration>) {
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + duration;
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (client, ok, failed) = (client.clone(), ok.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < until {
                let start = Instant::now();
                match client.send(get()).await {
                    Ok(resp) if resp.status().is_success() => {
                        let _ = resp.into_body().collect().await;
                        ok.fetch_add(1, Ordering::Relaxed);
                        latencies.push(start.elapsed());
                    }
                    Ok(resp) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        eprintln!("failed: {}", resp.status());
                    }
                    Err(e) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        eprintln!("failed: {e}");
                    }
                }
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    (
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        all,
    )
}

fn requests(ep: &MockEndpoint) -> u64 {
    ep.stats().requests()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fastest_endpoint_takes_most_traffic_and_the_slowest_almost_none() {
    let mut mesh = Mesh::new();
    let fast = mesh
        .endpoint("fast", Behavior::latency(Duration::from_millis(5)))
        .await;
    let medium = mesh
        .endpoint("medium", Behavior::latency(Duration::from_millis(50)))
        .await;
    let slow = mesh
        .endpoint("slow", Behavior::latency(Duration::from_millis(500)))
        .await;
    let client = mesh
        .client(endpoints(&[&fast, &medium, &slow]))
        .build()
        .unwrap();

    load(&client, 4, Duration::from_secs(1)).await; // warm-up
    let before = [requests(&fast), requests(&medium), requests(&slow)];
    let (ok, failed, latencies) = load(&client, 4, Duration::from_secs(3)).await;
    let after = [requests(&fast), requests(&medium), requests(&slow)];
    let share: Vec<f64> = (0..3)
        .map(|i| (after[i] - before[i]) as f64 / ok as f64)
        .collect();
    assert_eq!(failed, 0);
    assert!(share[0] > share[1] && share[0] > 0.5, "shares {share:?}");
    assert!(
        share[2] < 0.02,
        "the 500 ms endpoint took {:.1} %",
        share[2] * 100.0
    );
    let p99 = latencies[latencies.len() * 99 / 100];
    assert!(p99 < Duration::from_millis(150), "p99 {p99:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_killed_mid_run_loses_no_idempotent_request() {
    let mut mesh = Mesh::new();
    let a = mesh
        .endpoint("a", Behavior::latency(Duration::from_millis(5)))
        .await;
    let b = mesh
        .endpoint("b", Behavior::latency(Duration::from_millis(5)))
        .await;
    let c = mesh
        .endpoint("c", Behavior::latency(Duration::from_millis(5)))
        .await;
    let client = mesh.client(endpoints(&[&a, &b, &c])).build().unwrap();
    let run = tokio::spawn({
        let client = client.clone();
        async move { load(&client, 8, Duration::from_secs(2)).await }
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    let served_before_kill = requests(&b);
    b.kill();
    let (ok, failed, _) = run.await.unwrap();
    assert!(served_before_kill > 0);
    assert_eq!(failed, 0, "{failed} of {} requests failed", ok + failed);
    assert!(ok > 100, "{ok}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_endpoint_is_avoided_for_its_retry_after_and_recovers() {
    let mut mesh = Mesh::new();
    let a = mesh
        .endpoint("a", Behavior::latency(Duration::from_millis(2)))
        .await;
    let b = mesh
        .endpoint("b", Behavior::latency(Duration::from_millis(2)))
        .await;
    let limited = mesh
        .endpoint("limited", Behavior::rate_limited(Some(2)))
        .await;
    let client = mesh.client(endpoints(&[&a, &b, &limited])).build().unwrap();

    // Over the penalty: the limited endpoint gets its first request(s), then a few percent.
    let (ok, _, _) = load(&client, 4, Duration::from_millis(1500)).await;
    let during = requests(&limited);
    let total = ok + limited.stats().rate_limited.load(Ordering::Relaxed);
    assert!(
        (during as f64) < 0.03 * total as f64,
        "{during} of {total} went to the limited endpoint"
    );

    // It stops limiting; once the 2 s penalty is over it gets its share back.
    limited.set_behavior(Behavior::latency(Duration::from_millis(2)));
    tokio::time::sleep(Duration::from_millis(700)).await;
    let before = requests(&limited);
    let (ok, failed, _) = load(&client, 4, Duration::from_secs(1)).await;
    let share = (requests(&limited) - before) as f64 / ok as f64;
    assert_eq!(failed, 0);
    assert!(share > 0.15, "recovered share {share:.3}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_endpoint_is_ejected_probed_and_reinstated() {
    let mut mesh = Mesh::new();
    let a = mesh
        .endpoint("a", Behavior::latency(Duration::from_millis(2)))
        .await;
    let b = mesh
        .endpoint("b", Behavior::latency(Duration::from_millis(2)))
        .await;
    let bad = mesh
        .endpoint("bad", Behavior::failing(StatusCode::SERVICE_UNAVAILABLE))
        .await;
    let breaker: BreakerConfig = toml::from_str(
        "consecutive_failures = 3\nbackoff = { min = \"1500ms\", max = \"1500ms\", jitter = 0.0 }",
    )
    .unwrap();
    let client = mesh
        .client(endpoints(&[&a, &b, &bad]))
        .circuit_breaker(breaker)
        .build()
        .unwrap();
    let bad_slot = || {
        client
            .endpoints()
            .into_iter()
            .find(|s| s.endpoint.addr() == bad.addr())
            .unwrap()
    };
    // Until ejected, failures are retried on healthy endpoints: callers see no failure.
    let (_, failed, _) = load(&client, 2, Duration::from_millis(300)).await;
    assert_eq!(failed, 0);
    let gate_open = |s: &Arc<mesh_tower::balance::Slot<mesh_tower::client::EndpointStack>>| {
        s.service.handle().unwrap().gate().is_open()
    };
    assert!(!gate_open(&bad_slot()), "not ejected");
    // Ejected at the 3rd consecutive failure; a request already in flight may add one.
    let errors = bad.stats().errors.load(Ordering::Relaxed);
    assert!(
        (3..=4).contains(&errors),
        "{errors} failures before ejection"
    );

    // While ejected, it gets nothing.
    let seen = requests(&bad);
    load(&client, 2, Duration::from_millis(300)).await;
    assert_eq!(requests(&bad), seen, "an ejected endpoint got requests");

    // Healthy again: the probe after the 1.5 s back-off reinstates it.
    bad.set_behavior(Behavior::latency(Duration::from_millis(2)));
    load(&client, 2, Duration::from_millis(1500)).await;
    assert!(gate_open(&bad_slot()), "not reinstated");
    assert!(bad.stats().ok.load(Ordering::Relaxed) > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_everything_fails_retries_stay_within_the_budget() {
    let mut mesh = Mesh::new();
    let eps = [
        mesh.endpoint("a", Behavior::failing(StatusCode::BAD_GATEWAY))
            .await,
        mesh.endpoint("b", Behavior::failing(StatusCode::BAD_GATEWAY))
            .await,
        mesh.endpoint("c", Behavior::failing(StatusCode::BAD_GATEWAY))
            .await,
    ];
    let retry: RetryConfig = toml::from_str(
        "max_retries = 3\nbudget = { ratio = 0.2, min_per_second = 10, ttl = \"10s\" }\n\
         backoff = { min = \"1ms\", max = \"2ms\" }",
    )
    .unwrap();
    let client = mesh
        .client(endpoints(&[&eps[0], &eps[1], &eps[2]]))
        .retry(retry)
        .circuit_breaker(BreakerConfig {
            enabled: false,
            ..BreakerConfig::default()
        })
        .build()
        .unwrap();
    let started = Instant::now();
    let n = 300u64;
    for _ in 0..n {
        let resp = client.send(get()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    }
    let secs = started.elapsed().as_secs_f64().ceil();
    let tries: u64 = eps.iter().map(requests).sum();
    let retries = tries - n;
    // 20 % of requests plus 10 per second (the reserve is counted over the 10 s window).
    let allowed = (n as f64 * 0.2 + 10.0 * 10.0_f64.max(secs)) as u64;
    assert!(
        retries <= allowed,
        "{retries} retries for {n} requests (allowed {allowed})"
    );
    assert!(
        retries >= 10,
        "retries were not attempted at all: {retries}"
    );
    assert!(
        tries < n * 2,
        "amplification: {tries} tries for {n} requests"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_churn_under_load_loses_no_request() {
    let mut mesh = Mesh::new();
    let eps = [
        mesh.endpoint("a", Behavior::latency(Duration::from_millis(3)))
            .await,
        mesh.endpoint("b", Behavior::latency(Duration::from_millis(3)))
            .await,
        mesh.endpoint("c", Behavior::latency(Duration::from_millis(3)))
            .await,
        mesh.endpoint("d", Behavior::latency(Duration::from_millis(3)))
            .await,
    ];
    let (tx, rx) = mpsc::unbounded_channel::<Change>();
    let discovery: BoxDiscover = Box::pin(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|c| (Ok(c), rx))
    }));
    let insert = |ep: &MockEndpoint| {
        let e = Endpoint::new(ep.addr());
        Change::Insert(e.key(), e)
    };
    tx.send(insert(&eps[0])).unwrap();
    tx.send(insert(&eps[1])).unwrap();
    let client = mesh.client(discovery).build().unwrap();
    let run = tokio::spawn({
        let client = client.clone();
        async move { load(&client, 8, Duration::from_secs(2)).await }
    });
    for step in 0..8 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        match step % 4 {
            0 => tx.send(insert(&eps[2])).unwrap(),
            1 => tx
                .send(Change::Remove(Endpoint::new(eps[0].addr()).key()))
                .unwrap(),
            2 => tx.send(insert(&eps[3])).unwrap(),
            _ => {
                tx.send(insert(&eps[0])).unwrap();
                tx.send(Change::Remove(Endpoint::new(eps[2].addr()).key()))
                    .unwrap();
            }
        }
    }
    let (ok, failed, _) = run.await.unwrap();
    assert_eq!(failed, 0, "{failed} of {} lost", ok + failed);
    assert!(
        eps.iter().all(|e| requests(e) > 0),
        "every endpoint served at some point"
    );
}

#[tokio::test]
async fn posts_below_the_cap_are_replayed_byte_for_byte_and_above_it_are_not_retried() {
    let mut mesh = Mesh::new();
    let flaky = mesh
        .endpoint(
            "flaky",
            Behavior {
                error_rate: 0.3,
                ..Behavior::default()
            },
        )
        .await;
    let retry: RetryConfig = toml::from_str(
        "max_retries = 10\nnon_idempotent = true\nbudget = { ratio = 1.0, min_per_second = 1000 }\n\
         backoff = { min = \"1ms\", max = \"1ms\" }",
    )
    .unwrap();
    let client = mesh
        .client(endpoints(&[&flaky]))
        .retry(retry)
        .circuit_breaker(BreakerConfig {
            enabled: false,
            ..BreakerConfig::default()
        })
        .build()
        .unwrap();
    let body: Bytes = (0..60 * 1024)
        .map(|i| (i * 7 % 251) as u8)
        .collect::<Vec<_>>()
        .into();
    // 40 requests at a 30 % error rate: some try fails (all succeed at once with
    // probability 0.7^40 < 1e-6) and none fails 11 times in a row (0.3^11 each).
    for _ in 0..40 {
        let req = Request::builder()
            .method(Method::POST)
            .uri("http://users/upload")
            .body(Full::new(body.clone()))
            .unwrap();
        let resp = client.send(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), body);
    }
    assert!(
        flaky.stats().errors.load(Ordering::Relaxed) > 0,
        "no try failed: nothing was replayed"
    );
    assert!(flaky.bodies().iter().all(|b| *b == body));

    // Above the 64 KiB cap: sent once, the failure returned as it is.
    flaky.set_behavior(Behavior::failing(StatusCode::SERVICE_UNAVAILABLE));
    let before = requests(&flaky);
    let big = Bytes::from(vec![1u8; 100 * 1024]);
    let req = Request::builder()
        .method(Method::POST)
        .uri("http://users/upload")
        .body(Full::new(big))
        .unwrap();
    let resp = client.send(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(requests(&flaky) - before, 1);
}

#[tokio::test]
async fn endpoints_are_authenticated_and_wrong_identities_refused() {
    let mut mesh = Mesh::new();
    let ep = mesh.endpoint("a", Behavior::default()).await;
    // Discovery says this address must be a different workload: refused.
    let wrong = Endpoint::new(ep.addr())
        .with_identity(SpiffeId::new("spiffe://example.org/ns/prod/sa/billing").unwrap());
    let client = mesh
        .client(Box::pin(StaticDiscovery::new([wrong])))
        .build()
        .unwrap();
    let err = client.send(get()).await.unwrap_err();
    // The message itself names the cause, not only hyper's "client error (Connect)".
    let message = err.to_string();
    assert!(message.contains("is not authorized"), "{message}");
    assert!(message.contains(&ep.addr().to_string()), "{message}");
    let chain: Vec<String> = mesh_core::error::chain(err.as_ref())
        .map(|e| e.to_string())
        .collect();
    assert!(
        chain.iter().any(|m| m.contains("is not authorized")),
        "{chain:?}"
    );
    assert_eq!(ep.stats().requests(), 0);
}

/// The registry's text, and the value of the series named `name` whose labels contain
/// `labels` (as written in the text).
fn series(
    registry: &prometheus_client::registry::Registry,
    name: &str,
    labels: &str,
) -> Option<f64> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    text.lines()
        .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(labels))
        .and_then(|l| l.rsplit(' ').next())
        .map(|v| v.parse().unwrap())
}

#[tokio::test]
async fn an_endpoints_http1_pool_is_on_metrics_while_it_lives() {
    let ep = MockEndpoint::spawn(
        "a",
        Behavior {
            hang: true,
            ..Behavior::default()
        },
    )
    .await
    .unwrap();
    let mut registry = prometheus_client::registry::Registry::default();
    let client = MeshClient::builder(endpoints(&[&ep]))
        .service_name("users")
        .plaintext()
        .protocol(Protocol::Http1)
        .pool(PoolConfig {
            max_connections: 1,
            max_pending: 1,
            ..PoolConfig::default()
        })
        .retry(RetryConfig {
            enabled: false,
            ..RetryConfig::default()
        })
        .metrics(&mut registry)
        .build()
        .unwrap();
    // An HTTP/2-only service beside it, in the same families: it never pools HTTP/1.1
    // connections, so it has no pool series.
    let h2 = MeshClient::builder(endpoints(&[&ep]))
        .service_name("grpc")
        .plaintext()
        .protocol(Protocol::Grpc)
        .shared_metrics(client.metrics().unwrap())
        .build()
        .unwrap();
    let labels = format!(r#"service="users",server_address="{}""#, ep.addr());
    let connections = |r: &_| series(r, "mesh_client_pool_connections", &labels);
    let waiting = |r: &_| series(r, "mesh_client_pool_requests_waiting", &labels);
    let overflows = |r: &_| series(r, "mesh_client_pool_overflows_total", &labels);

    // One request holds the only connection (the endpoint never answers), one waits.
    let held = tokio::spawn({
        let client = client.clone();
        async move { client.send(get()).await }
    });
    let queued = tokio::spawn({
        let client = client.clone();
        async move { client.send(get()).await }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while (connections(&registry), waiting(&registry)) != (Some(1.0), Some(1.0)) {
        assert!(Instant::now() < deadline, "the pool never filled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(overflows(&registry), Some(0.0));
    // A third finds the line full: refused unsent, and counted.
    let error = client.send(get()).await.unwrap_err();
    assert!(
        mesh_tower::connect::is_pool_overflow(error.as_ref()),
        "{error}"
    );
    assert_eq!(overflows(&registry), Some(1.0));
    assert_eq!(ep.stats().requests(), 1);
    // The HTTP/2 service has its endpoint series, and no pool series.
    let grpc = format!(r#"service="grpc",server_address="{}""#, ep.addr());
    while series(&registry, "mesh_client_endpoint_load", &grpc).is_none() {
        assert!(Instant::now() < deadline, "the grpc endpoint never came up");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        series(&registry, "mesh_client_pool_connections", &grpc),
        None
    );

    // Given up, then the client gone: its pool series go with the endpoint's others.
    held.abort();
    queued.abort();
    assert!(held.await.unwrap_err().is_cancelled());
    assert!(queued.await.unwrap_err().is_cancelled());
    assert_eq!(waiting(&registry), Some(0.0));
    drop((client, h2));
    while connections(&registry).is_some() {
        assert!(
            Instant::now() < deadline,
            "the pool series outlived the client"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(overflows(&registry), None);
}
