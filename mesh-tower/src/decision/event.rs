//! The decisions a [`DecisionRecord`](super::DecisionRecord) keeps, each with a one-line
//! [`Display`](fmt::Display).

use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use mesh_core::SpiffeId;

/// The longest request path a decision keeps, in bytes: 256.
pub const MAX_PATH_LEN: usize = 256;

/// A request's path as a decision keeps it: a copy of at most [`MAX_PATH_LEN`] bytes,
/// without the query, so that a record of many decisions stays small whatever paths
/// clients send. A longer path is cut on a character boundary and marked so:
/// [`is_cut`](Self::is_cut), and `Display` ends it with `…`.
///
/// ```
/// use mesh_tower::decision::{DecisionPath, MAX_PATH_LEN};
///
/// let short = DecisionPath::new("/users/42?token=x");
/// assert_eq!((short.as_str(), short.is_cut()), ("/users/42", false));
/// let long = DecisionPath::new(&format!("/{}", "é".repeat(200)));
/// assert!(long.is_cut() && long.as_str().len() <= MAX_PATH_LEN);
/// assert!(long.to_string().ends_with("é…"));
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DecisionPath {
    path: Box<str>,
    cut: bool,
}

impl DecisionPath {
    /// Keeps `path` (anything from a `?` on left out), cut to [`MAX_PATH_LEN`] bytes.
    /// Looks at no more than `MAX_PATH_LEN + 1` bytes of it.
    pub fn new(path: &str) -> Self {
        let mut end = path.len().min(MAX_PATH_LEN);
        while !path.is_char_boundary(end) {
            end -= 1;
        }
        let head = path.get(..end).unwrap_or_default();
        let (kept, cut) = match head.find('?') {
            Some(query) => (head.get(..query).unwrap_or_default(), false),
            None => (
                head,
                path.get(end..)
                    .is_some_and(|rest| !rest.is_empty() && !rest.starts_with('?')),
            ),
        };
        Self {
            path: Box::from(kept),
            cut,
        }
    }

    /// The path kept.
    pub fn as_str(&self) -> &str {
        &self.path
    }

    /// Whether the request's path was longer than [`MAX_PATH_LEN`] and was cut.
    pub fn is_cut(&self) -> bool {
        self.cut
    }
}

impl From<&http::uri::PathAndQuery> for DecisionPath {
    fn from(path: &http::uri::PathAndQuery) -> Self {
        Self::new(path.path())
    }
}

impl FromStr for DecisionPath {
    type Err = Infallible;

    fn from_str(path: &str) -> Result<Self, Infallible> {
        Ok(Self::new(path))
    }
}

impl fmt::Display for DecisionPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.path)?;
        if self.cut {
            f.write_str("…")?;
        }
        Ok(())
    }
}

/// The path of a decision's line: `/` when the request had none.
fn path_or_root(path: Option<&DecisionPath>) -> &dyn fmt::Display {
    match path {
        Some(path) => path,
        None => &"/",
    }
}

/// What was decided; see the [module docs](super). New kinds of decision may be added.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// The balancer chose an endpoint for a request.
    Pick(Pick),
    /// An endpoint's circuit breaker changed phase, or refused to.
    Breaker(BreakerChange),
    /// A try failed: retried or not, and why.
    Retry(RetryDecision),
    /// A request was authorized, audited or denied.
    Authz(AuthzRecord),
}

/// The kind of an [`Event`], to filter by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Kind {
    /// [`Event::Pick`].
    Pick,
    /// [`Event::Breaker`].
    Breaker,
    /// [`Event::Retry`].
    Retry,
    /// [`Event::Authz`].
    Authz,
}

impl Event {
    /// The event's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Event::Pick(_) => Kind::Pick,
            Event::Breaker(_) => Kind::Breaker,
            Event::Retry(_) => Kind::Retry,
            Event::Authz(_) => Kind::Authz,
        }
    }

    /// The pick, if this is one.
    pub fn as_pick(&self) -> Option<&Pick> {
        match self {
            Event::Pick(p) => Some(p),
            _ => None,
        }
    }

    /// The breaker change, if this is one.
    pub fn as_breaker(&self) -> Option<&BreakerChange> {
        match self {
            Event::Breaker(b) => Some(b),
            _ => None,
        }
    }

    /// The retry decision, if this is one.
    pub fn as_retry(&self) -> Option<&RetryDecision> {
        match self {
            Event::Retry(r) => Some(r),
            _ => None,
        }
    }

    /// The authorization decision, if this is one.
    pub fn as_authz(&self) -> Option<&AuthzRecord> {
        match self {
            Event::Authz(a) => Some(a),
            _ => None,
        }
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::Pick(p) => p.fmt(f),
            Event::Breaker(b) => b.fmt(f),
            Event::Retry(r) => r.fmt(f),
            Event::Authz(a) => a.fmt(f),
        }
    }
}

/// How eligible an endpoint was when it was compared, from most to least (the
/// balancer's tiers; see [`crate::balance`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Tier {
    /// Ready and outside any rate-limit penalty.
    Preferred,
    /// Within a rate-limit penalty.
    Penalized,
    /// Not ready (ejected, or on probation with its probe out).
    Unready,
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tier::Preferred => "preferred",
            Tier::Penalized => "penalized",
            Tier::Unready => "unready",
        })
    }
}

/// One endpoint as a pick compared it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Candidate {
    /// Its address.
    pub addr: SocketAddr,
    /// Its cost at the pick, lower wins: the peak-EWMA round-trip estimate in
    /// nanoseconds times (requests in flight + 1), divided by its weight (see
    /// [`Cost`](crate::load::Cost)). Shown in milliseconds.
    pub cost: f64,
    /// Its tier at the pick.
    pub tier: Tier,
}

impl fmt::Display for Candidate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (cost {:.3}ms, {})",
            self.addr,
            self.cost / 1e6,
            self.tier
        )
    }
}

/// How a pick was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PickPath {
    /// Power of two choices, at `poll_ready`.
    P2c,
    /// No pick's winner was ready: every endpoint was polled and the cheapest ready one
    /// taken.
    Scan,
    /// A retry's endpoint was chosen again at `call`, away from the request's earlier
    /// tries (or from rate-limiting endpoints).
    Repick,
}

/// Where zone preference sent a pick (only when it applies: a local zone is known and
/// both local and remote endpoints exist).
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum ZoneChoice {
    /// Stayed in the local zone; the best remote candidate it was weighed against, if
    /// any was eligible.
    Local {
        /// The remote pair's winner.
        remote: Option<Candidate>,
    },
    /// Spilled to another zone: the local winner was too loaded, or in a worse tier.
    Spilled {
        /// The local pair's winner that lost.
        local: Candidate,
    },
    /// No local endpoint was eligible.
    NoLocal,
}

/// A pick of the balancer.
#[derive(Clone, Debug, PartialEq)]
pub struct Pick {
    /// How the pick was made.
    pub path: PickPath,
    /// The endpoint chosen.
    pub winner: Candidate,
    /// The other candidate of the pair; `None` when the winner was the only eligible
    /// endpoint of its tier (or for a scan).
    pub other: Option<Candidate>,
    /// Zone preference's part, when it applied.
    pub zone: Option<ZoneChoice>,
    /// Earlier winners passed over because they were not ready when asked.
    pub passed_over: u32,
}

impl fmt::Display for Pick {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = match self.path {
            PickPath::P2c => "pick",
            PickPath::Scan => "pick (scan)",
            PickPath::Repick => "pick (retry)",
        };
        write!(f, "{path} {}", self.winner)?;
        match &self.other {
            Some(other) => write!(f, " over {other}")?,
            None if self.path == PickPath::Scan => {}
            None => f.write_str(", alone in its tier")?,
        }
        match &self.zone {
            None => {}
            Some(ZoneChoice::Local { remote: Some(r) }) => write!(f, "; stayed local over {r}")?,
            Some(ZoneChoice::Local { remote: None }) => f.write_str("; stayed local")?,
            Some(ZoneChoice::Spilled { local }) => write!(f, "; spilled from local {local}")?,
            Some(ZoneChoice::NoLocal) => f.write_str("; no local endpoint eligible")?,
        }
        if self.passed_over > 0 {
            write!(f, "; {} not ready passed over", self.passed_over)?;
        }
        Ok(())
    }
}

/// A circuit breaker's phase; see [`crate::breaker`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BreakerPhase {
    /// Serving.
    Closed,
    /// Ejected: not ready.
    Ejected,
    /// One probe decides.
    Probation,
}

impl fmt::Display for BreakerPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BreakerPhase::Closed => "closed",
            BreakerPhase::Ejected => "ejected",
            BreakerPhase::Probation => "probation",
        })
    }
}

/// Why a breaker changed phase (or, for [`BudgetFull`](Self::BudgetFull), did not).
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum BreakerCause {
    /// This many failures in a row.
    ConsecutiveFailures {
        /// The failures counted.
        failures: u32,
    },
    /// The success rate over the window fell below the threshold.
    SuccessRate {
        /// The rate, 0 to 1.
        rate: f64,
        /// The threshold.
        threshold: f64,
        /// Outcomes in the window.
        requests: u32,
    },
    /// The probe on probation failed.
    ProbeFailed,
    /// The ejection's back-off ended.
    EjectionOver,
    /// The probe on probation succeeded.
    ProbeSucceeded,
    /// The endpoint should have been ejected, but the maximum ejected share is reached
    /// (or it is the last endpoint): it stays closed.
    BudgetFull,
}

impl fmt::Display for BreakerCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BreakerCause::ConsecutiveFailures { failures } => {
                write!(f, "{failures} consecutive failures")
            }
            BreakerCause::SuccessRate {
                rate,
                threshold,
                requests,
            } => write!(
                f,
                "success rate {:.1}% < {:.1}% over {requests} requests",
                rate * 100.0,
                threshold * 100.0
            ),
            BreakerCause::ProbeFailed => f.write_str("probe failed"),
            BreakerCause::EjectionOver => f.write_str("ejection over"),
            BreakerCause::ProbeSucceeded => f.write_str("probe succeeded"),
            BreakerCause::BudgetFull => {
                f.write_str("would eject, but the maximum ejected share is reached")
            }
        }
    }
}

/// A circuit breaker's decision about one endpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct BreakerChange {
    /// The endpoint (its discovery key).
    pub endpoint: Arc<str>,
    /// The phase before.
    pub from: BreakerPhase,
    /// The phase after (the same as `from` for [`BreakerCause::BudgetFull`]).
    pub to: BreakerPhase,
    /// Why.
    pub cause: BreakerCause,
    /// For an ejection: how long it lasts.
    pub ejected_for: Option<Duration>,
}

impl fmt::Display for BreakerChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "breaker {} {} -> {}: {}",
            self.endpoint, self.from, self.to, self.cause
        )?;
        if let Some(d) = self.ejected_for {
            write!(f, " (for {d:?})")?;
        }
        Ok(())
    }
}

/// How a failed try ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TryOutcome {
    /// An answer classified as a failure, with its HTTP status.
    Failed(u16),
    /// A rate-limited answer (429 or `RESOURCE_EXHAUSTED`), with its HTTP status.
    RateLimited(u16),
    /// No connection could be made: the request never left.
    ConnectError,
    /// Every connection to the endpoint was busy and the line for one full: the request
    /// never left.
    NotSent,
    /// The per-try timeout fired.
    Timeout,
    /// Another error: a broken connection, a refused readiness, ….
    Error,
}

impl fmt::Display for TryOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TryOutcome::Failed(s) => write!(f, "failed with {s}"),
            TryOutcome::RateLimited(s) => write!(f, "rate limited ({s})"),
            TryOutcome::ConnectError => f.write_str("could not connect"),
            TryOutcome::NotSent => f.write_str("found no free connection"),
            TryOutcome::Timeout => f.write_str("timed out"),
            TryOutcome::Error => f.write_str("failed without an answer"),
        }
    }
}

/// Whether a failed try was retried, and why (not).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RetryVerdict {
    /// Retried after this back-off.
    Retried {
        /// The back-off (or the server's pushback).
        delay: Duration,
    },
    /// A rate-limited answer retried at once on an endpoint that is not rate limiting.
    RetriedElsewhere,
    /// The retry elsewhere found no endpoint outside a rate-limit penalty: the caller
    /// gets the rate-limited answer.
    NoneElsewhere,
    /// The outcome is not retryable by the policy (status, gRPC code or error kind).
    NotRetryable,
    /// The method is not idempotent, and the policy does not retry those.
    NotIdempotent,
    /// The server's pushback forbids a retry: a negative `grpc-retry-pushback-ms`, or a
    /// `Retry-After` or pushback longer than [`MAX_PUSHBACK`](crate::retry::MAX_PUSHBACK).
    PushbackForbids,
    /// The policy's retries are used up.
    AttemptsExhausted,
    /// The request's body cannot be replayed (too large, or streamed past the cap): the
    /// request is committed to its try.
    Committed,
    /// The back-off would end past the request's deadline.
    Deadline,
    /// The retry budget is spent.
    BudgetExhausted,
}

impl RetryVerdict {
    /// Whether another try follows.
    pub fn is_retry(&self) -> bool {
        matches!(
            self,
            RetryVerdict::Retried { .. } | RetryVerdict::RetriedElsewhere
        )
    }
}

impl fmt::Display for RetryVerdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RetryVerdict::Retried { delay } => write!(f, "retried after {delay:?}"),
            RetryVerdict::RetriedElsewhere => f.write_str("retried elsewhere at once"),
            RetryVerdict::NoneElsewhere => {
                f.write_str("not retried: no endpoint elsewhere is outside a rate limit")
            }
            RetryVerdict::NotRetryable => f.write_str("not retried: not retryable"),
            RetryVerdict::NotIdempotent => f.write_str("not retried: not idempotent"),
            RetryVerdict::PushbackForbids => f.write_str("not retried: the server's pushback"),
            RetryVerdict::AttemptsExhausted => f.write_str("not retried: attempts exhausted"),
            RetryVerdict::Committed => {
                f.write_str("not retried: committed (body cannot be replayed)")
            }
            RetryVerdict::Deadline => f.write_str("not retried: the deadline is too close"),
            RetryVerdict::BudgetExhausted => f.write_str("not retried: retry budget exhausted"),
        }
    }
}

/// A retry decision after a failed try.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryDecision {
    /// The request's method.
    pub method: http::Method,
    /// The request's path (no query; see [`DecisionPath`]).
    pub path: Option<DecisionPath>,
    /// The try that ended, from 1.
    pub attempt: u32,
    /// How it ended.
    pub outcome: TryOutcome,
    /// What was decided.
    pub verdict: RetryVerdict,
}

impl fmt::Display for RetryDecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "retry {} {} attempt {} {}: {}",
            self.method,
            path_or_root(self.path.as_ref()),
            self.attempt,
            self.outcome,
            self.verdict
        )
    }
}

/// An authorization verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AuthzVerdict {
    /// A rule, or an `allow` default, let the request in.
    Allow,
    /// No rule allows it; the `audit` default let it in.
    Audit,
    /// Refused (403 / `PERMISSION_DENIED`).
    Deny,
}

impl fmt::Display for AuthzVerdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AuthzVerdict::Allow => "allow",
            AuthzVerdict::Audit => "audit",
            AuthzVerdict::Deny => "deny",
        })
    }
}

/// An authorization decision about one request.
#[derive(Clone, Debug, PartialEq)]
pub struct AuthzRecord {
    /// The peer's verified identity; `None`: unauthenticated.
    pub client: Option<SpiffeId>,
    /// The request's method.
    pub method: http::Method,
    /// The request's path (no query; see [`DecisionPath`]).
    pub path: Option<DecisionPath>,
    /// The policy's name.
    pub policy: Arc<str>,
    /// The rule that allowed the request; `None`: the policy's default decided.
    pub rule: Option<Arc<str>>,
    /// The verdict.
    pub verdict: AuthzVerdict,
}

impl fmt::Display for AuthzRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "authz {} ", self.verdict)?;
        match &self.client {
            Some(id) => write!(f, "{id}")?,
            None => f.write_str("unauthenticated")?,
        }
        write!(
            f,
            " {} {} by {}/",
            self.method,
            path_or_root(self.path.as_ref()),
            self.policy
        )?;
        match &self.rule {
            Some(rule) => f.write_str(rule),
            None => f.write_str("default"),
        }
    }
}
