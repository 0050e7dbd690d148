//! Building a [`MeshClient`] from code or from `mesh-core` configuration.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use mesh_core::Endpoint;
use mesh_core::classify::Classifier;
use mesh_core::config::{
    BalancerConfig, BreakerConfig, ClassificationConfig, PoolConfig, Protocol, RateLimitedConfig,
    RetryConfig, ServiceConfig, TimeoutConfig, TlsMode, ZoneConfig,
};
use mesh_core::discover::BoxDiscover;
use mesh_core::identity::IdentityPattern;
use mesh_spiffe::{Authorizer, Mtls, MtlsConnector};
use prometheus_client::registry::Registry;

use tower::ServiceBuilder;

use super::{EndpointStack, MeshClient};
use crate::balance::{Balance, ZonePreference};
use crate::breaker::BreakerLayer;
use crate::connect::{ConnectSettings, DEFAULT_CONNECT_BACKOFF, Dialer, EndpointClient};
use crate::decision::DecisionRecord;
use crate::load::{EndpointLoad, PeakEwmaLayer, RateLimitPenalty};
use crate::metrics::{ClientMetrics, Metrics};
use crate::retry::{ReplayBody, RetryBudget, RetryLayer, RetryPolicy};
use crate::timeout::TimeoutLayer;

/// Why a client could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// Neither [`MeshClientBuilder::mtls`] nor [`MeshClientBuilder::plaintext`] was chosen.
    #[error("choose mTLS (`.mtls(..)`) or, explicitly, plaintext (`.plaintext()`)")]
    NoTransport,
    /// A setting is out of range.
    #[error("invalid client setting `{0}`: {1}")]
    Invalid(&'static str, String),
    /// `build` was called outside a Tokio runtime.
    #[error("a MeshClient must be built inside a Tokio runtime")]
    NoRuntime,
}

enum Transport {
    Unset,
    Plaintext,
    Mtls(Mtls),
}

/// Builds a [`MeshClient`]; see [`MeshClient::builder`] and
/// [`MeshClientBuilder::from_config`].
pub struct MeshClientBuilder {
    discovery: BoxDiscover,
    service: String,
    transport: Transport,
    server_identity: Option<IdentityPattern>,
    decisions: Option<DecisionRecord>,
    protocol: Protocol,
    connect_timeout: Duration,
    balancer: BalancerConfig,
    retry: RetryConfig,
    timeout: TimeoutConfig,
    breaker: BreakerConfig,
    rate_limited: RateLimitedConfig,
    classification: ClassificationConfig,
    zone: ZoneConfig,
    local_zone: Option<String>,
    metrics: Option<ClientMetrics>,
    seed: Option<u64>,
    fail_fast: Option<Duration>,
    dialer: Option<Dialer>,
    tcp: crate::sock::TcpOptions,
    pool: PoolConfig,
}

impl fmt::Debug for MeshClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshClientBuilder")
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

impl MeshClientBuilder {
    pub(super) fn new(discovery: BoxDiscover) -> Self {
        Self {
            discovery,
            service: "default".to_owned(),
            transport: Transport::Unset,
            server_identity: None,
            decisions: None,
            protocol: Protocol::Auto,
            connect_timeout: crate::connect::DEFAULT_CONNECT_TIMEOUT,
            balancer: BalancerConfig::default(),
            retry: RetryConfig::default(),
            timeout: TimeoutConfig::default(),
            breaker: BreakerConfig::default(),
            rate_limited: RateLimitedConfig::default(),
            classification: ClassificationConfig::default(),
            zone: ZoneConfig::default(),
            local_zone: None,
            metrics: None,
            seed: None,
            fail_fast: None,
            dialer: None,
            tcp: crate::sock::TcpOptions::default(),
            pool: PoolConfig::default(),
        }
    }

    /// A builder with every policy of `config` (a `[services.NAME]` section). With
    /// `tls = "mtls"` the caller still supplies credentials with [`mtls`](Self::mtls);
    /// `server_identity` from the config is used unless that call overrides it.
    pub fn from_config(name: &str, config: &ServiceConfig, discovery: BoxDiscover) -> Self {
        let mut b = Self::new(discovery);
        b.service = name.to_owned();
        b.transport = match config.tls {
            TlsMode::Plaintext => Transport::Plaintext,
            _ => Transport::Unset,
        };
        b.protocol = config.protocol;
        b.connect_timeout = config.connect_timeout;
        b.balancer = config.balancer.clone();
        b.retry = config.retry.clone();
        b.timeout = config.timeout.clone();
        b.breaker = config.circuit_breaker.clone();
        b.rate_limited = config.rate_limited.clone();
        b.classification = config.classification.clone();
        b.zone = config.zone.clone();
        b.server_identity = config.server_identity.clone();
        b.pool = config.pool;
        b
    }

    /// The service's name, for logs and metrics (default `default`).
    pub fn service_name(mut self, name: impl Into<String>) -> Self {
        self.service = name.into();
        self
    }

    /// Connects with SPIFFE mTLS. Each endpoint must present the identity discovery gives
    /// for it or, when it gives none, one that [`server_identity`](Self::server_identity)
    /// matches; an endpoint with neither is refused.
    pub fn mtls(mut self, mtls: Mtls) -> Self {
        self.transport = Transport::Mtls(mtls);
        self
    }

    /// The identity endpoints must present when discovery names none for them.
    pub fn server_identity(mut self, pattern: IdentityPattern) -> Self {
        self.server_identity = Some(pattern);
        self
    }

    /// Connects in plaintext: endpoints are not authenticated.
    pub fn plaintext(mut self) -> Self {
        self.transport = Transport::Plaintext;
        self
    }

    /// Records the client's decisions in `record`, under the service's name (default:
    /// none; see [`crate::decision`]): the balancer's picks, the endpoints' breaker
    /// changes, and a retry decision after every failed try.
    pub fn decisions(mut self, record: &DecisionRecord) -> Self {
        self.decisions = Some(record.clone());
        self
    }

    /// The protocol (default: `Auto`).
    pub fn protocol(mut self, protocol: Protocol) -> Self {
        self.protocol = protocol;
        self
    }

    /// The connect timeout (default 1 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Socket options for TCP connections to endpoints on other hosts (default
    /// [`TcpOptions::default`](crate::sock::TcpOptions::default): keepalive after 10 s, a
    /// 40 s user timeout; see [`crate::sock`]).
    pub fn tcp(mut self, options: crate::sock::TcpOptions) -> Self {
        self.tcp = options;
        self
    }

    /// Bounds on each endpoint's HTTP/1.1 connections (default [`PoolConfig::default`]:
    /// 1,024 connections, 1,024 requests waiting, 90 s idle, 60 s for a stalled request
    /// body; see [`crate::connect`]).
    pub fn pool(mut self, config: PoolConfig) -> Self {
        self.pool = config;
        self
    }

    /// Balancer settings.
    pub fn balancer(mut self, config: BalancerConfig) -> Self {
        self.balancer = config;
        self
    }

    /// Retry settings.
    pub fn retry(mut self, config: RetryConfig) -> Self {
        self.retry = config;
        self
    }

    /// Timeouts.
    pub fn timeout(mut self, config: TimeoutConfig) -> Self {
        self.timeout = config;
        self
    }

    /// Circuit breaking.
    pub fn circuit_breaker(mut self, config: BreakerConfig) -> Self {
        self.breaker = config;
        self
    }

    /// Rate-limit awareness.
    pub fn rate_limited(mut self, config: RateLimitedConfig) -> Self {
        self.rate_limited = config;
        self
    }

    /// Response classification.
    pub fn classification(mut self, config: ClassificationConfig) -> Self {
        self.classification = config;
        self
    }

    /// This workload's zone and the zone preference.
    pub fn zone(mut self, local_zone: Option<String>, config: ZoneConfig) -> Self {
        self.local_zone = local_zone;
        self.zone = config;
        self
    }

    /// Seeds the balancer's endpoint picks, so that the same calls in the same order pick
    /// the same endpoints (tests and simulation; default: a random seed per process).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// How long a request waits for an endpoint to become ready before failing with
    /// `NoReadyEndpoints` (default 3 s; see [`balance`](crate::balance)).
    pub fn fail_fast(mut self, timeout: Duration) -> Self {
        self.fail_fast = Some(timeout);
        self
    }

    /// Opens each endpoint's byte streams with `dialer` instead of TCP: a simulated
    /// network, an in-memory pipe, a tunnel (see [`connect`](crate::connect)). mTLS,
    /// timeouts and back-off apply on top of it unchanged.
    pub fn dialer(mut self, dialer: Dialer) -> Self {
        self.dialer = Some(dialer);
        self
    }

    /// Registers the client metric families in `registry`, for this client. Once per
    /// registry: a process with several clients registers with the first and gives the
    /// others [`shared_metrics`](Self::shared_metrics) (a family registered twice is
    /// exposed twice, which Prometheus refuses to scrape).
    pub fn metrics(mut self, registry: &mut Registry) -> Self {
        self.metrics = Some(ClientMetrics::register(registry, &self.service));
        self
    }

    /// Records in `metrics`' families (registered once, by
    /// [`ClientMetrics::register`] or another client's [`metrics`](Self::metrics)), under
    /// this client's service name.
    pub fn shared_metrics(mut self, metrics: &ClientMetrics) -> Self {
        self.metrics = Some(metrics.clone());
        self
    }

    /// Starts the client: its discovery task runs from now on. The stack it composes is
    /// shown in the [module docs](super).
    pub fn build(mut self) -> Result<MeshClient, BuildError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(BuildError::NoRuntime);
        }
        // Under this client's name, whenever the metrics were given.
        if let Some(m) = &self.metrics
            && m.service() != self.service
        {
            self.metrics = Some(m.for_service(&self.service));
        }
        let invalid =
            |what: &'static str, e: &dyn fmt::Display| BuildError::Invalid(what, e.to_string());
        if !(0.0..=1.0).contains(&self.retry.budget.ratio) {
            return Err(invalid("retry.budget.ratio", &"must be between 0 and 1"));
        }
        let transport = match self.transport {
            Transport::Unset => return Err(BuildError::NoTransport),
            Transport::Plaintext => None,
            Transport::Mtls(mtls) => Some(mtls),
        };
        let classifier = Classifier::from(&self.classification);
        let retry = RetryPolicy::from_config(&self.retry, &self.classification)
            .map_err(|e| invalid("retry.backoff", &e))?;
        let budget = RetryBudget::new(
            self.retry.budget.ratio,
            self.retry.budget.min_per_second,
            self.retry.budget.ttl,
        );
        let mut retry = RetryLayer::new(retry, budget);
        if let Some(m) = &self.metrics {
            let (retries, exhausted) = m.retry_counters();
            retry = retry.counters(retries, exhausted);
        }
        let mut breaker = BreakerLayer::from_config(&self.breaker, &self.rate_limited)
            .map_err(|e| invalid("circuit_breaker.backoff", &e))?
            .classifier(classifier.clone());
        // The decision record, if any, under the service's name.
        let recorder = self.decisions.as_ref().map(|r| r.recorder(&self.service));
        if let Some(r) = &recorder {
            retry = retry.decisions(r.clone());
            breaker = breaker.decisions(r.clone());
        }
        let load = PeakEwmaLayer::new()
            .rtt(self.balancer.default_rtt, self.balancer.decay)
            .rate_limited(
                classifier.clone(),
                RateLimitPenalty::from(&self.rate_limited),
            );
        let per_try = TimeoutLayer::per_try(self.timeout.per_try);
        let connect = Connect {
            transport,
            server_identity: self.server_identity.clone(),
            protocol: self.protocol,
            connect_timeout: self.connect_timeout,
            dialer: self.dialer.clone(),
            tcp: self.tcp,
            pool: self.pool,
        };
        let metrics = self.metrics.clone();
        let factory = move |endpoint: &Endpoint| -> Option<EndpointStack> {
            let client = connect.client(endpoint)?;
            let label: Arc<str> = Arc::from(endpoint.key().to_string());
            let load_handle = EndpointLoad::new(self.balancer.default_rtt, self.balancer.decay);
            let series = metrics.as_ref().map(|m| {
                let series = m
                    .endpoint(label.clone(), classifier.clone())
                    .with_load(load_handle.clone());
                // HTTP/2-only services never pool HTTP/1.1 connections: no pool series.
                match connect.protocol {
                    Protocol::Auto | Protocol::Http1 => series.with_pool(client.pool_probe()),
                    _ => series,
                }
            });
            let transitions = series.clone();
            let breaker_handle = breaker.handle(endpoint.key(), move |t| {
                if let Some(m) = &transitions {
                    m.transition(t);
                }
            });
            Some(
                ServiceBuilder::new()
                    .layer_fn(|s| breaker.layer_with(s, breaker_handle.clone()))
                    .layer_fn(|s| Metrics::new(s, series.clone()))
                    .layer_fn(|s| load.layer_with(s, load_handle.clone()))
                    .layer(per_try)
                    .service(client),
            )
        };
        let mut balance = Balance::builder();
        if let Some(seed) = self.seed {
            balance = balance.seed(seed);
        }
        if let Some(timeout) = self.fail_fast {
            balance = balance.fail_fast(timeout);
        }
        let balance = balance
            .service_name(&self.service)
            .zone(
                self.local_zone.clone(),
                ZonePreference {
                    enabled: self.zone.prefer_local,
                    load_band: self.zone.load_band,
                },
            )
            .maybe_decisions(recorder)
            .build(self.discovery, factory)
            .with_unready_reasons(unready_reason);
        let stack = ServiceBuilder::new()
            .layer(TimeoutLayer::request(self.timeout.request))
            .layer(retry)
            .service(balance);
        Ok(MeshClient {
            stack,
            service: Arc::from(self.service.as_str()),
            metrics: self.metrics,
        })
    }
}

/// How the client reaches each endpoint.
struct Connect {
    transport: Option<Mtls>,
    server_identity: Option<IdentityPattern>,
    protocol: Protocol,
    connect_timeout: Duration,
    dialer: Option<Dialer>,
    tcp: crate::sock::TcpOptions,
    pool: PoolConfig,
}

impl Connect {
    /// The connection of `endpoint`, or `None` (logged) to leave it out.
    fn client(&self, endpoint: &Endpoint) -> Option<EndpointClient<ReplayBody>> {
        let tls = match &self.transport {
            None => {
                // Said, not silently dropped: nobody should take the service for verified.
                if let Some(id) = endpoint.identity() {
                    tracing::warn!(endpoint = %endpoint.key(), identity = %id, "discovery gives this endpoint an identity, which a plaintext service cannot verify: connecting in plaintext (use tls = \"mtls\" to verify it)");
                }
                None
            }
            Some(mtls) => {
                let expected = match (endpoint.identity(), &self.server_identity) {
                    (Some(id), _) => Authorizer::exact(id.clone()),
                    (None, Some(p)) => Authorizer::pattern(p.clone()),
                    // No expectation at all: refuse every server rather than trust any.
                    (None, None) => Authorizer::predicate(
                        "an identity given by discovery or `server_identity`",
                        |_| false,
                    ),
                };
                match MtlsConnector::new(mtls, expected) {
                    Ok(c) => Some(c),
                    Err(error) => {
                        // Fail closed: leave the endpoint out rather than connect in
                        // plaintext.
                        tracing::error!(%error, endpoint = %endpoint.key(), "cannot build a TLS configuration; endpoint skipped");
                        return None;
                    }
                }
            }
        };
        Some(EndpointClient::new(
            endpoint.addr(),
            ConnectSettings {
                protocol: self.protocol,
                tls,
                connect_timeout: self.connect_timeout,
                backoff: DEFAULT_CONNECT_BACKOFF,
                dialer: self.dialer.clone(),
                tcp: self.tcp,
                pool: self.pool,
            },
        ))
    }
}

/// Why an endpoint's stack is not ready: its breaker ejected it, or its connects are
/// backing off (with the last connect's error).
fn unready_reason(stack: &EndpointStack, now: tokio::time::Instant) -> Option<String> {
    let breaker = stack.handle().and_then(|h| match h.gate().state() {
        crate::breaker::GateState::Ejected => Some("ejected by its circuit breaker"),
        crate::breaker::GateState::Probation if !h.gate().may_admit() => {
            Some("on probation, its circuit breaker's probe request in flight")
        }
        _ => None,
    });
    let client = stack.get_ref().get_ref().get_ref().get_ref();
    let connects = client.conn_state().unready_reason(now);
    match (breaker, connects) {
        (Some(b), Some(c)) => Some(format!("{b}; {c}")),
        (Some(b), None) => Some(b.to_owned()),
        (None, c) => c,
    }
}
