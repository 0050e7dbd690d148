//! Serving tonic services to the mesh: [`GrpcServer`] puts generated tonic servers behind
//! a [`MeshServer`](mesh_tower::server::MeshServer) and wires gRPC health checking.
//!
//! ```text
//! MeshServer                  mTLS -> PeerIdentity, limits, metrics (by service, method
//!                             and gRPC code), authorization (per gRPC service/method:
//!                             PERMISSION_DENIED), rate limit (RESOURCE_EXHAUSTED with
//!                             grpc-retry-pushback-ms)
//!   timeout::GrpcDeadline     the caller's grpc-timeout as the request's Deadline (for
//!                             deadline::propagate); DEADLINE_EXCEEDED when it passes
//!                             before the handler answers; INTERNAL when malformed
//!   tonic Routes              /{package.Service}/{Method} -> the service; UNIMPLEMENTED
//!     grpc.health.v1.Health   tonic-health
//!     your services           handlers read PeerIdentity and AuthzDecision from
//!                             tonic::Request::extensions()
//! ```
//!
//! **Health.** `grpc.health.v1.Health` is always served. Every added service, and the
//! server as a whole (`""`), is `SERVING` once [`GrpcServerBuilder::serve`] has started
//! listening, and `NOT_SERVING` as soon as [`GrpcServer::shutdown`] begins: health
//! checkers stop sending new calls while the calls in flight drain (after
//! [`GrpcServerBuilder::drain_grace`], default none). [`GrpcServer::health_reporter`]
//! lets the application flip a service itself.
//!
//! ```no_run
//! use mesh_spiffe::{Authorizer, CredentialStore, Mtls, MtlsAcceptor};
//! use mesh_tonic::server::GrpcServer;
//! use mesh_tower::server::MeshServer;
//! # #[derive(Clone)] struct GreeterServer;
//! # impl tonic::server::NamedService for GreeterServer { const NAME: &'static str = "helloworld.Greeter"; }
//! # impl tower_service::Service<http::Request<tonic::body::Body>> for GreeterServer {
//! #   type Response = http::Response<tonic::body::Body>; type Error = std::convert::Infallible;
//! #   type Future = std::future::Ready<Result<Self::Response, Self::Error>>;
//! #   fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> { std::task::Poll::Ready(Ok(())) }
//! #   fn call(&mut self, _: http::Request<tonic::body::Body>) -> Self::Future { std::future::ready(Ok(http::Response::new(tonic::body::Body::empty()))) }
//! # }
//!
//! # async fn run(credentials: CredentialStore) -> Result<(), Box<dyn std::error::Error>> {
//! let acceptor = MtlsAcceptor::new(&Mtls::new(credentials), Authorizer::any())?;
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:4143").await?;
//! let server = GrpcServer::builder(MeshServer::builder().mtls(acceptor))
//!     .add_service(GreeterServer) // any generated `XxxServer::new(handler)`
//!     .serve(listener)
//!     .await?;
//! // ... on SIGTERM: NOT_SERVING, then a graceful drain.
//! let report = server.shutdown().await;
//! # let _ = report;
//! # Ok(()) }
//! ```

use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use mesh_tower::server::{MeshServerBuilder, Server, ServerError, ShutdownReport};
use mesh_tower::timeout::GrpcDeadlineLayer;
use tokio::net::TcpListener;
use tonic::server::NamedService;
use tonic::service::{Routes, RoutesBuilder};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tower::Layer;
use tower_service::Service;

/// The name under which health checking reports the server as a whole.
const WHOLE_SERVER: &str = "";

/// Serves tonic services over a [`MeshServer`](mesh_tower::server::MeshServer); see the
/// [module docs](self).
#[derive(Debug)]
pub struct GrpcServer {
    server: Server,
    health: HealthReporter,
    names: Vec<&'static str>,
    drain_grace: Duration,
}

/// Configures a [`GrpcServer`].
#[must_use]
pub struct GrpcServerBuilder {
    mesh: MeshServerBuilder,
    routes: RoutesBuilder,
    health: HealthReporter,
    names: Vec<&'static str>,
    drain_grace: Duration,
}

impl fmt::Debug for GrpcServerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcServerBuilder")
            .field("mesh", &self.mesh)
            .field("services", &self.names)
            .field("drain_grace", &self.drain_grace)
            .finish_non_exhaustive()
    }
}

impl GrpcServer {
    /// Starts configuring a server that serves over `mesh` (its transport, limits,
    /// authorization, rate limit and metrics).
    pub fn builder(mesh: MeshServerBuilder) -> GrpcServerBuilder {
        let (health, health_service) = tonic_health::server::health_reporter();
        let mut routes = Routes::builder();
        routes.add_service(health_service);
        GrpcServerBuilder {
            mesh,
            routes,
            health,
            names: Vec::new(),
            drain_grace: Duration::ZERO,
        }
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// The health reporter of this server's `grpc.health.v1.Health` service.
    pub fn health_reporter(&self) -> &HealthReporter {
        &self.health
    }

    /// Reports every service and the server `NOT_SERVING`, waits the drain grace, then
    /// shuts the server down gracefully (see
    /// [`Server::shutdown`](mesh_tower::server::Server::shutdown)).
    pub async fn shutdown(self) -> ShutdownReport {
        set_all(&self.health, &self.names, ServingStatus::NotServing).await;
        if !self.drain_grace.is_zero() {
            tokio::time::sleep(self.drain_grace).await;
        }
        self.server.shutdown().await
    }
}

impl GrpcServerBuilder {
    /// Serves `service`, a generated tonic server (`GreeterServer::new(handler)`), at
    /// `/{package.Service}/*`.
    pub fn add_service<S>(mut self, service: S) -> Self
    where
        S: Service<
                http::Request<tonic::body::Body>,
                Response = http::Response<tonic::body::Body>,
                Error = Infallible,
            > + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.routes.add_service(service);
        self.names.push(S::NAME);
        self
    }

    /// How long [`GrpcServer::shutdown`] waits between reporting `NOT_SERVING` and
    /// draining, so that health checkers notice first (default: no wait).
    pub fn drain_grace(mut self, grace: Duration) -> Self {
        self.drain_grace = grace;
        self
    }

    /// The health reporter. [`serve`](Self::serve) reports every added service
    /// `SERVING` when it starts, replacing what was set before it; a service that must
    /// wait (warming up) is set `NOT_SERVING` through this reporter, or
    /// [`GrpcServer`]'s, once `serve` returned, and `SERVING` when it is ready.
    pub fn health_reporter(&self) -> &HealthReporter {
        &self.health
    }

    /// Starts serving on `listener`, in a task of the current Tokio runtime, and reports
    /// every service `SERVING`.
    pub async fn serve(self, listener: TcpListener) -> Result<GrpcServer, ServerError> {
        let routes = self.routes.routes().prepare();
        let app = GrpcDeadlineLayer::new().layer(routes);
        let server = self.mesh.serve(listener, app)?;
        set_all(&self.health, &self.names, ServingStatus::Serving).await;
        tracing::debug!(addr = %server.local_addr(), services = ?self.names, "serving gRPC");
        Ok(GrpcServer {
            server,
            health: self.health,
            names: self.names,
            drain_grace: self.drain_grace,
        })
    }
}

async fn set_all(health: &HealthReporter, names: &[&'static str], status: ServingStatus) {
    for name in names.iter().copied().chain([WHOLE_SERVER]) {
        health.set_service_status(name, status).await;
    }
}
