//! Shared test harness: a test CA, mTLS `Echo` endpoints served by `GrpcServer` on
//! loopback, and `MeshChannel`s to them.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;

use mesh_core::Endpoint;
use mesh_core::config::{AuthorizationPolicy, RateLimitConfig};
use mesh_core::discover::{BoxDiscover, StaticDiscovery};
use mesh_spiffe::test_ca::TestCa;
use mesh_spiffe::{Authorizer, CredentialStore, Mtls, MtlsAcceptor};
use mesh_tonic::server::GrpcServer;
use mesh_tonic::test_util::EchoService;
use mesh_tonic::test_util::echo::EchoRequest;
use mesh_tonic::{MeshChannel, MeshChannelBuilder};
use mesh_tower::authz::Policy;
use mesh_tower::ratelimit::Limits;
use mesh_tower::server::{MeshServer, MeshServerBuilder, ServerLimits};
use tokio::net::TcpListener;

pub const SERVER_ID: &str = "spiffe://example.org/ns/prod/sa/echo";
pub const WEB: &str = "spiffe://example.org/ns/prod/sa/web";
pub const BATCH: &str = "spiffe://example.org/ns/batch/sa/jobs";

pub struct Mesh {
    pub ca: TestCa,
}

/// One endpoint: its server and its service (for call counts).
pub struct Ep {
    pub server: Option<GrpcServer>,
    pub echo: EchoService,
    pub addr: SocketAddr,
}

impl Ep {
    pub async fn shutdown(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await;
        }
    }
}

/// How an endpoint serves.
#[derive(Default)]
pub struct Serve {
    pub policy: Option<AuthorizationPolicy>,
    pub rate_limit: Option<RateLimitConfig>,
    pub limits: Option<ServerLimits>,
    /// Listen here rather than on a new port (to restart an endpoint).
    pub addr: Option<SocketAddr>,
}

impl Mesh {
    pub fn new() -> Self {
        Self {
            ca: TestCa::new("example.org").unwrap(),
        }
    }

    pub fn mtls(&mut self, id: &str) -> Mtls {
        let svid = self.ca.issue(id).unwrap();
        Mtls::new(CredentialStore::with(svid, self.ca.bundle_set().unwrap()))
    }

    pub fn mesh_server(&mut self, serve: &Serve) -> MeshServerBuilder {
        let acceptor = MtlsAcceptor::new(
            &self.mtls(SERVER_ID),
            Authorizer::trust_domain(self.ca.trust_domain().clone()),
        )
        .unwrap();
        let mut builder = MeshServer::builder().mtls(acceptor);
        if let Some(policy) = &serve.policy {
            builder = builder.authorization(Policy::new("echo", policy).unwrap());
        }
        if let Some(limits) = &serve.rate_limit {
            builder = builder.rate_limit(Limits::new(limits));
        }
        if let Some(limits) = &serve.limits {
            builder = builder.limits(limits.clone());
        }
        builder
    }

    pub async fn endpoint(&mut self, name: &str, serve: Serve) -> Ep {
        let listener = TcpListener::bind(serve.addr.unwrap_or(([127, 0, 0, 1], 0).into()))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let echo = EchoService::new(name);
        let server = GrpcServer::builder(self.mesh_server(&serve))
            .add_service(echo.server())
            .serve(listener)
            .await
            .unwrap();
        Ep {
            server: Some(server),
            echo,
            addr,
        }
    }

    pub fn channel_builder(&mut self, client: &str, addrs: &[SocketAddr]) -> MeshChannelBuilder {
        MeshChannel::builder(discovery(addrs))
            .service_name("echo")
            .mtls(self.mtls(client))
            .server_identity(SERVER_ID.parse().unwrap())
    }

    pub fn channel(&mut self, client: &str, addrs: &[SocketAddr]) -> MeshChannel {
        self.channel_builder(client, addrs).build().unwrap()
    }
}

pub fn discovery(addrs: &[SocketAddr]) -> BoxDiscover {
    Box::pin(StaticDiscovery::new(
        addrs.iter().map(|a| Endpoint::new(*a)),
    ))
}

pub fn msg(message: &str) -> EchoRequest {
    EchoRequest {
        message: message.into(),
        count: 0,
    }
}
