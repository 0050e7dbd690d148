//! The mesh as tower middleware.
//!
//! Each middleware is a tower `Layer` + `Service` in a module of its own, generic over the
//! inner service and the body types, and usable alone in an application's own
//! `ServiceBuilder` — over a hyper client, a tonic `Channel` or any
//! `Service<http::Request<B>>`:
//!
//! - [`timeout`]: request and per-try timeouts with typed errors; the request's deadline
//!   for the layers below;
//! - [`retry`]: retries with a budget, body replay, back-off and `Retry-After`, and the
//!   retry of a 429 on another endpoint;
//! - [`balance`] (feature `balance`): power of two choices over endpoint services that
//!   report their [`Load`](load::Load), fed by discovery, with readiness, tiers and zone
//!   preference;
//! - [`breaker`] (feature `breaker`): per-endpoint circuit breaking off the request path,
//!   its gate expressed as readiness;
//! - [`load`]: per-endpoint peak-EWMA load and the rate-limit penalty;
//! - [`metrics`]: Prometheus metrics in the host's registry, per endpoint, removed with it;
//! - [`connect`]: per-endpoint HTTP/1.1 and HTTP/2 connections on hyper 1, plaintext or
//!   SPIFFE mTLS, with a connect timeout and readiness that follows connection health;
//! - [`backoff`]: exponential back-off with jitter, shared by retries and ejections;
//! - [`route`] (feature `route`): the [`Router`](route::Router) over named backends —
//!   HTTPRoute / GRPCRoute route tables with Gateway API precedence, weighted splits,
//!   per-route retry, timeout and fault settings, route sets swapped at run time;
//!   [`fault`] (feature `fault`): delay and abort injection; [`matcher`]: the compiled
//!   request matches routes and authorization share;
//! - [`authz`] (feature `authz`), [`ratelimit`] (feature `ratelimit`) and
//!   [`metrics::server`]: the inbound layers — authorization by identity and route, GCRA
//!   rate limits, inbound metrics;
//! - [`access_log`]: one structured `tracing` event per request, when its response ends;
//! - [`forward`]: proxying — connection-specific headers stripped, HTTP/1.1 carried over
//!   HTTP/2 between proxies, the hop to a local application with the peer's identity, and
//!   answers for failed requests; [`upgrade`]: HTTP upgrades (WebSocket) and CONNECT
//!   spliced through a proxy, and across the mesh as HTTP/2 extended CONNECT;
//!   [`max_forwards`]: `Max-Forwards` on `TRACE` and `OPTIONS` at each proxy hop;
//! - [`opaque`] (feature `opaque`): opaque TCP — an inbound relay to a target with
//!   authorization per connection by the peer's identity, and an outbound relay to a
//!   service's endpoints (P2C over open connections, failover), over SPIFFE mTLS;
//!   [`detect`]: HTTP/2, HTTP/1.x or opaque, from a client's first bytes;
//! - [`decision`]: the decision record, an optional bounded buffer of recent picks,
//!   breaker changes, retry and authorization decisions ("why did this request go
//!   there"), off unless a layer is given one;
//! - `mock` (feature `test-util`): scripted HTTP endpoints on loopback, the mock mesh.
//!
//! [`MeshClient`] composes the client layers into the whole client stack for one service;
//! its [module docs](client) show the stack top to bottom. [`server::MeshServer`] (feature
//! `server`) serves an application over SPIFFE mTLS with the inbound layers. The crate
//! builds on `mesh-core` and `mesh-spiffe` and never depends on tonic.

#[cfg(any(feature = "server", feature = "opaque"))]
mod accept;
pub mod access_log;
#[cfg(feature = "authz")]
pub mod authz;
pub mod backoff;
#[cfg(feature = "balance")]
pub mod balance;
pub mod body;
#[cfg(feature = "breaker")]
pub mod breaker;
#[cfg(all(feature = "balance", feature = "breaker"))]
pub mod client;
pub mod connect;
pub mod decision;
pub mod detect;
#[cfg(feature = "fault")]
pub mod fault;
pub mod forward;
mod h2_streams;
pub mod load;
pub mod matcher;
pub mod max_forwards;
pub mod metrics;
#[cfg(feature = "test-util")]
pub mod mock;
#[cfg(feature = "opaque")]
pub mod opaque;
#[cfg(feature = "ratelimit")]
pub mod ratelimit;
pub mod relay;
pub mod retry;
#[cfg(feature = "route")]
pub mod route;
#[cfg(feature = "server")]
pub mod server;
pub use mesh_core::sock;
mod throttle;
pub mod timeout;
#[cfg(feature = "transparent")]
pub mod transparent;
pub mod upgrade;

/// A duration in whole nanoseconds, saturating (after ~584 years): a `u64`, where
/// `Duration::as_nanos` gives a `u128` whose division and float conversion cost a
/// library call on the request path.
pub(crate) fn nanos(d: std::time::Duration) -> u64 {
    d.as_secs()
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::from(d.subsec_nanos()))
}

#[cfg(all(feature = "balance", feature = "breaker"))]
pub use crate::client::{MeshClient, MeshClientBuilder};
#[doc(hidden)]
pub use crate::h2_streams::sniffed_max_streams;
