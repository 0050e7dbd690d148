//! The decision record: "why did this request go there".
//!
//! A [`DecisionRecord`] is an optional, bounded ring buffer of the mesh's recent
//! decisions, shared by the layers that make them:
//!
//! - **picks** of the balancer ([`crate::balance`]): both candidates of the power of two
//!   choices with their costs and tiers, which won, and where zone preference sent it;
//!   a pick with a single eligible endpoint, the slow path's scan, and a retry's repick;
//! - **breaker changes** ([`crate::breaker`]): an endpoint's phase before and after
//!   (closed, ejected, probation) and why — consecutive failures, success rate, the
//!   probe's outcome, the end of the back-off — and ejections the maximum ejected share
//!   refused;
//! - **retry decisions** ([`crate::retry`]): after every failed try, whether it was
//!   retried and, if not, why (not retryable, not idempotent, attempts exhausted,
//!   committed, budget exhausted, deadline, pushback), with the attempt number;
//! - **authorization decisions** ([`crate::authz`]): the peer's identity, the method and
//!   path, the policy and rule, and allow / audit / deny.
//!
//! Each [`Decision`] has a sequence number (increasing by one per decision recorded,
//! dropped ones included), the time since the record was made (Tokio's clock, so paused
//! time gives reproducible stamps), the name of the service or listener that decided,
//! and the typed [`Event`]. `Display` gives one line; [`DecisionRecord::dump`] the whole
//! buffer, oldest first.
//!
//! **Off by default.** A layer holds an `Option<Recorder>`; without one, a decision
//! costs one branch, and nothing is built, allocated or locked. With one, recording
//! takes a mutex held only to push into a buffer allocated up front (default
//! [`DEFAULT_CAPACITY`], 1,024 entries); when it is full the oldest entry is dropped and
//! counted ([`DecisionRecord::dropped`]). Names are shared `Arc<str>`s; a request's path
//! is copied, at most [`MAX_PATH_LEN`] (256) bytes of it ([`DecisionPath`]: a longer one
//! is cut, and marked so), so that a full record stays small whatever paths clients send.
//! Successful tries are not retry decisions and are not recorded.
//!
//! **Resizable at run time.** [`DecisionRecord::set_capacity`] grows or shrinks the
//! buffer (dropping the oldest entries that no longer fit) and `0` switches it off: a
//! recorder then returns at once, and the layers skip building the decision
//! ([`Recorder::is_enabled`], one atomic load). A record made with
//! [`DecisionRecord::disabled`] can be attached to every layer and switched on later,
//! which is how `mesh-proxy` reloads `[admin] decisions`.
//!
//! The layers take a named [`Recorder`] (`record.recorder("users")`);
//! [`MeshClientBuilder::decisions`](crate::MeshClientBuilder::decisions) and
//! `MeshServerBuilder::decisions` (feature `server`) name it after the service or
//! listener themselves.
//!
//! ```
//! use mesh_tower::decision::{DecisionRecord, Event, Kind, RetryDecision, RetryVerdict, TryOutcome};
//!
//! let record = DecisionRecord::new(2);
//! let users = record.recorder("users");
//! for attempt in 1..=3 {
//!     users.record(Event::Retry(RetryDecision {
//!         method: http::Method::GET,
//!         path: "/users/42".parse().ok(),
//!         attempt,
//!         outcome: TryOutcome::Failed(503),
//!         verdict: RetryVerdict::BudgetExhausted,
//!     }));
//! }
//! let kept = record.snapshot();
//! assert_eq!(kept.len(), 2); // bounded: the oldest was dropped
//! assert_eq!(record.dropped(), 1);
//! assert_eq!(kept[0].seq, 1);
//! assert_eq!(record.of_kind(Kind::Retry).len(), 2);
//! assert!(kept[1].to_string().ends_with(
//!     "users retry GET /users/42 attempt 3 failed with 503: not retried: retry budget exhausted"
//! ));
//! ```

mod event;

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

pub use self::event::{
    AuthzRecord, AuthzVerdict, BreakerCause, BreakerChange, BreakerPhase, Candidate, DecisionPath,
    Event, Kind, MAX_PATH_LEN, Pick, PickPath, RetryDecision, RetryVerdict, Tier, TryOutcome,
    ZoneChoice,
};

/// The capacity of [`DecisionRecord::default`]: 1,024 decisions.
pub const DEFAULT_CAPACITY: usize = 1024;

/// One recorded decision.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// Its sequence number: 0 for the record's first decision, then one more for each.
    pub seq: u64,
    /// When it was made.
    pub at: Instant,
    /// How long after the record was made.
    pub elapsed: Duration,
    /// The service or listener that made it.
    pub source: Arc<str>,
    /// What was decided.
    pub event: Event,
}

impl fmt::Display for Decision {
    /// `#seq +elapsed source event`, for example
    /// `#3 +1.250s users pick 10.0.0.8:80 (cost 30.000ms, preferred) over …`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "#{} +{:.3}s {} {}",
            self.seq,
            self.elapsed.as_secs_f64(),
            self.source,
            self.event
        )
    }
}

struct Ring {
    /// 0: off.
    capacity: AtomicUsize,
    created: Instant,
    state: Mutex<State>,
}

struct State {
    next: u64,
    dropped: u64,
    entries: VecDeque<Decision>,
}

/// A bounded ring buffer of recent decisions; see the [module docs](self). Cheap to
/// clone: clones share the buffer.
#[derive(Clone)]
pub struct DecisionRecord(Arc<Ring>);

impl fmt::Debug for DecisionRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("DecisionRecord")
            .field("capacity", &self.capacity())
            .field("len", &state.entries.len())
            .field("dropped", &state.dropped)
            .finish()
    }
}

impl Default for DecisionRecord {
    /// A record of [`DEFAULT_CAPACITY`] decisions.
    fn default() -> Self {
        Self::new(DEFAULT_CAPACITY)
    }
}

impl DecisionRecord {
    /// A record keeping the latest `capacity` decisions (at least one), its buffer
    /// allocated now. Its clock starts now (Tokio's: paused time applies).
    pub fn new(capacity: usize) -> Self {
        Self::with_capacity(capacity.max(1))
    }

    /// A record that keeps nothing until [`Self::set_capacity`] switches it on.
    pub fn disabled() -> Self {
        Self::with_capacity(0)
    }

    fn with_capacity(capacity: usize) -> Self {
        Self(Arc::new(Ring {
            capacity: AtomicUsize::new(capacity),
            created: Instant::now(),
            state: Mutex::new(State {
                next: 0,
                dropped: 0,
                entries: VecDeque::with_capacity(capacity),
            }),
        }))
    }

    /// A handle recording decisions made by `source` (a service or listener name).
    pub fn recorder(&self, source: impl AsRef<str>) -> Recorder {
        Recorder {
            record: self.clone(),
            source: Arc::from(source.as_ref()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while pushing leaves a consistent buffer: keep using it.
        self.0.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn push(&self, source: &Arc<str>, event: Event) {
        if !self.is_enabled() {
            return;
        }
        let at = Instant::now();
        let elapsed = at.saturating_duration_since(self.0.created);
        let source = source.clone();
        let mut state = self.lock();
        // Read under the lock: a resize in between cannot leave the buffer over it.
        let capacity = self.capacity();
        if capacity == 0 {
            return;
        }
        let seq = state.next;
        state.next += 1;
        while state.entries.len() >= capacity {
            state.entries.pop_front();
            state.dropped += 1;
        }
        state.entries.push_back(Decision {
            seq,
            at,
            elapsed,
            source,
            event,
        });
    }

    /// The decisions kept, oldest first.
    pub fn snapshot(&self) -> Vec<Decision> {
        self.lock().entries.iter().cloned().collect()
    }

    /// The decisions kept whose sequence number is `seq` or later, oldest first: pass the
    /// last one seen plus one to read only what is new.
    pub fn since(&self, seq: u64) -> Vec<Decision> {
        let state = self.lock();
        // Sequence numbers increase by one along the buffer.
        let skip = state
            .entries
            .front()
            .map_or(0, |first| seq.saturating_sub(first.seq));
        let skip = usize::try_from(skip).unwrap_or(usize::MAX);
        state.entries.iter().skip(skip).cloned().collect()
    }

    /// The decisions kept of one kind, oldest first.
    pub fn of_kind(&self, kind: Kind) -> Vec<Decision> {
        self.lock()
            .entries
            .iter()
            .filter(|d| d.event.kind() == kind)
            .cloned()
            .collect()
    }

    /// The sequence number the next decision will get.
    pub fn next_seq(&self) -> u64 {
        self.lock().next
    }

    /// Decisions dropped to make room, since the record was made.
    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }

    /// Decisions kept.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many decisions are kept at most (0: off).
    pub fn capacity(&self) -> usize {
        self.0.capacity.load(Ordering::Relaxed)
    }

    /// Whether decisions are kept (a capacity above 0).
    pub fn is_enabled(&self) -> bool {
        self.capacity() > 0
    }

    /// Keeps at most `capacity` decisions from now on; `0` switches the record off.
    /// Shrinking drops the oldest entries that no longer fit, counted as dropped;
    /// switching off forgets every entry (the sequence numbers go on).
    pub fn set_capacity(&self, capacity: usize) {
        let mut state = self.lock();
        self.0.capacity.store(capacity, Ordering::Relaxed);
        let excess = state.entries.len().saturating_sub(capacity);
        if excess > 0 {
            state.entries.drain(..excess);
            if capacity > 0 {
                state.dropped += excess as u64;
            }
        }
        if capacity == 0 {
            state.entries = VecDeque::new();
        } else if state.entries.capacity() < capacity {
            let more = capacity - state.entries.len();
            state.entries.reserve_exact(more);
        } else {
            state.entries.shrink_to(capacity);
        }
    }

    /// Forgets the decisions kept (sequence numbers go on).
    pub fn clear(&self) {
        self.lock().entries.clear();
    }

    /// The whole buffer as text, oldest first: a header line with the counts, then one
    /// line per decision.
    pub fn dump(&self) -> String {
        use std::fmt::Write as _;
        let entries = self.snapshot();
        let dropped = self.dropped();
        let mut out = String::with_capacity(64 + entries.len() * 120);
        let _ = writeln!(
            out,
            "# {} decisions kept (capacity {}), {dropped} dropped",
            entries.len(),
            self.capacity()
        );
        for d in &entries {
            let _ = writeln!(out, "{d}");
        }
        out
    }
}

/// Records the decisions of one service or listener into a [`DecisionRecord`]; made by
/// [`DecisionRecord::recorder`]. Cheap to clone.
#[derive(Clone)]
pub struct Recorder {
    record: DecisionRecord,
    source: Arc<str>,
}

impl fmt::Debug for Recorder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Recorder")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl Recorder {
    /// Records `event`, dropping the oldest decision if the buffer is full; nothing
    /// when the record is off.
    pub fn record(&self, event: Event) {
        self.record.push(&self.source, event);
    }

    /// Whether the record keeps decisions: layers check it before building one.
    #[inline]
    pub fn is_enabled(&self) -> bool {
        self.record.is_enabled()
    }

    /// The name decisions are recorded under.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The record written to.
    pub fn decision_record(&self) -> &DecisionRecord {
        &self.record
    }
}

#[cfg(test)]
mod tests;
