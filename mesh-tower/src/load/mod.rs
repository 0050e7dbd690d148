//! Per-endpoint load: peak-EWMA latency times outstanding requests, with a rate-limit
//! penalty, as a layer over one endpoint's service.
//!
//! [`PeakEwmaLayer`] wraps one endpoint's service in [`PeakEwma`], which measures every
//! request it passes and keeps the result in a shared [`EndpointLoad`] handle. The service
//! reports it through the [`Load`] trait, which is what [`crate::balance`] compares.
//!
//! # Peak-EWMA (Finagle, Linkerd, tower)
//!
//! Each endpoint keeps an exponentially weighted moving average of its round-trip times
//! (to the response head) that reacts to spikes at once and forgets them slowly:
//!
//! - a sample is averaged in with weight `1 − e^(−Δt/τ)`, where `Δt` is the time since
//!   the last update and `τ` the decay (default 10 s), and a sample *above* that average
//!   replaces it (the "peak");
//! - between samples the estimate decays toward zero with the same `τ`, so an endpoint
//!   that was slow once and then went idle is eventually tried again;
//! - a request that gets no answer (an error, a per-try timeout below this layer, or
//!   cancellation) gives a lower bound only: it raises the estimate when it took longer
//!   than the estimate, and is ignored otherwise.
//!
//! A new endpoint starts at the default RTT (30 ms), neither favoured nor shunned.
//!
//! The endpoint's **cost** is `estimate × (in_flight + 1)`: queueing behind outstanding
//! requests is what a new request would pay. In-flight requests are counted by a guard
//! that the response future owns, so a cancelled request never leaks a count.
//!
//! # Rate-limit penalty
//!
//! An endpoint that answered 429 / `RESOURCE_EXHAUSTED` (as its [`Classifier`] says) is
//! *penalized* until the end of the server's `Retry-After` / `grpc-retry-pushback-ms`
//! period, capped (default 30 s), or for a default penalty (1 s) when the answer carries
//! none. [`Cost`] orders penalized endpoints after every unpenalized one, whatever their
//! costs, so power-of-two-choices picks a penalized endpoint only when both candidates are
//! penalized — and among those, the cheaper. The answer itself is passed on unchanged. A
//! gRPC answer whose status comes in its trailers is judged when they arrive
//! ([`ResponseBody`]): a streaming call that runs into a server's limit penalizes its
//! endpoint too.
//!
//! [`Classifier`]: mesh_core::classify::Classifier
//!
//! ```
//! use std::convert::Infallible;
//! use http::{Request, Response};
//! use mesh_tower::load::{Load, PeakEwmaLayer};
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let mut endpoint = ServiceBuilder::new()
//!     .layer(PeakEwmaLayer::new())
//!     .service_fn(|_req: Request<()>| async {
//!         Ok::<_, http::Error>(Response::builder().status(429).header("retry-after", "2").body(())?)
//!     });
//! let response = endpoint.ready().await?.call(Request::new(())).await?;
//! assert_eq!(response.status(), 429);
//! let cost = endpoint.load(tokio::time::Instant::now());
//! assert!(cost.penalized, "rate-limited for the next 2 s");
//! # Ok(()) }
//! ```

mod body;
mod estimate;
mod future;
mod handle;
mod layer;
mod service;

use std::cmp::Ordering;
use std::time::Duration;

use tokio::time::Instant;

pub use self::body::ResponseBody;
pub use self::estimate::RttEstimate;
pub use self::future::ResponseFuture;
pub use self::handle::{EndpointLoad, InFlight};
pub use self::layer::{PeakEwmaLayer, RateLimitPenalty};
pub use self::service::PeakEwma;

/// The default RTT of an endpoint with no samples (Linkerd's): 30 ms.
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// The default decay of the RTT estimate (Linkerd's): 10 s.
pub const DEFAULT_DECAY: Duration = Duration::from_secs(10);

/// A service that can say, without side effects, how loaded and how ready it is: what
/// [`crate::balance`] compares. [`PeakEwma`] measures it; layers above it (such as
/// [`crate::breaker::Breaker`], which marks an ejected endpoint unready) pass it on,
/// adjusted.
pub trait Load {
    /// The service's cost at `now`.
    fn load(&self, now: Instant) -> Cost;
}

/// An endpoint's load as the balancer compares it: unready endpoints sort after all
/// others, then penalized ones; then lower cost wins.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Cost {
    /// Whether the endpoint would refuse a request now (an ejected endpoint). The
    /// balancer never picks one; its `poll_ready` is what finally decides.
    pub unready: bool,
    /// Whether the endpoint is within a rate-limit penalty.
    pub penalized: bool,
    /// `estimate_ns × (in_flight + 1)`, divided by the endpoint's weight by the balancer.
    pub cost: f64,
}

impl Eq for Cost {}

impl PartialOrd for Cost {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Cost {
    fn cmp(&self, other: &Self) -> Ordering {
        self.unready
            .cmp(&other.unready)
            .then(self.penalized.cmp(&other.penalized))
            .then(self.cost.total_cmp(&other.cost))
    }
}
