//! Local rate limiting of inbound requests, per client identity and in total.
//!
//! [`Limits`] compiles a [`mesh_core::config::RateLimitConfig`] into GCRA limiters (the
//! generic cell rate algorithm), on Tokio's clock so that paused time drives them in
//! tests: the per-client limits are `governor`'s keyed limiters; the total is one atomic
//! GCRA state of our own, because `governor` cannot say whether it would admit a request
//! without spending a cell, and a request refused by its client's limit must spend nothing
//! of the total. A rate of `requests` per `per` with a `burst` (default:
//! `requests`) admits one request every `per / requests` in the long run, and up to
//! `burst` at once after a quiet spell.
//!
//! Each request is checked, in order, against:
//! 1. its client's limit — the first `overrides` entry whose patterns match the peer's
//!    [`PeerIdentity`](mesh_spiffe::PeerIdentity), else `per_client`; every
//!    unauthenticated caller shares one state (and only `per_client` applies to them);
//! 2. the `total` limit, over all clients. A request its client's limit refuses spends
//!    nothing of the total, so one noisy client cannot starve the others.
//!
//! A refused request is answered here, without reaching the service: HTTP 429 with
//! `Retry-After` (whole seconds, rounded up, from the limiter's own earliest admission
//! time) and the IETF `RateLimit-Policy` / `RateLimit` fields
//! (draft-ietf-httpapi-ratelimit-headers: `"client";q=100;w=1` and `"client";r=0;t=3`);
//! a gRPC request a trailers-only `RESOURCE_EXHAUSTED` with `grpc-retry-pushback-ms`. The
//! mesh client reads either as a penalty and steers away from this server.
//!
//! **Memory is bounded.** Client states that have fully recovered are forgotten every few
//! thousand requests; at most [`DEFAULT_MAX_CLIENTS`] are kept (`with_max_clients`; the
//! table is counted every 64 requests, so it may overshoot by that many), and
//! while the table is full every client shares one overflow state.
//!
//! ```
//! use mesh_core::config::{Rate, RateLimitConfig};
//! use mesh_tower::ratelimit::RateLimitLayer;
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let config = RateLimitConfig {
//!     per_client: Some(Rate { requests: 1, per: std::time::Duration::from_secs(10), burst: None }),
//!     ..RateLimitConfig::default()
//! };
//! let svc = ServiceBuilder::new()
//!     .layer(RateLimitLayer::from_config(&config))
//!     .service(service_fn(|_req: http::Request<()>| async {
//!         Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Empty::<bytes::Bytes>::new()))
//!     }));
//! let first = svc.clone().oneshot(http::Request::new(())).await?;
//! assert_eq!(first.status(), http::StatusCode::OK);
//! let second = svc.oneshot(http::Request::new(())).await?;
//! assert_eq!(second.status(), http::StatusCode::TOO_MANY_REQUESTS);
//! assert_eq!(second.headers()["retry-after"], "10");
//! # Ok(()) }
//! ```

mod layer;
mod limits;
mod service;

pub use self::layer::{LimitsHandle, RateLimitLayer};
pub use self::limits::{DEFAULT_MAX_CLIENTS, Limits, Refused};
pub use self::service::RateLimit;
