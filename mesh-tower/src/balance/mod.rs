//! Load balancing: power of two choices over peak-EWMA load, with zone preference.
//!
//! - [`load`] measures each endpoint: peak-EWMA RTT × (in-flight + 1), divided by the
//!   endpoint's weight, with rate-limited endpoints ordered last for their penalty period.
//! - [`p2c`] picks the lighter of two random *ready* endpoints.
//! - [`pool`] keeps the endpoints current from discovery as a lock-free snapshot.
//!
//! Endpoints are picked in **tiers**: power of two choices runs among endpoints whose
//! connection is not in connect back-off, whose circuit breaker admits a request (closed,
//! or its single probe in probation) and that are not within a rate-limit penalty; if
//! there are none, among penalized ones too (rate limiting then only biases, by cost);
//! then among those backing off from failed connects, so a request is still attempted
//! (and fails fast) rather than parked. Ejected endpoints are never picked; the ejection
//! budget guarantees some are not ejected.
//!
//! **Zone preference** (when this workload's zone is known and some endpoints share it):
//! the pick runs among local-zone endpoints; it spills to another zone when the local
//! winner's cost exceeds `load_band` (default 1.5) times the cost of the best of two
//! random remote endpoints, or when no local endpoint is ready. Traffic therefore stays
//! local while the local zone keeps up, and overflows in proportion to its overload.

pub mod load;
pub mod p2c;
pub mod pool;

use std::sync::Arc;

use tokio::time::Instant;

use self::load::Load;
use self::pool::{Pool, Slot};

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

/// The load of a slot at `now`, divided by its weight.
fn weighted_load<B>(slot: &Slot<B>, now: Instant) -> Load {
    let mut load = slot.load.load(now);
    load.cost /= f64::from(slot.endpoint.weight().get());
    load
}

/// How eligible an endpoint is, from most to least.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Tier {
    /// Connected (or not backing off), breaker admitting, not rate-limited.
    Preferred,
    /// As above but within a rate-limit penalty.
    Penalized,
    /// Connect back-off: tried only when nothing better is ready.
    Backoff,
    /// Ejected, or on probation with its probe already out.
    Shut,
}

fn tier<B>(slot: &Slot<B>, now: Instant) -> Tier {
    if slot.breaker.as_ref().is_some_and(|b| !b.gate().may_admit()) {
        return Tier::Shut;
    }
    if !slot.client.conn_state().is_ready(now) {
        return Tier::Backoff;
    }
    if slot.load.penalized_until(now).is_some() {
        return Tier::Penalized;
    }
    Tier::Preferred
}

/// Power of two choices among `indices` whose tier is at least `min`.
fn pick_among<B>(
    pool: &Pool<B>,
    indices: &[usize],
    now: Instant,
    rng: &mut fastrand::Rng,
) -> Option<usize> {
    let slot = |i: usize| &pool.endpoints[indices[i]];
    for max in [Tier::Preferred, Tier::Penalized, Tier::Backoff] {
        let picked = p2c::pick(
            indices.len(),
            rng,
            |i| tier(slot(i), now) <= max,
            |i| weighted_load(slot(i), now),
        );
        if let Some(i) = picked {
            return Some(indices[i]);
        }
    }
    None
}

/// Picks an endpoint of `pool` for one request (see the [module docs](self)).
pub fn pick<B>(
    pool: &Pool<B>,
    zone: ZonePreference,
    rng: &mut fastrand::Rng,
) -> Option<Arc<Slot<B>>> {
    let now = Instant::now();
    // A probe permit can be taken by a concurrent request between the check and the
    // admission: pick again a few times.
    for _ in 0..3 {
        let chosen = if zone.enabled && !pool.local.is_empty() && !pool.remote.is_empty() {
            match pick_among(pool, &pool.local, now, rng) {
                None => pick_among(pool, &pool.remote, now, rng),
                Some(local) => match pick_among(pool, &pool.remote, now, rng) {
                    Some(remote)
                        if spill(
                            tier(&pool.endpoints[local], now),
                            weighted_load(&pool.endpoints[local], now),
                            tier(&pool.endpoints[remote], now),
                            weighted_load(&pool.endpoints[remote], now),
                            zone.load_band,
                        ) =>
                    {
                        Some(remote)
                    }
                    _ => Some(local),
                },
            }
        } else {
            pick_among(pool, &pool.all, now, rng)
        }?;
        let slot = &pool.endpoints[chosen];
        if slot.breaker.as_ref().is_none_or(|b| b.gate().try_admit()) {
            return Some(slot.clone());
        }
    }
    None
}

/// Whether a request should leave the local zone: the remote candidate is in a better
/// tier, or in the same tier and the local cost exceeds `band` times the remote cost.
fn spill(local_tier: Tier, local: Load, remote_tier: Tier, remote: Load, band: f64) -> bool {
    if local_tier != remote_tier {
        return remote_tier < local_tier;
    }
    local.cost > remote.cost * band
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spill_rules() {
        let l = |cost| Load {
            penalized: false,
            cost,
        };
        let p = Tier::Preferred;
        assert!(!spill(p, l(10.0), p, l(10.0), 1.5));
        assert!(!spill(p, l(15.0), p, l(10.0), 1.5));
        assert!(spill(p, l(15.1), p, l(10.0), 1.5));
        assert!(spill(Tier::Penalized, l(1.0), p, l(100.0), 1.5));
        assert!(!spill(p, l(100.0), Tier::Penalized, l(1.0), 1.5));
    }
}
