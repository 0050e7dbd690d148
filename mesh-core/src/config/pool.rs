//! Bounds on the HTTP/1.1 connections to one endpoint: a service's, or an inbound
//! listener's application.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::serde_str::duration;

/// The most connections, or waiting requests, a pool may be told to allow per endpoint.
pub const MAX_POOL_LIMIT: usize = 10_000_000;

/// Bounds on the HTTP/1.1 connections to each endpoint of a service (`[services.NAME.pool]`)
/// or to an inbound listener's application (`[inbound.pool]`). An HTTP/1.1 connection
/// carries one request at a time, so every concurrent request needs one: without a bound
/// one client's burst of HTTP/2 streams opens as many connections to the application.
/// HTTP/2 endpoints multiplex requests over one connection; only `max_connections` applies
/// to them: past the streams its server allows at once (its `SETTINGS`), a pool opens
/// another, up to `max_connections`, and closes the further ones once the first could take
/// their streams twice over.
///
/// ```toml
/// [services.users.pool]
/// max_connections = 256        # [1,024] HTTP/1.1 connections open to one endpoint
/// max_pending = 512            # [1,024] requests waiting for one of them; beyond, 503
/// idle_timeout = "30s"         # [90s] an unused pooled connection is closed after this long
/// body_read_timeout = "5m"     # [60s] a request body that keeps its connection waiting this long fails it (408); "0s": never
/// ```
///
/// A request that finds every connection busy and the pool full waits for one to come
/// back (within its own timeouts); one that finds `max_pending` requests waiting already
/// fails at once as not sent (503, `UNAVAILABLE` for gRPC), which a retry policy may send
/// to another endpoint, and which a circuit breaker does not count against the endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Most HTTP/1.1 connections open to one endpoint: in use, idle, or being dialled.
    /// Default: 1,024 (as Envoy's per-cluster `max_connections`).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Most requests waiting for a connection to one endpoint when all
    /// `max_connections` are busy; `0`: none wait. Default: 1,024.
    #[serde(default = "default_max_pending")]
    pub max_pending: usize,
    /// How long an unused connection stays in the pool. Default: 90 s.
    #[serde(default = "default_idle_timeout", with = "duration")]
    pub idle_timeout: Duration,
    /// How long a request body sent over HTTP/1.1 may keep its connection waiting for its
    /// next piece before the request fails (`408`) and the connection closes; `0s`: no
    /// bound. Default: 60 s (as nginx's `client_body_timeout`).
    #[serde(default = "default_body_read_timeout", with = "duration")]
    pub body_read_timeout: Duration,
}

fn default_max_connections() -> usize {
    1024
}

fn default_max_pending() -> usize {
    1024
}

fn default_idle_timeout() -> Duration {
    Duration::from_secs(90)
}

fn default_body_read_timeout() -> Duration {
    Duration::from_secs(60)
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_connections: default_max_connections(),
            max_pending: default_max_pending(),
            idle_timeout: default_idle_timeout(),
            body_read_timeout: default_body_read_timeout(),
        }
    }
}

impl PoolConfig {
    /// Whether every bound is left at its default.
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}
