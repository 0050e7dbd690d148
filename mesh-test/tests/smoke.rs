//! The basics: HTTP and gRPC through a wired client to scripted endpoints.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use http::StatusCode;
use mesh_test::{MockMesh, Outcome, Script};
use mesh_tonic::test_util::echo::EchoRequest;
use mesh_tonic::test_util::echo::echo_client::EchoClient;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_requests_reach_every_endpoint_over_mtls_and_are_logged() {
    let mesh = MockMesh::builder().seed(1).build().unwrap();
    let users = mesh.service("users").endpoints(3).spawn().await.unwrap();
    let client = mesh.client(&users).unwrap();
    let run = common::load(&client, 4, Duration::from_millis(500)).await;
    assert_eq!(run.failed, 0, "{:?}", run.failures);
    let log = mesh.events();
    let counts = log.request_counts("users", 3);
    assert_eq!(counts.iter().sum::<u64>(), run.ok);
    assert!(counts.iter().all(|&c| c > 0), "{counts:?}");
    let peer = log.requests("users").next().unwrap().peer.clone().unwrap();
    assert_eq!(peer.to_string(), "spiffe://example.org/client");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_get_the_echo_service_or_the_script() {
    let mesh = MockMesh::new().unwrap();
    let echo = mesh.service("echo").endpoints(2).spawn().await.unwrap();
    let mut client = EchoClient::new(mesh.channel(&echo).unwrap());
    let reply = client
        .unary(EchoRequest {
            message: "hi".into(),
            count: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.message, "hi");
    assert!(reply.endpoint.starts_with("echo-"), "{}", reply.endpoint);
    assert_eq!(reply.peer, "spiffe://example.org/client");

    echo.set_script(Script::failing(StatusCode::SERVICE_UNAVAILABLE));
    let status = client
        .unary(EchoRequest {
            message: "hi".into(),
            count: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    let log = mesh.events();
    assert!(log.requests("echo").all(|r| r.grpc));
    assert!(
        log.count_outcomes("echo", |o| matches!(
            o,
            Outcome::Error {
                grpc_code: Some(14),
                ..
            }
        )) >= 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resource_exhausted_grpc_endpoint_is_sidelined_for_its_pushback() {
    let mesh = MockMesh::new().unwrap();
    let echo = mesh
        .service("echo")
        .scripts([
            Script::default(),
            Script::default(),
            Script::rate_limited(Some(Duration::from_secs(5))),
        ])
        .spawn()
        .await
        .unwrap();
    // RESOURCE_EXHAUSTED named among the codes to retry: a call it ends goes again at
    // once to another endpoint (an application's is not retried unless named, since the
    // call may have done its work).
    let retry = mesh_core::config::RetryConfig {
        grpc_codes: mesh_core::classify::grpc::CodeSet::of(&[
            mesh_core::classify::grpc::Code::Unavailable,
            mesh_core::classify::grpc::Code::ResourceExhausted,
        ]),
        ..Default::default()
    };
    let channel = mesh
        .channel_builder(&echo)
        .unwrap()
        .retry(retry)
        .build()
        .unwrap();
    let client = EchoClient::new(channel);
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..100 {
                let msg = EchoRequest {
                    message: "x".into(),
                    count: 0,
                };
                client.unary(msg).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let log = mesh.events();
    let exhausted = log.count_outcomes("echo", |o| {
        *o == Outcome::RateLimited {
            retry_after: Some(Duration::from_secs(5)),
        }
    });
    assert!(exhausted >= 1);
    assert!(
        exhausted < 12,
        "{exhausted} of 400 calls hit the exhausted endpoint"
    );
    assert_eq!(echo.endpoint(2).unwrap().grpc_calls(), 0);
}
