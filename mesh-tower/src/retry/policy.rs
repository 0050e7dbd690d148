//! Which tries are retried, and after how long.

use http::{Method, Response, StatusCode};
use mesh_core::classify::{Classifier, CodeSet, StatusSet};
use mesh_core::config::{ClassificationConfig, RetryConfig};

use crate::backoff::{Backoff, InvalidBackoff};

/// What [`Retry`](super::Retry) retries; see the [module docs](super).
///
/// # Defaults
/// At most 2 retries; 5xx statuses and gRPC `UNAVAILABLE`; idempotent methods only;
/// bodies up to 64 KiB replayed; back-off 25–250 ms with jitter 0.5; a 429 retried once
/// elsewhere; the default [`Classifier`].
///
/// ```
/// use mesh_tower::retry::RetryPolicy;
///
/// let policy = RetryPolicy { max_retries: 3, ..RetryPolicy::default() };
/// assert!(policy.is_idempotent(&http::Method::PUT));
/// assert!(!policy.is_idempotent(&http::Method::POST));
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Retries per request after the first try (0: never retry).
    pub max_retries: u32,
    /// HTTP statuses retried (for idempotent requests).
    pub statuses: StatusSet,
    /// gRPC codes retried, whatever the method (A6). A try that broke without an answer
    /// or timed out counts as `UNAVAILABLE`: the server may have run it, so a policy for
    /// calls that must not run twice names no code.
    pub grpc_codes: CodeSet,
    /// Retry non-idempotent HTTP methods (POST, PATCH) too.
    pub non_idempotent: bool,
    /// The largest body buffered for replay; larger ones are sent once and not retried.
    pub max_replay_body: usize,
    /// The back-off between tries.
    pub backoff: Backoff,
    /// Retry a rate-limited answer once, at once, on an unpenalized endpoint.
    pub retry_rate_limited_elsewhere: bool,
    /// What is a failure and what is rate limiting.
    pub classifier: Classifier,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self::with_backoff(
            &RetryConfig::default(),
            &ClassificationConfig::default(),
            crate::backoff::DEFAULT_RETRY_BACKOFF,
        )
    }
}

impl RetryPolicy {
    /// A policy that never retries.
    pub fn never() -> Self {
        Self {
            max_retries: 0,
            statuses: StatusSet::EMPTY,
            grpc_codes: CodeSet::EMPTY,
            non_idempotent: false,
            max_replay_body: 0,
            backoff: crate::backoff::DEFAULT_RETRY_BACKOFF,
            retry_rate_limited_elsewhere: false,
            classifier: Classifier::default(),
        }
    }

    /// The policy a `[services.NAME]` configuration describes (`enabled = false` gives
    /// [`never`](Self::never)).
    pub fn from_config(
        retry: &RetryConfig,
        classification: &ClassificationConfig,
    ) -> Result<Self, InvalidBackoff> {
        let backoff = Backoff::from_config(&retry.backoff)?;
        Ok(Self::with_backoff(retry, classification, backoff))
    }

    fn with_backoff(
        retry: &RetryConfig,
        classification: &ClassificationConfig,
        backoff: Backoff,
    ) -> Self {
        if !retry.enabled {
            return Self::never();
        }
        Self {
            max_retries: retry.max_retries,
            statuses: retry.statuses,
            grpc_codes: retry.grpc_codes,
            non_idempotent: retry.non_idempotent,
            max_replay_body: retry.max_replay_body,
            backoff,
            retry_rate_limited_elsewhere: retry.retry_rate_limited_elsewhere,
            classifier: Classifier::from(classification),
        }
    }

    /// Whether failed answers to `method` may be retried: idempotent methods (RFC 9110
    /// §9.2.2), or any when `non_idempotent` is set.
    pub fn is_idempotent(&self, method: &Method) -> bool {
        self.non_idempotent
            || matches!(
                *method,
                Method::GET
                    | Method::HEAD
                    | Method::OPTIONS
                    | Method::TRACE
                    | Method::PUT
                    | Method::DELETE
            )
    }

    /// Whether a failed answer's status (or gRPC code) is one to retry.
    pub fn is_retryable_answer<B>(&self, resp: &Response<B>) -> bool {
        if resp.status() == StatusCode::OK && mesh_core::classify::is_grpc(resp.headers()) {
            return resp
                .headers()
                .get(mesh_core::classify::GRPC_STATUS)
                .and_then(|v| mesh_core::classify::grpc::parse_status(v).ok())
                .is_some_and(|code| self.grpc_codes.contains(code));
        }
        self.statuses.contains(resp.status())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_the_default_configuration() {
        let config =
            RetryPolicy::from_config(&RetryConfig::default(), &ClassificationConfig::default());
        assert_eq!(config.unwrap(), RetryPolicy::default());
        assert_eq!(RetryPolicy::default().max_retries, 2);
    }

    #[test]
    fn idempotent_methods() {
        let p = RetryPolicy::default();
        for m in [
            Method::GET,
            Method::HEAD,
            Method::PUT,
            Method::DELETE,
            Method::OPTIONS,
        ] {
            assert!(p.is_idempotent(&m), "{m}");
        }
        for m in [Method::POST, Method::PATCH, Method::CONNECT] {
            assert!(!p.is_idempotent(&m), "{m}");
        }
        let all = RetryPolicy {
            non_idempotent: true,
            ..RetryPolicy::default()
        };
        assert!(all.is_idempotent(&Method::POST));
    }
}
