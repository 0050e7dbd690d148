//! The accept loop the HTTP server and the opaque TCP listener share: a bound on open
//! connections, accept errors waited out, and a graceful drain on shutdown. Connections
//! come from a listener, are handed over by another loop (a transparent listener that
//! picked this server for them), or are byte streams of any kind from a stream the owner
//! feeds (Unix sockets, a simulated network).
//!
//! **Shedding newcomers.** A connection is a *newcomer* until it shows a real client is
//! behind it: its mTLS handshake verified a peer, or (TLS without client certificates,
//! plaintext) its first request began. A listener at `max_connections` closes its oldest
//! newcomer to make room for the next connection, and waits only when every open
//! connection is established. Otherwise clients that connect and never finish a handshake
//! (or never send a request) could hold every slot for the handshake or header-read
//! timeout at a time and lock real callers out, while costing the attacker one socket
//! each. With shedding, a real client's handshake is lost only when more connections
//! arrive while it runs than there are newcomers older than it (at most
//! `max_connections`, 10,000 by default, when stalled newcomers fill the listener; fewer
//! when established connections hold most of it). Established connections are never
//! shed. On an mTLS listener only a verified peer is established; on a plaintext or TLS
//! one any first request makes its connection established (one refused by the policy or
//! the rate limit too), so there shedding only raises the price of filling a listener to
//! a request per connection, and the idle timeout bounds how long each holds its place. The queue of newcomers is the
//! accept loop's own: one push per connection, and entries that stopped being newcomers
//! are dropped as they reach its front or when it has doubled since it was last
//! compacted.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;

use crate::sock::TcpOptions;

/// How a shutdown went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Connections open when the shutdown began.
    pub open_at_shutdown: usize,
    /// Connections still open at the shutdown timeout, closed then.
    pub forced: usize,
}

/// Where connections come from, and the socket options each gets.
pub(crate) enum Source {
    /// Accepted here.
    Listener(TcpListener, TcpOptions),
    /// Accepted elsewhere and handed over; ends when every sender is gone.
    Handed(mpsc::Receiver<(TcpStream, SocketAddr)>, TcpOptions),
}

/// Where an accept loop's connections come from.
pub(crate) trait Incoming: Send + 'static {
    /// A connection.
    type Conn: Send + 'static;

    /// The next connection; `None` once no more can come.
    fn next(
        &mut self,
    ) -> impl Future<Output = Option<std::io::Result<(Self::Conn, SocketAddr)>>> + Send;
}

impl Incoming for Source {
    type Conn = TcpStream;

    async fn next(&mut self) -> Option<std::io::Result<(TcpStream, SocketAddr)>> {
        let (accepted, options) = match self {
            Self::Listener(l, options) => (Some(l.accept().await), options),
            Self::Handed(rx, options) => (rx.recv().await.map(Ok), options),
        };
        if let Some(Ok((tcp, remote))) = &accepted {
            crate::sock::tune(tcp, *remote, options);
        }
        accepted
    }
}

/// A byte stream of any kind a server can serve.
pub(crate) trait Io:
    tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static
{
}

impl<T> Io for T where T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {}

/// A boxed [`Io`].
pub(crate) type BoxIo = Box<dyn Io>;

/// A connection from a stream the owner feeds, or the error it gave.
type StreamItem = std::io::Result<(BoxIo, SocketAddr)>;

/// Connections from a stream the owner feeds, each boxed.
pub(crate) struct Streams(Pin<Box<dyn futures_util::Stream<Item = StreamItem> + Send>>);

impl Streams {
    pub(crate) fn new<S, IO>(incoming: S) -> Self
    where
        S: futures_util::Stream<Item = std::io::Result<(IO, SocketAddr)>> + Send + 'static,
        IO: Io,
    {
        use futures_util::StreamExt as _;
        Self(Box::pin(incoming.map(|accepted| {
            accepted.map(|(io, remote)| (Box::new(io) as BoxIo, remote))
        })))
    }
}

impl Incoming for Streams {
    type Conn = BoxIo;

    async fn next(&mut self) -> Option<StreamItem> {
        futures_util::StreamExt::next(&mut self.0).await
    }
}

/// A newcomer: not yet shown to be a real client's.
const FRESH: u8 = 0;
/// Shown to be a real client's: never shed.
const PROVEN: u8 = 1;
/// Shed: its connection is to close.
const SHED: u8 = 2;

#[derive(Debug, Default)]
struct Slot {
    state: AtomicU8,
    shed: tokio::sync::Notify,
}

/// A connection's standing in its listener's queue of newcomers (see the [module
/// docs](self)): shed while it is a newcomer and its listener is full, until
/// [`proven`](Self::proven). Clones share one standing; a connection that drops every
/// clone leaves the queue.
#[derive(Clone, Debug, Default)]
pub(crate) struct Newcomer(Arc<Slot>);

impl Newcomer {
    /// The connection showed a real client: it is not shed from now on. False when it was
    /// shed first (it is about to close).
    pub(crate) fn proven(&self) -> bool {
        match self
            .0
            .state
            .compare_exchange(FRESH, PROVEN, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => true,
            Err(state) => state == PROVEN,
        }
    }

    /// Resolves once the connection is shed (never, once it is proven).
    pub(crate) async fn shed(&self) {
        if self.0.state.load(Ordering::Acquire) != SHED {
            self.0.shed.notified().await;
        }
    }

    /// `fut`'s output, or `None` when the connection is shed first.
    pub(crate) async fn unless_shed<F: Future>(&self, fut: F) -> Option<F::Output> {
        tokio::select! {
            biased;
            out = fut => Some(out),
            () = self.shed() => None,
        }
    }

    /// Still a newcomer, and some connection still holds it.
    fn sheddable(&self) -> bool {
        self.0.state.load(Ordering::Acquire) == FRESH && Arc::strong_count(&self.0) > 1
    }

    /// Sheds it, when it is still a newcomer.
    fn shed_now(&self) -> bool {
        let shed = self
            .0
            .state
            .compare_exchange(FRESH, SHED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if shed {
            // A permit is kept when nothing waits yet.
            self.0.shed.notify_one();
        }
        shed
    }
}

/// An accept loop's newcomers, oldest first (see the [module docs](self)).
#[derive(Debug)]
struct Newcomers {
    queue: VecDeque<Newcomer>,
    /// The length at which the queue is next compacted.
    compact_at: usize,
}

/// The queue's length at which it is first compacted, and the least it grows by before
/// it is compacted again.
const COMPACT_MIN: usize = 64;

impl Newcomers {
    fn new() -> Self {
        Self {
            queue: VecDeque::new(),
            compact_at: COMPACT_MIN,
        }
    }

    /// A new connection's standing.
    fn admit(&mut self) -> Newcomer {
        while self.queue.front().is_some_and(|n| !n.sheddable()) {
            self.queue.pop_front();
        }
        if self.queue.len() >= self.compact_at {
            self.queue.retain(Newcomer::sheddable);
            self.compact_at = 2 * self.queue.len() + COMPACT_MIN;
        }
        let newcomer = Newcomer::default();
        self.queue.push_back(newcomer.clone());
        newcomer
    }

    /// Sheds the oldest newcomer; false when there is none.
    fn shed_oldest(&mut self) -> bool {
        while let Some(oldest) = self.queue.pop_front() {
            if oldest.sheddable() && oldest.shed_now() {
                return true;
            }
        }
        false
    }
}

/// Says that a listener at `max_connections` closed its oldest newcomer to accept the
/// next connection (at warn once a second at most in the process, the rest at debug).
#[cold]
#[inline(never)]
fn shedding(max_connections: usize) {
    static SHEDDING: crate::throttle::Throttle = crate::throttle::Throttle::new();
    match SHEDDING.due() {
        Some(held) => tracing::warn!(
            max_connections,
            more_at_debug = held,
            "a listener is at its connection limit: closing its oldest connection that has not finished its handshake or sent a request, to accept the next (limits.max_connections)"
        ),
        None => tracing::debug!(
            max_connections,
            "a listener at its connection limit closed its oldest newcomer"
        ),
    }
}

/// Says that a listener holds `max_connections` and accepts no more until one closes (any
/// listener's: at warn once a second at most in the process, the rest at debug).
#[cold]
#[inline(never)]
fn full(max_connections: usize) {
    static FULL: crate::throttle::Throttle = crate::throttle::Throttle::new();
    match FULL.due() {
        Some(held) => tracing::warn!(
            max_connections,
            more_at_debug = held,
            "a listener is at its connection limit: further connections wait until one closes (limits.max_connections)"
        ),
        None => tracing::debug!(max_connections, "a listener is at its connection limit"),
    }
}

/// Accepts connections from `source` until `shutdown` turns true, at most
/// `max_connections` open at once, each served by `handle` (given the connection, its
/// peer, the shutdown signal and its [`Newcomer`] standing) in a task of its own. When
/// full, the oldest newcomer is shed; with none, accepting waits. On shutdown: stops accepting,
/// waits up to `shutdown_timeout` for open connections to end, then closes the rest.
/// When `source` ends first, the open connections run to their own end, or until a
/// shutdown drains them.
pub(crate) async fn accept_loop<I, F, Fut>(
    mut source: I,
    max_connections: usize,
    shutdown_timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
    handle: F,
) -> ShutdownReport
where
    I: Incoming,
    F: Fn(I::Conn, SocketAddr, watch::Receiver<bool>, Newcomer) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(max_connections.max(1)));
    let mut newcomers = Newcomers::new();
    let mut conns = JoinSet::new();
    let mut ended = false;
    loop {
        // A connection is taken before its permit: a full listener sheds a newcomer only
        // for a connection that really came. Were none to shed, it waits here, as it
        // would in the kernel's backlog.
        let (conn, remote) = tokio::select! {
            biased;
            () = stopped(&mut shutdown) => break,
            accepted = source.next() => match accepted {
                Some(Ok(accepted)) => accepted,
                None => {
                    ended = true;
                    break;
                }
                Some(Err(error)) => {
                    // Out of descriptors and the like: wait rather than spin (a
                    // shutdown ends the wait).
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::select! {
                        biased;
                        () = stopped(&mut shutdown) => break,
                        () = tokio::time::sleep(Duration::from_millis(50)) => continue,
                    }
                }
            },
        };
        let permit = match permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(tokio::sync::TryAcquireError::Closed) => break,
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                if newcomers.shed_oldest() {
                    // Its task ends at its next poll, and gives its permit back.
                    shedding(max_connections);
                } else {
                    // Full of established connections: this one waits, unanswered, as
                    // the ones behind it do in the kernel's backlog. Said (once a second
                    // at most), so that an operator sees why callers time out.
                    full(max_connections);
                }
                tokio::select! {
                    biased;
                    () = stopped(&mut shutdown) => break,
                    permit = permits.clone().acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => break,
                    },
                }
            }
        };
        let conn = handle(conn, remote, shutdown.clone(), newcomers.admit());
        // The permit is released when the connection ends. A combinator rather than an
        // `async move` block: the block would keep `conn` twice in the task (captured,
        // and again as the future it awaits), doubling every connection's task.
        conns.spawn(futures_util::FutureExt::map(conn, move |()| drop(permit)));
        // Reap finished connections as we go.
        while conns.try_join_next().is_some() {}
    }
    drop(source);
    if ended {
        // No more connections can come: the open ones run to their end, unless a
        // shutdown begins, which drains them as below. They see the shutdown as this
        // task does, and may end before it counts them: they are counted as they were.
        loop {
            tokio::select! {
                biased;
                () = stopped(&mut shutdown) => break,
                next = conns.join_next() => if next.is_none() { break },
            }
        }
    } else {
        while conns.try_join_next().is_some() {}
    }
    let open = conns.len();
    let mut deadline = pin!(tokio::time::sleep(shutdown_timeout));
    loop {
        tokio::select! {
            next = conns.join_next() => if next.is_none() { break },
            () = &mut deadline => break,
        }
    }
    let forced = conns.len();
    if forced > 0 {
        tracing::info!(
            forced,
            "shutdown timeout: closing the connections still open"
        );
    }
    conns.shutdown().await;
    ShutdownReport {
        open_at_shutdown: open,
        forced,
    }
}

/// Resolves once a shutdown began (or its sender is gone).
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_newcomer_still_held_is_shed_and_proven_ones_never() {
        let mut newcomers = Newcomers::new();
        let proven = newcomers.admit();
        let gone = newcomers.admit();
        let oldest = newcomers.admit();
        let newer = newcomers.admit();
        assert!(proven.proven());
        drop(gone);
        assert!(newcomers.shed_oldest());
        // Shed: it can no longer prove itself, and its wait ends at once.
        assert!(!oldest.proven());
        assert!(futures_util::FutureExt::now_or_never(oldest.shed()).is_some());
        assert!(futures_util::FutureExt::now_or_never(newer.shed()).is_none());
        assert!(newcomers.shed_oldest());
        assert!(!newcomers.shed_oldest());
        // Proving twice is fine; a proven one's wait never ends.
        assert!(proven.proven());
        assert!(futures_util::FutureExt::now_or_never(proven.shed()).is_none());
    }

    #[test]
    fn the_queue_stays_as_small_as_the_newcomers_it_holds() {
        let mut newcomers = Newcomers::new();
        // One long-lived newcomer at the front, and many connections that came and went
        // (or were established) behind it.
        let _front = newcomers.admit();
        let mut longest = 0;
        for i in 0..100_000 {
            let newcomer = newcomers.admit();
            if i % 2 == 0 {
                newcomer.proven();
            }
            longest = longest.max(newcomers.queue.len());
        }
        assert!(longest <= 2 * COMPACT_MIN + 2, "{longest}");
    }
}
