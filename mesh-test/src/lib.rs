//! A whole mock service mesh for tests, in a few lines.
//!
//! ```
//! # use mesh_test::MockMesh;
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let mesh = MockMesh::new()?;
//! let users = mesh.service("users").endpoints(3).spawn().await?;
//! let client = mesh.client(&users)?;
//! # let req = http::Request::get("http://users/").body(http_body_util::Empty::<bytes::Bytes>::new())?;
//! # assert_eq!(client.send(req).await?.status(), 200);
//! # assert_eq!(mesh.events().requests("users").count(), 1);
//! # Ok(()) }
//! ```
//!
//! That is a trust domain's CA (`example.org`), three endpoints of `users` on loopback —
//! each a real `MeshServer` with its own SVID for `spiffe://example.org/users`, serving
//! HTTP/1.1 and HTTP/2 over SPIFFE mTLS — and a `mesh_tower::MeshClient` wired to them:
//! discovery that follows the service, an SVID for `spiffe://example.org/client`, the
//! service's identity required of every endpoint, metrics the mesh reads.
//!
//! What [`MockMesh`] hands out:
//!
//! - **Mock services** ([`MockMesh::service`] → [`MockService`]): N endpoints, each
//!   running a [`Script`] — a latency distribution, an error rate and status, 429 with
//!   `Retry-After` (gRPC `RESOURCE_EXHAUSTED` with `grpc-retry-pushback-ms`), resets,
//!   hangs — replaceable while it runs ([`MockEndpoint::set_script`]). Endpoints can be
//!   killed, restarted on the same address, partitioned (a black hole) and healed, added
//!   and removed from discovery. An optional authorization policy and server-side rate
//!   limit are mesh-tower's own layers. gRPC callers reach `mesh_tonic::test_util`'s
//!   `Echo` service.
//! - **Clients, channels and servers** wired with SVIDs and discovery:
//!   [`MockMesh::client`] / [`client_builder`](MockMesh::client_builder) (`MeshClient`),
//!   [`MockMesh::channel`] (`MeshChannel`), [`MockMesh::server_builder`] (`MeshServer`
//!   for your own application), [`MockMesh::mtls`] for anything else.
//! - **A fake SPIFFE Workload API** ([`MockMesh::workload_api`]) for code that reads
//!   `SPIFFE_ENDPOINT_SOCKET`.
//! - **Rotation controls**: [`MockMesh::rotate_svids`], the trust-anchor rotation
//!   [`begin_trust_rotation`](MockMesh::begin_trust_rotation) /
//!   [`finish_trust_rotation`](MockMesh::finish_trust_rotation), and federation with
//!   [`MockMesh::trust`]. They reach every credential the mesh issued.
//! - **What happened**: [`MockMesh::events`], an ordered log of typed [`Event`]s (requests
//!   each endpoint saw and what it did, authorization decisions, the harness's own
//!   actions, breaker transitions read from the clients' metrics) with helpers for
//!   counts and shares; [`MockService::client_stats`] for retries against the budget.
//! - **Determinism hooks**: a [`seed`](MockMeshBuilder::seed) from which every endpoint's
//!   script randomness and every client's P2C picks are derived. (Retry back-off and
//!   breaker jitter still draw from the thread's generator, and real sockets keep timing
//!   real: to replay a run exactly, use the simulation.)
//! - **Deterministic simulation** (module `sim`, feature `sim`): the same scripted endpoints
//!   and the real client stack on turmoil's simulated network, in virtual time, so that
//!   a seed replays a scenario byte for byte.
//!
//! Everything runs on real loopback sockets with real TLS handshakes, so tests need a
//! multi-threaded or current-thread Tokio runtime with real time. Paused time works
//! only for what opens no socket (the log, scripts).

pub mod client_stats;
mod endpoint;
mod error;
pub mod events;
mod link;
mod mesh;
pub mod script;
mod service;
#[cfg(feature = "sim")]
pub mod sim;

pub use crate::client_stats::ClientStats;
pub use crate::endpoint::MockEndpoint;
pub use crate::error::MockMeshError;
pub use crate::events::{Event, EventLog, Outcome};
pub use crate::link::Link;
pub use crate::mesh::{
    DEFAULT_CLIENT, DEFAULT_TRUST_DOMAIN, MockMesh, MockMeshBuilder, WorkloadApi,
};
pub use crate::script::{Latency, Script, ScriptError};
pub use crate::service::{MockService, MockServiceBuilder};
