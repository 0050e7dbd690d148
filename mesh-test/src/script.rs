//! What a mock endpoint does with each request: its [`Script`].
//!
//! Per request, after the latency, one draw in `[0, 1)` from the endpoint's generator
//! picks, in this order: reset (`reset_rate`), rate limited (`rate_limited`), error
//! (`error_rate`); the rest succeed. `hang` overrides everything. The generator is seeded
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
    /// Uniformly between the two bounds.
    Uniform(Duration, Duration),
    /// `base` for most requests, `tail` for a share `tail_share` of them: a long tail.
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
            Latency::Uniform(lo, hi) if hi > lo => lo + (hi - lo).mul_f64(rng.f64()),
            Latency::Uniform(lo, _) => lo,
            Latency::Tail {
                base,
                tail,
                tail_share,
            } => {
                if rng.f64() < tail_share {
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
    /// The latency and the verdict for one request.
    pub(crate) fn draw(&self, rng: &mut fastrand::Rng) -> (Duration, Verdict) {
        let delay = self.latency.draw(rng);
        let roll = rng.f64();
        let verdict = if self.hang {
            Verdict::Hang
        } else if roll < self.reset_rate {
            Verdict::Reset
        } else if roll < self.reset_rate + self.rate_limited {
            Verdict::RateLimited
        } else if roll < self.reset_rate + self.rate_limited + self.error_rate {
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
