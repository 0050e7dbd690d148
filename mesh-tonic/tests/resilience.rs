//! Resilience through `MeshChannel` on loopback over mTLS: an endpoint killed mid-run,
//! `UNAVAILABLE` endpoints retried elsewhere, no retry after commit, a
//! `RESOURCE_EXHAUSTED` endpoint sidelined for its pushback, and deadlines across two
//! hops.
#![cfg(feature = "test-util")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod common;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{Mesh, Serve, WEB, msg};
use mesh_tonic::MeshChannel;
use mesh_tonic::server::GrpcServer;
use mesh_tonic::test_util::echo::echo_client::EchoClient;
use mesh_tonic::test_util::echo::echo_server::{Echo, EchoServer};
use mesh_tonic::test_util::echo::{EchoReply, EchoRequest};
use mesh_tower::server::ServerLimits;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_stream::{Stream, StreamExt};
use tonic::{Code, Request, Response, Status, Streaming};

/// What a scripted endpoint answers.
#[derive(Clone, Copy, Debug)]
enum Script {
    /// Trailers-only UNAVAILABLE.
    Unavailable,
    /// Trailers-only RESOURCE_EXHAUSTED with this pushback.
    Exhausted { pushback_ms: u64 },
    /// Server streaming: response headers and one message, then UNAVAILABLE in the
    /// trailers (the call is committed).
    HeadersThenFail,
}

#[derive(Clone)]
struct Scripted {
    script: Script,
    calls: Arc<AtomicU64>,
}

type Replies = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for Scripted {
    async fn unary(&self, _: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        match self.script {
            Script::Exhausted { pushback_ms } => {
                let mut status = Status::resource_exhausted("busy");
                status.metadata_mut().insert(
                    "grpc-retry-pushback-ms",
                    pushback_ms.to_string().parse().unwrap(),
                );
                Err(status)
            }
            _ => Err(Status::unavailable("scripted")),
        }
    }

    type ServerStreamStream = Replies;

    async fn server_stream(&self, _: Request<EchoRequest>) -> Result<Response<Replies>, Status> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if !matches!(self.script, Script::HeadersThenFail) {
            return Err(Status::unavailable("scripted"));
        }
        let replies = tokio_stream::iter([
            Ok(EchoReply {
                message: "first".into(),
                ..EchoReply::default()
            }),
            Err(Status::unavailable("failed after the first message")),
        ]);
        Ok(Response::new(Box::pin(replies)))
    }

    async fn client_stream(
        &self,
        _: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoReply>, Status> {
        Err(Status::unimplemented("scripted"))
    }

    type BidiStream = Replies;

    async fn bidi(&self, _: Request<Streaming<EchoRequest>>) -> Result<Response<Replies>, Status> {
        Err(Status::unimplemented("scripted"))
    }
}

async fn scripted(mesh: &mut Mesh, script: Script) -> (GrpcServer, SocketAddr, Arc<AtomicU64>) {
    let calls = Arc::new(AtomicU64::new(0));
    let svc = Scripted {
        script,
        calls: calls.clone(),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = GrpcServer::builder(mesh.mesh_server(&Serve::default()))
        .add_service(EchoServer::new(svc))
        .serve(listener)
        .await
        .unwrap();
    (server, addr, calls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_killed_mid_run_loses_no_unary_call() {
    let mut mesh = Mesh::new();
    let mut eps = Vec::new();
    for name in ["a", "b", "c"] {
        // Killed, not drained: connections close with their calls.
        let mut limits = ServerLimits::default();
        limits.shutdown_timeout = Duration::ZERO;
        let serve = Serve {
            limits: Some(limits),
            ..Serve::default()
        };
        eps.push(mesh.endpoint(name, serve).await);
    }
    let addrs: Vec<_> = eps.iter().map(|e| e.addr).collect();
    let client = EchoClient::new(mesh.channel(WEB, &addrs));
    let until = Instant::now() + Duration::from_secs(2);
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (mut client, ok, failed) = (client.clone(), ok.clone(), failed.clone());
        workers.spawn(async move {
            while Instant::now() < until {
                match client.unary(msg("sleep 20")).await {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(status) => {
                        eprintln!("lost: {status:?}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    let before = eps[1].echo.calls();
    eps[1].shutdown().await;
    while workers.join_next().await.is_some() {}
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert!(before > 0, "b served before it was killed");
    assert!(ok > 200, "{ok}");
    assert_eq!(failed, 0, "calls lost ({ok} ok)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unavailable_endpoint_is_retried_elsewhere() {
    let mut mesh = Mesh::new();
    let (_bad, bad_addr, bad_calls) = scripted(&mut mesh, Script::Unavailable).await;
    let good = mesh.endpoint("good", Serve::default()).await;
    let mut client = EchoClient::new(mesh.channel(WEB, &[bad_addr, good.addr]));
    for i in 0..30 {
        let reply = client.unary(msg(&format!("{i}"))).await;
        assert!(reply.is_ok(), "call {i}: {reply:?}");
    }
    assert!(
        bad_calls.load(Ordering::Relaxed) > 0,
        "the bad endpoint was tried"
    );
    assert_eq!(good.echo.calls(), 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_call_is_not_retried() {
    let mut mesh = Mesh::new();
    let (_a, a, a_calls) = scripted(&mut mesh, Script::HeadersThenFail).await;
    let (_b, b, b_calls) = scripted(&mut mesh, Script::HeadersThenFail).await;
    let mut client = EchoClient::new(mesh.channel(WEB, &[a, b]));
    let req = EchoRequest {
        message: "x".into(),
        count: 2,
    };
    let mut replies = client.server_stream(req).await.unwrap().into_inner();
    assert_eq!(replies.next().await.unwrap().unwrap().message, "first");
    let status = replies.next().await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(status.message(), "failed after the first message");
    assert!(replies.next().await.is_none());
    // Response headers arrived: the call was committed, and the UNAVAILABLE in its
    // trailers is not retried.
    let total = a_calls.load(Ordering::Relaxed) + b_calls.load(Ordering::Relaxed);
    assert_eq!(total, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resource_exhausted_endpoint_is_sidelined_for_its_pushback() {
    let mut mesh = Mesh::new();
    let (_busy, busy, busy_calls) =
        scripted(&mut mesh, Script::Exhausted { pushback_ms: 2_000 }).await;
    let good = mesh.endpoint("good", Serve::default()).await;
    let mut client = EchoClient::new(mesh.channel(WEB, &[busy, good.addr]));
    // Within the pushback: the busy endpoint is tried about once. Its application's
    // RESOURCE_EXHAUSTED reaches the caller (the default policy does not name the code,
    // and the call may have done its work); every other call ends well.
    let mut exhausted = 0;
    for i in 0..40 {
        match client.unary(msg(&format!("{i}"))).await {
            Ok(_) => {}
            Err(status) if status.code() == Code::ResourceExhausted => exhausted += 1,
            Err(status) => panic!("call {i}: {status:?}"),
        }
    }
    let tried = busy_calls.load(Ordering::Relaxed);
    assert!(
        (1..=2).contains(&tried),
        "busy endpoint tried {tried} times"
    );
    assert_eq!(
        exhausted, tried,
        "one failed call per try of the busy endpoint"
    );
    // After the pushback it is tried again.
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    for _ in 0..40 {
        let _ = client.unary(msg("after")).await;
    }
    assert!(busy_calls.load(Ordering::Relaxed) > tried);
}

/// Hop A: forwards each unary call to B with its own deadline.
#[derive(Clone)]
struct Forward {
    next: EchoClient<MeshChannel>,
}

#[tonic::async_trait]
impl Echo for Forward {
    async fn unary(&self, req: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let mut outgoing = Request::new(req.get_ref().clone());
        mesh_tonic::deadline::propagate(&req, &mut outgoing);
        let mut next = self.next.clone();
        let reply = next.unary(outgoing).await?.into_inner();
        Ok(Response::new(reply))
    }

    type ServerStreamStream = Replies;

    async fn server_stream(&self, _: Request<EchoRequest>) -> Result<Response<Replies>, Status> {
        Err(Status::unimplemented("forward"))
    }

    async fn client_stream(
        &self,
        _: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoReply>, Status> {
        Err(Status::unimplemented("forward"))
    }

    type BidiStream = Replies;

    async fn bidi(&self, _: Request<Streaming<EchoRequest>>) -> Result<Response<Replies>, Status> {
        Err(Status::unimplemented("forward"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_propagate_across_two_hops() {
    let mut mesh = Mesh::new();
    let b = mesh.endpoint("b", Serve::default()).await;
    let to_b = EchoClient::new(mesh.channel(common::SERVER_ID, &[b.addr]));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a_addr = listener.local_addr().unwrap();
    let _a = GrpcServer::builder(mesh.mesh_server(&Serve::default()))
        .add_service(EchoServer::new(Forward { next: to_b }))
        .serve(listener)
        .await
        .unwrap();
    let mut client = EchoClient::new(mesh.channel(WEB, &[a_addr]));

    // B sees a smaller grpc-timeout than the client set.
    let mut req = Request::new(msg("x"));
    req.set_timeout(Duration::from_secs(2));
    let reply = client.unary(req).await.unwrap().into_inner();
    assert_eq!(reply.endpoint, "b");
    let seen =
        mesh_core::classify::grpc::parse_timeout(&reply.grpc_timeout.parse().unwrap()).unwrap();
    assert!(
        seen < Duration::from_secs(2) && seen > Duration::from_millis(1_500),
        "{seen:?}"
    );

    // The call ends at the client's deadline, though B would take 2 s.
    let mut req = Request::new(msg("sleep 2000"));
    req.set_timeout(Duration::from_millis(300));
    let start = Instant::now();
    let status = client.unary(req).await.unwrap_err();
    let took = start.elapsed();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(800),
        "{took:?}"
    );
}
