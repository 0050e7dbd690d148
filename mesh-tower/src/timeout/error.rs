//! The timeouts' errors; find them in a chain with `mesh_core::error::find_cause`.

use std::time::Duration;

/// The whole request, retries included, took longer than the request timeout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("request timed out after {0:?}")]
pub struct RequestTimeout(pub Duration);

/// One try took longer than the per-try timeout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("try timed out after {0:?}")]
pub struct TryTimeout(pub Duration);

/// The request's [`Deadline`](super::Deadline) (or its `grpc-timeout`) had passed before
/// a try could be sent: nothing was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the request's deadline passed before it was sent")]
pub struct DeadlineExceeded;
