//! Load balancing: power of two choices over any endpoint services that report their
//! [`Load`], fed by a discovery stream, with readiness, tiers and zone preference.
//!
//! [`Balance`] follows a `mesh_core` discovery stream and makes each endpoint's service
//! with a factory ([`MakeEndpoint`]: any `FnMut(&Endpoint) -> Option<S>`), so the same
//! balancer runs over this crate's hyper connections, over tonic `Channel`s, or over test
//! services. An endpoint's service reports its [`Load`] (usually through
//! [`crate::load::PeakEwma`], under [`crate::breaker::Breaker`]) and its readiness
//! (`poll_ready`).
//!
//! - [`p2c`] picks the lighter of two random *eligible* endpoints.
//! - [`pool`] keeps the endpoints current as a lock-free snapshot; removed endpoints
//!   drain.
//!
//! # The pick
//!
//! `poll_ready` picks. Endpoints are picked in **tiers**: power of two choices runs among
//! endpoints whose [`Cost`] says they are ready and not within a rate-limit penalty; if
//! there are none, among penalized ones too (rate limiting then only biases, by cost).
//! Endpoints that say they are unready (ejected) are never picked. Costs are divided by
//! the endpoint's weight. The winner is then asked for readiness itself (`poll_ready` on
//! its clone of the service — where a breaker in probation hands out its single probe,
//! and a connection in back-off says no); an endpoint that is not ready is passed over
//! and the pick is made again.
//!
//! **When no endpoint is ready** (all ejected or backing off, or discovery has none yet),
//! `poll_ready` polls every endpoint so that each wakes it when it becomes ready, and
//! waits — woken by readiness or by discovery, never spinning — for at most the
//! fail-fast timeout (default 3 s, as Linkerd), then fails with [`NoReadyEndpoints`] (or
//! [`NoEndpoints`]; at once when discovery has ended with none).
//!
//! **Zone preference** (when this workload's zone is known and some endpoints share it):
//! the pick runs among local-zone endpoints; it spills to another zone when the local
//! winner's cost exceeds `load_band` (default 1.5) times the cost of the best of two
//! random remote endpoints, when the remote one is in a better tier, or when no local
//! endpoint is eligible. Traffic therefore stays local while the local zone keeps up,
//! and overflows in proportion to its overload.
//!
//! **Rate limited elsewhere**: a request carrying [`Elsewhere`] (a retry of a
//! rate-limited answer) is sent only to an endpoint outside a rate-limit penalty; when
//! the pick could find none, the call fails with [`NoElsewhere`].
//!
//! The random source is per `Balance` clone; [`BalanceBuilder::seed`] makes every pick
//! reproducible.
//!
//! [`NoReadyEndpoints`]: error::NoReadyEndpoints
//! [`NoEndpoints`]: error::NoEndpoints
//! [`Elsewhere`]: crate::retry::Elsewhere
//! [`NoElsewhere`]: crate::retry::error::NoElsewhere
//!
//! ```
//! use std::convert::Infallible;
//! use http::{Request, Response};
//! use mesh_core::{Endpoint, discover::StaticDiscovery};
//! use mesh_tower::balance::Balance;
//! use mesh_tower::load::PeakEwmaLayer;
//! use tower::{Layer, Service, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let discovery = StaticDiscovery::new([
//!     Endpoint::new("10.0.0.7:8080".parse()?),
//!     Endpoint::new("10.0.0.8:8080".parse()?),
//! ]);
//! let load = PeakEwmaLayer::new();
//! let mut balancer = Balance::builder().service_name("users").build(
//!     Box::pin(discovery),
//!     move |endpoint: &Endpoint| {
//!         let addr = endpoint.addr();
//!         // Any service: here one that answers with its own address.
//!         Some(load.layer(tower::service_fn(move |_req: Request<()>| async move {
//!             Ok::<_, Infallible>(Response::new(addr.to_string()))
//!         })))
//!     },
//! );
//! let response = balancer.ready().await?.call(Request::new(())).await?;
//! // The load layer's body wraps the service's.
//! assert!(response.into_body().into_inner().starts_with("10.0.0."));
//! # Ok(()) }
//! ```

pub mod error;
mod future;
pub mod p2c;
pub mod pool;
mod service;

use tokio::time::Instant;

pub use self::future::ResponseFuture;
pub use self::pool::{MakeEndpoint, Pool, Slot};
pub use self::service::{Balance, BalanceBuilder, DEFAULT_FAIL_FAST};

use crate::load::{Cost, Load};

/// Zone preference settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ZonePreference {
    /// Whether local-zone endpoints are preferred.
    pub enabled: bool,
    /// Stay local while the local cost is at most this multiple of the remote cost.
    pub load_band: f64,
}

impl Default for ZonePreference {
    fn default() -> Self {
        Self {
            enabled: true,
            load_band: 1.5,
        }
    }
}

/// How eligible an endpoint is, from most to least.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Tier {
    /// Ready and not rate-limited.
    Preferred,
    /// Within a rate-limit penalty.
    Penalized,
    /// Ejected, or on probation with its probe already out.
    Shut,
}

/// The cost of a slot at `now`, divided by its weight.
fn weighted<S: Load>(slot: &Slot<S>, now: Instant) -> Cost {
    let mut cost = slot.service.load(now);
    cost.cost /= f64::from(slot.endpoint.weight().get());
    cost
}

fn tier(cost: &Cost) -> Tier {
    if cost.unready {
        Tier::Shut
    } else if cost.penalized {
        Tier::Penalized
    } else {
        Tier::Preferred
    }
}

/// An endpoint a pick compared: its index and its weighted cost.
type Scored = (usize, Cost);

/// A pick and what decided it, for the [decision record](crate::decision).
#[derive(Clone, Copy, Debug)]
struct Picked {
    winner: Scored,
    /// The pair's other candidate.
    other: Option<Scored>,
    zone: Option<Zoned>,
}

/// Where zone preference sent a pick.
#[derive(Clone, Copy, Debug)]
enum Zoned {
    Local { remote: Option<Scored> },
    Spilled { local: Scored },
    NoLocal,
}

/// Power of two choices among `indices` not in `skip`, by tier: the winner and the
/// pair's other candidate.
fn pick_among<S: Load>(
    pool: &Pool<S>,
    indices: &[usize],
    skip: &[usize],
    now: Instant,
    rng: &mut fastrand::Rng,
) -> Option<(Scored, Option<Scored>)> {
    for max in [Tier::Preferred, Tier::Penalized] {
        let picked = p2c::pick_pair_by(indices.len(), rng, |i| {
            let index = indices[i];
            if skip.contains(&index) {
                return None;
            }
            let cost = weighted(&pool.endpoints[index], now);
            (tier(&cost) <= max).then_some(cost)
        });
        if let Some(((i, cost), other)) = picked {
            return Some(((indices[i], cost), other.map(|(j, c)| (indices[j], c))));
        }
    }
    None
}

/// Picks an endpoint of `pool` for one request (see the [module docs](self)), passing
/// over those in `skip`; returns its index.
pub fn pick<S: Load>(
    pool: &Pool<S>,
    zone: ZonePreference,
    skip: &[usize],
    rng: &mut fastrand::Rng,
) -> Option<usize> {
    pick_detailed(pool, zone, skip, rng).map(|p| p.winner.0)
}

/// [`pick`], with what decided it.
fn pick_detailed<S: Load>(
    pool: &Pool<S>,
    zone: ZonePreference,
    skip: &[usize],
    rng: &mut fastrand::Rng,
) -> Option<Picked> {
    let now = Instant::now();
    let picked = |(winner, other): (Scored, Option<Scored>), zone| Picked {
        winner,
        other,
        zone,
    };
    if !(zone.enabled && !pool.local.is_empty() && !pool.remote.is_empty()) {
        return pick_among(pool, &pool.all, skip, now, rng).map(|p| picked(p, None));
    }
    match pick_among(pool, &pool.local, skip, now, rng) {
        None => {
            pick_among(pool, &pool.remote, skip, now, rng).map(|p| picked(p, Some(Zoned::NoLocal)))
        }
        Some(local) => match pick_among(pool, &pool.remote, skip, now, rng) {
            Some(remote) if spill(local.0.1, remote.0.1, zone.load_band) => {
                Some(picked(remote, Some(Zoned::Spilled { local: local.0 })))
            }
            remote => Some(picked(
                local,
                Some(Zoned::Local {
                    remote: remote.map(|r| r.0),
                }),
            )),
        },
    }
}

/// The record's view of a compared endpoint.
fn candidate<S>(pool: &Pool<S>, (index, cost): Scored) -> crate::decision::Candidate {
    use crate::decision::Tier as T;
    crate::decision::Candidate {
        addr: pool.endpoints[index].endpoint.addr(),
        cost: cost.cost,
        tier: match tier(&cost) {
            Tier::Preferred => T::Preferred,
            Tier::Penalized => T::Penalized,
            Tier::Shut => T::Unready,
        },
    }
}

/// The record's view of a pick.
fn recorded<S>(
    pool: &Pool<S>,
    picked: &Picked,
    path: crate::decision::PickPath,
    passed_over: u32,
) -> crate::decision::Event {
    use crate::decision::ZoneChoice;
    crate::decision::Event::Pick(crate::decision::Pick {
        path,
        winner: candidate(pool, picked.winner),
        other: picked.other.map(|o| candidate(pool, o)),
        zone: picked.zone.map(|z| match z {
            Zoned::Local { remote } => ZoneChoice::Local {
                remote: remote.map(|r| candidate(pool, r)),
            },
            Zoned::Spilled { local } => ZoneChoice::Spilled {
                local: candidate(pool, local),
            },
            Zoned::NoLocal => ZoneChoice::NoLocal,
        }),
        passed_over,
    })
}

/// Whether a request should leave the local zone: the remote candidate is in a better
/// tier, or in the same tier and the local cost exceeds `band` times the remote cost.
fn spill(local: Cost, remote: Cost, band: f64) -> bool {
    let (lt, rt) = (tier(&local), tier(&remote));
    if lt != rt {
        return rt < lt;
    }
    local.cost > remote.cost * band
}

#[cfg(test)]
mod tests;
