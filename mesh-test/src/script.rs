//! What a mock endpoint does with each request: its [`Script`].
//!
//! Per request, after the latency, one draw in `[0, 1)` from the endpoint's generator
//! picks, in this order: reset (`reset_rate`), rate limited (`rate_limited`), error
//! (`error_rate`); the rest succeed. `hang` overrides everything.
//!
//! Shares are read forgivingly, never refused: one below 0 (or NaN) counts as 0, one
//! above 1 as 1; when they add up to more than 1, those earlier in that order keep
//! theirs and the later ones get what remains (`reset_rate` 0.6 with `error_rate` 0.6
//! errs on 0.4 of the requests). [`Script::check`] tells whether a script is read as
//! written. The generator is seeded
//! from the mesh's seed, the service's name and the endpoint's index, so with a seed the
//! sequence of draws an endpoint makes is the same on every run (which request gets which
//! draw depends on arrival order).
//!
//! The same script serves HTTP and gRPC callers:
//!
//! | script says | HTTP | gRPC (`content-type: application/grpc`) |
//! |---|---|---|
//! | success | 200, the request body echoed | the `Echo` service's answer (`mesh_tonic::test_util`) |
//! | error | `error_status` (default 503) | trailers-only `grpc_error_code` (default 14, `UNAVAILABLE`) |
//! | rate limited | 429 with `Retry-After` (whole seconds, rounded up) | trailers-only `RESOURCE_EXHAUSTED` with `grpc-retry-pushback-ms` |
//! | reset | connection (HTTP/1.1) or stream (HTTP/2) reset | stream reset |
//! | hang | no answer | no answer |
//!
//! Partitions are not part of a script: they cut the endpoint's network link, not its
//! answers; see [`MockEndpoint::partition`](crate::MockEndpoint::partition).

use std::time::Duration;

use http::StatusCode;

/// How long an endpoint takes before answering.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum Latency {
    /// Exactly this long.
    Fixed(Duration),
    /// Uniformly between the two bounds, in either order.
    Uniform(Duration, Duration),
    /// `base` for most requests, `tail` for a share `tail_share` of them: a long tail
    /// (the share read like the script's: NaN as 0, clamped to 0 to 1).
    Tail {
        /// The usual latency.
        base: Duration,
        /// The slow requests' latency.
        tail: Duration,
        /// The share of slow requests, 0 to 1.
        tail_share: f64,
    },
}

impl Latency {
    /// A delay for one request, drawn from `rng`.
    pub(crate) fn draw(&self, rng: &mut fastrand::Rng) -> Duration {
        match *self {
            Latency::Fixed(d) => d,
            Latency::Uniform(a, b) => {
                let (lo, hi) = (a.min(b), a.max(b));
                lo + (hi - lo).mul_f64(rng.f64())
            }
            Latency::Tail {
                base,
                tail,
                tail_share,
            } => {
                if rng.f64() < share(tail_share) {
                    tail
                } else {
                    base
                }
            }
        }
    }
}

/// How a mock endpoint answers; see the [module docs](self). Shares are probabilities
/// from 0 to 1.
#[derive(Clone, Debug, PartialEq)]
pub struct Script {
    /// Time before answering (default: none).
    pub latency: Latency,
    /// Share of requests answered with an error (default 0).
    pub error_rate: f64,
    /// The HTTP error status (default 503).
    pub error_status: StatusCode,
    /// The gRPC error code (default 14, `UNAVAILABLE`).
    pub grpc_error_code: i32,
    /// Share of requests answered 429 / `RESOURCE_EXHAUSTED` (default 0).
    pub rate_limited: f64,
    /// The back-off sent with them: `Retry-After` in whole seconds (rounded up) for HTTP,
    /// `grpc-retry-pushback-ms` for gRPC (default: none).
    pub retry_after: Option<Duration>,
    /// Share of requests reset without an answer (default 0).
    pub reset_rate: f64,
    /// Never answer (default false).
    pub hang: bool,
}

impl Default for Script {
    fn default() -> Self {
        Self {
            latency: Latency::Fixed(Duration::ZERO),
            error_rate: 0.0,
            error_status: StatusCode::SERVICE_UNAVAILABLE,
            grpc_error_code: 14,
            rate_limited: 0.0,
            retry_after: None,
            reset_rate: 0.0,
            hang: false,
        }
    }
}

impl Script {
    /// Healthy, answering after `latency`.
    pub fn latency(latency: Duration) -> Self {
        Self {
            latency: Latency::Fixed(latency),
            ..Self::default()
        }
    }

    /// Failing every request with `status` (gRPC: `UNAVAILABLE`).
    pub fn failing(status: StatusCode) -> Self {
        Self {
            error_rate: 1.0,
            error_status: status,
            ..Self::default()
        }
    }

    /// Answering every request 429 / `RESOURCE_EXHAUSTED`, asking for `retry_after`.
    pub fn rate_limited(retry_after: Option<Duration>) -> Self {
        Self {
            rate_limited: 1.0,
            retry_after,
            ..Self::default()
        }
    }

    /// Resetting every request.
    pub fn resetting() -> Self {
        Self {
            reset_rate: 1.0,
            ..Self::default()
        }
    }

    /// Never answering.
    pub fn hanging() -> Self {
        Self {
            hang: true,
            ..Self::default()
        }
    }

    /// The same with `latency`.
    pub fn with_latency(mut self, latency: Latency) -> Self {
        self.latency = latency;
        self
    }

    /// The same with a share `rate` of errors answered `status`.
    pub fn with_errors(mut self, rate: f64, status: StatusCode) -> Self {
        self.error_rate = rate;
        self.error_status = status;
        self
    }
}

impl From<mesh_tower::mock::Behavior> for Script {
    /// The same behaviour as a `mesh_tower::mock::MockEndpoint` would have.
    fn from(b: mesh_tower::mock::Behavior) -> Self {
        let latency = match b.latency {
            mesh_tower::mock::Latency::Fixed(d) => Latency::Fixed(d),
            mesh_tower::mock::Latency::Uniform(lo, hi) => Latency::Uniform(lo, hi),
        };
        Self {
            latency,
            error_rate: b.error_rate,
            error_status: b.error_status,
            grpc_error_code: 14,
            rate_limited: b.rate_limited,
            retry_after: b.retry_after.map(Duration::from_secs),
            reset_rate: b.reset_rate,
            hang: b.hang,
        }
    }
}

/// A share as the draw reads it: NaN as 0, clamped to 0 to 1.
fn share(p: f64) -> f64 {
    if p.is_nan() { 0.0 } else { p.clamp(0.0, 1.0) }
}

/// Why a [`Script`] is not read as written; see [`Script::check`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ScriptError {
    /// A share is NaN or outside 0 to 1 (read as 0, or as the nearest bound).
    #[error("the share `{0}` is not a number from 0 to 1")]
    Share(&'static str),
    /// The shares of reset, rate-limited and error answers add up to more than 1 (the
    /// later ones get what remains).
    #[error("the shares of resets, 429s and errors add up to more than 1")]
    Overbooked,
}

/// What the draw decided for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Ok,
    Error,
    RateLimited,
    Reset,
    Hang,
}

impl Script {
    /// Whether the script is read as written: every share a number from 0 to 1, and the
    /// shares of resets, 429s and errors adding up to at most 1. A script that fails
    /// still runs, read as the [module docs](self) say; the mesh logs a warning for it.
    pub fn check(&self) -> Result<(), ScriptError> {
        let shares = [
            ("reset_rate", self.reset_rate),
            ("rate_limited", self.rate_limited),
            ("error_rate", self.error_rate),
        ];
        let tail = match self.latency {
            Latency::Tail { tail_share, .. } => Some(("latency.tail_share", tail_share)),
            _ => None,
        };
        for (name, p) in shares.into_iter().chain(tail) {
            if !(0.0..=1.0).contains(&p) {
                return Err(ScriptError::Share(name));
            }
        }
        // A little room for sums like 0.7 + 0.2 + 0.1.
        if shares.iter().map(|(_, p)| p).sum::<f64>() > 1.0 + 1e-9 {
            return Err(ScriptError::Overbooked);
        }
        Ok(())
    }

    /// The latency and the verdict for one request.
    pub(crate) fn draw(&self, rng: &mut fastrand::Rng) -> (Duration, Verdict) {
        let delay = self.latency.draw(rng);
        let roll = rng.f64();
        let reset = share(self.reset_rate);
        let limited = reset + share(self.rate_limited);
        let error = limited + share(self.error_rate);
        let verdict = if self.hang {
            Verdict::Hang
        } else if roll < reset {
            Verdict::Reset
        } else if roll < limited {
            Verdict::RateLimited
        } else if roll < error {
            Verdict::Error
        } else {
            Verdict::Ok
        };
        (delay, verdict)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_repeat_with_a_seed_and_follow_the_shares() {
        let script = Script {
            error_rate: 0.2,
            rate_limited: 0.1,
            reset_rate: 0.05,
            latency: Latency::Uniform(Duration::ZERO, Duration::from_millis(10)),
            ..Script::default()
        };
        let run = |seed| {
            let mut rng = fastrand::Rng::with_seed(seed);
            (0..10_000)
                .map(|_| script.draw(&mut rng))
                .collect::<Vec<_>>()
        };
        let a = run(7);
        assert_eq!(a, run(7));
        assert_ne!(a, run(8));
        let share = |v| a.iter().filter(|(_, x)| *x == v).count() as f64 / a.len() as f64;
        assert!((share(Verdict::Error) - 0.2).abs() < 0.02);
        assert!((share(Verdict::RateLimited) - 0.1).abs() < 0.02);
        assert!((share(Verdict::Reset) - 0.05).abs() < 0.01);
        assert!(a.iter().all(|(d, _)| *d <= Duration::from_millis(10)));
    }

    #[test]
    fn a_uniform_latency_takes_its_bounds_in_either_order() {
        let mut rng = fastrand::Rng::with_seed(3);
        let reversed = Latency::Uniform(Duration::from_millis(10), Duration::from_millis(1));
        let draws: Vec<_> = (0..1000).map(|_| reversed.draw(&mut rng)).collect();
        let (lo, hi) = (Duration::from_millis(1), Duration::from_millis(10));
        assert!(draws.iter().all(|d| (lo..=hi).contains(d)));
        // Spread over the range, not stuck at one bound.
        assert!(
            draws.iter().any(|d| *d < Duration::from_millis(4)),
            "{draws:?}"
        );
        assert!(
            draws.iter().any(|d| *d > Duration::from_millis(7)),
            "{draws:?}"
        );
    }

    #[test]
    fn shares_are_read_forgivingly_and_checked() {
        let verdicts = |script: &Script| {
            let mut rng = fastrand::Rng::with_seed(5);
            let all: Vec<_> = (0..10_000).map(|_| script.draw(&mut rng).1).collect();
            move |v| all.iter().filter(|x| **x == v).count() as f64 / all.len() as f64
        };
        // A NaN share counts as 0, and does not switch off the shares after it.
        let nan = Script {
            reset_rate: f64::NAN,
            error_rate: 0.5,
            ..Script::default()
        };
        assert_eq!(nan.check(), Err(ScriptError::Share("reset_rate")));
        let share = verdicts(&nan);
        assert_eq!(share(Verdict::Reset), 0.0);
        assert!((share(Verdict::Error) - 0.5).abs() < 0.02);
        // Over 1: earlier shares first, the later ones get what remains.
        let over = Script {
            reset_rate: 0.6,
            error_rate: 0.6,
            ..Script::default()
        };
        assert_eq!(over.check(), Err(ScriptError::Overbooked));
        let share = verdicts(&over);
        assert!((share(Verdict::Reset) - 0.6).abs() < 0.02);
        assert!((share(Verdict::Error) - 0.4).abs() < 0.02);
        assert_eq!(share(Verdict::Ok), 0.0);
        // Beyond the bounds: clamped.
        let negative = Script {
            rate_limited: -1.0,
            error_rate: 2.0,
            ..Script::default()
        };
        assert_eq!(negative.check(), Err(ScriptError::Share("rate_limited")));
        assert_eq!(verdicts(&negative)(Verdict::Error), 1.0);
        assert_eq!(
            Script::default()
                .with_errors(0.7, StatusCode::BAD_GATEWAY)
                .check(),
            Ok(())
        );
        let exact = Script {
            reset_rate: 0.7,
            rate_limited: 0.2,
            error_rate: 0.1,
            ..Script::default()
        };
        assert_eq!(exact.check(), Ok(()));
    }

    #[test]
    fn a_tail_latency_takes_its_share() {
        let tail = Latency::Tail {
            base: Duration::from_millis(1),
            tail: Duration::from_millis(100),
            tail_share: 0.1,
        };
        let mut rng = fastrand::Rng::with_seed(1);
        let slow = (0..10_000)
            .filter(|_| tail.draw(&mut rng) == Duration::from_millis(100))
            .count();
        assert!((900..1100).contains(&slow), "{slow}");
    }
}
