//! The retry layer's errors.

use mesh_core::error::BoxError;

/// A failed try would have been retried, but the retry budget was spent. The last try's
/// error is the source.
#[derive(Debug, thiserror::Error)]
#[error("retry budget exhausted; last try: {0}")]
pub struct BudgetExhausted(#[source] pub BoxError);

/// A request marked [`Elsewhere`](super::Elsewhere) found no endpoint that is not rate
/// limiting; the retry layer then hands the caller the rate-limited answer it kept.
#[derive(Clone, Copy, Debug, thiserror::Error)]
#[error("no endpoint that is not rate limiting")]
pub struct NoElsewhere;
