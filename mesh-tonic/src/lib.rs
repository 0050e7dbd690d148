//! tonic over the mesh: a thin adapter from tonic to `mesh-tower`'s layers.
//!
//! - [`MeshChannel`]: what tonic's generated clients call (`GreeterClient::new(channel)`,
//!   unchanged), over a [`MeshClient`](mesh_tower::MeshClient): balancing, retries,
//!   breakers, rate-limit awareness and SPIFFE mTLS, with gRPC deadlines and errors as
//!   [`tonic::Status`]. Built with [`MeshChannel::builder`] or from a `[services.NAME]`
//!   section with [`MeshChannelBuilder::from_config`].
//! - [`server::GrpcServer`]: serves generated tonic servers over a
//!   [`MeshServer`](mesh_tower::server::MeshServer) — mTLS, per-method authorization,
//!   local rate limiting answering `RESOURCE_EXHAUSTED`, inbound metrics — with gRPC
//!   health checking. Handlers find the caller's
//!   [`PeerIdentity`](mesh_spiffe::PeerIdentity) and the
//!   [`AuthzDecision`](mesh_tower::authz::AuthzDecision) that admitted it in
//!   `tonic::Request::extensions()`.
//! - [`deadline`]: `grpc-timeout` and the [`Deadline`](deadline::Deadline) extension,
//!   and [`deadline::propagate`] from a handler's request to its outgoing calls.
//! - [`status`]: how mesh errors become gRPC codes.
//!
//! All mesh logic lives in `mesh-tower`'s layers (tonic is in maintenance mode); this
//! crate only adapts. With the `test-util` feature, [`test_util`] holds a test `Echo`
//! service and a greeter, generated without a system `protoc`.

pub mod channel;
pub mod deadline;
pub mod server;
pub mod status;
#[cfg(feature = "test-util")]
pub mod test_util;

pub use crate::channel::{GrpcBody, MeshChannel, MeshChannelBuilder};
