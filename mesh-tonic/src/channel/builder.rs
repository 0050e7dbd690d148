//! Building a [`MeshChannel`] from code or from a `[services.NAME]` section.

use std::time::Duration;

use http::uri::Authority;
use mesh_core::config::{
    BalancerConfig, BreakerConfig, ClassificationConfig, Protocol, RateLimitedConfig, RetryConfig,
    ServiceConfig, TimeoutConfig, TlsMode, ZoneConfig,
};
use mesh_core::discover::BoxDiscover;
use mesh_core::identity::IdentityPattern;
use mesh_spiffe::Mtls;
use mesh_tower::MeshClientBuilder;
use mesh_tower::client::BuildError;
use mesh_tower::connect::Dialer;
use mesh_tower::decision::DecisionRecord;
use prometheus_client::registry::Registry;

use super::MeshChannel;

/// Builds a [`MeshChannel`]: a [`MeshClientBuilder`] that always speaks gRPC
/// ([`Protocol::Grpc`]: HTTP/2 by ALPN over TLS, with prior knowledge in plaintext).
/// Every setting and default is the client's; see [`MeshChannel::builder`] and
/// [`MeshChannelBuilder::from_config`].
#[derive(Debug)]
#[must_use]
pub struct MeshChannelBuilder {
    client: MeshClientBuilder,
    service: String,
    tls: bool,
    authority: Option<Authority>,
}

impl MeshChannelBuilder {
    pub(super) fn new(discovery: BoxDiscover) -> Self {
        Self {
            client: mesh_tower::MeshClient::builder(discovery).protocol(Protocol::Grpc),
            service: "default".to_owned(),
            tls: true,
            authority: None,
        }
    }

    /// A builder with every policy of `config` (a `[services.NAME]` section), speaking
    /// gRPC whatever its `protocol` says. With `tls = "mtls"` the caller still supplies
    /// credentials with [`mtls`](Self::mtls).
    pub fn from_config(name: &str, config: &ServiceConfig, discovery: BoxDiscover) -> Self {
        if !matches!(
            config.protocol,
            Protocol::Grpc | Protocol::Http2 | Protocol::Auto
        ) {
            tracing::warn!(service = name, protocol = ?config.protocol, "a gRPC channel speaks HTTP/2: the configured protocol is ignored");
        }
        Self {
            client: MeshClientBuilder::from_config(name, config, discovery)
                .protocol(Protocol::Grpc),
            service: name.to_owned(),
            tls: config.tls != TlsMode::Plaintext,
            authority: None,
        }
    }

    /// The service's name, for logs, metrics, error messages and (unless
    /// [`authority`](Self::authority) is set) the requests' `:authority` (default
    /// `default`). Without an `authority`, [`build`](Self::build) refuses a name that is
    /// not a valid one (`users v2`, `a/b`, an empty name).
    pub fn service_name(mut self, name: impl Into<String>) -> Self {
        self.service = name.into();
        self.client = self.client.service_name(self.service.clone());
        self
    }

    /// The `:authority` of every call (default: the service name).
    pub fn authority(mut self, authority: Authority) -> Self {
        self.authority = Some(authority);
        self
    }

    /// Connects with SPIFFE mTLS; see [`MeshClientBuilder::mtls`].
    pub fn mtls(mut self, mtls: Mtls) -> Self {
        self.client = self.client.mtls(mtls);
        self.tls = true;
        self
    }

    /// The identity endpoints must present when discovery names none for them.
    pub fn server_identity(mut self, pattern: IdentityPattern) -> Self {
        self.client = self.client.server_identity(pattern);
        self
    }

    /// Connects in plaintext (HTTP/2 with prior knowledge): endpoints are not
    /// authenticated.
    pub fn plaintext(mut self) -> Self {
        self.client = self.client.plaintext();
        self.tls = false;
        self
    }

    /// The connect timeout (default 1 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.client = self.client.connect_timeout(timeout);
        self
    }

    /// Balancer settings.
    pub fn balancer(mut self, config: BalancerConfig) -> Self {
        self.client = self.client.balancer(config);
        self
    }

    /// Retry settings (gRPC codes retried: `grpc_codes`, default `UNAVAILABLE`).
    pub fn retry(mut self, config: RetryConfig) -> Self {
        self.client = self.client.retry(config);
        self
    }

    /// Timeouts: `request` bounds each call (`DEADLINE_EXCEEDED`), `per_try` each try.
    pub fn timeout(mut self, config: TimeoutConfig) -> Self {
        self.client = self.client.timeout(config);
        self
    }

    /// Circuit breaking.
    pub fn circuit_breaker(mut self, config: BreakerConfig) -> Self {
        self.client = self.client.circuit_breaker(config);
        self
    }

    /// Rate-limit awareness (`RESOURCE_EXHAUSTED` with `grpc-retry-pushback-ms`).
    pub fn rate_limited(mut self, config: RateLimitedConfig) -> Self {
        self.client = self.client.rate_limited(config);
        self
    }

    /// Response classification.
    pub fn classification(mut self, config: ClassificationConfig) -> Self {
        self.client = self.client.classification(config);
        self
    }

    /// This workload's zone and the zone preference.
    pub fn zone(mut self, local_zone: Option<String>, config: ZoneConfig) -> Self {
        self.client = self.client.zone(local_zone, config);
        self
    }

    /// Seeds the balancer's picks (tests and simulation); see
    /// [`MeshClientBuilder::seed`].
    pub fn seed(mut self, seed: u64) -> Self {
        self.client = self.client.seed(seed);
        self
    }

    /// Opens connections with `dialer` instead of TCP (a simulated network, a tunnel); see
    /// [`MeshClientBuilder::dialer`].
    pub fn dialer(mut self, dialer: Dialer) -> Self {
        self.client = self.client.dialer(dialer);
        self
    }

    /// Records picks, breaker transitions and retry decisions in `record`; see
    /// [`mesh_tower::decision`].
    pub fn decisions(mut self, record: &DecisionRecord) -> Self {
        self.client = self.client.decisions(record);
        self
    }

    /// Registers the client metric families in `registry`, for this channel. Once per
    /// registry: other channels (and clients) of the process take
    /// [`shared_metrics`](Self::shared_metrics) (a family registered twice is exposed
    /// twice, which Prometheus refuses).
    pub fn metrics(mut self, registry: &mut Registry) -> Self {
        self.client = self.client.metrics(registry);
        self
    }

    /// Records in `metrics`' families (registered once, by
    /// `ClientMetrics::register_families` or another channel's or client's metrics), under
    /// this channel's service name.
    pub fn shared_metrics(mut self, metrics: &mesh_tower::metrics::ClientMetrics) -> Self {
        self.client = self.client.shared_metrics(metrics);
        self
    }

    /// Starts the channel: its discovery task runs from now on. Fails as
    /// [`MeshClientBuilder::build`] does (no transport chosen, a setting out of range, no
    /// Tokio runtime), and with [`BuildError::Invalid`] when no
    /// [`authority`](Self::authority) is set and the service name is not a valid one.
    pub fn build(self) -> Result<MeshChannel, BuildError> {
        let authority = match self.authority {
            Some(authority) => authority,
            None => Authority::try_from(self.service.as_str()).map_err(|_| {
                BuildError::Invalid(
                    "service_name",
                    format!(
                        "`{}` is not a valid :authority for the calls; set one with `.authority(..)`",
                        self.service
                    ),
                )
            })?,
        };
        let client = self.client.build()?;
        Ok(MeshChannel::new(
            client,
            &self.service,
            self.tls,
            Some(authority),
        ))
    }
}
