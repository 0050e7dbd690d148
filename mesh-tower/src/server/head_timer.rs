//! The HTTP/1.1 header-read timeout, counted from a request head's first byte.
//!
//! hyper bounds the reading of a request head with a timer of its own, which starts when
//! the connection begins to wait for a head. Between keep-alive requests that is at once,
//! so hyper's timer bounds the silence between requests too: an idle HTTP/1.1 connection
//! would close at `header_read_timeout` (10 s) instead of `idle_timeout` (120 s), and a
//! client reusing it at that moment would meet a closing connection. hyper also boxes and
//! registers a fresh tokio timer for every request.
//!
//! Here hyper keeps deciding *what* a head is (its parser, its 408), and this module
//! decides *when* the bound starts:
//!
//! - [`HeadTimer`] is the [`hyper::rt::Timer`] of a connection's HTTP/1.1 side. When hyper
//!   begins to wait for a head it asks for a sleep, and gets an unarmed one: pending, with
//!   no timer registered.
//! - [`Watched`] wraps the connection's stream and notes, in the connection's
//!   [`HeadClock`], that bytes arrived.
//! - hyper polls the sleep only when a head is incomplete. The first poll after bytes
//!   arrived arms it: `header_read_timeout` from then, which is within the same wake-up as
//!   the read that brought the head's first bytes. A head that arrives whole (the usual
//!   case) never arms it: no clock read, no timer registration.
//!
//! The silence before a request is left to the connection's own checks: before the first
//! request, `header_read_timeout` (a new connection must begin promptly); between requests,
//! `idle_timeout`. One case counts from later than the first byte: bytes of the next head
//! that hyper read while the previous response was still being written (pipelining) are
//! already buffered when the head is awaited, so the bound starts at the next read, or the
//! idle timeout closes the connection.
//!
//! The watched stream also tells the connection's check how many bytes moved either way,
//! and whether the last write (or flush: a TLS stream meets the full socket there) waits
//! on the client: with what the response bodies tell, that is how the check sees a client
//! that stopped reading (see `conn`'s stall check and `ServerLimits::idle_timeout`).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What a connection's stream and its HTTP/1.1 timer share.
#[derive(Debug)]
pub(super) struct HeadClock {
    /// Bytes arrived since hyper began to wait for the current head.
    read: AtomicBool,
    /// Bytes moved either way, ever: the connection's check tells progress by it. Only
    /// the connection's task writes it (a load and a store, not a read-modify-write).
    moved: AtomicU64,
    /// The last write found the stream full: the client is not reading.
    write_blocked: AtomicBool,
    /// The bound on reading a head, from its first byte.
    timeout: Duration,
}

impl HeadClock {
    /// A connection's clock, bounding heads by `timeout`.
    pub(super) fn new(timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            read: AtomicBool::new(false),
            moved: AtomicU64::new(0),
            write_blocked: AtomicBool::new(false),
            timeout,
        })
    }

    /// Bytes moved either way since the connection began.
    pub(super) fn moved(&self) -> u64 {
        self.moved.load(Ordering::Relaxed)
    }

    fn add_moved(&self, n: usize) {
        let total = self.moved.load(Ordering::Relaxed).wrapping_add(n as u64);
        self.moved.store(total, Ordering::Relaxed);
    }

    /// Whether the last write waits for the client to read.
    pub(super) fn write_blocked(&self) -> bool {
        self.write_blocked.load(Ordering::Relaxed)
    }

    /// A flush (or shutdown) came back: `pending` when it waits on the client. hyper
    /// flushes only once its writes went through, so a completed flush means nothing waits.
    fn flushed(&self, pending: bool) {
        self.write_blocked.store(pending, Ordering::Relaxed);
    }

    fn wrote(&self, written: &Poll<io::Result<usize>>) {
        match written {
            Poll::Ready(Ok(n)) => {
                self.add_moved(*n);
                self.write_blocked.store(false, Ordering::Relaxed);
            }
            Poll::Ready(Err(_)) => self.write_blocked.store(false, Ordering::Relaxed),
            Poll::Pending => self.write_blocked.store(true, Ordering::Relaxed),
        }
    }
}

/// A connection's stream, noting arriving bytes, and bytes moved either way, on its
/// [`HeadClock`].
#[derive(Debug)]
pub(super) struct Watched<IO> {
    io: IO,
    clock: Arc<HeadClock>,
}

impl<IO> Watched<IO> {
    /// `io`, watched for `clock`.
    pub(super) fn new(io: IO, clock: Arc<HeadClock>) -> Self {
        Self { io, clock }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Watched<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let result = Pin::new(&mut this.io).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.clock.read.store(true, Ordering::Relaxed);
            this.clock.add_moved(n);
        }
        result
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Watched<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write(cx, buf);
        self.clock.wrote(&written);
        written
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.clock.wrote(&written);
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    // A TLS stream takes writes into its own buffer and meets a full socket only when
    // flushing (or sending its close_notify): a pending flush is a write waiting on the
    // client too.
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let flushed = Pin::new(&mut self.io).poll_flush(cx);
        self.clock.flushed(flushed.is_pending());
        flushed
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let shut = Pin::new(&mut self.io).poll_shutdown(cx);
        self.clock.flushed(shut.is_pending());
        shut
    }
}

/// The [`hyper::rt::Timer`] of a connection's HTTP/1.1 side: its sleeps are the header-read
/// bound, armed by the head's first byte.
///
/// hyper's HTTP/1.1 server uses its timer for the header-read timeout and nothing else; a
/// plain [`sleep`](hyper::rt::Timer::sleep) is still an ordinary tokio sleep, in case a
/// later hyper uses it for more.
#[derive(Clone, Debug)]
pub(super) struct HeadTimer {
    clock: Arc<HeadClock>,
}

impl HeadTimer {
    /// The timer of the connection `clock` belongs to.
    pub(super) fn new(clock: Arc<HeadClock>) -> Self {
        Self { clock }
    }

    fn head_sleep(&self) -> HeadSleep {
        // A new head is awaited: only bytes from now on begin it.
        self.clock.read.store(false, Ordering::Relaxed);
        HeadSleep {
            clock: self.clock.clone(),
            armed: None,
        }
    }
}

// hyper's trait speaks of std's `Instant`; its deadlines are not used here.
#[allow(clippy::disallowed_types)]
impl hyper::rt::Timer for HeadTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(Plain {
            sleep: tokio::time::sleep(duration),
        })
    }

    /// hyper asks for this when it begins to wait for a head, with a deadline counted from
    /// then; the sleep returned counts from the head's first byte instead.
    fn sleep_until(&self, _deadline: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(self.head_sleep())
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, _deadline: std::time::Instant) {
        match sleep.as_mut().downcast_mut_pin::<HeadSleep>() {
            Some(mut head) => head.set(self.head_sleep()),
            None => *sleep = Box::pin(self.head_sleep()),
        }
    }
}

pin_project_lite::pin_project! {
    /// A tokio sleep as hyper wants it.
    struct Plain {
        #[pin]
        sleep: tokio::time::Sleep,
    }
}

impl Future for Plain {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.project().sleep.poll(cx)
    }
}

impl hyper::rt::Sleep for Plain {}

/// The bound on one head: pending and unregistered until the head's first bytes arrive,
/// then `timeout` from that moment.
struct HeadSleep {
    clock: Arc<HeadClock>,
    /// Boxed: only an incomplete head needs it.
    armed: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Future for HeadSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.armed.is_none() {
            if !self.clock.read.load(Ordering::Relaxed) {
                // Silence, which the connection's idle check bounds. hyper polls this only
                // after its read of the stream came back pending, so the stream's waker
                // brings it back when bytes arrive.
                return Poll::Pending;
            }
            let timeout = self.clock.timeout;
            self.armed = Some(Box::pin(tokio::time::sleep(timeout)));
        }
        match self.armed.as_mut() {
            Some(sleep) => sleep.as_mut().poll(cx),
            None => Poll::Pending,
        }
    }
}

impl hyper::rt::Sleep for HeadSleep {}
