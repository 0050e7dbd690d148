//! Inbound policy: authorization by peer identity and route, and local rate limits.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::route::RouteMatch;
use crate::identity::IdentityPattern;
use crate::serde_str::duration;

/// An authorization policy: rules tried in order, and what happens when none matches.
///
/// ```toml
/// [authorization.api]
/// default = "deny"                  # deny | allow | audit
///
/// [[authorization.api.rules]]
/// name = "frontend-reads"
/// clients = ["spiffe://example.org/ns/prod/sa/frontend", "spiffe://example.org/ns/ops/*"]
/// routes = [{ path = { prefix = "/users" }, methods = ["GET", "HEAD"] }]
///
/// [[authorization.api.rules]]
/// name = "health"
/// unauthenticated = true            # plaintext callers too
/// routes = [{ path = { exact = "/healthz" } }]
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationPolicy {
    /// What happens to a request no rule allows. Default: `deny`.
    #[serde(default)]
    pub default: DefaultAction,
    /// The rules; a request is allowed when any rule matches both its client and its route.
    #[serde(default)]
    pub rules: Vec<AuthorizationRule>,
}

/// What happens to a request that no rule allows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum DefaultAction {
    /// Refuse it: HTTP 403, gRPC `PERMISSION_DENIED` (the default).
    #[default]
    Deny,
    /// Allow it.
    Allow,
    /// Allow it, and log that it would have been denied.
    Audit,
}

/// One allow rule: (clients) x (routes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationRule {
    /// A name, used in logs and metrics; unique within the policy.
    pub name: String,
    /// Client identities the rule admits (`*` for any verified identity). At least one
    /// unless `unauthenticated` is set.
    #[serde(default)]
    pub clients: Vec<IdentityPattern>,
    /// Also admit callers without a verified identity (plaintext). Default: false.
    #[serde(default)]
    pub unauthenticated: bool,
    /// Routes, any of which the request must match. Default: every route.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteMatch>,
}

/// A local rate limit (GCRA), in total and per client identity.
///
/// ```toml
/// [rate_limits.api]
/// total = { requests = 1000, per = "1s" }
/// per_client = { requests = 100, per = "1s", burst = 20 }
/// [[rate_limits.api.overrides]]
/// clients = ["spiffe://example.org/ns/batch/*"]
/// limit = { requests = 10, per = "1s" }
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// The limit over all clients together. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<Rate>,
    /// The limit for each client identity (unauthenticated callers share one bucket).
    /// Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_client: Option<Rate>,
    /// Per-client limits for particular clients, first match wins, replacing `per_client`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<RateLimitOverride>,
}

/// A rate: `requests` per `per`, with bursts of up to `burst` requests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    /// Requests allowed per period; at least 1.
    pub requests: u32,
    /// The period. Default: 1 s.
    #[serde(default = "one_second", with = "duration")]
    pub per: Duration,
    /// Requests that may arrive at once, at least 1. Default: `requests`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

fn one_second() -> Duration {
    Duration::from_secs(1)
}

impl Rate {
    /// The burst, with its default applied.
    pub fn burst(&self) -> u32 {
        self.burst.unwrap_or(self.requests)
    }
}

/// A per-client limit for the clients matching `clients`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitOverride {
    /// The clients it applies to; at least one.
    pub clients: Vec<IdentityPattern>,
    /// Their limit.
    pub limit: Rate,
}
