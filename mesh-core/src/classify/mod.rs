//! Response classification: was an answer a success, a failure, or a request to slow down?
//!
//! The class describes the *endpoint*, not the request: a `404` or a gRPC `NOT_FOUND` is a
//! healthy endpoint answering, so it is a [`Class::Success`]; a `503` or `UNAVAILABLE` is a
//! [`Class::Failure`] that feeds circuit breakers and may be retried; a `429` or
//! `RESOURCE_EXHAUSTED` is [`Class::RateLimited`], neither success nor failure: balancers
//! penalize the endpoint for the server's pushback period instead of ejecting it.
//!
//! A [`Classifier`] holds the configurable sets. Its defaults (from Linkerd and gRPC):
//!
//! | | failure | rate-limited |
//! |---|---|---|
//! | HTTP status | `500`–`599` | `429` |
//! | gRPC code | `UNAVAILABLE`, `INTERNAL`, `DEADLINE_EXCEEDED`, `DATA_LOSS` | `RESOURCE_EXHAUSTED` |
//!
//! The rate-limited sets are checked first, so a status placed in both is rate-limited.
//!
//! A gRPC response (content type `application/grpc…` with HTTP status 200) carries its
//! status in the `grpc-status` header when it is *trailers-only*, otherwise in the
//! trailers. [`Classifier::classify_response`] returns `None` when the class waits on the
//! trailers, and [`Classifier::classify_trailers`] finishes the job. A gRPC stream that
//! ends without a valid `grpc-status` is a failure. A gRPC request answered with another
//! HTTP status (a proxy's `503`, say) is classified by that status.
//!
//! The header parsers — [`retry_after`], [`grpc::parse_pushback`], [`grpc::parse_timeout`]
//! and [`grpc::encode_timeout`] — are pure and bounded; [`pushback`] combines the first two
//! into the delay an endpoint should be penalized for.

use std::fmt;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};

pub mod grpc;
pub mod retry_after;
mod status_set;

pub use self::grpc::{Code, CodeSet};
pub use self::status_set::{StatusSet, StatusSetError};

/// How an answer reflects on the endpoint that gave it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Class {
    /// The endpoint answered and is healthy (including client errors such as 404).
    Success,
    /// The endpoint failed: feeds circuit breakers; retryable where policy allows.
    Failure,
    /// The endpoint asked the client to slow down (429, `RESOURCE_EXHAUSTED`).
    RateLimited,
}

/// The configurable status and code sets that decide a [`Class`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Classifier {
    /// HTTP statuses that are failures. Default: 500–599.
    pub http_failure: StatusSet,
    /// HTTP statuses that are rate limiting. Default: 429.
    pub http_rate_limited: StatusSet,
    /// gRPC codes that are failures. Default: UNAVAILABLE, INTERNAL, DEADLINE_EXCEEDED,
    /// DATA_LOSS.
    pub grpc_failure: CodeSet,
    /// gRPC codes that are rate limiting. Default: RESOURCE_EXHAUSTED.
    pub grpc_rate_limited: CodeSet,
}

impl Default for Classifier {
    fn default() -> Self {
        Self {
            http_failure: StatusSet::SERVER_ERRORS,
            http_rate_limited: StatusSet::TOO_MANY_REQUESTS,
            grpc_failure: CodeSet::of(&[
                Code::Unavailable,
                Code::Internal,
                Code::DeadlineExceeded,
                Code::DataLoss,
            ]),
            grpc_rate_limited: CodeSet::of(&[Code::ResourceExhausted]),
        }
    }
}

/// The `grpc-status` header name.
pub const GRPC_STATUS: &str = "grpc-status";
/// The `grpc-retry-pushback-ms` header name.
pub const GRPC_RETRY_PUSHBACK_MS: &str = "grpc-retry-pushback-ms";
/// The `grpc-timeout` header name.
pub const GRPC_TIMEOUT: &str = "grpc-timeout";

const GRPC_STATUS_NAME: HeaderName = HeaderName::from_static(GRPC_STATUS);

impl Classifier {
    /// The class of an HTTP status alone.
    pub fn classify_status(&self, status: StatusCode) -> Class {
        if self.http_rate_limited.contains(status) {
            Class::RateLimited
        } else if self.http_failure.contains(status) {
            Class::Failure
        } else {
            Class::Success
        }
    }

    /// The class of a gRPC status code.
    pub fn classify_code(&self, code: Code) -> Class {
        if self.grpc_rate_limited.contains(code) {
            Class::RateLimited
        } else if self.grpc_failure.contains(code) {
            Class::Failure
        } else {
            Class::Success
        }
    }

    /// The class of a response head, or `None` when it is a gRPC response whose status
    /// will arrive in the trailers.
    ///
    /// ```
    /// use http::{HeaderMap, HeaderValue, StatusCode};
    /// use mesh_core::classify::{Class, Classifier};
    ///
    /// let c = Classifier::default();
    /// let none = HeaderMap::new();
    /// assert_eq!(c.classify_response(StatusCode::NOT_FOUND, &none), Some(Class::Success));
    /// assert_eq!(c.classify_response(StatusCode::BAD_GATEWAY, &none), Some(Class::Failure));
    ///
    /// let mut grpc = HeaderMap::new();
    /// grpc.insert("content-type", HeaderValue::from_static("application/grpc"));
    /// assert_eq!(c.classify_response(StatusCode::OK, &grpc), None); // wait for trailers
    /// grpc.insert("grpc-status", HeaderValue::from_static("8")); // trailers-only
    /// assert_eq!(c.classify_response(StatusCode::OK, &grpc), Some(Class::RateLimited));
    /// ```
    pub fn classify_response(&self, status: StatusCode, headers: &HeaderMap) -> Option<Class> {
        if status != StatusCode::OK || !is_grpc(headers) {
            return Some(self.classify_status(status));
        }
        headers
            .get(&GRPC_STATUS_NAME)
            .map(|v| self.classify_grpc_status(v))
    }

    /// The class of a gRPC response from its trailers (`None` if the stream ended with
    /// none). A missing or malformed `grpc-status` is a failure.
    pub fn classify_trailers(&self, trailers: Option<&HeaderMap>) -> Class {
        match trailers.and_then(|t| t.get(&GRPC_STATUS_NAME)) {
            Some(v) => self.classify_grpc_status(v),
            None => Class::Failure,
        }
    }

    fn classify_grpc_status(&self, value: &HeaderValue) -> Class {
        match grpc::parse_status(value) {
            Ok(code) => self.classify_code(code),
            Err(error) => {
                tracing::debug!(%error, "gRPC response with a malformed status");
                Class::Failure
            }
        }
    }
}

/// Whether the headers say this is a gRPC message (`application/grpc`, `application/grpc+proto`, …).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).is_some_and(|ct| {
        let ct = ct.as_bytes();
        ct.len() >= 16
            && ct[..16].eq_ignore_ascii_case(b"application/grpc")
            && matches!(ct.get(16), None | Some(b'+' | b';'))
    })
}

/// How long a server asked the client to back off, from `grpc-retry-pushback-ms` or
/// `Retry-After` (whichever is present; the gRPC one first: a gRPC server's word on its
/// own calls).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backoff {
    /// Neither header was present (or both were malformed).
    Unspecified,
    /// Wait this long (already capped).
    After(Duration),
    /// The server asked that the request not be retried (negative or malformed pushback,
    /// as gRFC A6 specifies).
    DoNotRetry,
}

/// Reads the back-off a server asked for, capped at `cap`. Malformed values are logged at
/// debug level: a malformed `Retry-After` is ignored, a malformed pushback, or more than
/// one, means "do not retry" (gRFC A6, as grpc-go reads it).
pub fn pushback(headers: &HeaderMap, now: SystemTime, cap: Duration) -> Backoff {
    let mut pushbacks = headers.get_all(GRPC_RETRY_PUSHBACK_MS).iter();
    match (pushbacks.next(), pushbacks.next()) {
        (Some(v), None) => {
            return match grpc::parse_pushback(v, cap) {
                Ok(grpc::Pushback::After(d)) => Backoff::After(d),
                Ok(grpc::Pushback::DoNotRetry) => Backoff::DoNotRetry,
                Err(error) => {
                    tracing::debug!(%error, "malformed pushback: not retrying");
                    Backoff::DoNotRetry
                }
            };
        }
        (Some(_), Some(_)) => {
            tracing::debug!("more than one pushback: not retrying");
            return Backoff::DoNotRetry;
        }
        (None, _) => {}
    }
    if let Some(v) = headers.get(header::RETRY_AFTER) {
        match retry_after::parse(v, now, cap) {
            Ok(d) => return Backoff::After(d),
            Err(error) => tracing::debug!(%error, "ignoring a malformed Retry-After"),
        }
    }
    Backoff::Unspecified
}

/// A header value that does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid {header} {value}: {reason}")]
pub struct HeaderError {
    header: &'static str,
    value: Shown,
    reason: &'static str,
}

impl HeaderError {
    fn new(header: &'static str, value: &[u8], reason: &'static str) -> Self {
        Self {
            header,
            value: Shown::new(value),
            reason,
        }
    }

    /// The header's name.
    pub fn header(&self) -> &'static str {
        self.header
    }

    /// Why the value was refused.
    pub fn reason(&self) -> &'static str {
        self.reason
    }
}

/// At most 32 bytes of an offending value, escaped for a log line.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Shown(String);

impl Shown {
    fn new(value: &[u8]) -> Self {
        let head = &value[..value.len().min(32)];
        let mut s = format!("`{}`", head.escape_ascii());
        if value.len() > head.len() {
            s.push_str(&format!(" (and {} more bytes)", value.len() - head.len()));
        }
        Self(s)
    }
}

impl fmt::Display for Shown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grpc_headers(status: Option<&'static str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc+proto"),
        );
        if let Some(s) = status {
            h.insert(GRPC_STATUS, HeaderValue::from_static(s));
        }
        h
    }

    #[test]
    fn the_first_grpc_status_counts_wherever_the_grpc_headers_are() {
        let c = Classifier::default();
        for others in 1..20 {
            for at in 0..others {
                let mut h = HeaderMap::new();
                for i in 0..others {
                    if i == at {
                        h.insert(
                            header::CONTENT_TYPE,
                            HeaderValue::from_static("application/grpc"),
                        );
                        h.append(GRPC_STATUS, HeaderValue::from_static("8"));
                        h.append(GRPC_STATUS, HeaderValue::from_static("0"));
                    }
                    let name = HeaderName::from_bytes(format!("x-other-{i}").as_bytes()).unwrap();
                    h.insert(name, HeaderValue::from_static("v"));
                }
                assert!(is_grpc(&h), "{others} names, content-type at {at}");
                assert_eq!(
                    c.classify_response(StatusCode::OK, &h),
                    Some(Class::RateLimited),
                    "{others} names, gRPC headers at {at}: the first grpc-status counts"
                );
            }
        }
    }

    #[test]
    fn default_http_classes() {
        let c = Classifier::default();
        for (s, want) in [
            (200, Class::Success),
            (204, Class::Success),
            (301, Class::Success),
            (404, Class::Success),
            (429, Class::RateLimited),
            (500, Class::Failure),
            (503, Class::Failure),
            (599, Class::Failure),
        ] {
            let status = StatusCode::from_u16(s).unwrap();
            assert_eq!(
                c.classify_response(status, &HeaderMap::new()),
                Some(want),
                "{s}"
            );
        }
    }

    #[test]
    fn default_grpc_classes() {
        let c = Classifier::default();
        let failures = [
            Code::Unavailable,
            Code::Internal,
            Code::DeadlineExceeded,
            Code::DataLoss,
        ];
        for code in Code::ALL {
            let want = if code == Code::ResourceExhausted {
                Class::RateLimited
            } else if failures.contains(&code) {
                Class::Failure
            } else {
                Class::Success
            };
            assert_eq!(c.classify_code(code), want, "{code}");
            let n = HeaderValue::from_str(&(code as u8).to_string()).unwrap();
            let mut trailers = HeaderMap::new();
            trailers.insert(GRPC_STATUS, n);
            assert_eq!(c.classify_trailers(Some(&trailers)), want, "{code}");
        }
    }

    #[test]
    fn grpc_trailers_only_and_missing_status() {
        let c = Classifier::default();
        assert_eq!(
            c.classify_response(StatusCode::OK, &grpc_headers(None)),
            None
        );
        assert_eq!(
            c.classify_response(StatusCode::OK, &grpc_headers(Some("14"))),
            Some(Class::Failure)
        );
        assert_eq!(
            c.classify_response(StatusCode::OK, &grpc_headers(Some("garbage"))),
            Some(Class::Failure)
        );
        // A proxy's 503 in front of a gRPC server.
        assert_eq!(
            c.classify_response(StatusCode::SERVICE_UNAVAILABLE, &grpc_headers(None)),
            Some(Class::Failure)
        );
        assert_eq!(c.classify_trailers(None), Class::Failure);
        assert_eq!(c.classify_trailers(Some(&HeaderMap::new())), Class::Failure);
    }

    #[test]
    fn grpc_content_types() {
        let with = |ct: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
            is_grpc(&h)
        };
        assert!(with("application/grpc"));
        assert!(with("Application/GRPC+json"));
        assert!(with("application/grpc;charset=utf-8"));
        assert!(!with("application/grpc-web"));
        assert!(!with("application/json"));
        assert!(!is_grpc(&HeaderMap::new()));
    }

    #[test]
    fn configured_sets_and_precedence() {
        let c = Classifier {
            http_failure: "5xx,429".parse().unwrap(),
            http_rate_limited: "429,503".parse().unwrap(),
            grpc_failure: CodeSet::of(&[Code::Unknown]),
            grpc_rate_limited: CodeSet::EMPTY,
        };
        assert_eq!(
            c.classify_status(StatusCode::SERVICE_UNAVAILABLE),
            Class::RateLimited
        );
        assert_eq!(
            c.classify_status(StatusCode::TOO_MANY_REQUESTS),
            Class::RateLimited
        );
        assert_eq!(c.classify_status(StatusCode::BAD_GATEWAY), Class::Failure);
        assert_eq!(c.classify_code(Code::Unknown), Class::Failure);
        assert_eq!(c.classify_code(Code::Unavailable), Class::Success);
        assert_eq!(c.classify_code(Code::ResourceExhausted), Class::Success);
    }

    #[test]
    fn pushback_from_either_header() {
        let now = SystemTime::now();
        let cap = Duration::from_secs(10);
        let mut h = HeaderMap::new();
        assert_eq!(pushback(&h, now, cap), Backoff::Unspecified);
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
        assert_eq!(
            pushback(&h, now, cap),
            Backoff::After(Duration::from_secs(2))
        );
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("3600"));
        assert_eq!(pushback(&h, now, cap), Backoff::After(cap));
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("later"));
        assert_eq!(pushback(&h, now, cap), Backoff::Unspecified);
        // A gRPC server's pushback comes first, "do not retry" included.
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
        h.insert(GRPC_RETRY_PUSHBACK_MS, HeaderValue::from_static("1500"));
        assert_eq!(
            pushback(&h, now, cap),
            Backoff::After(Duration::from_millis(1500))
        );
        h.insert(GRPC_RETRY_PUSHBACK_MS, HeaderValue::from_static("-5"));
        assert_eq!(pushback(&h, now, cap), Backoff::DoNotRetry);
        h.insert(GRPC_RETRY_PUSHBACK_MS, HeaderValue::from_static("abc"));
        assert_eq!(pushback(&h, now, cap), Backoff::DoNotRetry);
        // More than one: do not retry (as grpc-go reads it).
        h.insert(GRPC_RETRY_PUSHBACK_MS, HeaderValue::from_static("100"));
        h.append(GRPC_RETRY_PUSHBACK_MS, HeaderValue::from_static("100"));
        assert_eq!(pushback(&h, now, cap), Backoff::DoNotRetry);
    }

    #[test]
    fn http_statuses_map_to_grpc_codes() {
        for (status, code) in [
            (400, Code::Internal),
            (401, Code::Unauthenticated),
            (403, Code::PermissionDenied),
            (404, Code::Unimplemented),
            (429, Code::Unavailable),
            (502, Code::Unavailable),
            (503, Code::Unavailable),
            (504, Code::Unavailable),
            (500, Code::Unknown),
            (200, Code::Unknown),
        ] {
            assert_eq!(Code::for_http_status(status), code, "{status}");
        }
    }

    #[test]
    fn header_errors_truncate_and_escape() {
        let long = [b'x'; 100];
        let e = HeaderError::new("Retry-After", &long, "too long").to_string();
        assert!(e.contains("(and 68 more bytes)"), "{e}");
        let e = HeaderError::new("grpc-timeout", b"\x01\n", "bad").to_string();
        assert_eq!(e, "invalid grpc-timeout `\\x01\\n`: bad");
    }
}
