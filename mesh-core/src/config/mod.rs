//! Configuration for the whole mesh, shared by `mesh-proxy`'s config file and the library
//! builders.
//!
//! The types are plain serde data with the defaults of the project's architecture
//! documented on each field. Loading is two steps, both done by [`MeshConfig::from_toml`]:
//!
//! 1. **Parse.** TOML is deserialized; unknown keys are refused (a typo never silently
//!    falls back to a default). The first syntax or type error is reported with its key
//!    path, line and column.
//! 2. **Validate.** [`MeshConfig::validate`] checks every semantic rule — ranges, ordering
//!    of minimums and maximums, references between sections, unique names and listen
//!    addresses, regexes that compile — and reports *every* error at once, each with its
//!    key path:
//!
//! ```text
//! services.users.retry.budget.ratio: must be between 0 and 1 (got 1.5)
//! routes[0].backends[1].service: no service named `users-canary`
//! ```
//!
//! A minimal file:
//!
//! ```
//! use mesh_core::config::MeshConfig;
//!
//! let config = MeshConfig::from_toml(r#"
//!     [identity]
//!     source = "spire"
//!
//!     [services.users]
//!     discovery = { kind = "dns", host = "users.prod.internal", port = 8443 }
//!     server_identity = "spiffe://example.org/ns/prod/sa/users"
//!
//!     [services.users.retry]
//!     max_retries = 3
//! "#)?;
//! let users = &config.services["users"];
//! assert_eq!(users.retry.budget.ratio, 0.2); // the default
//! assert_eq!(users.retry.max_retries, 3);
//! # Ok::<(), mesh_core::config::ConfigError>(())
//! ```
//!
//! The sections: [`identity`](IdentityConfig) (where SVIDs come from),
//! [`services`](ServiceConfig) (outbound: discovery, balancer, retry, timeouts, circuit
//! breaker, rate-limit awareness, zone preference), [`routes`](RouteConfig) (outbound
//! HTTP/gRPC routing, canary splits, per-route policies, fault injection),
//! [`inbound`](InboundConfig) and [`outbound`](OutboundConfig) listeners,
//! [`authorization`](AuthorizationPolicy) policies, [`rate_limits`](RateLimitConfig) and
//! the [`admin`](AdminConfig) listener.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod destination;
mod identity;
mod listener;
mod policy;
mod pool;
mod route;
mod service;
mod tcp;
mod validate;

pub use self::destination::{Destination, Network};
pub use self::identity::{IdentityConfig, TrustDomainKey};
pub use self::listener::{
    AdminConfig, CertificateFiles, InboundConfig, ListenerLimits, MAX_DECISIONS, OutboundConfig,
    Protocol, TlsMode, Unmatched,
};
pub use self::policy::{
    AuthorizationPolicy, AuthorizationRule, DefaultAction, Rate, RateLimitConfig, RateLimitOverride,
};
pub use self::pool::{MAX_POOL_LIMIT, PoolConfig};
pub use self::route::{
    BackendRef, FaultConfig, FaultHeader, GrpcMatch, HeaderMatch, HeaderValueMatch, PathMatch,
    QueryMatch, QueryValueMatch, RouteConfig, RouteMatch, is_ambiguous_path,
};
pub use self::service::{
    BackoffConfig, BalancerConfig, BreakerConfig, BudgetConfig, ClassificationConfig,
    DiscoveryConfig, RateLimitedConfig, RetryConfig, ServiceConfig, SuccessRateConfig,
    TimeoutConfig, ZoneConfig,
};
pub use self::tcp::{MAX_KEEPALIVE_PROBES, MAX_KEEPALIVE_SECS, TcpConfig};

/// `pattern` compiled to match only a whole text (a path, a header or query value), as
/// route and authorization regexes do.
///
/// `pattern` must compile on its own first: wrapped as `^(?:pattern)$` without that check,
/// `/a)|(/b` would become `^(?:/a)|(/b)$`, whose second branch matches anywhere. A
/// pattern that compiles on its own has balanced groups, so the wrapper's group closes
/// after it, unless the pattern ends in a verbose-mode (`(?x)`) comment, which would
/// swallow the wrapper's end: that case is closed by a line break, which verbose mode
/// ignores.
pub fn anchored_regex(pattern: &str) -> Result<regex::Regex, regex::Error> {
    regex::Regex::new(pattern)?;
    regex::Regex::new(&format!("^(?:{pattern})$"))
        .or_else(|_| regex::Regex::new(&format!("^(?:{pattern}\n)$")))
}

/// The configuration of a mesh: everything `mesh-proxy` reads from its file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshConfig {
    /// Where this workload's SVIDs and trust bundles come from. Default: none, in which case
    /// only listeners and services with `tls = "plaintext"` are allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<IdentityConfig>,
    /// This workload's zone, for zone-aware balancing. Default: unknown (no preference).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Outbound services by name.
    #[serde(default)]
    pub services: BTreeMap<String, ServiceConfig>,
    /// Outbound routes, selected by Gateway API precedence (the most specific hostname,
    /// then path, method, header and query matches), ties by their order here.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Inbound listeners: mTLS from peers, then authorization and rate limiting, to the
    /// local application.
    #[serde(default)]
    pub inbound: Vec<InboundConfig>,
    /// Outbound listeners: plaintext from the local application, routed to services.
    #[serde(default)]
    pub outbound: Vec<OutboundConfig>,
    /// Authorization policies by name, referenced by inbound listeners.
    #[serde(default)]
    pub authorization: BTreeMap<String, AuthorizationPolicy>,
    /// Local rate limits by name, referenced by inbound listeners.
    #[serde(default)]
    pub rate_limits: BTreeMap<String, RateLimitConfig>,
    /// The admin listener (`/metrics`, `/ready`, `/live`, the effective config). Default:
    /// none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<AdminConfig>,
    /// How long in-flight requests may take to finish after a shutdown signal. Default:
    /// 30 s.
    #[serde(default = "default_drain_timeout", with = "crate::serde_str::duration")]
    pub drain_timeout: Duration,
    /// TCP keepalive and user timeout for connections to and from other hosts. Default:
    /// keepalive after 10 s of silence, then 3 probes 10 s apart; a 40 s user timeout.
    #[serde(default, skip_serializing_if = "TcpConfig::is_default")]
    pub tcp: TcpConfig,
}

fn default_drain_timeout() -> Duration {
    Duration::from_secs(30)
}

impl MeshConfig {
    /// Parses and validates a configuration from TOML text.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Self::parse(text, None)
    }

    /// Reads, parses and validates a configuration file. Errors name the file. Relative
    /// paths in it (identity PEM files, discovery files) are taken from the file's
    /// directory, whatever the working directory.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, Some(path))
    }

    /// [`from_file`](Self::from_file) for a caller that reads the file itself (without
    /// blocking, say, with `tokio::fs`): parses and validates `text`, read from `path`,
    /// which errors name and relative paths are taken from.
    pub fn from_file_contents(path: impl AsRef<Path>, text: &str) -> Result<Self, ConfigError> {
        Self::parse(text, Some(path.as_ref()))
    }

    fn parse(text: &str, file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut config =
            deserialize_toml::<Self>(text).map_err(|(key, message)| ConfigError::Parse {
                file: file.map(Path::to_owned),
                key,
                message,
            })?;
        config.validate().map_err(|errors| ConfigError::Invalid {
            file: file.map(Path::to_owned),
            errors,
        })?;
        if let Some(dir) = file.and_then(Path::parent) {
            config.rebase(dir);
        }
        Ok(config)
    }

    /// Makes the relative paths the configuration names (identity PEM files, discovery
    /// files, listener certificates) relative to `dir`, the configuration file's directory, so that a
    /// configuration means the same whatever the working directory (under systemd, `/`).
    fn rebase(&mut self, dir: &Path) {
        let rebase = |p: &mut std::path::PathBuf| {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        };
        if let Some(IdentityConfig::Files { cert, key, bundles }) = &mut self.identity {
            rebase(cert);
            rebase(key);
            bundles.values_mut().for_each(rebase);
        }
        for service in self.services.values_mut() {
            if let DiscoveryConfig::File { path } = &mut service.discovery {
                rebase(path);
            }
        }
        for outbound in &mut self.outbound {
            if let Some(CertificateFiles { cert, key }) = &mut outbound.certificate {
                rebase(cert);
                rebase(key);
            }
        }
    }

    /// Checks every semantic rule and returns all violations, each with its key path.
    pub fn validate(&self) -> Result<(), Vec<ValidationError>> {
        let mut v = validate::Validator::default();
        v.mesh(self);
        v.finish()
    }
}

/// Deserializes TOML, returning the key path and message of the first error.
pub(crate) fn deserialize_toml<T: serde::de::DeserializeOwned>(
    text: &str,
) -> Result<T, (String, String)> {
    let de = toml::de::Deserializer::parse(text)
        .map_err(|e| (String::new(), e.to_string().trim_end().to_owned()))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let key = if key == "." { String::new() } else { key };
        (key, e.into_inner().to_string().trim_end().to_owned())
    })
}

/// One semantic error in a configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidationError {
    /// The key path, as written in TOML (`services.users.retry.budget.ratio`,
    /// `routes[0].backends[1].service`).
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

impl std::error::Error for ValidationError {}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The text is not valid TOML or does not fit the schema.
    #[error("{}{}{message}", file_prefix(file), key_prefix(key))]
    Parse {
        /// The file, when loaded from one.
        file: Option<PathBuf>,
        /// The key path where parsing stopped (empty at the top level).
        key: String,
        /// The parser's message, with line and column.
        message: String,
    },
    /// The configuration parsed but breaks one or more rules.
    #[error("{}{}", file_prefix(file), list(errors))]
    Invalid {
        /// The file, when loaded from one.
        file: Option<PathBuf>,
        /// Every violation, in document order.
        errors: Vec<ValidationError>,
    },
}

impl ConfigError {
    /// The validation errors, if this is [`ConfigError::Invalid`].
    pub fn validation_errors(&self) -> &[ValidationError] {
        match self {
            Self::Invalid { errors, .. } => errors,
            _ => &[],
        }
    }
}

fn file_prefix(file: &Option<PathBuf>) -> String {
    file.as_ref()
        .map(|f| format!("{}: ", f.display()))
        .unwrap_or_default()
}

fn key_prefix(key: &str) -> String {
    if key.is_empty() {
        String::new()
    } else {
        format!("at `{key}`: ")
    }
}

fn list(errors: &[ValidationError]) -> String {
    let mut s = match errors.len() {
        1 => "1 error in configuration:".to_owned(),
        n => format!("{n} errors in configuration:"),
    };
    for e in errors {
        s.push_str(&format!("\n  {e}"));
    }
    s
}

#[cfg(test)]
mod tests;
