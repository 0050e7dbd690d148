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
