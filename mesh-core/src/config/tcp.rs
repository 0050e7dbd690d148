//! Socket options for TCP connections to and from other hosts.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::serde_str::duration;

/// The most seconds Linux takes for a keepalive idle time or interval
/// (`MAX_TCP_KEEPIDLE`, `MAX_TCP_KEEPINTVL`).
pub const MAX_KEEPALIVE_SECS: u64 = 32_767;

/// The most unanswered probes Linux takes (`MAX_TCP_KEEPCNT`).
pub const MAX_KEEPALIVE_PROBES: u32 = 127;

/// TCP options for every connection the proxy accepts from, or dials to, another host
/// (loopback connections, the local application's, skip them; `TCP_NODELAY` is always
/// set). Applies to every listener and service; a change needs a restart.
///
/// ```toml
/// [tcp]
/// keepalive_idle = "60s"     # probe after a minute of silence; "0s": no keepalive
/// keepalive_interval = "10s"
/// keepalive_probes = 3
/// user_timeout = "0s"        # leave unacknowledged data to the kernel's retransmissions
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpConfig {
    /// Silence before the first keepalive probe, in whole seconds; `0s` turns keepalive
    /// off. Default: 10 s (as Linkerd's proxy).
    #[serde(default = "default_keepalive_idle", with = "duration")]
    pub keepalive_idle: Duration,
    /// Time between unanswered probes, in whole seconds. Default: 10 s.
    #[serde(default = "default_keepalive_interval", with = "duration")]
    pub keepalive_interval: Duration,
    /// Unanswered probes before the connection is reset. Default: 3. With the defaults a
    /// peer whose host vanished is noticed after about 40 s of silence.
    #[serde(default = "default_keepalive_probes")]
    pub keepalive_probes: u32,
    /// How long sent data may stay unacknowledged before the connection is reset
    /// (`TCP_USER_TIMEOUT`, Linux; other systems ignore it); `0s` leaves the kernel's
    /// retransmissions (about 15 minutes). Default: 40 s. On Linux it also bounds a
    /// keepalive's probing: probes stop once this long has passed without an answer.
    #[serde(default = "default_user_timeout", with = "duration")]
    pub user_timeout: Duration,
}

fn default_keepalive_idle() -> Duration {
    Duration::from_secs(10)
}

fn default_keepalive_interval() -> Duration {
    Duration::from_secs(10)
}

fn default_keepalive_probes() -> u32 {
    3
}

fn default_user_timeout() -> Duration {
    Duration::from_secs(40)
}

impl Default for TcpConfig {
    fn default() -> Self {
        Self {
            keepalive_idle: default_keepalive_idle(),
            keepalive_interval: default_keepalive_interval(),
            keepalive_probes: default_keepalive_probes(),
            user_timeout: default_user_timeout(),
        }
    }
}

impl TcpConfig {
    /// Whether every option is left at its default.
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// Whether keepalive is on (`keepalive_idle` is not `0s`).
    pub fn keepalive(&self) -> bool {
        !self.keepalive_idle.is_zero()
    }
}
