//! Outbound services: how endpoints are found, balanced, retried, timed out and ejected.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::listener::{Protocol, TlsMode};
use crate::classify::{Classifier, Code, CodeSet, StatusSet};
use crate::endpoint::Endpoint;
use crate::identity::IdentityPattern;
use crate::serde_str::duration;

/// One outbound service.
///
/// ```toml
/// [services.users]
/// discovery = { kind = "dns", host = "users.prod.internal", port = 8443 }
/// server_identity = "spiffe://example.org/ns/prod/sa/users"
/// protocol = "http2"
///
/// [services.users.retry]
/// max_retries = 2
/// budget = { ratio = 0.2, min_per_second = 10, ttl = "10s" }
///
/// [services.users.timeout]
/// request = "2s"
/// per_try = "500ms"
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Where the service's endpoints come from.
    pub discovery: DiscoveryConfig,
    /// The identity every endpoint must present, unless the endpoint names its own.
    /// Required with `tls = "mtls"` unless every endpoint is static and carries one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_identity: Option<IdentityPattern>,
    /// Transport security to the endpoints. Default: `mtls`.
    #[serde(default)]
    pub tls: TlsMode,
    /// The protocol spoken to the endpoints. Default: `auto` (ALPN over TLS; HTTP/1.1 in
    /// plaintext).
    #[serde(default)]
    pub protocol: Protocol,
    /// Timeout for establishing a connection (TCP and TLS). Default: 1 s.
    #[serde(default = "defaults::connect_timeout", with = "duration")]
    pub connect_timeout: Duration,
    /// Load balancing.
    #[serde(default)]
    pub balancer: BalancerConfig,
    /// Retries.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Timeouts.
    #[serde(default)]
    pub timeout: TimeoutConfig,
    /// Per-endpoint circuit breaking.
    #[serde(default)]
    pub circuit_breaker: BreakerConfig,
    /// How 429 / `RESOURCE_EXHAUSTED` answers affect an endpoint.
    #[serde(default)]
    pub rate_limited: RateLimitedConfig,
    /// Which responses are failures and which are rate limiting.
    #[serde(default)]
    pub classification: ClassificationConfig,
    /// Zone-aware balancing.
    #[serde(default)]
    pub zone: ZoneConfig,
    /// Bounds on each endpoint's HTTP/1.1 connections. Default: see [`PoolConfig`](super::PoolConfig).
    #[serde(default, skip_serializing_if = "super::PoolConfig::is_default")]
    pub pool: super::PoolConfig,
    /// The destinations that mean this service to a transparent outbound listener: the
    /// addresses the application dials (a virtual IP, or what the service's DNS name
    /// resolves to), each `IP:port`, or a whole network at a port (`10.1.2.0/24:5432`,
    /// `[2001:db8::/64]:443`: see [`Destination`](super::Destination); an exact address
    /// wins over a network, a longer prefix over a shorter). Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<super::Destination>,
}

/// Where a service's endpoints come from; the `kind` key selects the source.
///
/// ```toml
/// discovery = { kind = "static", endpoints = [{ addr = "10.0.0.1:8443" }] }
/// discovery = { kind = "file", path = "/etc/mesh/users.toml" }
/// discovery = { kind = "dns", host = "users.internal", port = 8443 }
/// discovery = { kind = "dns-srv", name = "_https._tcp.users.internal" }
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
#[non_exhaustive]
pub enum DiscoveryConfig {
    /// A fixed list of endpoints.
    Static {
        /// The endpoints; at least one.
        endpoints: Vec<Endpoint>,
    },
    /// A TOML (`[[endpoints]]`) or JSON (`{"endpoints": [...]}`) file, reloaded when it
    /// changes.
    File {
        /// The file.
        path: PathBuf,
    },
    /// DNS A and AAAA records of a host name, every address at one port.
    Dns {
        /// The host name.
        host: String,
        /// The port every address is reached at.
        port: u16,
        /// Shortest re-resolution interval, whatever the TTL. Default: 5 s.
        #[serde(default = "defaults::dns_min_ttl", with = "duration")]
        min_ttl: Duration,
        /// Longest re-resolution interval, whatever the TTL. Default: 5 min.
        #[serde(default = "defaults::dns_max_ttl", with = "duration")]
        max_ttl: Duration,
        /// The name servers to ask, `IP:port` (a local Consul agent's DNS interface is
        /// `127.0.0.1:8600`, say). Default: the `nameserver` lines of `/etc/resolv.conf`.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        name_servers: Vec<SocketAddr>,
        /// How long the name must stay unknown (NXDOMAIN, in two lookups at least)
        /// before its endpoints are dropped: a name deleted by mistake, or a resolver
        /// answering wrongly for a moment, keeps traffic flowing meanwhile. Default: 30 s.
        #[serde(default = "defaults::nxdomain_grace", with = "duration")]
        nxdomain_grace: Duration,
    },
    /// DNS SRV records: each target's addresses at the record's port, weighted.
    DnsSrv {
        /// The SRV name (`_service._proto.name`).
        name: String,
        /// Shortest re-resolution interval, whatever the TTL. Default: 5 s.
        #[serde(default = "defaults::dns_min_ttl", with = "duration")]
        min_ttl: Duration,
        /// Longest re-resolution interval, whatever the TTL. Default: 5 min.
        #[serde(default = "defaults::dns_max_ttl", with = "duration")]
        max_ttl: Duration,
        /// The name servers to ask, as for `dns`. Default: `/etc/resolv.conf`'s.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        name_servers: Vec<SocketAddr>,
        /// As for `dns`. Default: 30 s.
        #[serde(default = "defaults::nxdomain_grace", with = "duration")]
        nxdomain_grace: Duration,
    },
}

/// Power-of-two-choices balancing over peak-EWMA load (Linkerd's and Finagle's defaults).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalancerConfig {
    /// The RTT assumed for an endpoint with no measurements yet. Default: 30 ms.
    #[serde(default = "defaults::default_rtt", with = "duration")]
    pub default_rtt: Duration,
    /// How fast the RTT estimate forgets old samples. Default: 10 s.
    #[serde(default = "defaults::ewma_decay", with = "duration")]
    pub decay: Duration,
}

impl Default for BalancerConfig {
    fn default() -> Self {
        Self {
            default_rtt: defaults::default_rtt(),
            decay: defaults::ewma_decay(),
        }
    }
}

/// Retries, bounded by a budget.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Whether retries are attempted at all. Default: true.
    #[serde(default = "defaults::yes")]
    pub enabled: bool,
    /// Retries per request, after the first try. Default: 2.
    #[serde(default = "defaults::max_retries")]
    pub max_retries: u32,
    /// The budget that caps retries across all requests.
    #[serde(default)]
    pub budget: BudgetConfig,
    /// HTTP statuses that are retried. Default: `5xx`. (Connection failures are always
    /// retryable; 429 is never retried sooner than its `Retry-After`.)
    #[serde(default = "defaults::retry_statuses")]
    pub statuses: StatusSet,
    /// gRPC codes that are retried, whatever the method. Default: `UNAVAILABLE`. A try
    /// whose connection broke before an answer, or that timed out, counts as
    /// `UNAVAILABLE`, as a gRPC client's own status does (gRFC A6): the server may have
    /// run it. For methods that must not run twice, set `grpc_codes = []` on their
    /// route; calls the server refused or never received are retried anyway.
    #[serde(default = "defaults::retry_codes")]
    pub grpc_codes: CodeSet,
    /// Retry HTTP methods that are not idempotent (POST, PATCH) too. Default: false.
    /// gRPC calls (all POSTs) follow `grpc_codes` instead.
    #[serde(default)]
    pub non_idempotent: bool,
    /// The largest request body buffered for replay; larger bodies are sent once, never
    /// retried. Default: 64 KiB.
    #[serde(default = "defaults::max_replay_body")]
    pub max_replay_body: usize,
    /// Back-off between tries, with full jitter.
    #[serde(default)]
    pub backoff: BackoffConfig,
    /// Retry a request answered 429 / `RESOURCE_EXHAUSTED` once, at once, on another
    /// endpoint that is not rate limiting, when one exists and the budget allows (never
    /// when the pushback is negative): an HTTP request whose method may be retried, a
    /// gRPC call whose `grpc_codes` name `RESOURCE_EXHAUSTED`, and any request a mesh
    /// proxy's rate limit refused (its answer marked `x-mesh-error`: no application saw
    /// it). Default: true.
    #[serde(default = "defaults::yes")]
    pub retry_rate_limited_elsewhere: bool,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_retries: defaults::max_retries(),
            budget: BudgetConfig::default(),
            statuses: defaults::retry_statuses(),
            grpc_codes: defaults::retry_codes(),
            non_idempotent: false,
            max_replay_body: defaults::max_replay_body(),
            backoff: BackoffConfig::default(),
            retry_rate_limited_elsewhere: true,
        }
    }
}

/// A retry budget (Finagle's and Linkerd's): retries may add at most `ratio` of the
/// requests seen in the last `ttl`, plus `min_per_second`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    /// Retries allowed per request, 0 to 1. Default: 0.2.
    #[serde(default = "defaults::budget_ratio")]
    pub ratio: f64,
    /// Retries always allowed per second. Default: 10.
    #[serde(default = "defaults::budget_min_per_second")]
    pub min_per_second: u32,
    /// The window requests are counted over, 1 s to 60 s. Default: 10 s.
    #[serde(default = "defaults::budget_ttl", with = "duration")]
    pub ttl: Duration,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            ratio: defaults::budget_ratio(),
            min_per_second: defaults::budget_min_per_second(),
            ttl: defaults::budget_ttl(),
        }
    }
}

/// Exponential back-off with jitter between `min` and `max`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackoffConfig {
    /// The first delay. Default: 25 ms (retries), 1 s (ejections).
    #[serde(with = "duration")]
    pub min: Duration,
    /// The longest delay. Default: 250 ms (retries), 60 s (ejections).
    #[serde(with = "duration")]
    pub max: Duration,
    /// The share of each delay that is randomized, 0 to 1. Default: 0.5.
    #[serde(default = "defaults::jitter")]
    pub jitter: f64,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self {
            min: Duration::from_millis(25),
            max: Duration::from_millis(250),
            jitter: defaults::jitter(),
        }
    }
}

/// Request and per-try timeouts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutConfig {
    /// The whole request, retries included, up to the end of its response body (a
    /// stream that outlives it fails). Default: none.
    #[serde(
        default,
        with = "duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub request: Option<Duration>,
    /// Each try, up to its response head (where the try is committed). Default: none.
    #[serde(
        default,
        with = "duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub per_try: Option<Duration>,
}

/// Per-endpoint circuit breaking, off the request path.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    /// Whether endpoints are ejected at all. Default: true.
    #[serde(default = "defaults::yes")]
    pub enabled: bool,
    /// Consecutive failures that eject an endpoint. Default: 7.
    #[serde(default = "defaults::consecutive_failures")]
    pub consecutive_failures: u32,
    /// Optional ejection on a low success rate over a window. Default: off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_rate: Option<SuccessRateConfig>,
    /// How long an ejection lasts: from `min`, doubling per repeated ejection, to `max`.
    #[serde(default = "defaults::ejection_backoff")]
    pub backoff: BackoffConfig,
    /// The largest share of endpoints ejected at once, 0 to 1; at least one endpoint is
    /// always left in the pool. Default: 0.5.
    #[serde(default = "defaults::max_ejected_share")]
    pub max_ejected_share: f64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            consecutive_failures: defaults::consecutive_failures(),
            success_rate: None,
            backoff: defaults::ejection_backoff(),
            max_ejected_share: defaults::max_ejected_share(),
        }
    }
}

/// Ejection when the success rate over a window falls below a threshold.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SuccessRateConfig {
    /// The lowest acceptable success rate, 0 to 1. Default: 0.8.
    #[serde(default = "defaults::success_rate")]
    pub threshold: f64,
    /// The window the rate is computed over, in tenths: an outcome counts for between
    /// nine tenths of it and all of it. Default: 10 s.
    #[serde(default = "defaults::success_window", with = "duration")]
    pub window: Duration,
    /// Requests in the window before the rate is judged. Default: 20.
    #[serde(default = "defaults::success_min_requests")]
    pub min_requests: u32,
}

/// How rate-limited answers (429, `RESOURCE_EXHAUSTED`) affect an endpoint: never a
/// failure, never a success; the endpoint's load is penalized for the server's pushback
/// so that balancing moves away from it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitedConfig {
    /// The penalty when the answer carries no `Retry-After` or pushback. Default: 1 s.
    #[serde(default = "defaults::rate_limit_penalty", with = "duration")]
    pub default_penalty: Duration,
    /// The longest penalty, whatever the server asks. Default: 30 s.
    #[serde(default = "defaults::rate_limit_max_penalty", with = "duration")]
    pub max_penalty: Duration,
    /// Count rate-limited answers toward ejection like failures. Default: false.
    #[serde(default)]
    pub count_toward_ejection: bool,
}

impl Default for RateLimitedConfig {
    fn default() -> Self {
        Self {
            default_penalty: defaults::rate_limit_penalty(),
            max_penalty: defaults::rate_limit_max_penalty(),
            count_toward_ejection: false,
        }
    }
}

/// Which answers are failures and which are rate limiting (see
/// [`classify`](crate::classify)).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassificationConfig {
    /// HTTP statuses that are failures. Default: `5xx`.
    #[serde(default = "defaults::failure_statuses")]
    pub failure_statuses: StatusSet,
    /// HTTP statuses that are rate limiting. Default: `429`.
    #[serde(default = "defaults::rate_limited_statuses")]
    pub rate_limited_statuses: StatusSet,
    /// gRPC codes that are failures. Default: `UNAVAILABLE`, `INTERNAL`,
    /// `DEADLINE_EXCEEDED`, `DATA_LOSS`.
    #[serde(default = "defaults::failure_codes")]
    pub failure_codes: CodeSet,
    /// gRPC codes that are rate limiting. Default: `RESOURCE_EXHAUSTED`.
    #[serde(default = "defaults::rate_limited_codes")]
    pub rate_limited_codes: CodeSet,
}

impl Default for ClassificationConfig {
    fn default() -> Self {
        Classifier::default().into()
    }
}

impl From<Classifier> for ClassificationConfig {
    fn from(c: Classifier) -> Self {
        Self {
            failure_statuses: c.http_failure,
            rate_limited_statuses: c.http_rate_limited,
            failure_codes: c.grpc_failure,
            rate_limited_codes: c.grpc_rate_limited,
        }
    }
}

impl From<&ClassificationConfig> for Classifier {
    fn from(c: &ClassificationConfig) -> Self {
        Self {
            http_failure: c.failure_statuses,
            http_rate_limited: c.rate_limited_statuses,
            grpc_failure: c.failure_codes,
            grpc_rate_limited: c.rate_limited_codes,
        }
    }
}

/// Zone-aware balancing: prefer endpoints in this workload's zone (the top-level `zone`)
/// while their load stays within a band of the other zones' load; spill over beyond it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZoneConfig {
    /// Prefer local-zone endpoints. Default: true (no effect when the zone is unknown).
    #[serde(default = "defaults::yes")]
    pub prefer_local: bool,
    /// Stay local while the local zone's mean load is at most this multiple of the other
    /// zones' mean load, at least 1. Default: 1.5.
    #[serde(default = "defaults::load_band")]
    pub load_band: f64,
}

impl Default for ZoneConfig {
    fn default() -> Self {
        Self {
            prefer_local: true,
            load_band: defaults::load_band(),
        }
    }
}

/// The documented defaults, one function each so serde can use them.
pub(super) mod defaults {
    use super::*;

    pub(crate) fn yes() -> bool {
        true
    }
    pub(crate) fn connect_timeout() -> Duration {
        Duration::from_secs(1)
    }
    pub(crate) fn dns_min_ttl() -> Duration {
        Duration::from_secs(5)
    }
    pub(crate) fn dns_max_ttl() -> Duration {
        Duration::from_secs(300)
    }
    /// As `discover::dns::DEFAULT_NXDOMAIN_GRACE`.
    pub(crate) fn nxdomain_grace() -> Duration {
        Duration::from_secs(30)
    }
    pub(crate) fn default_rtt() -> Duration {
        Duration::from_millis(30)
    }
    pub(crate) fn ewma_decay() -> Duration {
        Duration::from_secs(10)
    }
    pub(crate) fn max_retries() -> u32 {
        2
    }
    pub(crate) fn retry_statuses() -> StatusSet {
        StatusSet::SERVER_ERRORS
    }
    pub(crate) fn retry_codes() -> CodeSet {
        CodeSet::of(&[Code::Unavailable])
    }
    pub(crate) fn max_replay_body() -> usize {
        64 * 1024
    }
    pub(crate) fn budget_ratio() -> f64 {
        0.2
    }
    pub(crate) fn budget_min_per_second() -> u32 {
        10
    }
    pub(crate) fn budget_ttl() -> Duration {
        Duration::from_secs(10)
    }
    pub(crate) fn jitter() -> f64 {
        0.5
    }
    pub(crate) fn consecutive_failures() -> u32 {
        7
    }
    pub(crate) fn ejection_backoff() -> BackoffConfig {
        BackoffConfig {
            min: Duration::from_secs(1),
            max: Duration::from_secs(60),
            jitter: jitter(),
        }
    }
    pub(crate) fn max_ejected_share() -> f64 {
        0.5
    }
    pub(crate) fn success_rate() -> f64 {
        0.8
    }
    pub(crate) fn success_window() -> Duration {
        Duration::from_secs(10)
    }
    pub(crate) fn success_min_requests() -> u32 {
        20
    }
    pub(crate) fn rate_limit_penalty() -> Duration {
        Duration::from_secs(1)
    }
    pub(crate) fn rate_limit_max_penalty() -> Duration {
        Duration::from_secs(30)
    }
    pub(crate) fn failure_statuses() -> StatusSet {
        Classifier::default().http_failure
    }
    pub(crate) fn rate_limited_statuses() -> StatusSet {
        Classifier::default().http_rate_limited
    }
    pub(crate) fn failure_codes() -> CodeSet {
        Classifier::default().grpc_failure
    }
    pub(crate) fn rate_limited_codes() -> CodeSet {
        Classifier::default().grpc_rate_limited
    }
    pub(crate) fn load_band() -> f64 {
        1.5
    }
}
