//! The event log: what happened in a [`MockMesh`](crate::MockMesh), in order.
//!
//! Every mesh keeps one append-only log of typed [`Event`]s, each stamped with a sequence
//! number and the time since the mesh started (Tokio's clock, so paused time shows as
//! virtual time). [`MockMesh::events`](crate::MockMesh::events) returns a snapshot as an
//! [`EventLog`] (a `Vec` underneath), with the counting and share helpers tests assert
//! with.
//!
//! Where the events come from:
//!
//! - **Endpoints** ([`Event::Request`], [`Event::Authz`]): appended by each mock endpoint,
//!   so they are exact. One [`Event::Request`] per request that reached the endpoint's
//!   application, appended when the application answers (or, for a request dropped
//!   before it answered, when it was dropped: [`Outcome::Cancelled`]), plus one
//!   ([`Outcome::LimitedByServer`]) per request the service's server-side rate limit
//!   refused before the application. One [`Event::Authz`] per authorization decision
//!   when the service has a policy, appended as the decision is made, so before the
//!   request's own event.
//! - **The harness** ([`Event::Endpoint`], [`Event::Credentials`]): appended when a test
//!   kills, restarts, partitions, adds or removes an endpoint, changes a script, or
//!   rotates credentials.
//! - **Clients** ([`Event::Breaker`]): read from the metrics registry of each client the
//!   mesh built. The counts are exact, the moments are not: the registry is sampled every
//!   20 ms and whenever the log is read, so a breaker event sits in the log at the first
//!   sample after it happened.
//!
//! [`Event`] is `#[non_exhaustive]`: client-side decision records (picks, retries, authz
//! decisions recorded inside `mesh-tower`) are meant to be appended as further variants
//! without breaking tests that match on the existing ones.

use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, StatusCode};
use mesh_core::SpiffeId;
use tokio::time::Instant;

/// One entry of the log.
#[derive(Clone, Debug, PartialEq)]
pub struct Recorded {
    /// Its position in the log, from 0.
    pub seq: u64,
    /// When it was appended, since the mesh started (Tokio's clock).
    pub at: Duration,
    /// What happened.
    pub event: Event,
}

/// Something that happened in the mesh.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// A mock endpoint received a request and did what its script said (or its
    /// server-side rate limit refused it, or it was dropped first; see [`Outcome`]).
    Request(RequestEvent),
    /// A mock endpoint's authorization policy decided on a request.
    Authz(AuthzEvent),
    /// The harness changed an endpoint.
    Endpoint(EndpointEvent),
    /// A client's breaker changed state for an endpoint (from the client's metrics).
    Breaker(BreakerEvent),
    /// The harness rotated credentials.
    Credentials(CredentialEvent),
}

/// Which endpoint: the service, the endpoint's index in it, and its address.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EndpointRef {
    /// The service's name.
    pub service: Arc<str>,
    /// The endpoint's index in its service (0 for the first one spawned).
    pub index: usize,
    /// The address clients reach it at.
    pub addr: SocketAddr,
}

impl fmt::Display for EndpointRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]@{}", self.service, self.index, self.addr)
    }
}

/// A request a mock endpoint received.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestEvent {
    /// The endpoint.
    pub endpoint: EndpointRef,
    /// The caller's verified identity.
    pub peer: Option<SpiffeId>,
    /// The method.
    pub method: Method,
    /// The path.
    pub path: String,
    /// Whether it was a gRPC call.
    pub grpc: bool,
    /// What the endpoint did.
    pub outcome: Outcome,
}

/// What a mock endpoint did with a request.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// Answered successfully (HTTP 200 echoing the body, or the `Echo` service's reply).
    Ok,
    /// Answered an error: the script's (an HTTP status, or for gRPC a `grpc-status`
    /// code), or for a gRPC call the `Echo` service's own trailers-only error, such as
    /// 12 (`UNIMPLEMENTED`) for a method it does not have.
    Error {
        /// The HTTP status (200 for gRPC errors, which travel in `grpc-status`).
        status: StatusCode,
        /// The gRPC code, for gRPC calls.
        grpc_code: Option<i32>,
    },
    /// Answered 429 (or gRPC `RESOURCE_EXHAUSTED`) by its script, with this `Retry-After`
    /// (or `grpc-retry-pushback-ms`).
    RateLimited {
        /// The back-off it asked for.
        retry_after: Option<Duration>,
    },
    /// Refused by the endpoint's server-side rate limit (`RateLimitLayer`), before the
    /// application: 429 or `RESOURCE_EXHAUSTED` from the limit, not from the script.
    LimitedByServer,
    /// Its connection or stream was reset without an answer.
    Reset,
    /// Never answered (the script hangs). Logged on arrival; a hung request that is
    /// later dropped is not logged again.
    Hung,
    /// Dropped before the application answered: the client cancelled it or its try
    /// timed out, or its connection closed (the endpoint was killed, say).
    Cancelled,
}

/// An authorization decision at a mock endpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct AuthzEvent {
    /// The endpoint.
    pub endpoint: EndpointRef,
    /// The caller's verified identity.
    pub peer: Option<SpiffeId>,
    /// The method.
    pub method: Method,
    /// The path.
    pub path: String,
    /// The decision.
    pub decision: Decision,
}

/// An authorization decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Admitted by `rule` of `policy` (`None`: by the policy's default, `allow` or
    /// `audit`).
    Allowed {
        /// The policy's name.
        policy: String,
        /// The rule that admitted it.
        rule: Option<String>,
        /// Admitted only because the policy audits.
        audit: bool,
    },
    /// Refused (403 / `PERMISSION_DENIED`).
    Denied {
        /// The policy's name.
        policy: String,
    },
}

/// A change the harness made to an endpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct EndpointEvent {
    /// The endpoint.
    pub endpoint: EndpointRef,
    /// What changed.
    pub change: EndpointChange,
}

/// What the harness did to an endpoint.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum EndpointChange {
    /// Started and added to discovery.
    Started,
    /// Killed: its listener closed and its connections dropped.
    Killed,
    /// Listening again on the same address after a kill.
    Restarted,
    /// Cut off: connections and bytes go nowhere (a black hole), nothing is refused.
    Partitioned,
    /// Reachable again after a partition; bytes held meanwhile are delivered.
    Healed,
    /// Removed from discovery (still running, so requests in flight finish).
    Removed,
    /// Its script was replaced.
    Scripted,
}

/// A breaker transition a client reported for an endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BreakerEvent {
    /// The service the client calls.
    pub service: Arc<str>,
    /// The endpoint's address.
    pub addr: SocketAddr,
    /// The endpoint's index in the service, when it is one of the mesh's.
    pub index: Option<usize>,
    /// The transition.
    pub transition: BreakerTransition,
}

/// A breaker state change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BreakerTransition {
    /// The endpoint was ejected.
    Ejected,
    /// Its ejection ended; one probe request is allowed.
    Probation,
    /// The probe succeeded: back in rotation.
    Reinstated,
}

/// A credential change the harness made.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CredentialEvent {
    /// Every workload got a fresh SVID.
    SvidsRotated {
        /// How many credential stores and Workload API servers were updated.
        workloads: usize,
    },
    /// A new root signs SVIDs from now on; bundles trust the old and the new one.
    TrustRotationBegun,
    /// The old root left the bundles.
    TrustRotationFinished,
    /// Another trust domain's bundle was added to every workload's bundles.
    TrustDomainAdded {
        /// The trust domain.
        trust_domain: String,
    },
}

/// The shared, append-only log a mesh and its endpoints write to.
#[derive(Clone, Debug)]
pub(crate) struct Log {
    inner: Arc<Mutex<Vec<Recorded>>>,
    clock: Clock,
}

/// Where the log's times come from.
#[derive(Clone, Debug)]
enum Clock {
    /// Tokio's clock, from the mesh's start.
    Tokio(Instant),
    /// The simulation's virtual time: turmoil's inside a host, else the time the
    /// simulation last stepped to (in nanoseconds).
    #[cfg(feature = "sim")]
    Sim(Arc<std::sync::atomic::AtomicU64>),
}

impl Log {
    pub(crate) fn new() -> Self {
        Self {
            inner: Arc::default(),
            clock: Clock::Tokio(Instant::now()),
        }
    }

    /// A log stamped with a simulation's virtual time; `stepped` is kept up to date by
    /// the simulation.
    #[cfg(feature = "sim")]
    pub(crate) fn simulated(stepped: Arc<std::sync::atomic::AtomicU64>) -> Self {
        Self {
            inner: Arc::default(),
            clock: Clock::Sim(stepped),
        }
    }

    fn now(&self) -> Duration {
        match &self.clock {
            Clock::Tokio(start) => start.elapsed(),
            #[cfg(feature = "sim")]
            Clock::Sim(stepped) => turmoil::sim_elapsed().unwrap_or_else(|| {
                Duration::from_nanos(stepped.load(std::sync::atomic::Ordering::Relaxed))
            }),
        }
    }

    pub(crate) fn push(&self, event: Event) {
        if let Ok(mut log) = self.inner.lock() {
            // Read under the lock, so that times never go backwards as `seq` goes on.
            let at = self.now();
            let seq = log.len() as u64;
            tracing::trace!(seq, ?event, "mock mesh event");
            log.push(Recorded { seq, at, event });
        }
    }

    pub(crate) fn snapshot(&self) -> EventLog {
        EventLog(self.inner.lock().map(|l| l.clone()).unwrap_or_default())
    }
}

/// A snapshot of the log, in order. Derefs to the `Vec` of [`Recorded`] events.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EventLog(pub Vec<Recorded>);

impl std::ops::Deref for EventLog {
    type Target = Vec<Recorded>;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl EventLog {
    /// The events alone, in order.
    pub fn events(&self) -> impl Iterator<Item = &Event> {
        self.0.iter().map(|r| &r.event)
    }

    /// The events at or after `seq` (a mark taken with `len()` earlier), to
    /// look at one phase of a test.
    pub fn since(&self, seq: usize) -> EventLog {
        EventLog(self.0.get(seq..).unwrap_or_default().to_vec())
    }

    /// The requests endpoints of `service` received.
    pub fn requests<'a>(&'a self, service: &'a str) -> impl Iterator<Item = &'a RequestEvent> {
        self.events().filter_map(move |e| match e {
            Event::Request(r) if &*r.endpoint.service == service => Some(r),
            _ => None,
        })
    }

    /// The authorization decisions endpoints of `service` made.
    pub fn authz<'a>(&'a self, service: &'a str) -> impl Iterator<Item = &'a AuthzEvent> {
        self.events().filter_map(move |e| match e {
            Event::Authz(a) if &*a.endpoint.service == service => Some(a),
            _ => None,
        })
    }

    /// The breaker transitions clients of `service` reported.
    pub fn breaker<'a>(&'a self, service: &'a str) -> impl Iterator<Item = &'a BreakerEvent> {
        self.events().filter_map(move |e| match e {
            Event::Breaker(b) if &*b.service == service => Some(b),
            _ => None,
        })
    }

    /// Requests received per endpoint of `service`, indexed by endpoint (`endpoints` is
    /// the service's endpoint count, so that endpoints that got nothing count 0).
    pub fn request_counts(&self, service: &str, endpoints: usize) -> Vec<u64> {
        let mut counts = vec![0; endpoints];
        for r in self.requests(service) {
            if let Some(c) = counts.get_mut(r.endpoint.index) {
                *c += 1;
            }
        }
        counts
    }

    /// Each endpoint's share of the requests `service` received, 0 to 1 (all 0 when
    /// none arrived).
    pub fn shares(&self, service: &str, endpoints: usize) -> Vec<f64> {
        let counts = self.request_counts(service, endpoints);
        let total: u64 = counts.iter().sum();
        counts
            .iter()
            .map(|&c| {
                if total == 0 {
                    0.0
                } else {
                    c as f64 / total as f64
                }
            })
            .collect()
    }

    /// Requests to `service` whose outcome satisfies `f`.
    pub fn count_outcomes(&self, service: &str, f: impl Fn(&Outcome) -> bool) -> usize {
        self.requests(service).filter(|r| f(&r.outcome)).count()
    }

    /// Ejections clients of `service` reported for its endpoint `index`.
    pub fn ejections(&self, service: &str, index: usize) -> usize {
        self.breaker(service)
            .filter(|b| b.index == Some(index) && b.transition == BreakerTransition::Ejected)
            .count()
    }

    /// Refusals by the authorization policy of `service`.
    pub fn denials(&self, service: &str) -> usize {
        self.authz(service)
            .filter(|a| matches!(a.decision, Decision::Denied { .. }))
            .count()
    }

    /// The position of the first event satisfying `f`, if any.
    pub fn position(&self, f: impl Fn(&Event) -> bool) -> Option<usize> {
        self.0.iter().position(|r| f(&r.event))
    }

    /// Whether the events satisfying `first` all come before the first event satisfying
    /// `then` (true when either matches nothing).
    pub fn all_before(
        &self,
        first: impl Fn(&Event) -> bool,
        then: impl Fn(&Event) -> bool,
    ) -> bool {
        let Some(boundary) = self.position(then) else {
            return true;
        };
        !self
            .0
            .get(boundary..)
            .unwrap_or_default()
            .iter()
            .any(|r| first(&r.event))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn times_never_go_backwards_along_the_sequence() {
        // Many threads appending at once: each entry's time is read under the lock, so
        // a later `seq` never has an earlier time.
        let log = Log::new();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for _ in 0..5_000 {
                        log.push(Event::Credentials(CredentialEvent::TrustRotationBegun));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let snapshot = log.snapshot();
        assert_eq!(snapshot.len(), 20_000);
        for pair in snapshot.windows(2) {
            assert!(pair[0].at <= pair[1].at, "{:?} then {:?}", pair[0], pair[1]);
        }
    }
}
