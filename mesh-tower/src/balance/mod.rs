//! Load balancing: power of two choices over peak-EWMA load, with zone preference.
//!
//! - [`load`] measures each endpoint: peak-EWMA RTT × (in-flight + 1), divided by the
//!   endpoint's weight, with rate-limited endpoints ordered last for their penalty period.
//! - [`p2c`] picks the lighter of two random *ready* endpoints.
//! - [`pool`] keeps the endpoints current from discovery as a lock-free snapshot.
//!
//! An endpoint is **ready** when its connection is not in connect back-off and its circuit
//! breaker admits a request (closed, or the single probe in probation). When no endpoint
//! is ready, the pick falls back to power of two choices among all endpoints whose breaker
//! is not shut, so a request is still attempted (and fails fast) rather than parked.
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

fn is_ready<B>(slot: &Slot<B>, now: Instant) -> bool {
    slot.client.conn_state().is_ready(now)
        && slot.breaker.as_ref().is_none_or(|b| b.gate().try_admit())
}

fn pick_among<B>(
    pool: &Pool<B>,
    indices: &[usize],
    now: Instant,
    rng: &mut fastrand::Rng,
) -> Option<usize> {
    p2c::pick(
        indices.len(),
        rng,
        |i| is_ready(&pool.endpoints[indices[i]], now),
        |i| weighted_load(&pool.endpoints[indices[i]], now),
    )
    .map(|i| indices[i])
}

/// Picks an endpoint of `pool` for one request (see the [module docs](self)).
pub fn pick<B>(
    pool: &Pool<B>,
    zone: ZonePreference,
    rng: &mut fastrand::Rng,
) -> Option<Arc<Slot<B>>> {
    let now = Instant::now();
    let n = pool.endpoints.len();
    let chosen = if zone.enabled && !pool.local.is_empty() && !pool.remote.is_empty() {
        match pick_among(pool, &pool.local, now, rng) {
            None => pick_among(pool, &pool.remote, now, rng),
            Some(local) => {
                // Compare with a remote sample without taking its breaker permit.
                let remote = p2c::pick(
                    pool.remote.len(),
                    rng,
                    |i| {
                        let s = &pool.endpoints[pool.remote[i]];
                        s.client.conn_state().is_ready(now)
                            && s.breaker.as_ref().is_none_or(|b| b.gate().is_open())
                    },
                    |i| weighted_load(&pool.endpoints[pool.remote[i]], now),
                )
                .map(|i| pool.remote[i]);
                match remote {
                    Some(r)
                        if spill(
                            weighted_load(&pool.endpoints[local], now),
                            weighted_load(&pool.endpoints[r], now),
                            zone.load_band,
                        ) =>
                    {
                        Some(r)
                    }
                    _ => Some(local),
                }
            }
        }
    } else {
        p2c::pick(
            n,
            rng,
            |i| is_ready(&pool.endpoints[i], now),
            |i| weighted_load(&pool.endpoints[i], now),
        )
    };
    let chosen = chosen.or_else(|| {
        // Nothing ready: try anyway among endpoints not ejected.
        p2c::pick(
            n,
            rng,
            |i| {
                pool.endpoints[i]
                    .breaker
                    .as_ref()
                    .is_none_or(|b| b.gate().is_open())
            },
            |i| weighted_load(&pool.endpoints[i], now),
        )
    });
    chosen.map(|i| pool.endpoints[i].clone())
}

/// Whether a request should leave the local zone.
fn spill(local: Load, remote: Load, band: f64) -> bool {
    if local.penalized != remote.penalized {
        return local.penalized;
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
        assert!(!spill(l(10.0), l(10.0), 1.5));
        assert!(!spill(l(15.0), l(10.0), 1.5));
        assert!(spill(l(15.1), l(10.0), 1.5));
        assert!(spill(
            Load {
                penalized: true,
                cost: 1.0
            },
            l(100.0),
            1.5
        ));
        assert!(!spill(
            l(100.0),
            Load {
                penalized: true,
                cost: 1.0
            },
            1.5
        ));
    }
}
