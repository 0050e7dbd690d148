//! `MeshChannel` and `GrpcServer` on loopback with SPIFFE mTLS from the test CA: every
//! kind of gRPC call to three endpoints, identities and authorization decisions in the
//! handlers, authorization and rate limiting as gRPC codes, deadlines, health.
#![cfg(feature = "test-util")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{BATCH, Mesh, Serve, WEB, msg};
use mesh_core::config::{
    AuthorizationPolicy, AuthorizationRule, DefaultAction, GrpcMatch, Rate, RateLimitConfig,
    RouteMatch,
};
use mesh_tonic::test_util::echo::EchoRequest;
use mesh_tonic::test_util::echo::echo_client::EchoClient;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

async fn three(mesh: &mut Mesh) -> Vec<common::Ep> {
    let mut eps = Vec::new();
    for name in ["a", "b", "c"] {
        eps.push(mesh.endpoint(name, Serve::default()).await);
    }
    eps
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_call_goes_through_the_channel_to_three_endpoints_over_mtls() {
    let mut mesh = Mesh::new();
    let eps = three(&mut mesh).await;
    let addrs: Vec<_> = eps.iter().map(|e| e.addr).collect();
    let channel = mesh.channel(WEB, &addrs);
    let mut client = EchoClient::new(channel.clone());

    // Unary, concurrent, spread across the endpoints; the handler saw the verified client.
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..60 {
        let mut client = client.clone();
        calls.spawn(async move {
            let reply = client
                .unary(msg(&format!("hello {i}")))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(reply.message, format!("hello {i}"));
            reply
        });
    }
    let mut by_endpoint = HashMap::new();
    while let Some(reply) = calls.join_next().await {
        let reply = reply.unwrap();
        assert_eq!(reply.peer, WEB);
        assert_eq!(reply.decision, "default/default");
        *by_endpoint.entry(reply.endpoint).or_insert(0) += 1;
    }
    assert_eq!(by_endpoint.len(), 3, "{by_endpoint:?}");

    // Server streaming.
    let req = EchoRequest {
        message: "tick".into(),
        count: 5,
    };
    let replies: Vec<_> = client
        .server_stream(req)
        .await
        .unwrap()
        .into_inner()
        .collect::<Result<Vec<_>, _>>()
        .await
        .unwrap();
    assert_eq!(replies.len(), 5);
    assert!(
        replies
            .iter()
            .enumerate()
            .all(|(i, r)| r.index as usize == i)
    );

    // Client streaming.
    let words = tokio_stream::iter(["one", "two", "three"].map(msg));
    let reply = client.client_stream(words).await.unwrap().into_inner();
    assert_eq!((reply.message.as_str(), reply.index), ("one two three", 3));
    assert_eq!(reply.peer, WEB);

    // Bidi: each request answered as it comes, interleaved.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut replies = client
        .bidi(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for i in 0..4 {
        tx.send(msg(&format!("ping {i}"))).await.unwrap();
        let reply = replies.next().await.unwrap().unwrap();
        assert_eq!((reply.message, reply.index), (format!("ping {i}"), i));
    }
    drop(tx);
    assert!(replies.next().await.is_none());

    // Every endpoint served calls (generated clients are cheap clones).
    let total: u64 = eps.iter().map(|e| e.echo.calls()).sum();
    assert_eq!(total, 63);
}

fn policy() -> AuthorizationPolicy {
    let grpc = |method: &str| RouteMatch {
        grpc: Some(GrpcMatch {
            service: "mesh.test.v1.Echo".into(),
            method: Some(method.into()),
        }),
        ..RouteMatch::default()
    };
    AuthorizationPolicy {
        default: DefaultAction::Deny,
        rules: vec![
            AuthorizationRule {
                name: "web-unary".into(),
                clients: vec![WEB.parse().unwrap()],
                unauthenticated: false,
                routes: vec![grpc("Unary")],
            },
            AuthorizationRule {
                name: "batch-streams".into(),
                clients: vec![BATCH.parse().unwrap()],
                unauthenticated: false,
                routes: vec![grpc("ServerStream")],
            },
        ],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_method_authorization_allows_and_denies_with_permission_denied() {
    let mut mesh = Mesh::new();
    let serve = Serve {
        policy: Some(policy()),
        ..Serve::default()
    };
    let ep = mesh.endpoint("a", serve).await;
    let mut web = EchoClient::new(mesh.channel(WEB, &[ep.addr]));
    let mut batch = EchoClient::new(mesh.channel(BATCH, &[ep.addr]));

    let reply = web.unary(msg("hi")).await.unwrap().into_inner();
    assert_eq!(
        (reply.peer.as_str(), reply.decision.as_str()),
        (WEB, "echo/web-unary")
    );
    let denied = batch.unary(msg("hi")).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");

    let req = EchoRequest {
        message: "x".into(),
        count: 2,
    };
    let denied = web.server_stream(req.clone()).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let replies = batch.server_stream(req).await.unwrap().into_inner();
    assert_eq!(replies.collect::<Vec<_>>().await.len(), 2);
    // Denied calls never reached the handler.
    assert_eq!(ep.echo.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_answers_resource_exhausted() {
    let mut mesh = Mesh::new();
    let serve = Serve {
        rate_limit: Some(RateLimitConfig {
            per_client: Some(Rate {
                requests: 2,
                per: Duration::from_secs(60),
                burst: None,
            }),
            ..RateLimitConfig::default()
        }),
        ..Serve::default()
    };
    let ep = mesh.endpoint("a", serve).await;
    let mut web = EchoClient::new(mesh.channel(WEB, &[ep.addr]));
    web.unary(msg("1")).await.unwrap();
    web.unary(msg("2")).await.unwrap();
    let refused = web.unary(msg("3")).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    let pushback: u64 = refused
        .metadata()
        .get("grpc-retry-pushback-ms")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(pushback > 1_000, "{pushback}");
    // Another client has its own budget.
    let mut batch = EchoClient::new(mesh.channel(BATCH, &[ep.addr]));
    batch.unary(msg("1")).await.unwrap();
    assert_eq!(ep.echo.calls(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_fail_locally_when_expired_and_bound_the_call() {
    let mut mesh = Mesh::new();
    let ep = mesh.endpoint("a", Serve::default()).await;
    let mut client = EchoClient::new(mesh.channel(WEB, &[ep.addr]));
    client.unary(msg("warm up")).await.unwrap();

    // The server sees the time left.
    let mut req = tonic::Request::new(msg("x"));
    req.set_timeout(Duration::from_secs(5));
    let reply = client.unary(req).await.unwrap().into_inner();
    let seen =
        mesh_core::classify::grpc::parse_timeout(&reply.grpc_timeout.parse().unwrap()).unwrap();
    assert!(
        seen <= Duration::from_secs(5) && seen > Duration::from_secs(4),
        "{seen:?}"
    );

    // A malformed grpc-timeout set by hand sets no deadline and is not sent on (a mesh
    // server would refuse the call with INTERNAL).
    let mut req = tonic::Request::new(msg("x"));
    req.metadata_mut()
        .insert("grpc-timeout", "5s".parse().unwrap());
    let reply = client.unary(req).await.unwrap().into_inner();
    assert_eq!(reply.grpc_timeout, "");

    // An expired Deadline: DEADLINE_EXCEEDED, nothing sent.
    let mut req = tonic::Request::new(msg("x"));
    req.extensions_mut().insert(mesh_tonic::deadline::Deadline(
        tokio::time::Instant::now() - Duration::from_millis(1),
    ));
    let status = client.unary(req).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded);
    assert_eq!(
        status.message(),
        "echo: deadline exceeded before the call was sent"
    );
    assert_eq!(ep.echo.calls(), 3);

    // A deadline that passes during the call ends it with DEADLINE_EXCEEDED.
    let mut req = tonic::Request::new(msg("sleep 2000"));
    req.set_timeout(Duration::from_millis(200));
    let start = tokio::time::Instant::now();
    let status = client.unary(req).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    let took = start.elapsed();
    assert!(took < Duration::from_millis(1_000), "{took:?}");

    // A streaming call is bounded too, body included.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    req.set_timeout(Duration::from_millis(300));
    let mut replies = client.bidi(req).await.unwrap().into_inner();
    tx.send(msg("one")).await.unwrap();
    assert_eq!(replies.next().await.unwrap().unwrap().message, "one");
    let status = replies.next().await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
}

/// A server streaming faster than its caller reads keeps the response body ready (hyper
/// buffers up to the stream's flow-control window), and the deadline still ends the call
/// when it passes.
#[tokio::test(start_paused = true)]
async fn the_deadline_ends_a_stream_read_slower_than_it_is_sent() {
    // Paused time jumps to the next timer whenever the runtime waits, on its sockets too:
    // this ticker keeps each jump to 1 ms, so that the deadline passes as the caller reads.
    let ticker = tokio::spawn(async {
        loop {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    let mut mesh = Mesh::new();
    let ep = mesh.endpoint("a", Serve::default()).await;
    let mut client = EchoClient::new(mesh.channel(WEB, &[ep.addr]));
    client.unary(msg("warm up")).await.unwrap();

    // 1,000 replies of 8 KiB: the server sends them as fast as the window allows; the
    // caller reads one every 10 ms.
    let mut req = tonic::Request::new(EchoRequest {
        message: "x".repeat(8 << 10),
        count: 1_000,
    });
    req.set_timeout(Duration::from_secs(1));
    let start = tokio::time::Instant::now();
    let mut replies = client.server_stream(req).await.unwrap().into_inner();
    let mut read = 0;
    let status = loop {
        match replies.message().await {
            Ok(reply) => assert!(reply.is_some(), "the stream ended after {read} replies"),
            Err(status) => break status,
        }
        read += 1;
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{read} replies read in {:?}, past the deadline",
            start.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let took = start.elapsed();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(read > 50, "{read} replies");
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_millis(1_100),
        "{took:?}"
    );
    ticker.abort();
}

/// A service name that is not a valid `:authority` never costs a call its path: the builder
/// refuses it unless an authority is set, and a channel over an existing client sends
/// the calls with the endpoint's address for their authority.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_names_that_are_not_authorities_never_lose_the_path() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let echo = mesh_tonic::test_util::EchoService::new("plain");
    let mesh = mesh_tower::server::MeshServer::builder().plaintext();
    let _server = mesh_tonic::server::GrpcServer::builder(mesh)
        .add_service(echo.server())
        .serve(listener)
        .await
        .unwrap();
    let builder = |name: &str| {
        mesh_tonic::MeshChannel::builder(common::discovery(&[addr]))
            .service_name(name)
            .plaintext()
    };
    for name in ["users v2", "", "a/b"] {
        let error = builder(name).build().unwrap_err();
        assert!(
            matches!(
                error,
                mesh_tower::client::BuildError::Invalid("service_name", _)
            ),
            "{name:?}: {error}"
        );
        // With an authority of its own, the name is only a name.
        let channel = builder(name)
            .authority(http::uri::Authority::from_static("echo"))
            .build()
            .unwrap();
        let reply = EchoClient::new(channel).unary(msg(name)).await.unwrap();
        assert_eq!(reply.into_inner().message, name);
        let client = mesh_tower::MeshClient::builder(common::discovery(&[addr]))
            .protocol(mesh_core::config::Protocol::Grpc)
            .plaintext()
            .build()
            .unwrap();
        let channel = mesh_tonic::MeshChannel::from_client(client, name, false);
        let reply = EchoClient::new(channel).unary(msg(name)).await;
        assert_eq!(reply.unwrap().into_inner().message, name, "{name:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_errors_are_statuses_naming_the_service() {
    let mut mesh = Mesh::new();
    // Nothing listens there.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let channel = mesh.channel(WEB, &[addr]);
    let status = EchoClient::new(channel).unary(msg("x")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().starts_with("echo: "), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_serving_while_listening_and_not_serving_on_shutdown() {
    let mut mesh = Mesh::new();
    let mut ep = mesh.endpoint("a", Serve::default()).await;
    let mut health = HealthClient::new(mesh.channel(WEB, &[ep.addr]));
    for service in ["", "mesh.test.v1.Echo"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "{service:?}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "nope.Nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    // Watch, then shut down: NOT_SERVING arrives before the connection drains.
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "mesh.test.v1.Echo".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.next().await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );
    let server = ep.server.take().unwrap();
    let shutdown = tokio::spawn(server.shutdown());
    assert_eq!(
        watch.next().await.unwrap().unwrap().status(),
        ServingStatus::NotServing
    );
    drop(watch);
    shutdown.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_from_config_in_plaintext_and_inbound_metrics_by_method_and_code() {
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = mesh_tower::metrics::server::ServerMetrics::register(&mut registry);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let echo = mesh_tonic::test_util::EchoService::new("plain");
    let mesh = mesh_tower::server::MeshServer::builder()
        .plaintext()
        .metrics(metrics.listener("grpc"));
    let _server = mesh_tonic::server::GrpcServer::builder(mesh)
        .add_service(echo.server())
        .serve(listener)
        .await
        .unwrap();

    let config = mesh_core::config::MeshConfig::from_toml(&format!(
        r#"
        [identity]
        source = "spire"

        [services.echo]
        discovery = {{ kind = "static", endpoints = [{{ addr = "{addr}" }}] }}
        tls = "plaintext"
        protocol = "grpc"

        [services.echo.timeout]
        request = "5s"
        "#
    ))
    .unwrap();
    let channel = mesh_tonic::MeshChannelBuilder::from_config(
        "echo",
        &config.services["echo"],
        common::discovery(&[addr]),
    )
    .build()
    .unwrap();
    assert_eq!(channel.service_name(), "echo");
    let mut client = EchoClient::new(channel);
    let reply = client.unary(msg("plain")).await.unwrap().into_inner();
    assert_eq!(
        (reply.endpoint.as_str(), reply.peer.as_str()),
        ("plain", "")
    );
    // The request timeout reached the server as grpc-timeout.
    assert!(!reply.grpc_timeout.is_empty());
    let unknown = client
        .server_stream(EchoRequest::default())
        .await
        .unwrap()
        .into_inner()
        .collect::<Vec<_>>()
        .await;
    assert!(unknown.is_empty());

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let unary = r#"rpc_server_duration_seconds_count{listener="grpc",rpc_system="grpc",rpc_service="mesh.test.v1.Echo",rpc_method="Unary",rpc_grpc_status_code="0"} 1"#;
    assert!(text.contains(unary), "{text}");
}
