//! Proxy processes under load: an inbound proxy killed loses no idempotent request, SVID
//! rotation (PEM files rewritten) fails none, SIGTERM drains requests in flight, and
//! gRPC (unary and streaming) crosses both proxies.
#![cfg(unix)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::{Proxy, app, app_with_delay, inbound_config, outbound_config};
use http_body_util::{BodyExt, Empty};
use mesh_spiffe::test_ca::TestCa;

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Empty<Bytes>,
>;

fn client() -> Client {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

/// A response whose head had come through when its body broke off.
const CUT: &str = "cut after 200";

/// `workers` tasks each sending `per_worker` GETs to `egress`; returns the statuses that
/// were not 200 (or the errors), and calls `midway` once half are done.
async fn load(
    egress: SocketAddr,
    workers: usize,
    per_worker: usize,
    midway: impl FnOnce() + Send + 'static,
) -> Vec<String> {
    let client = client();
    let done = Arc::new(AtomicUsize::new(0));
    let total = workers * per_worker;
    let midway = Arc::new(std::sync::Mutex::new(Some(midway)));
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (client, done, midway) = (client.clone(), done.clone(), midway.clone());
        tasks.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            for i in 0..per_worker {
                let uri = format!("http://{egress}/load/{w}/{i}");
                let req = http::Request::get(uri).body(Empty::new()).unwrap();
                match client.request(req).await {
                    Ok(resp) if resp.status() == 200 => {
                        if let Err(e) = resp.into_body().collect().await {
                            failures.push(format!("{CUT}: {e:?}"));
                        }
                    }
                    Ok(resp) => {
                        let status = resp.status();
                        let body = resp.into_body().collect().await.unwrap().to_bytes();
                        failures.push(format!("{status}: {}", String::from_utf8_lossy(&body)));
                    }
                    Err(e) => failures.push(format!("error: {e:?}")),
                }
                if done.fetch_add(1, Ordering::Relaxed) + 1 == total / 2
                    && let Some(f) = midway.lock().unwrap().take()
                {
                    f();
                }
            }
            failures
        }));
    }
    let mut failures = Vec::new();
    for t in tasks {
        failures.extend(t.await.unwrap());
    }
    failures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbound_proxy_killed_under_load_loses_no_idempotent_request() {
    let dir = tempfile::tempdir().unwrap();
    let mut ca = TestCa::new("example.org").unwrap();
    let app = app().await;
    let b1 = Proxy::start(
        &inbound_config(dir.path(), &mut ca, "app", "b1.toml", app),
        2,
    );
    let b2 = Proxy::start(
        &inbound_config(dir.path(), &mut ca, "app", "b2.toml", app),
        2,
    );
    let a_config = outbound_config(
        dir.path(),
        &mut ca,
        "caller",
        &[b1.addr("app"), b2.addr("app")],
        "",
    );
    let a = Proxy::start(&a_config, 2);
    let b1 = Arc::new(std::sync::Mutex::new(Some(b1)));
    let killed = b1.clone();
    let failures = load(a.addr("egress"), 8, 100, move || {
        // SIGKILL: connections reset, nothing drained.
        if let Some(mut b1) = killed.lock().unwrap().take() {
            b1.child.kill().unwrap();
            b1.child.wait().unwrap();
        }
    })
    .await;
    assert!(b1.lock().unwrap().is_none(), "the kill happened mid-run");
    // A response whose status had already reached the client when B1 died cannot be
    // retried by anyone (the client has its answer's head): at most one per worker, and
    // rarely any, since the app's answer is one small frame behind its head. Every other
    // request must succeed.
    let (cut, failed): (Vec<_>, Vec<_>) = failures.into_iter().partition(|f| f.starts_with(CUT));
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
    assert!(cut.len() <= 8, "{} cut: {cut:?}", cut.len());
    assert!(a.terminate().success());
    assert!(b2.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_the_svid_files_under_load_fails_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let mut ca = TestCa::new("example.org").unwrap();
    let app = app().await;
    let b = Proxy::start(
        &inbound_config(dir.path(), &mut ca, "app", "b.toml", app),
        2,
    );
    let a_config = outbound_config(dir.path(), &mut ca, "caller", &[b.addr("app")], "");
    let log = dir.path().join("a.log");
    let a = Proxy::start_with(
        &a_config,
        2,
        Stdio::from(std::fs::File::create(&log).unwrap()),
    );
    let rotate_dir = dir.path().to_owned();
    let rotated = Arc::new(AtomicUsize::new(0));
    let flag = rotated.clone();
    // The same CA signs the new SVID.
    let mut rotate_ca = ca;
    let failures = load(a.addr("egress"), 4, 150, move || {
        let svid = rotate_ca
            .issue("spiffe://example.org/caller-rotated")
            .unwrap();
        let (chain, key) = svid.to_pem();
        // Key first, then chain: the source takes them once both match.
        std::fs::write(rotate_dir.join("caller.key"), key).unwrap();
        std::fs::write(rotate_dir.join("caller.crt"), chain).unwrap();
        flag.store(1, Ordering::Relaxed);
    })
    .await;
    assert_eq!(rotated.load(Ordering::Relaxed), 1);
    assert!(
        failures.is_empty(),
        "{} failed: {failures:?}",
        failures.len()
    );
    // The proxy picked the new SVID up without a restart.
    let mut picked_up = false;
    for _ in 0..50 {
        let text = std::fs::read_to_string(&log).unwrap();
        if text.contains("caller-rotated") {
            picked_up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(picked_up, "no reload of the rotated SVID in the log");
    assert_eq!(
        load(a.addr("egress"), 2, 10, || {}).await,
        Vec::<String>::new()
    );
    assert!(a.terminate().success());
    assert!(b.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_requests_in_flight_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let mut ca = TestCa::new("example.org").unwrap();
    let app = app_with_delay(Duration::from_millis(800)).await;
    let b = Proxy::start(
        &inbound_config(dir.path(), &mut ca, "app", "b.toml", app),
        2,
    );
    let a_config = outbound_config(dir.path(), &mut ca, "caller", &[b.addr("app")], "");
    let a = Proxy::start(&a_config, 2);
    let egress = a.addr("egress");
    let client = client();
    let requests: Vec<_> = (0..6)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let req = http::Request::get(format!("http://{egress}/slow/{i}"))
                    .body(Empty::new())
                    .unwrap();
                client.request(req).await.map(|r| r.status())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = tokio::time::Instant::now();
    let status = tokio::task::spawn_blocking(move || a.terminate())
        .await
        .unwrap();
    assert!(status.success(), "exit 0 after draining");
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "waited for the requests"
    );
    for r in requests {
        assert_eq!(
            r.await.unwrap().unwrap(),
            200,
            "a request in flight was lost"
        );
    }
    // Stopped accepting: the listener is closed.
    assert!(tokio::net::TcpStream::connect(egress).await.is_err());
    assert!(b.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_and_streaming_calls_cross_both_proxies() {
    use mesh_tonic::test_util::EchoService;
    use mesh_tonic::test_util::echo::EchoRequest;
    use mesh_tonic::test_util::echo::echo_client::EchoClient;
    use tokio_stream::StreamExt;

    let dir = tempfile::tempdir().unwrap();
    let mut ca = TestCa::new("example.org").unwrap();
    let echo = EchoService::new("grpc-app");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc_app = mesh_tonic::server::GrpcServer::builder(
        mesh_tower::server::MeshServer::builder().plaintext(),
    )
    .add_service(echo.server())
    .serve(listener)
    .await
    .unwrap();
    let b = Proxy::start(
        &inbound_config(dir.path(), &mut ca, "app", "b.toml", grpc_app.local_addr()),
        2,
    );
    let a_config = outbound_config(dir.path(), &mut ca, "caller", &[b.addr("app")], "");
    let a = Proxy::start(&a_config, 2);

    let discovery =
        mesh_core::discover::StaticDiscovery::new([mesh_core::Endpoint::new(a.addr("egress"))]);
    let channel = mesh_tonic::MeshChannel::builder(Box::pin(discovery))
        .service_name("app")
        .plaintext()
        .build()
        .unwrap();
    let mut client = EchoClient::new(channel);
    let reply = client
        .unary(EchoRequest {
            message: "hello".into(),
            count: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.message, "hello");
    assert_eq!(reply.endpoint, "grpc-app");

    let mut stream = client
        .server_stream(EchoRequest {
            message: "tick".into(),
            count: 5,
        })
        .await
        .unwrap()
        .into_inner();
    let mut indexes = Vec::new();
    while let Some(reply) = stream.next().await {
        indexes.push(reply.unwrap().index);
    }
    assert_eq!(indexes, [0, 1, 2, 3, 4]);

    let requests = tokio_stream::iter((0..3).map(|i| EchoRequest {
        message: format!("m{i}"),
        count: 0,
    }));
    let joined = client.client_stream(requests).await.unwrap().into_inner();
    assert_eq!(joined.message, "m0 m1 m2");
    assert_eq!(echo.calls(), 3);

    assert!(a.terminate().success());
    assert!(b.terminate().success());
    grpc_app.shutdown().await;
}
