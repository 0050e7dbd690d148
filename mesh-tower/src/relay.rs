//! Relaying bytes both ways between two connections, with an idle timeout and live byte
//! counts: what opaque TCP ([`crate::opaque`]) and switched HTTP connections
//! ([`crate::upgrade`]: WebSocket, CONNECT) do once nothing on them is HTTP any more.
//!
//! [`Relay::run`] moves bytes between a *client* connection (the one accepted) and an
//! *upstream* one until both directions have ended.
//!
//! # The algorithm
//!
//! Each direction reads up to [`BUFFER_SIZE`] at a time (16 KiB: a TLS record's largest
//! plaintext, and the size nginx's stream proxy and HAProxy use; against 8 KiB it halves
//! the system calls of a bulk transfer) into a buffer on the stack, and writes what it
//! read to the other side at once. Only what the other side does not take then is copied
//! to a heap buffer of the direction's, written first when that side is ready again and
//! freed once the source has nothing more for now: a relay that keeps up, or is quiet,
//! holds no buffer (one through `tokio::io::copy_bidirectional` holds 16 KiB for its
//! life). When its source has nothing more for now a direction flushes the other side, so
//! that a TLS writer sends what it holds. Both directions are polled by one task, taking
//! turns at going first, so that one whose source and sink never wait cannot use up the
//! task's budget of Tokio operations and starve the other.
//!
//! - **Half-close passes through.** When a source's reads end (a TCP FIN, a TLS
//!   `close_notify`), what the other side has not taken is written, it is flushed and
//!   its writing half shut down the same way, and the opposite direction goes on: a client
//!   may finish sending and still read the whole answer.
//! - **End.** The relay ends when both directions have ended; when either side fails (a
//!   reset, a TLS error such as a stream cut without `close_notify`, a write that takes
//!   no byte), with [`RelayError::Io`] naming the side, and the mesh's opaque and
//!   transparent relays then reset the other side's TCP connection, so that a failure
//!   reaches the other peer as one, not as a clean end (a truncated transfer would
//!   otherwise look complete); or when no byte has been read or written either way for
//!   the idle timeout, with [`RelayError::Idle`], both sides then closed cleanly (a TLS
//!   side with its `close_notify`, so that a peer proxy reads an end, not a
//!   truncation). The byte counts so far come with either error.
//! - **Idle timeout** (default [`DEFAULT_IDLE_TIMEOUT`], 1 hour, as Envoy's TCP proxy;
//!   nginx's stream proxy uses 10 minutes; `None` for none). It bounds the life of a
//!   connection whose peer vanished without a FIN or a reset, which would otherwise hold
//!   its place (and two sockets) forever. A write waiting on a peer that stopped reading
//!   moves no byte, so it counts as idle too. The byte path only sets a flag: a timer
//!   looks at it every eighth of the timeout, and the relay ends at the eighth look in a
//!   row that finds no byte moved — between 1 and 1.125 timeouts after the last byte,
//!   without a clock read or a timer change per read or write.
//! - **Counting** ([`Relay::metrics`]): [`TunnelMetrics`] counts relays open and opened
//!   per listener, and their bytes per direction as they are written, so a long-lived
//!   connection's traffic shows while it lasts, and bytes moved before a failure count
//!   too.
//!
//! ```
//! use mesh_tower::relay::Relay;
//! use std::time::Duration;
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let (mut client, mut client_side) = tokio::io::duplex(64);
//! let (mut upstream_side, mut upstream) = tokio::io::duplex(64);
//! let relay = tokio::spawn(async move {
//!     Relay::new()
//!         .idle_timeout(Some(Duration::from_secs(300)))
//!         .run(&mut client_side, &mut upstream_side)
//!         .await
//! });
//! client.write_all(b"ping").await?;
//! client.shutdown().await?; // half-close: the answer still comes back
//! let mut got = Vec::new();
//! upstream.read_to_end(&mut got).await?;
//! assert_eq!(got, b"ping");
//! upstream.write_all(b"pong").await?;
//! drop(upstream);
//! let mut answer = Vec::new();
//! client.read_to_end(&mut answer).await?;
//! assert_eq!(answer, b"pong");
//! let relayed = relay.await??;
//! assert_eq!((relayed.client_to_upstream, relayed.upstream_to_client), (4, 4));
//! # Ok(()) }
//! ```

use std::fmt;
use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The default idle timeout: 1 hour.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// The most a direction reads at a time (into a buffer on the stack): 16 KiB.
pub const BUFFER_SIZE: usize = 16 * 1024;

/// How long a relay ended by its idle timeout waits for its two sides to take their
/// clean close.
const IDLE_CLOSE: Duration = Duration::from_secs(1);

/// How relays run: their idle timeout and where they are counted. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Relay {
    idle_timeout: Option<Duration>,
    metrics: Option<ListenerTunnels>,
}

impl Default for Relay {
    fn default() -> Self {
        Self::new()
    }
}

impl Relay {
    /// Relays with the default idle timeout, uncounted.
    pub fn new() -> Self {
        Self {
            idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
            metrics: None,
        }
    }

    /// Ends a relay after this long without a byte either way (`None`: never).
    pub fn idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// The idle timeout.
    pub fn idle_timeout_value(&self) -> Option<Duration> {
        self.idle_timeout
    }

    /// Counts relays and their bytes in `metrics` (default: not counted).
    pub fn metrics(mut self, metrics: ListenerTunnels) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Relays between `client` and `upstream` until both directions have ended, either
    /// side fails, or the idle timeout passes; see the [module docs](self).
    pub async fn run<C, U>(&self, client: &mut C, upstream: &mut U) -> Result<Relayed, RelayError>
    where
        C: AsyncRead + AsyncWrite + Unpin + ?Sized,
        U: AsyncRead + AsyncWrite + Unpin + ?Sized,
    {
        let _open = self.metrics.as_ref().map(OpenTunnel::new);
        let series = self.metrics.as_ref().map(|m| &*m.0);
        let mut up = Direction::new(
            Side::Client,
            Side::Upstream,
            series.map(|s| &s.client_to_upstream),
        );
        let mut down = Direction::new(
            Side::Upstream,
            Side::Client,
            series.map(|s| &s.upstream_to_client),
        );
        let mut idle = self.idle_timeout.map(IdleCheck::new);
        let relayed = |up: &Direction<'_>, down: &Direction<'_>| Relayed {
            client_to_upstream: up.written.bytes,
            upstream_to_client: down.written.bytes,
        };
        // Which direction goes first, swapped on every poll: a direction whose source and
        // sink are always ready may use up the task's budget of Tokio operations, and the
        // other would never get its turn if it always came second.
        let mut up_first = true;
        let outcome = poll_fn(|cx| {
            let mut progress = false;
            let (done_up, done_down) = if up_first {
                let done_up = up.poll(cx, &mut *client, &mut *upstream, &mut progress);
                (
                    done_up,
                    down.poll(cx, &mut *upstream, &mut *client, &mut progress),
                )
            } else {
                let done_down = down.poll(cx, &mut *upstream, &mut *client, &mut progress);
                (
                    up.poll(cx, &mut *client, &mut *upstream, &mut progress),
                    done_down,
                )
            };
            up_first = !up_first;
            match (done_up, done_down) {
                (Poll::Ready(Err((side, source))), _) | (_, Poll::Ready(Err((side, source)))) => {
                    return Poll::Ready(Err(RelayError::Io {
                        side,
                        source,
                        relayed: relayed(&up, &down),
                    }));
                }
                (Poll::Ready(Ok(())), Poll::Ready(Ok(()))) => {
                    return Poll::Ready(Ok(relayed(&up, &down)));
                }
                _ => {}
            }
            if let Some(check) = &mut idle
                && check.poll_idle(cx, progress)
            {
                return Poll::Ready(Err(RelayError::Idle {
                    timeout: check.timeout,
                    relayed: relayed(&up, &down),
                }));
            }
            Poll::Pending
        })
        .await;
        if let Err(RelayError::Idle { .. }) = &outcome {
            // Our decision, not a failure: both sides are closed cleanly, as far as they
            // take it within a moment (a peer that stopped reading may not).
            let close = async {
                let _ = tokio::io::AsyncWriteExt::shutdown(client).await;
                let _ = tokio::io::AsyncWriteExt::shutdown(upstream).await;
            };
            let _ = tokio::time::timeout(IDLE_CLOSE, close).await;
        }
        outcome
    }
}

/// How many checks a quiet relay passes before it is idle: it is looked at every eighth
/// of the idle timeout.
const IDLE_CHECKS: u32 = 8;

/// The idle timeout's clock: a timer that ticks every eighth of the timeout, and whether
/// a byte moved since the last tick. The byte path only sets a flag; the relay ends at the
/// eighth tick in a row without one, between 1 and 1.125 timeouts after its last byte.
struct IdleCheck {
    timeout: Duration,
    step: Duration,
    tick: Pin<Box<tokio::time::Sleep>>,
    moved: bool,
    quiet: u32,
    /// The timer has been polled (it holds the task's waker).
    armed: bool,
}

impl IdleCheck {
    fn new(timeout: Duration) -> Self {
        let step = (timeout / IDLE_CHECKS).max(Duration::from_millis(1));
        Self {
            timeout,
            step,
            tick: Box::pin(tokio::time::sleep(step)),
            moved: false,
            quiet: 0,
            armed: false,
        }
    }

    /// Whether the relay is idle now (never when this poll `moved` a byte); otherwise the
    /// next tick wakes the task. A task polled late counts one tick, not every one it
    /// missed: a stalled runtime delays the timeout rather than ending a relay early.
    ///
    /// A poll that moved bytes leaves an armed timer alone: it holds this task's waker
    /// from an earlier poll, and looking at it on every wake of a busy relay would cost
    /// more than the rest of the relay's own work.
    fn poll_idle(&mut self, cx: &mut Context<'_>, moved: bool) -> bool {
        self.moved |= moved;
        if moved && self.armed && !self.tick.is_elapsed() {
            return false;
        }
        while self.tick.as_mut().poll(cx).is_ready() {
            if std::mem::take(&mut self.moved) {
                self.quiet = 0;
            } else {
                self.quiet += 1;
                if self.quiet >= IDLE_CHECKS {
                    return true;
                }
            }
            let mut next = self.tick.deadline() + self.step;
            let now = tokio::time::Instant::now();
            if next <= now {
                next = now + self.step;
            }
            self.tick.as_mut().reset(next);
        }
        self.armed = true;
        false
    }
}

/// The bytes a relay moved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Relayed {
    /// From the client connection to the upstream one.
    pub client_to_upstream: u64,
    /// From the upstream connection to the client one.
    pub upstream_to_client: u64,
}

/// One of a relay's two connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The connection accepted (the local application's, or the peer proxy's).
    Client,
    /// The connection dialled (the target's, or the endpoint's).
    Upstream,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Client => "the client's connection",
            Self::Upstream => "the upstream connection",
        })
    }
}

/// Why a relay ended before both directions did.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// No byte was read or written either way for the idle timeout.
    #[error("no byte moved either way for {timeout:?}: closed")]
    Idle {
        /// The idle timeout.
        timeout: Duration,
        /// The bytes moved before.
        relayed: Relayed,
    },
    /// Reading or writing one side failed.
    #[error("{side}: {source}")]
    Io {
        /// The side that failed.
        side: Side,
        /// The failure.
        #[source]
        source: io::Error,
        /// The bytes moved before.
        relayed: Relayed,
    },
}

impl RelayError {
    /// The bytes moved before the relay ended.
    pub fn relayed(&self) -> Relayed {
        match self {
            Self::Idle { relayed, .. } | Self::Io { relayed, .. } => *relayed,
        }
    }

    /// The side that failed; `None` for an idle timeout.
    pub fn side(&self) -> Option<Side> {
        match self {
            Self::Io { side, .. } => Some(*side),
            Self::Idle { .. } => None,
        }
    }

    /// Makes the side that did not fail end with a reset when it is dropped, so that its
    /// peer learns of the failure rather than read a clean end: an upstream's reset, or a
    /// TLS stream cut without `close_notify` (a truncation), must not reach the other
    /// application as a complete transfer. An idle timeout ends both sides cleanly.
    #[cfg(feature = "opaque")]
    pub(crate) fn pass_on(&self, client: &impl Abort, upstream: &impl Abort) {
        match self {
            Self::Io {
                side: Side::Client, ..
            } => upstream.abort_on_drop(),
            Self::Io {
                side: Side::Upstream,
                ..
            } => client.abort_on_drop(),
            Self::Idle { .. } => {}
        }
    }
}

/// A connection that can be made to end with a TCP reset (`SO_LINGER` 0) when dropped;
/// see [`RelayError::pass_on`]. A connection that cannot (an in-memory pipe, a
/// [`Dialer`](crate::connect::Dialer)'s) ends cleanly.
#[cfg(feature = "opaque")]
pub(crate) trait Abort {
    fn abort_on_drop(&self);
}

#[cfg(feature = "opaque")]
impl Abort for tokio::net::TcpStream {
    fn abort_on_drop(&self) {
        if let Err(error) = self.set_zero_linger() {
            tracing::debug!(%error, "could not set SO_LINGER 0: the connection closes cleanly");
        }
    }
}

#[cfg(feature = "opaque")]
impl<IO: Abort> Abort for tokio_rustls::server::TlsStream<IO> {
    fn abort_on_drop(&self) {
        self.get_ref().0.abort_on_drop();
    }
}

#[cfg(feature = "opaque")]
impl<IO: Abort> Abort for tokio_rustls::client::TlsStream<IO> {
    fn abort_on_drop(&self) {
        self.get_ref().0.abort_on_drop();
    }
}

#[cfg(feature = "opaque")]
impl<T: Abort + ?Sized> Abort for Box<T> {
    fn abort_on_drop(&self) {
        (**self).abort_on_drop();
    }
}

/// One direction of a relay: from a source to a sink.
struct Direction<'m> {
    /// What the sink has not taken yet (`spill[pos..end]`); allocated only while the sink
    /// is behind, so a relay that keeps up, or is quiet, holds no buffer.
    spill: Option<Box<[u8]>>,
    pos: usize,
    end: usize,
    /// The source's reads ended.
    read_done: bool,
    state: State,
    written: Written<'m>,
    from: Side,
    to: Side,
}

/// What a direction wrote.
struct Written<'m> {
    bytes: u64,
    /// Written since the last flush.
    unflushed: bool,
    counter: Option<&'m Counter>,
}

impl Written<'_> {
    /// Writes some of `buf` (not empty) to `sink`, the side `to`: how much (never 0),
    /// counted. A sink that takes no byte fails with `WriteZero`.
    fn write<W>(
        &mut self,
        to: Side,
        cx: &mut Context<'_>,
        sink: &mut W,
        buf: &[u8],
        progress: &mut bool,
    ) -> Poll<Result<usize, Failed>>
    where
        W: AsyncWrite + Unpin + ?Sized,
    {
        let n = ready!(Pin::new(sink).poll_write(cx, buf)).map_err(|e| (to, e))?;
        if n == 0 {
            let e = io::Error::new(io::ErrorKind::WriteZero, "wrote no byte");
            return Poll::Ready(Err((to, e)));
        }
        self.bytes += n as u64;
        self.unflushed = true;
        *progress = true;
        if let Some(counter) = self.counter {
            counter.inc_by(n as u64);
        }
        Poll::Ready(Ok(n))
    }
}

#[derive(Clone, Copy)]
enum State {
    Copying,
    ShuttingDown,
    Done,
}

type Failed = (Side, io::Error);

impl<'m> Direction<'m> {
    fn new(from: Side, to: Side, counter: Option<&'m Counter>) -> Self {
        Self {
            spill: None,
            pos: 0,
            end: 0,
            read_done: false,
            state: State::Copying,
            written: Written {
                bytes: 0,
                unflushed: false,
                counter,
            },
            from,
            to,
        }
    }

    /// Moves what it can; ready when this direction has ended (its sink shut down).
    /// `progress` is set when a byte was read or written.
    ///
    /// Reads go to a buffer on the stack and are written from there at once; only what
    /// the sink does not take is copied to the spill buffer, which is written first on
    /// later polls and freed once the source has nothing more for now.
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        source: &mut R,
        sink: &mut W,
        progress: &mut bool,
    ) -> Poll<Result<(), Failed>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        let mut stack = [MaybeUninit::<u8>::uninit(); BUFFER_SIZE];
        loop {
            match self.state {
                State::Done => return Poll::Ready(Ok(())),
                State::ShuttingDown => {
                    ready!(Pin::new(&mut *sink).poll_shutdown(cx)).map_err(|e| (self.to, e))?;
                    self.state = State::Done;
                }
                State::Copying => {
                    // What the sink left last time goes first.
                    if let Some(spill) = &self.spill {
                        while self.pos < self.end {
                            let buf = &spill[self.pos..self.end];
                            self.pos +=
                                ready!(self.written.write(self.to, cx, sink, buf, progress))?;
                        }
                    }
                    if self.read_done {
                        ready!(Pin::new(&mut *sink).poll_flush(cx)).map_err(|e| (self.to, e))?;
                        self.written.unflushed = false;
                        self.spill = None;
                        self.state = State::ShuttingDown;
                        continue;
                    }
                    let mut read = ReadBuf::uninit(&mut stack);
                    match Pin::new(&mut *source).poll_read(cx, &mut read) {
                        Poll::Pending => {
                            // Nothing more for now: the spill buffer goes, and what was
                            // written goes out.
                            self.spill = None;
                            if self.written.unflushed {
                                ready!(Pin::new(&mut *sink).poll_flush(cx))
                                    .map_err(|e| (self.to, e))?;
                                self.written.unflushed = false;
                            }
                            return Poll::Pending;
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Err((self.from, e))),
                        Poll::Ready(Ok(())) if read.filled().is_empty() => {
                            self.read_done = true;
                        }
                        Poll::Ready(Ok(())) => {
                            *progress = true;
                            let data = read.filled();
                            let mut at = 0;
                            while at < data.len() {
                                match self.written.write(self.to, cx, sink, &data[at..], progress) {
                                    Poll::Ready(n) => at += n?,
                                    Poll::Pending => {
                                        // The sink is behind: keep the rest until it is
                                        // ready (its waker is set).
                                        let rest = &data[at..];
                                        let spill = self.spill.get_or_insert_with(|| {
                                            vec![0; BUFFER_SIZE].into_boxed_slice()
                                        });
                                        spill[..rest.len()].copy_from_slice(rest);
                                        self.pos = 0;
                                        self.end = rest.len();
                                        return Poll::Pending;
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Prometheus metrics of relays — tunnels of switched HTTP connections ([`crate::upgrade`])
/// and opaque TCP connections ([`crate::opaque`]) — by listener:
///
/// - `mesh_tunnels_open{listener}`: relays open now;
/// - `mesh_tunnels_total{listener}`: relays opened;
/// - `mesh_tunnel_bytes_total{listener, direction}`: bytes carried, `direction` being
///   `client_to_upstream` or `upstream_to_client`, counted as they are written.
#[derive(Clone, Debug, Default)]
pub struct TunnelMetrics {
    open: Family<ListenerLabel, Gauge>,
    opened: Family<ListenerLabel, Counter>,
    bytes: Family<BytesLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabel {
    listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    listener: String,
    direction: &'static str,
}

impl TunnelMetrics {
    /// Registers the families in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "mesh_tunnels_open",
            "Tunnels open (upgraded connections spliced, opaque TCP connections relayed), by listener",
            metrics.open.clone(),
        );
        registry.register(
            "mesh_tunnels",
            "Tunnels opened, by listener",
            metrics.opened.clone(),
        );
        registry.register(
            "mesh_tunnel_bytes",
            "Bytes carried by tunnels, by listener and direction, counted as they are written",
            metrics.bytes.clone(),
        );
        metrics
    }

    /// The series of listener `name`.
    pub fn listener(&self, name: &str) -> ListenerTunnels {
        let listener = || ListenerLabel {
            listener: name.to_owned(),
        };
        let bytes = |direction| {
            self.bytes
                .get_or_create(&BytesLabels {
                    listener: name.to_owned(),
                    direction,
                })
                .clone()
        };
        ListenerTunnels(Arc::new(Series {
            open: self.open.get_or_create(&listener()).clone(),
            opened: self.opened.get_or_create(&listener()).clone(),
            client_to_upstream: bytes("client_to_upstream"),
            upstream_to_client: bytes("upstream_to_client"),
        }))
    }
}

/// One listener's relay series ([`TunnelMetrics::listener`]). Cheap to clone.
#[derive(Clone, Debug)]
pub struct ListenerTunnels(Arc<Series>);

#[derive(Debug)]
struct Series {
    open: Gauge,
    opened: Counter,
    client_to_upstream: Counter,
    upstream_to_client: Counter,
}

/// A relay counted open in its listener's series until dropped.
struct OpenTunnel<'a>(&'a ListenerTunnels);

impl<'a> OpenTunnel<'a> {
    fn new(metrics: &'a ListenerTunnels) -> Self {
        metrics.0.opened.inc();
        metrics.0.open.inc();
        Self(metrics)
    }
}

impl Drop for OpenTunnel<'_> {
    fn drop(&mut self) {
        self.0.0.open.dec();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};
    use tokio::time::Instant;

    use super::*;

    /// A relay between two in-memory pipes: (client end, upstream end, the relay).
    fn relay(
        relay: Relay,
    ) -> (
        DuplexStream,
        DuplexStream,
        tokio::task::JoinHandle<Result<Relayed, RelayError>>,
    ) {
        let (client, mut client_side) = duplex(1024);
        let (mut upstream_side, upstream) = duplex(1024);
        let task =
            tokio::spawn(async move { relay.run(&mut client_side, &mut upstream_side).await });
        (client, upstream, task)
    }

    fn encoded(metrics: &TunnelMetrics) -> String {
        let mut registry = Registry::default();
        registry.register("t", "t", metrics.open.clone());
        registry.register("t_opened", "t", metrics.opened.clone());
        registry.register("t_bytes", "t", metrics.bytes.clone());
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        out
    }

    #[tokio::test]
    async fn bytes_cross_both_ways_larger_than_the_buffers() {
        let (mut client, mut upstream, task) = relay(Relay::new());
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        upstream.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, data);
        // The client half-closed and still gets the upstream's answer.
        upstream.write_all(&got[..70_000]).await.unwrap();
        drop(upstream);
        assert_eq!(writer.await.unwrap(), &data[..70_000]);
        let relayed = task.await.unwrap().unwrap();
        assert_eq!(relayed.client_to_upstream, 200_000);
        assert_eq!(relayed.upstream_to_client, 70_000);
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_relay_ends_at_its_idle_timeout() {
        let idle = Duration::from_secs(60);
        let (mut client, mut upstream, task) = relay(Relay::new().idle_timeout(Some(idle)));
        let started = Instant::now();
        // A byte every 50 s keeps it open past the timeout, whichever way it goes.
        for round in 0..4u8 {
            tokio::time::sleep(Duration::from_secs(50)).await;
            if round % 2 == 0 {
                client.write_all(&[round]).await.unwrap();
                assert_eq!(upstream.read_u8().await.unwrap(), round);
            } else {
                upstream.write_all(&[round]).await.unwrap();
                assert_eq!(client.read_u8().await.unwrap(), round);
            }
        }
        let last = Instant::now();
        assert!(!task.is_finished());
        let err = task.await.unwrap().unwrap_err();
        // Ended one timeout after the last byte (within an eighth), not one after the
        // start.
        let quiet = Instant::now() - last;
        assert!(quiet >= idle && quiet <= idle + idle / 8, "{quiet:?}");
        assert!(last - started >= Duration::from_secs(200));
        assert!(matches!(err, RelayError::Idle { timeout, .. } if timeout == idle));
        assert_eq!(
            err.relayed(),
            Relayed {
                client_to_upstream: 2,
                upstream_to_client: 2
            }
        );
        assert_eq!(err.to_string(), "no byte moved either way for 60s: closed");
        // Both connections were closed with it.
        assert_eq!(client.read(&mut [0; 1]).await.unwrap(), 0);
        assert_eq!(upstream.read(&mut [0; 1]).await.unwrap(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stops_reading_counts_as_idle() {
        let idle = Duration::from_secs(10);
        let (mut client, upstream, task) = relay(Relay::new().idle_timeout(Some(idle)));
        // The upstream reads nothing: the pipes fill, then nothing moves.
        let filler = tokio::spawn(async move {
            let _ = client.write_all(&vec![7; 1 << 20]).await;
            client
        });
        let err = task.await.unwrap().unwrap_err();
        assert!(matches!(err, RelayError::Idle { .. }), "{err}");
        // The relay held what the pipes and its buffer hold, no more.
        let moved = err.relayed().client_to_upstream;
        assert!((1024..1 << 20).contains(&moved), "{moved}");
        drop(upstream);
        drop(filler.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn without_an_idle_timeout_a_quiet_relay_stays() {
        let (mut client, mut upstream, task) = relay(Relay::new().idle_timeout(None));
        tokio::time::sleep(DEFAULT_IDLE_TIMEOUT * 3).await;
        assert!(!task.is_finished());
        client.write_all(b"x").await.unwrap();
        assert_eq!(upstream.read_u8().await.unwrap(), b'x');
        drop((client, upstream));
        assert_eq!(
            task.await.unwrap().unwrap(),
            Relayed {
                client_to_upstream: 1,
                upstream_to_client: 0
            }
        );
    }

    #[tokio::test]
    async fn bytes_are_counted_while_the_relay_lasts() {
        let metrics = TunnelMetrics::default();
        let (mut client, mut upstream, task) = relay(Relay::new().metrics(metrics.listener("db")));
        client.write_all(&[1; 3000]).await.unwrap();
        let mut got = vec![0; 3000];
        upstream.read_exact(&mut got).await.unwrap();
        upstream.write_all(&[2; 10]).await.unwrap();
        client.read_exact(&mut [0; 10]).await.unwrap();
        // Open, and its bytes already counted.
        let text = encoded(&metrics);
        assert!(text.contains("t{listener=\"db\"} 1\n"), "{text}");
        assert!(
            text.contains("t_opened_total{listener=\"db\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("t_bytes_total{listener=\"db\",direction=\"client_to_upstream\"} 3000\n"),
            "{text}"
        );
        assert!(
            text.contains("t_bytes_total{listener=\"db\",direction=\"upstream_to_client\"} 10\n"),
            "{text}"
        );
        drop((client, upstream));
        task.await.unwrap().unwrap();
        assert!(encoded(&metrics).contains("t{listener=\"db\"} 0\n"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_poll_that_comes_late_does_not_end_a_relay_that_just_moved_bytes() {
        let idle = Duration::from_secs(8);
        let (mut client, mut upstream, task) = relay(Relay::new().idle_timeout(Some(idle)));
        // The relay runs...
        client.write_all(b"a").await.unwrap();
        assert_eq!(upstream.read_u8().await.unwrap(), b'a');
        // ... then the runtime stalls for longer than the timeout (no task runs
        // meanwhile), right after a byte was written to the relay.
        client.write_all(b"x").await.unwrap();
        tokio::time::advance(idle * 2).await;
        assert_eq!(upstream.read_u8().await.unwrap(), b'x');
        tokio::task::yield_now().await;
        assert!(!task.is_finished(), "{:?}", task.await);
        // It still ends once quiet for the timeout.
        let err = task.await.unwrap().unwrap_err();
        assert!(matches!(err, RelayError::Idle { .. }), "{err}");
        drop(client);
    }

    #[tokio::test(start_paused = true)]
    async fn a_relay_that_moves_bytes_on_its_first_poll_still_times_out() {
        let idle = Duration::from_secs(5);
        let (mut client, mut client_side) = duplex(1024);
        let (mut upstream_side, mut upstream) = duplex(1024);
        // Bytes wait before the relay's first poll, which therefore moves some.
        client.write_all(b"early").await.unwrap();
        let task = tokio::spawn(async move {
            Relay::new()
                .idle_timeout(Some(idle))
                .run(&mut client_side, &mut upstream_side)
                .await
        });
        let mut got = [0; 5];
        upstream.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"early");
        let err = task.await.unwrap().unwrap_err();
        assert!(matches!(err, RelayError::Idle { .. }), "{err}");
        drop(client);
    }

    /// A stream that is always ready: reads give ones, writes take everything.
    struct Flood;

    impl AsyncRead for Flood {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            // Counted against the task's budget, as Tokio's own streams are.
            let coop = ready!(tokio::task::coop::poll_proceed(cx));
            coop.made_progress();
            let n = buf.remaining().min(1024);
            buf.put_slice(&[1; 1024][..n]);
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Flood {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let coop = ready!(tokio::task::coop::poll_proceed(cx));
            coop.made_progress();
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    // When one direction always went first, this test hung (the upstream's bytes never
    // moved, and nextest ended it as slow).
    #[tokio::test]
    async fn a_direction_that_never_waits_does_not_shut_out_the_other() {
        // The client floods the upstream without end; the upstream's two bytes still come
        // back to the client.
        let (mut peer, upstream_side) = duplex(1);
        let (back_tx, mut back) = tokio::sync::mpsc::unbounded_channel();
        let mut client = tokio::io::join(Flood, Collect(back_tx));
        let mut upstream = tokio::io::join(upstream_side, Flood);
        let task = tokio::spawn(async move {
            Relay::new()
                .idle_timeout(None)
                .run(&mut client, &mut upstream)
                .await
        });
        peer.write_all(b"xy").await.unwrap();
        let mut got = Vec::new();
        while got.len() < 2 {
            let chunk = tokio::time::timeout(Duration::from_secs(10), back.recv())
                .await
                .expect("the upstream's bytes got through");
            got.extend(chunk.unwrap());
        }
        assert_eq!(got, b"xy");
        task.abort();
    }

    /// A sink sending what it is given to a channel.
    struct Collect(tokio::sync::mpsc::UnboundedSender<Vec<u8>>);

    impl AsyncWrite for Collect {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let _ = self.0.send(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// A stream that fails every read and write, to see the failing side named.
    struct Broken;

    impl AsyncRead for Broken {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
        }
    }

    impl AsyncWrite for Broken {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_failure_names_its_side_and_keeps_the_counts() {
        let (mut client, mut client_side) = duplex(1024);
        client.write_all(b"abc").await.unwrap();
        let err = Relay::new()
            .run(&mut client_side, &mut Broken)
            .await
            .unwrap_err();
        match &err {
            RelayError::Io { side, source, .. } => {
                // Either the upstream's read (reset) or its write (broken pipe) failed
                // first; both are the upstream's.
                assert_eq!(*side, Side::Upstream, "{err}");
                assert!(
                    matches!(
                        source.kind(),
                        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                    ),
                    "{err}"
                );
            }
            other => panic!("{other}"),
        }
        assert!(
            err.to_string().starts_with("the upstream connection: "),
            "{err}"
        );
        // The client's side failing is named as the client's.
        let (_peer, mut upstream_side) = duplex(1024);
        let err = Relay::new()
            .run(&mut Broken, &mut upstream_side)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                RelayError::Io {
                    side: Side::Client,
                    ..
                }
            ),
            "{err}"
        );
    }
}
