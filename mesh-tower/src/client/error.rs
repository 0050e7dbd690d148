//! The client's own failures, one small type each; find them in an error chain with
//! `mesh_core::error::find_cause`.

use std::time::Duration;

/// The whole request, retries included, took longer than the request timeout.
#[derive(Clone, Copy, Debug, thiserror::Error)]
#[error("request timed out after {0:?}")]
pub struct RequestTimeout(pub Duration);

/// One try took longer than the per-try timeout.
#[derive(Clone, Copy, Debug, thiserror::Error)]
#[error("try timed out after {0:?}")]
pub struct TryTimeout(pub Duration);

/// Discovery knows no endpoint for the service.
#[derive(Clone, Copy, Debug, thiserror::Error)]
#[error("no endpoints")]
pub struct NoEndpoints;
