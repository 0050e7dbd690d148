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
/// by their breakers or backing off after failed connects. The message ends with why, per
/// endpoint, when the balancer was told how to ask
/// ([`Balance::with_unready_reasons`](super::Balance::with_unready_reasons); a
/// `MeshClient` is): `10.0.0.7:8080: 3 failed connects (the last: connecting to
/// 10.0.0.7:8080: Connection refused), the next in 1.6s`, `10.0.0.8:8080: ejected by its
/// circuit breaker`.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
#[error(
    "no ready endpoint for `{service}` within {waited:.1?}: all {endpoints} are ejected or backing off after failed connects{}",
    Causes(causes)
)]
pub struct NoReadyEndpoints {
    /// The service.
    pub service: Arc<str>,
    /// How many endpoints it has.
    pub endpoints: usize,
    /// How long the balancer waited.
    pub waited: Duration,
    /// Why, for each endpoint that could say (`address: reason`; at most
    /// [`MAX_CAUSES`], then how many more).
    pub causes: Vec<String>,
}

/// How many endpoints' reasons a [`NoReadyEndpoints`] lists.
pub const MAX_CAUSES: usize = 5;

/// The first [`MAX_CAUSES`] of `causes`, then `and N more`.
pub(crate) fn capped(causes: impl Iterator<Item = String>) -> Vec<String> {
    let mut listed = Vec::new();
    let mut more = 0usize;
    for cause in causes {
        if listed.len() < MAX_CAUSES {
            listed.push(cause);
        } else {
            more += 1;
        }
    }
    if more > 0 {
        listed.push(format!("and {more} more"));
    }
    listed
}

/// The causes, as the message's tail: ` (a; b)`, or nothing.
pub(crate) struct Causes<'a>(pub(crate) &'a [String]);

impl std::fmt::Display for Causes<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            return Ok(());
        }
        write!(f, " ({})", self.0.join("; "))
    }
}

/// `call` without a successful `poll_ready` first.
#[derive(Clone, Copy, Debug, thiserror::Error)]
#[error("the balancer was called before it was ready")]
pub struct NotReady;
