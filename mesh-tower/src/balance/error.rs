//! The balancer's errors, one small type each.

use std::sync::Arc;
use std::time::Duration;

/// Discovery knows no endpoint for the service (and has ended, or none appeared within
/// the fail-fast timeout).
#[derive(Clone, Debug, thiserror::Error)]
#[error("no endpoints for `{service}`")]
pub struct NoEndpoints {
    /// The service.
    pub service: Arc<str>,
}

/// No endpoint of the service became ready within the fail-fast timeout: all were ejected
/// by their breakers or backing off after failed connects.
#[derive(Clone, Debug, thiserror::Error)]
#[error(
    "no ready endpoint for `{service}` within {waited:?}: all {endpoints} are ejected or backing off after failed connects"
)]
pub struct NoReadyEndpoints {
    /// The service.
    pub service: Arc<str>,
    /// How many endpoints it has.
    pub endpoints: usize,
    /// How long the balancer waited.
    pub waited: Duration,
}

/// `call` without a successful `poll_ready` first.
#[derive(Clone, Copy, Debug, thiserror::Error)]
#[error("the balancer was called before it was ready")]
pub struct NotReady;
