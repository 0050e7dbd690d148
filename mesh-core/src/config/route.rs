//! Outbound routing: HTTPRoute / GRPCRoute-style matches, weighted backends, per-route
//! policies and fault injection.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::service::{RetryConfig, TimeoutConfig};
use crate::serde_str::duration;

/// One outbound route. Of the routes whose `hosts` and any of whose `matches` fit a
/// request, the most specific wins, as in the Gateway API: the most specific host (exact,
/// then the longest wildcard, then none), then the most specific match (an exact path,
/// then the longest prefix other than `/`, then a regex, then `/` or no path; then
/// methods, then more header conditions, then more query conditions); the order in the
/// file decides only between equals.
///
/// ```toml
/// [[routes]]
/// name = "users-canary"
/// hosts = ["users", "users.prod.internal"]
/// matches = [{ path = { prefix = "/api/" }, methods = ["GET"] }]
/// backends = [{ service = "users", weight = 90 }, { service = "users-v2", weight = 10 }]
/// timeout = { request = "2s" }
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// A name for logs and metrics; unique among routes.
    pub name: String,
    /// Authorities (`Host` / `:authority`, port ignored) this route serves; `*.example.org`
    /// matches one or more leading labels. Default: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Request matches, any of which selects the route. Default: every request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<RouteMatch>,
    /// Services the route's traffic is split over, by weight; at least one.
    pub backends: Vec<BackendRef>,
    /// Overrides the backend service's retry policy for this route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryConfig>,
    /// Overrides the backend service's timeouts for this route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<TimeoutConfig>,
    /// Injected faults, for testing how callers cope. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<FaultConfig>,
}

/// Conditions on a request; all given conditions must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    /// The request path. Default: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    /// Methods, any of which matches (`GET`, `POST`, …). Default: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty", with = "methods")]
    pub methods: Vec<http::Method>,
    /// Headers, all of which must match. Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
    /// Query parameters, all of which must match. Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query: Vec<QueryMatch>,
    /// A gRPC service and method. Default: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<GrpcMatch>,
}

/// A match on the request path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
#[non_exhaustive]
pub enum PathMatch {
    /// The whole path, exactly: `{ exact = "/healthz" }`.
    Exact(String),
    /// A prefix on segment boundaries: `{ prefix = "/api" }` matches `/api` and `/api/x`,
    /// not `/apix`.
    Prefix(String),
    /// A regular expression that must match the whole path: `{ regex = "/users/[0-9]+" }`.
    Regex(String),
}

/// A match on one request header.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatch {
    /// The header name (case-insensitive).
    pub name: String,
    /// The value condition.
    #[serde(flatten)]
    pub value: HeaderValueMatch,
}

/// How a header's value must look: `{ name = "x-env", exact = "prod" }`,
/// `{ name = "x-user", regex = "[a-z]+" }` or `{ name = "x-debug", present = true }`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum HeaderValueMatch {
    /// Exactly this value.
    Exact(String),
    /// A regular expression matching the whole value.
    Regex(String),
    /// Present (`true`) or absent (`false`), whatever its value.
    Present(bool),
}

/// A match on one query parameter: `{ name = "version", exact = "2" }` or
/// `{ name = "id", regex = "[0-9]+" }`. Names are case-sensitive and compared decoded on
/// both sides (`%5B` is `[`, `+` a space: `filter%5Bstatus%5D` and `filter[status]` are
/// one name), as applications read them; values are compared as sent. When a parameter is
/// repeated, every value must match, and a query holding `;` matches no condition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryMatch {
    /// The parameter's name (case-sensitive).
    pub name: String,
    /// The value condition.
    #[serde(flatten)]
    pub value: QueryValueMatch,
}

/// How a query parameter's value must look.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum QueryValueMatch {
    /// Exactly this value.
    Exact(String),
    /// A regular expression matching the whole value.
    Regex(String),
}

/// A match on a gRPC request's `/package.Service/Method` path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcMatch {
    /// The fully qualified service (`users.v1.Users`).
    pub service: String,
    /// The method (`GetUser`). Default: any method of the service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

/// A service that receives a share of a route's traffic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendRef {
    /// A key of `[services]`.
    pub service: String,
    /// The relative share of traffic. Default: 1. A weight of 0 sends nothing (a canary
    /// turned off) but keeps the reference checked.
    #[serde(default = "default_backend_weight")]
    pub weight: u32,
}

fn default_backend_weight() -> u32 {
    1
}

/// Faults injected into a share of a route's requests.
///
/// ```toml
/// fault = { delay = "100ms", delay_ratio = 0.1, abort_status = 503, abort_ratio = 0.05 }
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultConfig {
    /// A delay added before the request is sent. Default: none.
    #[serde(
        default,
        with = "duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub delay: Option<Duration>,
    /// The share of requests delayed, 0 to 1. Default: 1 when `delay` is set.
    #[serde(default = "one")]
    pub delay_ratio: f64,
    /// The HTTP status returned instead of sending the request. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort_status: Option<u16>,
    /// The share of requests aborted, 0 to 1. Default: 1 when `abort_status` or
    /// `abort_grpc_code` is set.
    #[serde(default = "one")]
    pub abort_ratio: f64,
    /// The gRPC code (1 to 16) aborted gRPC requests get, in a trailers-only answer.
    /// Default: the one `abort_status` maps to (503: 14 `UNAVAILABLE`); set alone, it
    /// aborts gRPC requests with it and others with 503.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort_grpc_code: Option<u16>,
    /// Fault only requests carrying this header (with this value, when given), for
    /// targeted tests. Default: every request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<FaultHeader>,
}

/// The header that selects the requests a fault applies to.
///
/// ```toml
/// fault = { abort_status = 503, header = { name = "x-chaos", value = "on" } }
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultHeader {
    /// The header's name (case-insensitive).
    pub name: String,
    /// Its value, exactly. Default: any value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

fn one() -> f64 {
    1.0
}

mod methods {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<http::Method>, D::Error> {
        Vec::<String>::deserialize(d)?
            .into_iter()
            .map(|m| {
                http::Method::from_bytes(m.to_ascii_uppercase().as_bytes()).map_err(|_| {
                    serde::de::Error::custom(format_args!("invalid HTTP method `{m}`"))
                })
            })
            .collect()
    }

    pub(super) fn serialize<S: Serializer>(
        methods: &[http::Method],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(methods.iter().map(http::Method::as_str))
    }
}

/// Whether a server might resolve `path` to another path than it reads as: dot or empty
/// segments, backslashes, percent-encoded `/`, `\` or `.`. Such a path satisfies no path
/// condition of a route or an authorization rule but the prefix `/`, which takes every
/// path (so that `/public/../admin` cannot pass for `/public`), and a path condition
/// holding one could never match: configurations refuse it.
pub fn is_ambiguous_path(path: &str) -> bool {
    let bytes = path.as_bytes();
    // Most paths hold none of `.`, `%`, `\`: then only an empty segment can make one
    // ambiguous.
    if !bytes.iter().any(|&b| matches!(b, b'.' | b'%' | b'\\')) {
        return path.contains("//");
    }
    // One pass: each byte, with where the current segment began.
    let mut segment_start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'\\' => return true,
            b'%' => {
                if let Some(&[hi, lo]) = bytes.get(i + 1..i + 3) {
                    let code = [hi.to_ascii_uppercase(), lo.to_ascii_uppercase()];
                    if matches!(&code, b"2F" | b"5C" | b"2E") {
                        return true;
                    }
                }
            }
            b'/' => {
                if is_dot_segment(&bytes[segment_start..i]) || (i > 0 && segment_start == i) {
                    return true;
                }
                segment_start = i + 1;
            }
            _ => {}
        }
    }
    is_dot_segment(&bytes[segment_start..])
}

/// `.` or `..`: segments a server may resolve away, with path parameters too (`..;x`,
/// `..%3b`): Tomcat and Jetty drop a segment's `;` parameters before they resolve dot
/// segments, so `/public/..;/admin` is `/admin` to them.
fn is_dot_segment(segment: &[u8]) -> bool {
    let name = match segment.iter().position(|&b| b == b';') {
        Some(end) => &segment[..end],
        None => segment,
    };
    let name = match name
        .windows(3)
        .position(|w| w[0] == b'%' && w[1] == b'3' && w[2].eq_ignore_ascii_case(&b'b'))
    {
        Some(end) => &name[..end],
        None => name,
    };
    name == b"." || name == b".."
}
