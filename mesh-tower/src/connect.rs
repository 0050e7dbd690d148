//! Per-endpoint connections on hyper 1.
//!
//! An [`EndpointClient`] sends requests to one endpoint over connections it manages
//! itself on hyper's connection API. Every connection dials that endpoint's address —
//! with a connect timeout (default 1 s), then, for mTLS, a SPIFFE handshake that requires
//! the endpoint's expected identity:
//!
//! - [`Protocol::Http2`](mesh_core::config::Protocol) (and `Grpc`): one multiplexed HTTP/2
//!   connection, dialled by one request while the others wait for it, and re-dialled when
//!   it closes. Its server's stream limit (`SETTINGS_MAX_CONCURRENT_STREAMS`, read from
//!   its first `SETTINGS` as the bytes pass; until then the limit the endpoint's other
//!   connections learned, or 100) is kept: a request that finds every connection at its
//!   limit dials another (at most `max_connections`; past them, and when that dial
//!   fails, it waits in h2's queue on the least busy one), rather than waiting behind
//!   the open streams, forever behind long-lived ones (gRPC watches). A stream counts
//!   from its request until its response's end (a request body still streaming after
//!   that is not counted: h2 may then queue the next stream). Further connections close
//!   once the first is under half its limit and they carry no stream. Over mTLS a
//!   connection takes no new stream once the certificate its server presented expires
//!   (its open streams run to their end): the next request dials one verified against
//!   the current SVID and bundles;
//! - `Http1`: a pool of HTTP/1.1 connections. A connection goes back to the pool when its
//!   response body has been read to the end (a body dropped early closes it), and is
//!   reused most-recently-first. A connection idle for 90 s (`idle_timeout`) is closed
//!   when the pool is next used (no timer runs for it); all close when the client is
//!   dropped (the endpoint left discovery) or the server closes them. At most 1,024
//!   (`max_connections`) are open at once, idle ones included; a request that finds them
//!   all busy waits in line (first come, first served) for one to come back or close,
//!   and one that finds 1,024 (`max_pending`) waiting already fails at once with
//!   [`PoolOverflow`], never sent. A connection that comes back while still sending a
//!   request body (the application answered early) rejoins the pool once it is done. A
//!   request body that keeps its connection waiting 60 s (`body_read_timeout`) fails its
//!   request ([`BodyReadTimeout`]). The bounds are [`ConnectSettings::pool`] (a
//!   [`PoolConfig`]);
//! - `Auto`: HTTP/2 when ALPN negotiates `h2` over mTLS, HTTP/1.1 otherwise.
//!
//! An HTTP/2 connection with requests open is pinged after 20 s without a frame from the
//! endpoint and closed if the ping is not answered within 20 s more, so requests to an
//! endpoint that vanished without a reset fail (and are retried) rather than hang. An
//! HTTP/1.1 request has no such check: bound it with a timeout.
//!
//! A CONNECT (a tunnel: WebSocket across the mesh, say; see [`crate::upgrade`]) to an
//! endpoint known to speak HTTP/2 (configured, or learned from ALPN) goes on a
//! connection of its own, which closes when the tunnel ends: a
//! tunnel holds its stream for its whole life and would otherwise take the shared
//! connection's streams and flow-control window from the requests.
//!
//! A request that a pooled connection could not take before writing it (the server had
//! just closed it) is sent again on another connection, whatever its method. Requests to
//! HTTP/1.1 go in origin form with a `Host` header from the URI's authority (the logical
//! service); to HTTP/2 in absolute form, the authority in `:authority` alone.
//!
//! One endpoint means one address, so the pool needs no key: a checkout is one uncontended
//! lock and a pop, where a general-purpose client hashes the URI's scheme and authority
//! several times per request.
//!
//! It is a `tower::Service<http::Request<B>>`, the bottom of each endpoint's stack.
//!
//! **Readiness reflects the connection's state.** Each failed connect pushes the
//! endpoint's [`ConnState`] into back-off (exponential with jitter, 100 ms to 10 s by
//! default), during which `poll_ready` is pending (it wakes when the back-off ends), so the
//! balancer skips the endpoint; the first successful connect clears it. The next request
//! after the back-off reconnects. The server's verified [`PeerIdentity`] is attached to
//! every response as an extension.
//!
//! **The transport is pluggable.** By default each connection is a Tokio `TcpStream`
//! (with `TCP_NODELAY`). A [`Dialer`] in [`ConnectSettings::dialer`] replaces that dial
//! with any byte stream — a simulated network (turmoil), an in-memory pipe, a Unix
//! socket, a SOCKS tunnel — and everything above it (mTLS, HTTP/1.1 or HTTP/2, pooling,
//! back-off) stays the same. The default path pays nothing for it: no box, no dynamic
//! call.
//!
//! **Errors say why.** A failed request is a [`SendError`] whose message names the cause
//! itself — a refused server identity, a connect timeout, a reset — not only hyper's
//! generic text.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use http::header::HOST;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mesh_core::config::{PoolConfig, Protocol};
use mesh_spiffe::{MtlsConnector, PeerIdentity, TransportError};
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::backoff::Backoff;
use crate::h2_streams::{OpenStream, Sniff, StreamLimit};
use futures_util::FutureExt as _;

/// The default connect timeout (TCP and TLS).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// How to reach one endpoint.
#[derive(Clone)]
pub struct ConnectSettings {
    /// The protocol (default `Auto`).
    pub protocol: Protocol,
    /// mTLS toward the endpoint, expecting the identity the connector was built for;
    /// `None` for plaintext.
    pub tls: Option<MtlsConnector>,
    /// Bound on TCP connect plus TLS handshake (default 1 s).
    pub connect_timeout: Duration,
    /// Back-off after failed connects (default 100 ms to 10 s, jitter 0.5).
    pub backoff: Backoff,
    /// How to open the byte stream to the endpoint; `None` (the default) dials TCP.
    pub dialer: Option<Dialer>,
    /// Socket options for a TCP connection to another host (default
    /// [`TcpOptions::default`](crate::sock::TcpOptions::default); see [`crate::sock`]).
    pub tcp: crate::sock::TcpOptions,
    /// Bounds on the HTTP/1.1 connections (default [`PoolConfig::default`]; see the
    /// [module docs](self)).
    pub pool: PoolConfig,
}

impl fmt::Debug for ConnectSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectSettings")
            .field("protocol", &self.protocol)
            .field("tls", &self.tls.is_some())
            .field("connect_timeout", &self.connect_timeout)
            .field("dialer", &self.dialer.is_some())
            .field("tcp", &self.tcp)
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

impl ConnectSettings {
    /// Plaintext with the defaults.
    pub fn plaintext() -> Self {
        Self {
            protocol: Protocol::Auto,
            tls: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            backoff: DEFAULT_CONNECT_BACKOFF,
            dialer: None,
            tcp: crate::sock::TcpOptions::default(),
            pool: PoolConfig::default(),
        }
    }

    /// mTLS through `connector` with the defaults.
    pub fn mtls(connector: MtlsConnector) -> Self {
        Self {
            tls: Some(connector),
            ..Self::plaintext()
        }
    }
}

/// A byte stream a [`Dialer`] opened.
pub trait DialedIo: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> DialedIo for T {}

/// What a [`Dialer`] returns.
pub type DialFuture = Pin<Box<dyn Future<Output = io::Result<Box<dyn DialedIo>>> + Send>>;

/// Opens the byte streams an [`EndpointClient`] runs its connections on, in place of
/// TCP; see the [module docs](self). Cheap to clone.
///
/// The connect timeout, mTLS, protocol negotiation and back-off apply as they do to TCP: a
/// dial that fails or takes too long is a connect failure of the endpoint.
///
/// ```
/// # use mesh_tower::connect::Dialer;
/// // Dial a simulated network, an in-memory pipe, a tunnel... here, plain TCP again.
/// let dialer = Dialer::new(|addr| tokio::net::TcpStream::connect(addr));
/// # let _ = dialer;
/// ```
#[derive(Clone)]
pub struct Dialer(Arc<dyn Fn(SocketAddr) -> DialFuture + Send + Sync>);

impl Dialer {
    /// A dialer calling `dial` with each endpoint's address.
    pub fn new<F, Fut, IO>(dial: F) -> Self
    where
        F: Fn(SocketAddr) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = io::Result<IO>> + Send + 'static,
        IO: DialedIo,
    {
        Self(Arc::new(move |addr| {
            let dialled = dial(addr);
            Box::pin(async move { Ok(Box::new(dialled.await?) as Box<dyn DialedIo>) })
        }))
    }

    /// Opens a byte stream to `addr`.
    pub fn dial(&self, addr: SocketAddr) -> DialFuture {
        (self.0)(addr)
    }
}

impl fmt::Debug for Dialer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Dialer")
    }
}

/// The default back-off after failed connects: 100 ms to 10 s, jitter 0.5.
pub const DEFAULT_CONNECT_BACKOFF: Backoff =
    Backoff::constant(Duration::from_millis(100), Duration::from_secs(10), 0.5);

/// An endpoint's connection health, read by the balancer.
///
/// Failures escalate the back-off only one at a time: connects that were already under way
/// when a failure was recorded (a burst of dials to an endpoint that stopped answering,
/// say) fail for the same reason and do not lengthen it again. Without that, a hundred
/// dials timing out together would push a single endpoint to the 10 s ceiling at once.
#[derive(Debug)]
pub struct ConnState {
    failures: AtomicU32,
    down_until: Mutex<Option<Instant>>,
    /// Bumped by every recorded outcome; a connect remembers it when it starts.
    epoch: AtomicU64,
    /// Why the last connect failed, until one succeeds.
    last_error: Mutex<Option<Arc<str>>>,
    /// Opaque connections in a row that the endpoint took, then ended with a failure
    /// before sending a byte (its proxy could not reach its application): see
    /// [`refused`](Self::refused).
    refusals: AtomicU32,
}

impl ConnState {
    pub(crate) fn new() -> Self {
        Self {
            failures: AtomicU32::new(0),
            down_until: Mutex::new(None),
            epoch: AtomicU64::new(0),
            last_error: Mutex::new(None),
            refusals: AtomicU32::new(0),
        }
    }

    /// An opaque connection the endpoint accepted (its handshake done) ended soon with a
    /// failure, before a byte came back: as good as a refused connect, though the connect
    /// succeeded. The endpoint is backed off, longer for each such connection in a row,
    /// so that it does not draw new connections for having none open.
    #[cfg(feature = "opaque")]
    pub(crate) fn refused(&self, backoff: &Backoff, why: &dyn fmt::Display) {
        self.note_error(why);
        let Ok(mut until) = self.down_until.lock() else {
            return;
        };
        let now = Instant::now();
        // Connections open before the back-off began fail for the same reason: one
        // outage lengthens it once, not once per connection it cut.
        if until.is_some_and(|u| now < u) {
            return;
        }
        let strikes = self.refusals.fetch_add(1, Ordering::AcqRel);
        *until = Some(now + backoff.delay(strikes, &mut fastrand::Rng::new()));
    }

    /// An opaque connection through the endpoint went well (bytes came back, it ended
    /// cleanly, or it lived past the time a refusal takes): its run of refusals ends, and
    /// so does a back-off they began.
    #[cfg(feature = "opaque")]
    pub(crate) fn served(&self) {
        if self.refusals.swap(0, Ordering::AcqRel) != 0
            && self.failures.load(Ordering::Acquire) == 0
            && let Ok(mut until) = self.down_until.lock()
        {
            *until = None;
        }
    }

    /// Why the last connect failed, while no connect has succeeded since.
    pub fn last_error(&self) -> Option<Arc<str>> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }

    /// Remembers why a connect failed, for [`last_error`](Self::last_error).
    pub(crate) fn note_error(&self, error: &dyn fmt::Display) {
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(Arc::from(error.to_string()));
        }
    }

    /// Why the endpoint is not ready at `now`, if it is inside a connect back-off: how many
    /// connects failed, the last one's error, and when the next may start.
    pub fn unready_reason(&self, now: Instant) -> Option<String> {
        let until = self.backoff_until(now)?;
        let failures = self.failures();
        let next = until.saturating_duration_since(now);
        if failures == 0 {
            let refusals = self.refusals.load(Ordering::Acquire);
            let plural = if refusals == 1 { "" } else { "s" };
            let last = self.last_error().map(|e| format!(" (the last: {e})"));
            return Some(format!(
                "{refusals} connection{plural} failed before a byte came back{}, the next in {next:.1?}",
                last.unwrap_or_default()
            ));
        }
        let plural = if failures == 1 { "" } else { "s" };
        Some(match self.last_error() {
            Some(error) => format!(
                "{failures} failed connect{plural} (the last: {error}), the next in {next:.1?}"
            ),
            None => format!("{failures} failed connect{plural}, the next in {next:.1?}"),
        })
    }

    /// Whether the endpoint may be picked: not inside a connect back-off.
    pub fn is_ready(&self, now: Instant) -> bool {
        self.backoff_until(now).is_none()
    }

    /// The end of the current connect back-off, if the endpoint is inside one at `now`.
    pub fn backoff_until(&self, now: Instant) -> Option<Instant> {
        if self.failures.load(Ordering::Acquire) == 0 && self.refusals.load(Ordering::Acquire) == 0
        {
            return None;
        }
        self.down_until
            .lock()
            .ok()
            .and_then(|until| *until)
            .filter(|t| now < *t)
    }

    /// Consecutive failed connects.
    pub fn failures(&self) -> u32 {
        self.failures.load(Ordering::Acquire)
    }

    /// What a connect starting now remembers, for [`failed`](Self::failed).
    pub(crate) fn attempt(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    pub(crate) fn connected(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        if self.failures.swap(0, Ordering::AcqRel) != 0 {
            if let Ok(mut until) = self.down_until.lock() {
                *until = None;
            }
            if let Ok(mut last) = self.last_error.lock() {
                *last = None;
            }
        }
    }

    /// Records a failed connect that started at `started` (from [`attempt`](Self::attempt)):
    /// it escalates the back-off unless another outcome was recorded since it started.
    pub(crate) fn failed(&self, backoff: &Backoff, started: u64) {
        let Ok(mut until) = self.down_until.lock() else {
            return;
        };
        if self.epoch.load(Ordering::Acquire) != started && until.is_some() {
            // Under way when an earlier failure was recorded: the same outage.
            return;
        }
        self.epoch.fetch_add(1, Ordering::AcqRel);
        let attempt = self.failures.fetch_add(1, Ordering::AcqRel);
        let delay = backoff.delay(attempt, &mut fastrand::Rng::new());
        *until = Some(Instant::now() + delay);
    }
}

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// TCP connect failed.
    #[error("connecting to {addr}: {source}")]
    Tcp {
        /// The endpoint.
        addr: SocketAddr,
        /// The socket error.
        #[source]
        source: io::Error,
    },
    /// TCP connect and the TLS handshake did not finish within the connect timeout.
    #[error("connecting to {addr}: timed out after {timeout:?}")]
    Timeout {
        /// The endpoint.
        addr: SocketAddr,
        /// The timeout.
        timeout: Duration,
    },
    /// The mTLS handshake failed (a refused identity among others).
    #[error("TLS with {addr}: {source}")]
    Tls {
        /// The endpoint.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: TransportError,
    },
    /// The HTTP connection could not be set up over the transport.
    #[error("HTTP handshake with {addr}: {source}")]
    Handshake {
        /// The endpoint.
        addr: SocketAddr,
        /// hyper's error.
        #[source]
        source: hyper::Error,
    },
}

impl ConnectError {
    /// Whether the failure is this host's, not the endpoint's: out of file descriptors,
    /// socket buffers or memory. It says nothing of the endpoint, which
    /// therefore is not backed off (a short local shortage would otherwise back off
    /// every endpoint tried, and outlast itself as "no ready endpoint").
    pub fn is_local(&self) -> bool {
        let ConnectError::Tcp { source, .. } = self else {
            return false;
        };
        // (Not EADDRNOTAVAIL: besides ephemeral ports running out, it is what an IPv6
        // endpoint gets on a host without IPv6, for good.)
        if source.kind() == io::ErrorKind::OutOfMemory {
            return true;
        }
        // ENFILE, EMFILE, ENOBUFS (no `ErrorKind` names them).
        #[cfg(target_os = "linux")]
        const LOCAL: [i32; 3] = [23, 24, 105];
        #[cfg(target_os = "macos")]
        const LOCAL: [i32; 3] = [23, 24, 55];
        #[cfg(not(any(target_os = "linux", target_os = "macos")))]
        const LOCAL: [i32; 0] = [];
        source
            .raw_os_error()
            .is_some_and(|code| LOCAL.contains(&code))
    }
}

/// A connection to an endpoint, plaintext or mTLS.
/// A client TLS stream over `T`, as the pool reads it.
type SniffedTls<T> = Sniff<tokio_rustls::client::TlsStream<T>>;

enum Conn {
    Plain(TokioIo<Sniff<TcpStream>>),
    Tls(Box<TokioIo<SniffedTls<TcpStream>>>),
    /// Opened by a [`Dialer`].
    Dialed(TokioIo<Sniff<Box<dyn DialedIo>>>),
    DialedTls(Box<TokioIo<SniffedTls<Box<dyn DialedIo>>>>),
}

/// `io`, learning its HTTP/2 server's stream limit into `limit` when there is one.
fn sniff<T>(io: T, limit: Option<&Arc<StreamLimit>>) -> Sniff<T> {
    match limit {
        Some(limit) => Sniff::learning(io, limit.clone()),
        None => Sniff::plain(io),
    }
}

impl hyper::rt::Read for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(io) => Pin::new(io).poll_read(cx, buf),
            Conn::Tls(io) => Pin::new(&mut **io).poll_read(cx, buf),
            Conn::Dialed(io) => Pin::new(io).poll_read(cx, buf),
            Conn::DialedTls(io) => Pin::new(&mut **io).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(io) => Pin::new(io).poll_write(cx, buf),
            Conn::Tls(io) => Pin::new(&mut **io).poll_write(cx, buf),
            Conn::Dialed(io) => Pin::new(io).poll_write(cx, buf),
            Conn::DialedTls(io) => Pin::new(&mut **io).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(io) => Pin::new(io).poll_flush(cx),
            Conn::Tls(io) => Pin::new(&mut **io).poll_flush(cx),
            Conn::Dialed(io) => Pin::new(io).poll_flush(cx),
            Conn::DialedTls(io) => Pin::new(&mut **io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(io) => Pin::new(io).poll_shutdown(cx),
            Conn::Tls(io) => Pin::new(&mut **io).poll_shutdown(cx),
            Conn::Dialed(io) => Pin::new(io).poll_shutdown(cx),
            Conn::DialedTls(io) => Pin::new(&mut **io).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            Conn::Tls(io) => Pin::new(&mut **io).poll_write_vectored(cx, bufs),
            Conn::Dialed(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            Conn::DialedTls(io) => Pin::new(&mut **io).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(io) => io.is_write_vectored(),
            Conn::Tls(io) => io.is_write_vectored(),
            Conn::Dialed(io) => io.is_write_vectored(),
            Conn::DialedTls(io) => io.is_write_vectored(),
        }
    }
}

/// HTTP/2 connections with requests open are pinged after this long without a frame
/// from the endpoint, and closed when the ping goes unanswered as long again: requests
/// on a connection to an endpoint that vanished without a reset (a black hole, a host
/// powered off) fail after at most 40 s, and are retried, instead of hanging with no
/// timeout configured. (Found by the simulation's partition test.)
const H2_KEEP_ALIVE: Duration = Duration::from_secs(20);

/// The longest duration the pool takes for a timeout: past it, `Instant + d` could
/// overflow (a configuration caps durations at 10 years too).
const LONGEST: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Sends of one request that found their connection closed before it was written.
const MAX_UNSENT: usize = 3;

/// Sends requests to one endpoint over pooled (HTTP/1.1) or multiplexed (HTTP/2)
/// connections; see the [module docs](self). Cheap to clone: clones share the pool.
pub struct EndpointClient<B> {
    // Shared, so that a clone (one per request, as the balancer picks) is one reference
    // count and the stack's futures stay small.
    shared: Arc<Shared<B>>,
    /// The end of a back-off `poll_ready` waits for.
    backoff: Option<Pin<Box<Sleep>>>,
}

struct Shared<B> {
    addr: SocketAddr,
    authority: http::uri::Authority,
    settings: ConnectSettings,
    state: Arc<ConnState>,
    pool: Mutex<Pool<B>>,
    /// Wakes the requests waiting for an HTTP/2 connection being dialled.
    dialled: tokio::sync::Notify,
    /// The HTTP/1.1 connections open (or being dialled), against `max_connections`, and
    /// the line of requests waiting for one.
    slots: Arc<Slots>,
}

/// How an endpoint's HTTP/1.1 pool stands ([`EndpointClient::pool_status`],
/// [`PoolProbe::status`]), for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolStatus {
    /// HTTP/1.1 connections open (in use, idle, or being dialled).
    pub open: usize,
    /// Requests waiting for one.
    pub waiting: usize,
    /// Requests refused since the client was made: every connection busy and the line
    /// full ([`PoolOverflow`]).
    pub overflows: u64,
}

/// The count of one endpoint's open HTTP/1.1 connections, shared with their tasks (which
/// must not hold the pool itself: its idle connections would then never close).
///
/// Each connection's [`Slot`] travels with its `SendRequest` (dialled, in use, idle) and is
/// freed with it: a connection dropped from the pool (expired, closed) frees its place at
/// once, not when its task notices. The task wakes a waiting request when the connection
/// ends, so that one closed by the server while idle is noticed and dropped.
struct Slots {
    open: AtomicUsize,
    /// Requests in `line`, against `max_pending`; read without the lock to skip it when
    /// nobody waits.
    waiting: AtomicUsize,
    line: Mutex<Line>,
    /// Requests refused with [`PoolOverflow`].
    overflows: AtomicU64,
}

/// A read-only view of one endpoint's HTTP/1.1 pool ([`EndpointClient::pool_probe`]),
/// for a metrics collector to read at scrape time: it holds the pool's counts, not its
/// connections, so keeping it does not keep the endpoint's client alive. Cheap to clone.
#[derive(Clone)]
pub struct PoolProbe(Arc<Slots>);

impl PoolProbe {
    /// How the pool stands now.
    pub fn status(&self) -> PoolStatus {
        PoolStatus {
            open: self.0.open.load(Ordering::Relaxed),
            waiting: self.0.waiting.load(Ordering::Relaxed),
            overflows: self.0.overflows.load(Ordering::Relaxed),
        }
    }
}

impl fmt::Debug for PoolProbe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PoolProbe").field(&self.status()).finish()
    }
}

/// The requests waiting for an HTTP/1.1 connection, first come first served: each has
/// its own wake-up, and only the one at the front may take a connection or a place.
#[derive(Default)]
struct Line {
    next_ticket: u64,
    queue: std::collections::VecDeque<(u64, Arc<tokio::sync::Notify>)>,
}

impl Slots {
    /// A slot for one more connection, unless `max` are open.
    fn reserve(self: &Arc<Self>, max: usize) -> Option<Slot> {
        self.open
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |open| {
                (open < max).then_some(open + 1)
            })
            .ok()
            .map(|_| Slot(self.clone()))
    }

    fn line(&self) -> std::sync::MutexGuard<'_, Line> {
        // A queue of wake-ups: a panic while holding the lock cannot leave it
        // inconsistent.
        self.line.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes the request at the front of the line, if any: a connection came back, one
    /// closed, a place freed, or the front changed. (Waiters join before they look, so
    /// one this does not see finds what was freed when it looks.)
    fn wake_front(&self) {
        if self.waiting.load(Ordering::SeqCst) == 0 {
            return;
        }
        if let Some((_, wake)) = self.line().queue.front() {
            wake.notify_one();
        }
    }

    /// Wakes every request in line (the endpoint turned out to speak HTTP/2).
    fn wake_all(&self) {
        for (_, wake) in &self.line().queue {
            wake.notify_one();
        }
    }
}

/// One open HTTP/1.1 connection's place in [`Slots`]: held beside its `SendRequest`, and
/// freed (waking the request at the front of the line) when that is dropped, or when the
/// dial fails.
struct Slot(Arc<Slots>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
        self.0.wake_front();
    }
}

/// A request's place in the line; leaving it (with a connection, or given up) wakes the
/// next one when it was at the front.
struct InLine<'a> {
    slots: &'a Slots,
    ticket: u64,
    wake: Arc<tokio::sync::Notify>,
}

impl InLine<'_> {
    fn is_front(&self) -> bool {
        self.slots
            .line()
            .queue
            .front()
            .is_some_and(|(ticket, _)| *ticket == self.ticket)
    }
}

impl Drop for InLine<'_> {
    fn drop(&mut self) {
        let mut line = self.slots.line();
        let at = line.queue.iter().position(|(t, _)| *t == self.ticket);
        if let Some(at) = at {
            line.queue.remove(at);
        }
        drop(line);
        self.slots.waiting.fetch_sub(1, Ordering::SeqCst);
        if at == Some(0) {
            self.slots.wake_front();
        }
    }
}

/// A request found every HTTP/1.1 connection to its endpoint busy (`max_connections`
/// open) and `max_pending` requests waiting for one already: it was not sent. Answered
/// 503; a retry policy may send it to another endpoint, and breakers do not count it.
#[derive(Debug)]
pub struct PoolOverflow {
    /// The endpoint.
    pub addr: SocketAddr,
    /// Its `max_connections`.
    pub connections: usize,
    /// Its `max_pending`.
    pub pending: usize,
}

impl fmt::Display for PoolOverflow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "all {} HTTP/1.1 connections to {} are in use (pool.max_connections), and ",
            self.connections, self.addr
        )?;
        match self.pending {
            0 => f.write_str("no request may wait for one (pool.max_pending is 0)"),
            n => write!(f, "{n} requests wait for one already (pool.max_pending)"),
        }
    }
}

impl std::error::Error for PoolOverflow {}

/// Whether `error` is (caused by) a [`PoolOverflow`].
pub fn is_pool_overflow(error: &(dyn std::error::Error + 'static)) -> bool {
    mesh_core::error::is_caused_by::<PoolOverflow>(error)
}

/// A gRPC call (`content-type: application/grpc`) to a plaintext endpoint left at
/// `Protocol::Auto`, which speaks HTTP/1.1: gRPC needs HTTP/2 (prior knowledge, in
/// plaintext). It was not sent: a gRPC server would refuse it (dropping the connection,
/// which reads as an outage). Every endpoint of such a service is the same, so it is the
/// request's failure, not the endpoint's ([`is_request_error`]); the error names the
/// setting.
#[derive(Debug, thiserror::Error)]
#[error(
    "a gRPC call needs HTTP/2, and {addr} is reached over HTTP/1.1 (a plaintext service with protocol = \"auto\"): set the service's protocol = \"grpc\""
)]
pub struct GrpcOverHttp1 {
    /// The endpoint.
    pub addr: SocketAddr,
}

struct Pool<B> {
    idle: Vec<Idle<B>>,
    /// HTTP/2 connections, oldest first: one, unless the server's stream limit made the
    /// pool open more (at most `max_connections`).
    h2: Vec<H2Conn<B>>,
    /// Whether this endpoint speaks HTTP/2: configured, or learned from ALPN.
    h2_known: bool,
    /// An HTTP/2 dial is under way.
    dialling: bool,
    /// Counts finished HTTP/2 dials; with the last failure, for the requests that waited.
    dials: u64,
    failure: Option<(u64, Arc<ConnectError>)>,
}

/// When the certificate the peer presented in `tls` stops being vouched for, on this
/// runtime's clock: the pool's HTTP/2 connections take no new stream from then, and
/// `MeshServer` shuts its connections down then.
pub(crate) fn peer_expiry(tls: &tokio_rustls::rustls::CommonState) -> Option<Instant> {
    // A second after `notAfter`: verification reads whole seconds and takes the
    // certificate until then, so an earlier mark would dial again, and again, onto the
    // same certificate until that second ends (and a server would close a connection its
    // client could open again at once).
    let at = mesh_spiffe::peer_not_after(tls)? + std::time::Duration::from_secs(1);
    let left = at
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    Instant::now().checked_add(left)
}

pin_project! {
    /// An HTTP/2 connection's task, which marks the connection expired when the certificate
    /// its server presented expires: the pool takes no new stream on it from then on (its
    /// open streams run to their end), and the next request dials a connection verified
    /// against the current SVID and bundles. So a connection does not outlive its server's
    /// SVID (a removed root or a withdrawn identity included), as a `MeshServer`'s does
    /// not outlive its client's.
    struct ExpireAt<F> {
        #[pin]
        conn: F,
        timer: Option<Pin<Box<Sleep>>>,
        streams: std::sync::Weak<StreamLimit>,
    }
}

impl<F> ExpireAt<F> {
    fn new(conn: F, at: Instant, streams: &Arc<StreamLimit>) -> Self {
        Self {
            conn,
            timer: Some(Box::pin(tokio::time::sleep_until(at))),
            streams: Arc::downgrade(streams),
        }
    }
}

impl<F: Future<Output = ()>> Future for ExpireAt<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if let Some(timer) = this.timer
            && timer.as_mut().poll(cx).is_ready()
        {
            *this.timer = None;
            if let Some(streams) = this.streams.upgrade() {
                streams.expire();
            }
        }
        this.conn.poll(cx)
    }
}

/// A stream on the least busy open connection of `conns`, past its limit (h2 queues it).
fn least_busy<B>(conns: &[H2Conn<B>]) -> Option<Checkout<B>> {
    conns
        .iter()
        .filter(|c| !c.sender.is_closed() && !c.streams.expired())
        .min_by_key(|c| c.streams.open())
        .map(|c| c.checkout(c.streams.open_anyway()))
}

/// An HTTP/2 connection of the pool, and the streams open on it.
struct H2Conn<B> {
    sender: http2::SendRequest<CleanTrailers<B>>,
    peer: Option<PeerIdentity>,
    streams: Arc<StreamLimit>,
}

impl<B> H2Conn<B> {
    fn checkout(&self, stream: OpenStream) -> Checkout<B> {
        Checkout::H2(self.sender.clone(), self.peer.clone(), Some(stream))
    }
}

struct Idle<B> {
    sender: http1::SendRequest<Bounded<B>>,
    peer: Option<PeerIdentity>,
    since: Instant,
    slot: Option<Slot>,
}

impl<B> Pool<B> {
    /// The most recently used idle HTTP/1.1 connection that can take a request now.
    /// Connections come back ready ([`Shared::check_in`]) and stay so until sent on, so
    /// one is good unless it closed since: then it is dropped, with its slot. (One that
    /// closes between this look and the send gives its request back unsent, to be sent
    /// on another.)
    fn ready_idle(&mut self) -> Option<Idle<B>> {
        while let Some(idle) = self.idle.pop() {
            if !idle.sender.is_closed() {
                return Some(idle);
            }
        }
        None
    }

    fn prune(&mut self, now: Instant, idle_timeout: Duration) {
        self.idle.retain(|i| {
            !i.sender.is_closed() && now.saturating_duration_since(i.since) < idle_timeout
        });
    }
}

/// A connection a request may be sent on.
enum Checkout<B> {
    H1(
        http1::SendRequest<Bounded<B>>,
        Option<PeerIdentity>,
        Option<Slot>,
    ),
    /// With the stream counted against its connection's limit.
    H2(
        http2::SendRequest<CleanTrailers<B>>,
        Option<PeerIdentity>,
        Option<OpenStream>,
    ),
}

/// What a request does next to get a connection.
enum Next<B> {
    Idle(Idle<B>),
    /// Wait for the HTTP/2 dial under way (the number of dials finished before it).
    Wait(u64),
    /// Dial: HTTP/2, or HTTP/1.1 in the slot reserved for it.
    Dial {
        h2: bool,
        slot: Option<Slot>,
    },
    /// Every HTTP/1.1 connection is busy and no slot is left.
    Full,
    /// The endpoint speaks HTTP/2 after all (ALPN said so): look again.
    Again,
}

impl<B> Clone for EndpointClient<B> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            backoff: None,
        }
    }
}

impl<B> EndpointClient<B> {
    /// The endpoint's address.
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// The endpoint's connection health.
    pub fn conn_state(&self) -> &Arc<ConnState> {
        &self.shared.state
    }

    /// How the endpoint's HTTP/1.1 pool stands: connections open, requests waiting, and
    /// requests refused so far.
    pub fn pool_status(&self) -> PoolStatus {
        self.pool_probe().status()
    }

    /// A view of the endpoint's HTTP/1.1 pool that a metrics collector can keep and read
    /// at each scrape ([`ClientMetrics`](crate::metrics::ClientMetrics) does, through
    /// `EndpointMetrics::with_pool`).
    pub fn pool_probe(&self) -> PoolProbe {
        PoolProbe(self.shared.slots.clone())
    }
}

impl<B> fmt::Debug for EndpointClient<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndpointClient")
            .field("addr", &self.shared.addr)
            .field("failures", &self.shared.state.failures())
            .finish()
    }
}

/// The HTTP/2 dial latch of one request (`Pool::dialling`): the requests that found a
/// dial under way wait for its end. Released when the dial ends, and also when the
/// dialling request is dropped mid-dial (its timeout fired, its caller went away):
/// otherwise the waiters, and every later request to the endpoint, would wait for a dial
/// nobody makes. After a dropped dial, the next request dials again.
struct DialLatch<'a, B> {
    shared: &'a Shared<B>,
    held: bool,
}

impl<B> DialLatch<'_, B> {
    /// Ends the dial: the waiters wake and look at the pool again.
    fn release(mut self) {
        self.open();
    }

    fn open(&mut self) {
        if std::mem::take(&mut self.held) {
            let mut pool = self.shared.pool();
            pool.dialling = false;
            pool.dials += 1;
            drop(pool);
            self.shared.dialled.notify_waiters();
        }
    }
}

impl<B> Drop for DialLatch<'_, B> {
    fn drop(&mut self) {
        self.open();
    }
}

impl<B> Shared<B> {
    fn pool(&self) -> std::sync::MutexGuard<'_, Pool<B>> {
        // The pool holds connections and flags only; a panic while holding the lock cannot
        // leave it inconsistent.
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a place at the back of the line for an HTTP/1.1 connection, or fails the
    /// request when `max_pending` have taken theirs.
    fn wait_in_line(&self) -> Result<InLine<'_>, SendError> {
        let pool = &self.settings.pool;
        let slots = &*self.slots;
        if slots
            .waiting
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < pool.max_pending).then_some(n + 1)
            })
            .is_err()
        {
            slots.overflows.fetch_add(1, Ordering::Relaxed);
            return Err(SendError {
                addr: self.addr,
                cause: Cause::Overflow(PoolOverflow {
                    addr: self.addr,
                    connections: pool.max_connections,
                    pending: pool.max_pending,
                }),
            });
        }
        let wake = Arc::new(tokio::sync::Notify::new());
        let mut line = slots.line();
        let ticket = line.next_ticket;
        line.next_ticket += 1;
        line.queue.push_back((ticket, wake.clone()));
        Ok(InLine {
            slots,
            ticket,
            wake,
        })
    }

    /// An idle HTTP/1.1 connection ready now, else a slot to dial one in; `Full` when
    /// neither, or when requests wait in line already and `queued` is not one of them
    /// (a newcomer does not pass them). Called with the pool locked, and only while the
    /// endpoint is not known to speak HTTP/2 (both callers look first).
    fn h1_next(&self, pool: &mut Pool<B>, queued: bool) -> Next<B> {
        if !queued && self.slots.waiting.load(Ordering::SeqCst) > 0 {
            return Next::Full;
        }
        if !pool.idle.is_empty() {
            // The oldest idle connections are first: drop the expired ones.
            let now = Instant::now();
            let idle_timeout = self.settings.pool.idle_timeout;
            if pool.idle[0].since + idle_timeout <= now {
                pool.prune(now, idle_timeout);
            }
        }
        if let Some(idle) = pool.ready_idle() {
            return Next::Idle(idle);
        }
        match self.slots.reserve(self.settings.pool.max_connections) {
            Some(slot) => Next::Dial {
                h2: false,
                slot: Some(slot),
            },
            None => Next::Full,
        }
    }

    /// Waits in line until, at its front, an HTTP/1.1 connection comes back or a slot
    /// frees: first come, first served (a request that arrives while others wait joins
    /// them). Bounded by the request's own timeouts.
    async fn wait_for_h1(&self) -> Result<Next<B>, SendError> {
        let me = self.wait_in_line()?;
        loop {
            {
                let mut pool = self.pool();
                if pool.h2_known {
                    return Ok(Next::Again);
                }
                if me.is_front() {
                    match self.h1_next(&mut pool, true) {
                        Next::Full => {}
                        next => return Ok(next),
                    }
                }
            }
            // A wake-up between the look and here is kept for this wait.
            me.wake.notified().await;
        }
    }
}

impl<B> Shared<B>
where
    B: Send + 'static,
{
    /// Returns an HTTP/1.1 connection whose response was read to the end, and wakes a
    /// request waiting for one. hyper readies a connection as it reads the end of a
    /// response; one not ready yet is still sending a request body the application did
    /// not wait for (it answered early), which a client may trickle for as long as
    /// `body_read_timeout` allows: it comes back once it is ready, or is dropped with its
    /// slot if it fails.
    fn check_in(
        self: &Arc<Self>,
        mut sender: http1::SendRequest<Bounded<B>>,
        peer: Option<PeerIdentity>,
        slot: Option<Slot>,
    ) {
        match sender.ready().now_or_never() {
            Some(Ok(())) => {}
            Some(Err(_)) => return,
            None => {
                // Outside a runtime (a body read by other means) it is dropped instead.
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    let shared = self.clone();
                    runtime.spawn(async move {
                        if sender.ready().await.is_ok() {
                            shared.idle(sender, peer, slot);
                        }
                    });
                }
                return;
            }
        }
        self.idle(sender, peer, slot);
    }

    /// Puts a ready connection in the pool and wakes a request waiting for one, if any:
    /// a request joins the line before it looks at the pool under its lock, so one that
    /// this does not see waiting finds the connection there. A connection without a slot
    /// (dialled for HTTP/2, which ALPN refused) serves one request only, and none is
    /// kept once the endpoint is known to speak HTTP/2.
    fn idle(
        &self,
        sender: http1::SendRequest<Bounded<B>>,
        peer: Option<PeerIdentity>,
        slot: Option<Slot>,
    ) {
        if slot.is_none() {
            return;
        }
        let mut pool = self.pool();
        if pool.h2_known {
            return;
        }
        pool.idle.push(Idle {
            sender,
            peer,
            since: Instant::now(),
            slot,
        });
        drop(pool);
        self.slots.wake_front();
    }
}

impl<B> Shared<B>
where
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// A connection to send on: the HTTP/2 one, an idle HTTP/1.1 one once it is ready,
    /// or a new one.
    async fn check_out(&self) -> Result<Checkout<B>, SendError> {
        loop {
            let next = {
                let mut pool = self.pool();
                if !pool.h2.is_empty() {
                    pool.h2
                        .retain(|c| !c.sender.is_closed() && !c.streams.expired());
                    // Further connections go once the first could take their streams
                    // twice over: the first is under half its limit, and they carry none
                    // (dropped here, each closes once its last stream is done).
                    if pool.h2.len() > 1 && pool.h2[0].streams.open() * 2 < pool.h2[0].streams.max()
                    {
                        let mut first = true;
                        pool.h2
                            .retain(|c| std::mem::take(&mut first) || c.streams.open() > 0);
                    }
                    // The oldest connection with room for a stream.
                    if let Some(checkout) = pool
                        .h2
                        .iter()
                        .find_map(|c| c.streams.try_open().map(|s| c.checkout(s)))
                    {
                        return Ok(checkout);
                    }
                    // Every one is at its server's limit, and the pool may open no more:
                    // the least busy one takes it, and h2 queues it there.
                    if pool.h2.len() >= self.settings.pool.max_connections
                        && let Some(c) = pool.h2.iter().min_by_key(|c| c.streams.open())
                    {
                        return Ok(c.checkout(c.streams.open_anyway()));
                    }
                }
                if pool.h2_known {
                    if pool.dialling {
                        Next::Wait(pool.dials)
                    } else {
                        pool.dialling = true;
                        Next::Dial {
                            h2: true,
                            slot: None,
                        }
                    }
                } else {
                    self.h1_next(&mut pool, false)
                }
            };
            let next = match next {
                // Boxed: rare, and it would grow every request's future.
                Next::Full => Box::pin(self.wait_for_h1()).await?,
                next => next,
            };
            match next {
                Next::Idle(idle) => return Ok(Checkout::H1(idle.sender, idle.peer, idle.slot)),
                Next::Wait(dials) => loop {
                    let dialled = self.dialled.notified();
                    tokio::pin!(dialled);
                    // Registered before the check, so that no wake-up slips between.
                    dialled.as_mut().enable();
                    // `None`: still dialling; `Some(failure)`: the dial we waited for is over.
                    let over = {
                        let pool = self.pool();
                        (pool.dials != dials || !pool.dialling).then(|| {
                            pool.failure
                                .as_ref()
                                .filter(|(at, _)| *at > dials)
                                .map(|(_, e)| e.clone())
                        })
                    };
                    match over {
                        None => dialled.await,
                        // It failed: so do the requests that waited for it (no herd of
                        // dials), unless it was a further connection for full ones: they
                        // take the least busy of those, and h2 queues them there.
                        Some(Some(error)) => {
                            return least_busy(&self.pool().h2)
                                .ok_or_else(|| SendError::connect(self.addr, error));
                        }
                        // Dialled: the next round takes the connection.
                        Some(None) => break,
                    }
                },
                Next::Full | Next::Again => {}
                Next::Dial { h2, slot } => {
                    // Held while this request dials the HTTP/2 connection others wait for:
                    // released by the dial's end, or by dropping it mid-dial.
                    let latch = DialLatch {
                        shared: self,
                        held: h2,
                    };
                    // Boxed: a dial (TCP, TLS, HTTP/2 handshakes) is a large future and a
                    // rare one; inline, it would make every request's exchange that large.
                    let dialled = Box::pin(self.dial(slot)).await;
                    let mut pool = self.pool();
                    if let Ok(Checkout::H2(sender, peer, Some(stream))) = &dialled {
                        // Stored before the waiters wake: they take it, not dial again.
                        pool.h2_known = true;
                        pool.h2.push(H2Conn {
                            sender: sender.clone(),
                            peer: peer.clone(),
                            streams: stream.limit().clone(),
                        });
                        // Idle HTTP/1.1 connections are not used again: they go, with
                        // their slots.
                        pool.idle.clear();
                    }
                    // A further connection for full ones that could not be made: this
                    // request, like those that waited for it, takes the least busy of
                    // them (h2 queues it there), rather than failing with working ones.
                    let fallback = match &dialled {
                        Err(_) if h2 => least_busy(&pool.h2),
                        _ => None,
                    };
                    if h2 && let Err(error) = &dialled {
                        pool.failure = Some((pool.dials + 1, error.clone()));
                    }
                    if h2 && matches!(dialled, Ok(Checkout::H1(..))) {
                        // ALPN no longer offers HTTP/2: back to the HTTP/1.1 pool (this
                        // connection, dialled without a slot, serves this request only).
                        pool.h2_known = false;
                        pool.h2.clear();
                    }
                    let learned = !h2 && matches!(dialled, Ok(Checkout::H2(..)));
                    drop(pool);
                    latch.release();
                    if learned {
                        // ALPN said HTTP/2: the requests in line for an HTTP/1.1
                        // connection take this one instead.
                        self.slots.wake_all();
                    }
                    return match (dialled, fallback) {
                        (Ok(checkout), _) => Ok(checkout),
                        (Err(_), Some(checkout)) => Ok(checkout),
                        (Err(error), None) => Err(SendError::connect(self.addr, error)),
                    };
                }
            }
        }
    }

    /// A new connection, HTTP/2 or HTTP/1.1 by configuration and ALPN, within the connect
    /// timeout; feeds the endpoint's [`ConnState`].
    /// An HTTP/1.1 connection takes `slot` for its life; without one (a tunnel's own
    /// connection to an HTTP/2 endpoint) only HTTP/2 is expected.
    async fn dial(&self, slot: Option<Slot>) -> Result<Checkout<B>, Arc<ConnectError>> {
        let addr = self.addr;
        let timeout = self.settings.connect_timeout;
        let started = self.state.attempt();
        let result = tokio::time::timeout(timeout, self.handshake(slot))
            .await
            .unwrap_or(Err(ConnectError::Timeout { addr, timeout }));
        match result {
            Ok(checkout) => {
                self.state.connected();
                Ok(checkout)
            }
            Err(error) if error.is_local() => {
                tracing::warn!(%addr, %error, "connect failed for want of local resources: the endpoint is not backed off");
                Err(Arc::new(error))
            }
            Err(error) => {
                tracing::debug!(%addr, %error, "connect failed");
                self.state.note_error(&error);
                // A further HTTP/2 connection beside working ones (they were full) says
                // nothing against the endpoint: it is not backed off for it.
                let serving = self.pool().h2.iter().any(|c| !c.sender.is_closed());
                if !serving {
                    self.state.failed(&self.settings.backoff, started);
                }
                Err(Arc::new(error))
            }
        }
    }

    async fn handshake(&self, slot: Option<Slot>) -> Result<Checkout<B>, ConnectError> {
        let addr = self.addr;
        let configured_h2 = matches!(self.settings.protocol, Protocol::Http2 | Protocol::Grpc);
        let tcp_failed = |source| ConnectError::Tcp { addr, source };
        let tls_failed = |source| ConnectError::Tls { addr, source };
        // An HTTP/2 connection learns its server's stream limit (`crate::h2_streams`).
        // Until its server's SETTINGS come, what the endpoint's other connections learned.
        let limit = |h2: bool| {
            h2.then(|| {
                let known = self.pool().h2.iter().map(|c| c.streams.max()).min();
                Arc::new(StreamLimit::assuming(
                    known.unwrap_or(crate::h2_streams::ASSUMED_MAX_STREAMS),
                ))
            })
        };
        // When the server's certificate expires (mTLS).
        let mut expires = None;
        let (io, peer, streams) = match (&self.settings.dialer, &self.settings.tls) {
            (None, tls) => {
                let tcp = TcpStream::connect(addr).await.map_err(tcp_failed)?;
                crate::sock::tune(&tcp, addr, &self.settings.tcp);
                match tls {
                    None => {
                        let streams = limit(configured_h2);
                        let io = sniff(tcp, streams.as_ref());
                        (Conn::Plain(TokioIo::new(io)), None, streams)
                    }
                    Some(tls) => {
                        let (stream, peer) = tls.handshake(addr, tcp).await.map_err(tls_failed)?;
                        let streams = limit(
                            configured_h2 || stream.get_ref().1.alpn_protocol() == Some(b"h2"),
                        );
                        expires = peer_expiry(stream.get_ref().1);
                        let io = sniff(stream, streams.as_ref());
                        (Conn::Tls(Box::new(TokioIo::new(io))), Some(peer), streams)
                    }
                }
            }
            (Some(dialer), tls) => {
                let io = dialer.dial(addr).await.map_err(tcp_failed)?;
                match tls {
                    None => {
                        let streams = limit(configured_h2);
                        let io = sniff(io, streams.as_ref());
                        (Conn::Dialed(TokioIo::new(io)), None, streams)
                    }
                    Some(tls) => {
                        let (stream, peer) = tls.handshake(addr, io).await.map_err(tls_failed)?;
                        let streams = limit(
                            configured_h2 || stream.get_ref().1.alpn_protocol() == Some(b"h2"),
                        );
                        expires = peer_expiry(stream.get_ref().1);
                        let io = sniff(stream, streams.as_ref());
                        (
                            Conn::DialedTls(Box::new(TokioIo::new(io))),
                            Some(peer),
                            streams,
                        )
                    }
                }
            }
        };
        let failed = |source| ConnectError::Handshake { addr, source };
        if streams.is_some() {
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .keep_alive_interval(H2_KEEP_ALIVE)
                .keep_alive_timeout(H2_KEEP_ALIVE)
                .handshake(io)
                .await
                .map_err(failed)?;
            // Combinators rather than `async move` blocks, which would hold the
            // connection twice (captured, and as the future awaited).
            let conn = futures_util::FutureExt::map(conn, move |result| {
                if let Err(error) = result {
                    tracing::debug!(%addr, %error, "HTTP/2 connection ended");
                }
            });
            match (&streams, expires) {
                // Its task marks it expired then: no timer outlives the connection.
                (Some(streams), Some(at)) => {
                    tokio::spawn(ExpireAt::new(conn, at, streams));
                }
                _ => {
                    tokio::spawn(conn);
                }
            }
            // This request's stream is the connection's first.
            let stream = streams.map(|s| s.open_anyway());
            Ok(Checkout::H2(sender, peer, stream))
        } else {
            let (sender, conn) = http1::handshake(io).await.map_err(failed)?;
            // With upgrades: a `101` (or a `2xx` to CONNECT) hands the connection to the
            // response's `OnUpgrade` (see `crate::upgrade`).
            let conn = conn.with_upgrades();
            // Its end wakes a request waiting for a connection, which then drops this one
            // (and its slot) from the pool if it was idle there.
            let slots = self.slots.clone();
            tokio::spawn(futures_util::FutureExt::map(conn, move |result| {
                slots.wake_front();
                if let Err(error) = result {
                    tracing::debug!(%addr, %error, "HTTP/1.1 connection ended");
                }
            }));
            Ok(Checkout::H1(sender, peer, slot))
        }
    }
}

impl<B> EndpointClient<B>
where
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// A client for the endpoint at `addr`. Connections are made on first use.
    pub fn new(addr: SocketAddr, mut settings: ConnectSettings) -> Self {
        // Bounds that would stop every request, or overflow an `Instant`, are clamped
        // (a configuration refuses them outright).
        let pool = &mut settings.pool;
        pool.max_connections = pool.max_connections.max(1);
        pool.idle_timeout = pool.idle_timeout.clamp(Duration::from_millis(1), LONGEST);
        pool.body_read_timeout = pool.body_read_timeout.min(LONGEST);
        let authority = http::uri::Authority::try_from(addr.to_string().as_str())
            .unwrap_or_else(|_| http::uri::Authority::from_static("endpoint"));
        let h2_known = matches!(settings.protocol, Protocol::Http2 | Protocol::Grpc);
        let shared = Arc::new(Shared {
            addr,
            authority,
            settings,
            state: Arc::new(ConnState::new()),
            pool: Mutex::new(Pool {
                idle: Vec::new(),
                h2: Vec::new(),
                h2_known,
                dialling: false,
                dials: 0,
                failure: None,
            }),
            dialled: tokio::sync::Notify::new(),
            slots: Arc::new(Slots {
                open: AtomicUsize::new(0),
                waiting: AtomicUsize::new(0),
                line: Mutex::new(Line::default()),
                overflows: AtomicU64::new(0),
            }),
        });
        Self {
            shared,
            backoff: None,
        }
    }

    /// Sends `req` to this endpoint, whatever its URI's authority says: the connection is
    /// always to this endpoint. The URI's authority (the logical service, e.g.
    /// `users.prod`) is kept for `Host` / `:authority`; a request with a relative URI keeps
    /// its `Host`, or gets the endpoint's address.
    pub fn send(&self, req: http::Request<B>) -> ResponseFuture<B> {
        ResponseFuture {
            inner: Box::pin(send(self.shared.clone(), req)),
        }
    }
}

/// One request's exchange: a connection, then the request, sent again on another
/// connection when the first could not take it.
async fn send<B>(
    shared: Arc<Shared<B>>,
    mut req: http::Request<B>,
) -> Result<http::Response<Body<B>>, SendError>
where
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // A plaintext endpoint left at `auto` speaks HTTP/1.1, which gRPC cannot use: known
    // before any connection, so said before one is taken. (HTTP/1.1 chosen on purpose,
    // `Http1` — a gRPC server that takes HTTP/1.1, the request's own version relayed to an
    // application — is sent as asked; TLS without `h2` is the endpoint's to answer.)
    if shared.settings.protocol == Protocol::Auto
        && shared.settings.tls.is_none()
        && req.method() == http::Method::POST
        && mesh_core::classify::is_grpc(req.headers())
    {
        return Err(SendError {
            addr: shared.addr,
            cause: Cause::GrpcOverHttp1(GrpcOverHttp1 { addr: shared.addr }),
        });
    }
    // The request's absolute URI, while an HTTP/1.1 try holds it in origin form.
    let mut absolute: Option<Uri> = None;
    let mut unsent = 0;
    // A CONNECT holds its stream for as long as its tunnel lives: on a connection of its
    // own, so that tunnels neither take the shared HTTP/2 connection's streams (a peer
    // allows a few hundred) nor share its flow-control window.
    // (HTTP/1.1 connections serve one request at a time anyway: a pooled one will do.)
    let own_connection = req.method() == http::Method::CONNECT && shared.pool().h2_known;
    loop {
        let checkout = if own_connection {
            // Boxed: the dial's state would otherwise grow every request's future.
            Box::pin(shared.dial(None))
                .await
                .map_err(|e| SendError::connect(shared.addr, e))?
        } else {
            shared.check_out().await?
        };
        let (unsent_req, error) = match checkout {
            Checkout::H2(mut sender, peer, stream) => {
                if let Some(uri) = absolute.take() {
                    *req.uri_mut() = uri;
                }
                to_absolute_form(&mut req, &shared.authority);
                match sender.try_send_request(req.map(CleanTrailers::new)).await {
                    Ok(resp) => return Ok(finish(resp, None, stream, peer)),
                    Err(mut e) => (
                        e.take_message().map(|r| r.map(CleanTrailers::into_inner)),
                        e.into_error(),
                    ),
                }
            }
            Checkout::H1(mut sender, peer, slot) => {
                if let Some(uri) = to_origin_form(&mut req, &shared.authority) {
                    absolute = Some(uri);
                }
                let connect = req.method() == http::Method::CONNECT;
                let bound = shared.settings.pool.body_read_timeout;
                match sender
                    .try_send_request(req.map(|b| Bounded::new(b, bound)))
                    .await
                {
                    Ok(resp) => {
                        // A switched connection belongs to the response's `OnUpgrade`.
                        let switched = resp.status() == http::StatusCode::SWITCHING_PROTOCOLS
                            || (connect && resp.status().is_success());
                        // A switched connection leaves the pool, and frees its slot: a
                        // tunnel is bounded by its listener's connections.
                        let back = (!switched).then(|| CheckIn {
                            sender,
                            peer: peer.clone(),
                            shared: shared.clone(),
                            slot,
                        });
                        return Ok(finish(resp, back, None, peer));
                    }
                    Err(mut e) => (
                        e.take_message().map(|r| r.map(Bounded::into_inner)),
                        e.into_error(),
                    ),
                }
            }
        };
        match unsent_req {
            // Never written: the connection had closed. Another one may take it.
            Some(unsent_req) if unsent < MAX_UNSENT => {
                tracing::debug!(addr = %shared.addr, %error, "connection closed before the request was sent; sending it on another");
                unsent += 1;
                req = unsent_req;
            }
            _ => return Err(SendError::http(shared.addr, error)),
        }
    }
}

/// How long an HTTP/1.1 request's body may keep its connection waiting for its next
/// piece, unless [`PoolConfig::body_read_timeout`] says otherwise: 60 s, as nginx's
/// `client_body_timeout`. Each such request holds a connection to the endpoint of its
/// own, so a client that sends a head and then trickles its body, or nothing (an HTTP/2
/// stream without `END_STREAM`, hundreds of them on one connection), would otherwise hold
/// as many of the application's connections for as long as it likes. Past it the request
/// fails and its connection closes. HTTP/2 sends, which share one connection, are not
/// bounded.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(60);

pin_project! {
    /// A request body sent over HTTP/1.1, ended with an error ([`BodyReadTimeout`]) once
    /// it has kept its connection waiting for its bound (none when zero).
    struct Bounded<B> {
        #[pin]
        inner: B,
        // Armed when the body first waits; re-armed after each piece.
        timer: Option<Pin<Box<Sleep>>>,
        moved: bool,
        bound: Duration,
    }
}

impl<B> Bounded<B> {
    fn new(inner: B, bound: Duration) -> Self {
        Self {
            inner,
            timer: None,
            moved: false,
            bound,
        }
    }

    fn into_inner(self) -> B {
        self.inner
    }
}

/// Whether `error` is the request's own doing, not the endpoint's: its body stalled past
/// its bound ([`BodyReadTimeout`]) or failed as it was read (the client went away), hyper
/// refused the request as given, or it is a gRPC call to an endpoint that cannot carry
/// one ([`GrpcOverHttp1`]). Such a try says nothing of the endpoint: breakers do not
/// count it, and retries do not repeat it.
pub fn is_request_error(error: &(dyn std::error::Error + 'static)) -> bool {
    mesh_core::error::is_caused_by::<BodyReadTimeout>(error)
        || mesh_core::error::is_caused_by::<GrpcOverHttp1>(error)
        || mesh_core::error::find_cause::<hyper::Error>(error).is_some_and(hyper::Error::is_user)
}

/// A request body kept its HTTP/1.1 connection waiting longer than its bound
/// ([`PoolConfig::body_read_timeout`], default [`BODY_READ_TIMEOUT`]).
#[derive(Debug, thiserror::Error)]
#[error("the request body sent nothing for {0:?}")]
pub struct BodyReadTimeout(pub Duration);

impl<B> http_body::Body for Bounded<B>
where
    B: http_body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = B::Data;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, Self::Error>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(frame) => {
                *this.moved = true;
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending if this.bound.is_zero() => Poll::Pending,
            Poll::Pending => {
                let bound = *this.bound;
                let timer = match this.timer {
                    Some(timer) => {
                        if std::mem::take(this.moved) {
                            timer.as_mut().reset(Instant::now() + bound);
                        }
                        timer
                    }
                    None => {
                        *this.moved = false;
                        this.timer.insert(Box::pin(tokio::time::sleep(bound)))
                    }
                };
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(BodyReadTimeout(bound).into()))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

pin_project! {
    /// A request body sent over HTTP/2, its trailers without connection-specific fields:
    /// an HTTP/1.1 client's trailers may hold anything hyper parsed, and h2 refuses to end
    /// a stream with one of those (the request would wait for its timeout).
    struct CleanTrailers<B> {
        #[pin]
        inner: B,
    }
}

impl<B> CleanTrailers<B> {
    fn new(inner: B) -> Self {
        Self { inner }
    }

    fn into_inner(self) -> B {
        self.inner
    }
}

impl<B: http_body::Body> http_body::Body for CleanTrailers<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        let mut frame = std::task::ready!(self.project().inner.poll_frame(cx));
        if let Some(Ok(frame)) = &mut frame
            && let Some(trailers) = frame.trailers_mut()
        {
            crate::forward::strip_hop_by_hop(trailers);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Joins several `Cookie` fields into one, with `; ` between them.
fn join_cookies(headers: &mut http::HeaderMap) {
    let mut cookies = headers.get_all(http::header::COOKIE).iter();
    if cookies.next().is_none() || cookies.next().is_none() {
        return;
    }
    let mut joined = Vec::new();
    for (i, cookie) in headers.get_all(http::header::COOKIE).iter().enumerate() {
        if i > 0 {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(cookie.as_bytes());
    }
    if let Ok(value) = http::HeaderValue::from_bytes(&joined) {
        headers.insert(http::header::COOKIE, value);
    }
}

/// `TE` speaks of the connection it is sent on, so on HTTP/1.1 its sender lists it in
/// `Connection` too (RFC 9110 §10.1.4): a `TE: trailers` that came over HTTP/2 (every
/// gRPC request's), or from another hop, says so to an HTTP/1.1 server.
fn te_in_connection(headers: &mut http::HeaderMap) {
    let listed = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .any(|option| option.trim_ascii().eq_ignore_ascii_case(b"te"));
    if !listed {
        headers.append(
            http::header::CONNECTION,
            http::HeaderValue::from_static("te"),
        );
    }
}

/// HTTP/2 takes the whole URI (RFC 9113 §8.3.1): a URI without a scheme gets `http`; one
/// without an authority gets the `Host` header's value, else `endpoint`; userinfo is
/// dropped (`:authority` must not carry it). `:authority` then says what `Host` would,
/// so a `Host` header is removed: beside it, it could only disagree (a request routed
/// by one name and served by another).
fn to_absolute_form<B>(req: &mut http::Request<B>, endpoint: &http::uri::Authority) {
    let uri = req.uri();
    let whole = uri.scheme().is_some()
        && uri.path_and_query().is_some()
        && uri.authority().is_some_and(|a| !a.as_str().contains('@'));
    // A Host that is no authority cannot become `:authority`: it is passed on as it came.
    let mut keep_host = false;
    if !whole {
        let mut parts = uri.clone().into_parts();
        parts.scheme.get_or_insert(http::uri::Scheme::HTTP);
        let authority = match parts.authority.take() {
            Some(authority) => Some(without_userinfo(authority)),
            None => match req.headers().get(HOST) {
                Some(host) => match http::uri::Authority::try_from(host.as_bytes()) {
                    Ok(authority) => Some(without_userinfo(authority)),
                    Err(_) => {
                        keep_host = true;
                        None
                    }
                },
                None => None,
            },
        };
        parts.authority = Some(authority.unwrap_or_else(|| endpoint.clone()));
        parts
            .path_and_query
            .get_or_insert_with(|| http::uri::PathAndQuery::from_static("/"));
        if let Ok(uri) = Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
    }
    if !keep_host && req.headers().contains_key(HOST) {
        req.headers_mut().remove(HOST);
    }
}

/// HTTP/1.1 takes the path in the request line and the authority in `Host`
/// (RFC 9112 §3.2): `Host` is the URI's authority without userinfo when it has one
/// (replacing a `Host` that says otherwise), else the request's own `Host`, else
/// `endpoint`. A `CONNECT` keeps its authority form. Cookies an HTTP/2 client split into
/// several fields become one (RFC 9113 §8.2.3: many HTTP/1.1 servers read only the first).
/// Returns the URI it replaced, when it was not in origin form already (an HTTP/2 try of
/// the same request takes it back).
fn to_origin_form<B>(req: &mut http::Request<B>, endpoint: &http::uri::Authority) -> Option<Uri> {
    // One pass over the names rather than a hashed lookup for each of the two.
    let (mut cookie, mut te) = (false, false);
    for name in req.headers().keys() {
        cookie |= *name == http::header::COOKIE;
        te |= *name == http::header::TE;
    }
    if cookie {
        join_cookies(req.headers_mut());
    }
    if te {
        te_in_connection(req.headers_mut());
    }
    match req.uri().authority() {
        Some(authority) => {
            let host = host_of(authority);
            if req.headers().get(HOST).map(|h| h.as_bytes()) != Some(host.as_bytes())
                && let Ok(value) = http::HeaderValue::from_str(host)
            {
                req.headers_mut().insert(HOST, value);
            }
        }
        None => {
            if !req.headers().contains_key(HOST)
                && let Ok(value) = http::HeaderValue::from_str(endpoint.as_str())
            {
                req.headers_mut().insert(HOST, value);
            }
        }
    }
    if req.method() == http::Method::CONNECT {
        return None;
    }
    if req.uri().authority().is_none() && req.uri().scheme().is_none() {
        if req.uri().path_and_query().is_none() {
            *req.uri_mut() = Uri::from_static("/");
        }
        return None;
    }
    // A target with an authority may have an empty path (HTTP/2's `:path` of `?q`): in
    // origin form it is `/` (RFC 9112 §3.2.1). (`http` parses `http://a` with the path
    // `/`, so an absolute-form OPTIONS with an empty path cannot be told apart to go on
    // as `*`, RFC 9112 §3.2.4.)
    let path = match req.uri().path_and_query() {
        Some(path) if path.as_str().starts_with('/') || path.as_str() == "*" => path.clone(),
        Some(path) if !path.as_str().is_empty() => {
            http::uri::PathAndQuery::try_from(format!("/{}", path.as_str()))
                .unwrap_or_else(|_| http::uri::PathAndQuery::from_static("/"))
        }
        _ => http::uri::PathAndQuery::from_static("/"),
    };
    Some(std::mem::replace(req.uri_mut(), Uri::from(path)))
}

/// An authority's host and port: what follows a userinfo's `@`, if any.
fn host_of(authority: &http::uri::Authority) -> &str {
    let s = authority.as_str();
    s.rfind('@').map_or(s, |at| &s[at + 1..])
}

/// `authority` without its userinfo.
fn without_userinfo(authority: http::uri::Authority) -> http::uri::Authority {
    if !authority.as_str().contains('@') {
        return authority;
    }
    http::uri::Authority::try_from(host_of(&authority)).unwrap_or(authority)
}

/// The response with its body wrapped to give the connection back at its end, and the
/// server's identity attached.
fn finish<B: Send + 'static>(
    resp: http::Response<Incoming>,
    back: Option<CheckIn<B>>,
    stream: Option<OpenStream>,
    peer: Option<PeerIdentity>,
) -> http::Response<Body<B>> {
    let (mut parts, inner) = resp.into_parts();
    if let Some(peer) = peer {
        parts.extensions.insert(peer);
    }
    let mut body = Body {
        inner,
        back,
        stream,
    };
    if http_body::Body::is_end_stream(&body.inner) {
        body.give_back();
        body.stream = None;
    }
    http::Response::from_parts(parts, body)
}

/// An HTTP/1.1 connection to give back to the pool when its response is read.
struct CheckIn<B> {
    sender: http1::SendRequest<Bounded<B>>,
    peer: Option<PeerIdentity>,
    shared: Arc<Shared<B>>,
    slot: Option<Slot>,
}

pin_project! {
    /// The body of an [`EndpointClient`] response: hyper's, which gives its HTTP/1.1
    /// connection back to the pool once read to the end. Dropped before its end, it lets
    /// the connection close. Its trailers lose connection-specific fields
    /// ([`strip_hop_by_hop`](crate::forward::strip_hop_by_hop)), which HTTP/2 forbids.
    pub struct Body<B> {
        #[pin]
        inner: Incoming,
        back: Option<CheckIn<B>>,
        // An HTTP/2 stream, counted against its connection's limit until its end.
        stream: Option<OpenStream>,
    }
}

impl<B: Send + 'static> Body<B> {
    fn give_back(&mut self) {
        give_back(&mut self.back);
    }
}

impl<B> fmt::Debug for Body<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Body").field("inner", &self.inner).finish()
    }
}

impl<B: Send + 'static> http_body::Body for Body<B> {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        let mut this = self.project();
        let mut frame = std::task::ready!(this.inner.as_mut().poll_frame(cx));
        // An HTTP/1.1 server's trailers may hold anything hyper parsed; passed on to an
        // HTTP/2 client, a connection-specific one would fail the stream's end.
        if let Some(Ok(trailers)) = &mut frame
            && let Some(trailers) = trailers.trailers_mut()
        {
            crate::forward::strip_hop_by_hop(trailers);
        }
        match &frame {
            None => {
                give_back(this.back);
                *this.stream = None;
            }
            Some(Ok(_)) if this.inner.is_end_stream() => {
                give_back(this.back);
                *this.stream = None;
            }
            // An error ends the exchange: the connection is not reused.
            Some(Err(_)) => {
                *this.back = None;
                *this.stream = None;
            }
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

fn give_back<B: Send + 'static>(back: &mut Option<CheckIn<B>>) {
    if let Some(CheckIn {
        sender,
        peer,
        shared,
        slot,
    }) = back.take()
    {
        shared.check_in(sender, peer, slot);
    }
}

impl<B> tower_service::Service<http::Request<B>> for EndpointClient<B>
where
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = http::Response<Body<B>>;
    type Error = SendError;
    type Future = ResponseFuture<B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), SendError>> {
        loop {
            let Some(until) = self.shared.state.backoff_until(Instant::now()) else {
                self.backoff = None;
                return Poll::Ready(Ok(()));
            };
            match &mut self.backoff {
                Some(sleep) if sleep.deadline() == until => {
                    std::task::ready!(sleep.as_mut().poll(cx));
                    self.backoff = None;
                }
                _ => self.backoff = Some(Box::pin(tokio::time::sleep_until(until))),
            }
        }
    }

    fn call(&mut self, req: http::Request<B>) -> ResponseFuture<B> {
        self.send(req)
    }
}

type SendFuture<B> =
    Pin<Box<dyn Future<Output = Result<http::Response<Body<B>>, SendError>> + Send>>;

/// The response future of an [`EndpointClient`].
pub struct ResponseFuture<B> {
    inner: SendFuture<B>,
}

impl<B> fmt::Debug for ResponseFuture<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<B> Future for ResponseFuture<B> {
    type Output = Result<http::Response<Body<B>>, SendError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

/// A request to an endpoint failed: it could not connect, or the connection failed.
/// The message names the cause, down to the deepest one.
#[derive(Debug)]
pub struct SendError {
    addr: SocketAddr,
    cause: Cause,
}

#[derive(Debug)]
enum Cause {
    Connect(Arc<ConnectError>),
    Http(hyper::Error),
    Overflow(PoolOverflow),
    GrpcOverHttp1(GrpcOverHttp1),
}

impl SendError {
    pub(crate) fn connect(addr: SocketAddr, error: Arc<ConnectError>) -> Self {
        Self {
            addr,
            cause: Cause::Connect(error),
        }
    }

    fn http(addr: SocketAddr, error: hyper::Error) -> Self {
        Self {
            addr,
            cause: Cause::Http(error),
        }
    }

    /// Whether no connection could be made (the request never left).
    pub fn is_connect(&self) -> bool {
        matches!(self.cause, Cause::Connect(_))
    }

    /// The endpoint.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (mut message, mut cause) = match &self.cause {
            Cause::Connect(e) => (e.to_string(), std::error::Error::source(&**e)),
            Cause::Http(e) => (
                format!("request to {} failed: {e}", self.addr),
                std::error::Error::source(e),
            ),
            Cause::Overflow(e) => (e.to_string(), None),
            Cause::GrpcOverHttp1(e) => (e.to_string(), None),
        };
        // Name every cause below that adds something.
        while let Some(e) = cause {
            let text = e.to_string();
            if !message.contains(&text) {
                message.push_str(": ");
                message.push_str(&text);
            }
            cause = e.source();
        }
        f.write_str(&message)
    }
}

impl std::error::Error for SendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.cause {
            Cause::Connect(e) => Some(&**e),
            Cause::Http(e) => Some(e),
            Cause::Overflow(e) => Some(e),
            Cause::GrpcOverHttp1(e) => Some(e),
        }
    }
}

#[cfg(all(test, feature = "test-util"))]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::mock::{Behavior, MockEndpoint};
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use mesh_spiffe::test_ca::TestCa;
    use mesh_spiffe::{Authorizer, CredentialStore, Mtls, MtlsAcceptor};

    fn request(body: &'static str) -> http::Request<Full<Bytes>> {
        http::Request::post("http://users.prod/echo")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap()
    }

    /// gRPC needs HTTP/2: a gRPC call to an endpoint reached over HTTP/1.1 (plaintext,
    /// `protocol = "auto"`) is not sent, and says which setting to change; the connection
    /// it found stays in the pool for the next request.
    #[tokio::test]
    async fn a_grpc_call_over_http1_is_refused_naming_the_setting() {
        let ep = MockEndpoint::spawn("a", Behavior::default()).await.unwrap();
        let client = EndpointClient::new(ep.addr(), ConnectSettings::plaintext());
        let resp = client.send(request("warm")).await.unwrap();
        assert_eq!(read(resp).await, "warm");
        let grpc = http::Request::post("http://users.prod/pkg.Users/Get")
            .header("content-type", "application/grpc")
            .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
            .unwrap();
        let err = client.send(grpc).await.unwrap_err();
        assert!(is_request_error(&err), "{err}");
        assert!(err.to_string().contains("protocol = \"grpc\""), "{err}");
        let resp = client.send(request("again")).await.unwrap();
        assert_eq!(read(resp).await, "again");
        assert_eq!(connections(&ep), 1);
        // HTTP/1.1 chosen on purpose (a gRPC server that takes it; an application's own
        // version relayed to it) is sent as asked.
        let http1 = EndpointClient::new(
            ep.addr(),
            ConnectSettings {
                protocol: Protocol::Http1,
                ..ConnectSettings::plaintext()
            },
        );
        let grpc = http::Request::post("http://users.prod/pkg.Users/Get")
            .header("content-type", "application/grpc")
            .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
            .unwrap();
        assert!(http1.send(grpc).await.is_ok());
    }

    #[tokio::test]
    async fn plaintext_http1_and_http2() {
        let ep = MockEndpoint::spawn("a", Behavior::default()).await.unwrap();
        for protocol in [Protocol::Auto, Protocol::Http1, Protocol::Http2] {
            let client = EndpointClient::new(
                ep.addr(),
                ConnectSettings {
                    protocol,
                    ..ConnectSettings::plaintext()
                },
            );
            for _ in 0..3 {
                let resp = client.send(request("hello")).await.unwrap();
                let want = if protocol == Protocol::Http2 {
                    http::Version::HTTP_2
                } else {
                    http::Version::HTTP_11
                };
                assert_eq!(resp.version(), want);
                assert_eq!(
                    resp.into_body().collect().await.unwrap().to_bytes(),
                    "hello"
                );
            }
        }
        // One connection per client: reused (HTTP/1.1) or multiplexed (HTTP/2).
        assert_eq!(ep.stats().connections.load(Ordering::Relaxed), 3);
    }

    /// A server that answers each request with the target and `Host` it received.
    #[cfg(feature = "server")]
    async fn target_echo() -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let echo =
                        hyper::service::service_fn(|req: http::Request<Incoming>| async move {
                            let host = req
                                .headers()
                                .get(HOST)
                                .map_or("-", |h| h.to_str().unwrap_or("?"))
                                .to_owned();
                            let answer = format!("{} {}", req.uri(), host);
                            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                                Bytes::from(answer),
                            )))
                        });
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), echo)
                    .await;
                });
            }
        });
        addr
    }

    #[cfg(feature = "server")]
    #[tokio::test]
    async fn http1_gets_origin_form_and_host_http2_the_whole_uri() {
        let addr = target_echo().await;
        let get = |uri: &str, host: Option<&str>| {
            let mut req = http::Request::get(uri);
            if let Some(host) = host {
                req = req.header(HOST, host);
            }
            req.body(Full::new(Bytes::new())).unwrap()
        };
        let cases = [
            // (protocol, URI, Host sent, what the server saw)
            (Protocol::Http1, "/x?y", None, format!("/x?y {addr}")),
            (
                Protocol::Http1,
                "/x",
                Some("users.prod"),
                "/x users.prod".to_owned(),
            ),
            (
                Protocol::Http1,
                "http://users.prod/x?y",
                None,
                "/x?y users.prod".to_owned(),
            ),
            (
                Protocol::Http2,
                "/x?y",
                None,
                format!("http://{addr}/x?y -"),
            ),
            (
                Protocol::Http2,
                "http://users.prod/x",
                None,
                "http://users.prod/x -".to_owned(),
            ),
            // The URI's authority wins over a Host that names another (RFC 9112 §3.2.2,
            // RFC 9113 §8.3.1), and userinfo goes nowhere.
            (
                Protocol::Http1,
                "http://users.prod/x",
                Some("admin.internal"),
                "/x users.prod".to_owned(),
            ),
            (
                Protocol::Http1,
                "http://user:secret@users.prod:8080/x",
                None,
                "/x users.prod:8080".to_owned(),
            ),
            (
                Protocol::Http2,
                "http://users.prod/x",
                Some("admin.internal"),
                "http://users.prod/x -".to_owned(),
            ),
            (
                Protocol::Http2,
                "http://user:secret@users.prod/x",
                None,
                "http://users.prod/x -".to_owned(),
            ),
            // A relative URI to HTTP/2: its Host becomes :authority; one that is no
            // authority stays a header, beside the endpoint's address.
            (
                Protocol::Http2,
                "/x",
                Some("users.prod"),
                "http://users.prod/x -".to_owned(),
            ),
            (
                Protocol::Http2,
                "/x",
                Some("bad{host}"),
                format!("http://{addr}/x bad{{host}}"),
            ),
        ];
        for (protocol, uri, host, want) in cases {
            let client = EndpointClient::new(
                addr,
                ConnectSettings {
                    protocol,
                    ..ConnectSettings::plaintext()
                },
            );
            let resp = client.send(get(uri, host)).await.unwrap();
            assert_eq!(read(resp).await, want, "{protocol:?} {uri} {host:?}");
        }
    }

    /// An HTTP/1.1 client of `addr` whose pool has the bounds `pool`.
    fn pooled<B>(addr: SocketAddr, pool: PoolConfig) -> EndpointClient<B>
    where
        B: http_body::Body + Send + Unpin + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        EndpointClient::new(
            addr,
            ConnectSettings {
                protocol: Protocol::Http1,
                pool,
                ..ConnectSettings::plaintext()
            },
        )
    }

    /// A scripted endpoint that answers after 30 ms.
    async fn slow_endpoint() -> MockEndpoint {
        let slow = Behavior {
            latency: crate::mock::Latency::Fixed(Duration::from_millis(30)),
            ..Behavior::default()
        };
        MockEndpoint::spawn("a", slow).await.unwrap()
    }

    fn connections(ep: &MockEndpoint) -> u64 {
        ep.stats().connections.load(Ordering::Relaxed)
    }

    async fn read(resp: http::Response<Body<Full<Bytes>>>) -> Bytes {
        resp.into_body().collect().await.unwrap().to_bytes()
    }

    #[tokio::test]
    async fn a_body_read_to_its_end_gives_the_connection_back_and_a_dropped_one_closes_it() {
        let ep = MockEndpoint::spawn("a", Behavior::default()).await.unwrap();
        let client = EndpointClient::new(
            ep.addr(),
            ConnectSettings {
                protocol: Protocol::Http1,
                ..ConnectSettings::plaintext()
            },
        );
        assert_eq!(
            read(client.send(request("one")).await.unwrap()).await,
            "one"
        );
        assert_eq!(
            read(client.send(request("two")).await.unwrap()).await,
            "two"
        );
        assert_eq!(connections(&ep), 1, "reused once read");
        // Dropped unread: that connection cannot carry another exchange.
        drop(client.send(request("three")).await.unwrap());
        assert_eq!(
            read(client.send(request("four")).await.unwrap()).await,
            "four"
        );
        assert_eq!(connections(&ep), 2);
        assert_eq!(
            read(client.send(request("five")).await.unwrap()).await,
            "five"
        );
        assert_eq!(connections(&ep), 2);
    }

    type BoxedBody = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

    /// A client of the endpoint at `addr` that speaks HTTP/1.1, with boxed bodies.
    fn http1_client(addr: SocketAddr) -> EndpointClient<BoxedBody> {
        EndpointClient::new(
            addr,
            ConnectSettings {
                protocol: Protocol::Http1,
                ..ConnectSettings::plaintext()
            },
        )
    }

    /// An upload whose body sends one piece, then nothing, and never ends (declaring
    /// `length` when given).
    fn stalled_upload(length: Option<u64>) -> http::Request<BoxedBody> {
        use futures_util::StreamExt as _;
        let trickle = futures_util::stream::iter([Ok::<_, std::convert::Infallible>(
            http_body::Frame::data(Bytes::from_static(b"partial")),
        )])
        .chain(futures_util::stream::pending());
        let mut upload = http::Request::post("http://users.prod/upload");
        if let Some(length) = length {
            upload = upload.header(http::header::CONTENT_LENGTH, length);
        }
        upload
            .body(BodyExt::boxed(http_body_util::StreamBody::new(trickle)))
            .unwrap()
    }

    /// A request body that keeps its HTTP/1.1 connection waiting fails the request after
    /// BODY_READ_TIMEOUT, and the connection to the application closes: a client cannot
    /// hold the application's connections with bodies it never finishes.
    #[tokio::test(start_paused = true)]
    async fn a_stalled_request_body_lets_its_connection_go() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Reads whatever comes, answers nothing; says when the connection closed.
        let closed = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            while tcp.read(&mut buf).await.is_ok_and(|n| n > 0) {}
            tokio::time::Instant::now()
        });
        let client = http1_client(addr);
        let upload = stalled_upload(None);
        let started = tokio::time::Instant::now();
        let error = client.send(upload).await.unwrap_err();
        assert!(
            mesh_core::error::is_caused_by::<BodyReadTimeout>(&error),
            "{error:?}"
        );
        // The request's doing, not the endpoint's: breakers and retries leave it be.
        assert!(is_request_error(&error));
        let at = closed.await.unwrap();
        let waited = at - started;
        assert!(
            waited >= BODY_READ_TIMEOUT && waited < BODY_READ_TIMEOUT + Duration::from_secs(1),
            "{waited:?}"
        );
    }

    /// `pool.body_read_timeout` replaces the 60 s bound, and `0s` lifts it.
    #[tokio::test(start_paused = true)]
    async fn the_body_read_bound_is_configurable_and_zero_lifts_it() {
        use tokio::io::AsyncReadExt;
        for bound in [Duration::from_secs(5), Duration::ZERO] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move {
                let (mut tcp, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 4096];
                while tcp.read(&mut buf).await.is_ok_and(|n| n > 0) {}
            });
            let client = pooled(
                addr,
                PoolConfig {
                    body_read_timeout: bound,
                    ..PoolConfig::default()
                },
            );
            let started = tokio::time::Instant::now();
            let sent = tokio::time::timeout(
                BODY_READ_TIMEOUT * 3,
                client.send(stalled_upload(Some(100))),
            )
            .await;
            if bound.is_zero() {
                assert!(sent.is_err(), "no bound: still sending");
            } else {
                let error = sent.unwrap().unwrap_err();
                let Some(BodyReadTimeout(after)) = mesh_core::error::find_cause(&error) else {
                    panic!("{error:?}");
                };
                assert_eq!(*after, bound);
                let waited = started.elapsed();
                assert!(
                    waited >= bound && waited < bound + Duration::from_secs(1),
                    "{waited:?}"
                );
            }
        }
    }

    /// At most `max_connections` are open to an endpoint: the requests past them wait
    /// for one to come back, and those past `max_pending` waiting fail at once, not sent
    /// and not the endpoint's fault.
    #[tokio::test]
    async fn the_pool_bounds_connections_and_the_requests_waiting() {
        let ep = slow_endpoint().await;
        let client = pooled(
            ep.addr(),
            PoolConfig {
                max_connections: 2,
                max_pending: 3,
                ..PoolConfig::default()
            },
        );
        for round in 0..2 {
            // Polled in order: two dial, three wait in line, the sixth finds it full.
            let sends = (0..6).map(|i| {
                let client = &client;
                async move {
                    match client.send(request("x")).await {
                        Ok(resp) => Ok(read(resp).await),
                        Err(error) => Err((i, error)),
                    }
                }
            });
            let results = futures_util::future::join_all(sends).await;
            let mut failed = Vec::new();
            for result in results {
                match result {
                    Ok(body) => assert_eq!(body, "x"),
                    Err((i, error)) => {
                        assert!(is_pool_overflow(&error), "{error:?}");
                        assert!(!error.is_connect() && !is_request_error(&error));
                        let text = error.to_string();
                        assert!(text.contains("all 2 HTTP/1.1 connections"), "{text}");
                        failed.push(i);
                    }
                }
            }
            assert_eq!(failed, [5], "round {round}");
            assert_eq!(connections(&ep), 2, "round {round}: never more than two");
            let status = client.pool_status();
            assert_eq!((status.open, status.waiting), (2, 0), "round {round}");
            assert_eq!(status.overflows, round + 1);
        }
        // Nobody waits past the limit when no one may wait.
        let strict = pooled(
            ep.addr(),
            PoolConfig {
                max_connections: 1,
                max_pending: 0,
                ..PoolConfig::default()
            },
        );
        let first = strict.send(request("a"));
        let second = strict.send(request("b"));
        let (first, second) = tokio::join!(first, second);
        assert_eq!(read(first.unwrap()).await, "a");
        assert!(is_pool_overflow(&second.unwrap_err()));
        // Its one connection came back: the next request takes it.
        assert_eq!(read(strict.send(request("c")).await.unwrap()).await, "c");
    }

    /// The line is first come, first served: a connection given back goes to the request
    /// at its front, not to one that arrives at that moment (here, in the same task that
    /// gives it back, before the waiters can run).
    #[tokio::test]
    async fn the_line_is_first_come_first_served() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let log = log.clone();
                let app = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                    log.lock().unwrap().push(req.uri().path().to_owned());
                    async move {
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::from_static(b"ok"),
                        )))
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), app),
                );
            }
        });
        let client: EndpointClient<Full<Bytes>> = pooled(
            addr,
            PoolConfig {
                max_connections: 1,
                ..PoolConfig::default()
            },
        );
        let get = |path: &str| {
            http::Request::get(format!("http://users.prod{path}"))
                .body(Full::new(Bytes::new()))
                .unwrap()
        };
        // The one connection, held while its answer is unread.
        let first = client.send(get("/0")).await.unwrap();
        let waiters: Vec<_> = ["/1", "/2"]
            .into_iter()
            .map(|path| tokio::spawn(client.send(get(path))))
            .collect();
        // Both in line before the connection comes back.
        while client.pool_status().waiting < 2 {
            tokio::task::yield_now().await;
        }
        read(first).await;
        // Arrives as the connection comes back, and looks before the waiters run.
        let mut late = client.send(get("/late"));
        assert!((&mut late).now_or_never().is_none(), "in line, behind them");
        for waiter in waiters {
            let answered = tokio::time::timeout(Duration::from_secs(5), waiter)
                .await
                .expect("the waiters come first: the late request is behind them");
            read(answered.unwrap().unwrap()).await;
        }
        read(late.await.unwrap()).await;
        assert_eq!(*seen.lock().unwrap(), ["/0", "/1", "/2", "/late"]);
    }

    /// A slot freed by a connection that closed (not only one given back) lets a waiting
    /// request dial.
    #[tokio::test]
    async fn a_closed_connection_frees_its_place_for_a_waiting_request() {
        let ep = slow_endpoint().await;
        let client = pooled(
            ep.addr(),
            PoolConfig {
                max_connections: 1,
                ..PoolConfig::default()
            },
        );
        let first = client.send(request("a"));
        let second = client.send(request("b"));
        let (first, second) = tokio::join!(
            async {
                // Dropped unread: the connection closes rather than coming back.
                drop(first.await.unwrap());
            },
            second
        );
        let () = first;
        assert_eq!(read(second.unwrap()).await, "b");
        assert_eq!(connections(&ep), 2);
    }

    /// Cookies an HTTP/2 client sent as several fields reach an HTTP/1.1 server as one.
    #[test]
    fn cookie_fields_are_joined_for_http1() {
        let endpoint: http::uri::Authority = "10.0.0.1:80".parse().unwrap();
        let mut req = http::Request::get("http://users/")
            .header(http::header::COOKIE, "a=1")
            .header(http::header::COOKIE, "b=2")
            .header(http::header::COOKIE, "c=3")
            .body(())
            .unwrap();
        to_origin_form(&mut req, &endpoint);
        let cookies: Vec<_> = req.headers().get_all(http::header::COOKIE).iter().collect();
        assert_eq!(cookies, ["a=1; b=2; c=3"]);
        let mut one = http::Request::get("/")
            .header(http::header::COOKIE, "a=1")
            .body(())
            .unwrap();
        to_origin_form(&mut one, &endpoint);
        assert_eq!(one.headers()[http::header::COOKIE], "a=1");
    }

    /// An HTTP/1.1 server's trailers lose connection-specific fields, which an HTTP/2
    /// client's stream could not end with; the others stay.
    #[tokio::test]
    async fn connection_specific_trailers_are_dropped() {
        use http_body_util::BodyExt;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut head = [0; 1024];
            let _ = tcp.read(&mut head).await.unwrap();
            tcp.write_all(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-checksum\r\n\r\n\
                  2\r\nok\r\n0\r\nx-checksum: 1\r\nconnection: x\r\nkeep-alive: 5\r\n\r\n",
            )
            .await
            .unwrap();
            let _ = tcp.read(&mut head).await;
        });
        let client: EndpointClient<Full<Bytes>> =
            EndpointClient::new(addr, ConnectSettings::plaintext());
        let resp = client
            .send(
                http::Request::get("/")
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap();
        let whole = resp.into_body().collect().await.unwrap();
        let trailers = whole.trailers().cloned().unwrap();
        assert_eq!(whole.to_bytes(), "ok");
        let names: Vec<_> = trailers.keys().map(http::HeaderName::as_str).collect();
        assert_eq!(names, ["x-checksum"]);
    }

    /// A request's connection-specific trailers (an HTTP/1.1 client's, as hyper parsed
    /// them) are dropped before they go on HTTP/2, which could not end the stream with
    /// them: the request completes, its other trailers with it.
    #[tokio::test]
    async fn a_requests_connection_specific_trailers_are_dropped_for_http2() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let app = hyper::service::service_fn(|req: http::Request<Incoming>| async move {
                let whole = req.into_body().collect().await.unwrap();
                let mut names: Vec<String> = whole
                    .trailers()
                    .map(|t| t.keys().map(|k| k.as_str().to_owned()).collect())
                    .unwrap_or_default();
                names.sort();
                Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from(
                    names.join(","),
                ))))
            });
            let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), app)
                .await;
        });
        type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, std::convert::Infallible>;
        let client: EndpointClient<Body> = EndpointClient::new(
            addr,
            ConnectSettings {
                protocol: Protocol::Http2,
                ..ConnectSettings::plaintext()
            },
        );
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-checksum", "1".parse().unwrap());
        trailers.insert("connection", "x".parse().unwrap());
        trailers.insert("keep-alive", "5".parse().unwrap());
        let frames = futures_util::stream::iter([
            Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::from_static(b"x"))),
            Ok(http_body::Frame::trailers(trailers)),
        ]);
        let req = http::Request::post("/upload")
            .body(http_body_util::StreamBody::new(frames).boxed_unsync())
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(5), client.send(req))
            .await
            .expect("the request ends")
            .unwrap();
        let body = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect())
            .await
            .expect("the answer ends")
            .unwrap()
            .to_bytes();
        assert_eq!(body, "x-checksum");
    }

    /// A target with an authority and an empty path (an HTTP/2 `:path` of `?a=b`) goes on
    /// as `/?a=b`, never as a `?`-led request line.
    #[test]
    fn empty_paths_become_slash() {
        let endpoint: http::uri::Authority = "10.0.0.1:80".parse().unwrap();
        for (pq, target) in [("?a=b", "/?a=b"), ("/x?y", "/x?y"), ("*", "*")] {
            let mut parts = http::uri::Parts::default();
            parts.scheme = Some(http::uri::Scheme::HTTP);
            parts.authority = Some(http::uri::Authority::from_static("users"));
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static(pq));
            let mut req = http::Request::builder()
                .method(http::Method::OPTIONS)
                .uri(Uri::from_parts(parts).unwrap())
                .body(())
                .unwrap();
            to_origin_form(&mut req, &endpoint);
            assert_eq!(req.uri().to_string(), target, "{pq}");
            assert_eq!(req.headers()[HOST], "users");
        }
    }

    /// A `TE` sent over HTTP/1.1 is named in `Connection` (beside an upgrade's `upgrade`),
    /// once; a request without `TE` gets no `Connection` from it.
    #[test]
    fn te_is_named_in_connection_for_http1() {
        let endpoint: http::uri::Authority = "10.0.0.1:80".parse().unwrap();
        let connection = |req: &http::Request<()>| -> Vec<String> {
            req.headers()
                .get_all(http::header::CONNECTION)
                .iter()
                .map(|v| v.to_str().unwrap().to_owned())
                .collect()
        };
        let mut grpc = http::Request::post("http://users/a.B/C")
            .header(http::header::TE, "trailers")
            .body(())
            .unwrap();
        to_origin_form(&mut grpc, &endpoint);
        assert_eq!(connection(&grpc), ["te"]);
        to_origin_form(&mut grpc, &endpoint);
        assert_eq!(connection(&grpc), ["te"], "not twice");
        let mut upgrade = http::Request::get("/chat")
            .header(http::header::TE, "trailers")
            .header(http::header::CONNECTION, "upgrade")
            .header(http::header::UPGRADE, "websocket")
            .body(())
            .unwrap();
        to_origin_form(&mut upgrade, &endpoint);
        assert_eq!(connection(&upgrade), ["upgrade", "te"]);
        let mut plain = http::Request::get("/").body(()).unwrap();
        to_origin_form(&mut plain, &endpoint);
        assert!(connection(&plain).is_empty());
    }

    /// An application that answers before it has read the request's body (a 401 to an
    /// upload) leaves the connection busy with that body, which a client may trickle
    /// forever: a later request that finds it idle is not held by it.
    #[tokio::test]
    async fn a_connection_still_sending_a_body_does_not_hold_the_next_request() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    loop {
                        // Each head is answered at once; whatever follows is read and
                        // dropped, as an application that ignores an upload does.
                        let Ok(n) = tcp.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        head.extend_from_slice(&buf[..n]);
                        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                            head.drain(..end + 4);
                            let answer =
                                b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 2\r\n\r\nno";
                            if tcp.write_all(answer).await.is_err() {
                                return;
                            }
                            head.clear();
                        }
                    }
                });
            }
        });
        let client = http1_client(addr);
        let upload = stalled_upload(Some(100_000));
        let resp = client.send(upload).await.unwrap();
        assert_eq!(resp.status(), 401);
        resp.into_body().collect().await.unwrap();
        let get = http::Request::get("http://users.prod/")
            .body(BodyExt::boxed(Full::new(Bytes::new())))
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(5), client.send(get))
            .await
            .expect("not held by the connection still sending the upload")
            .unwrap();
        assert_eq!(resp.status(), 401);
    }

    /// With one connection allowed, a request waiting for it gets it once the upload it
    /// was still sending (after the application's early answer) is done: the connection
    /// comes back when it is ready, and wakes the request.
    #[tokio::test]
    async fn a_request_waiting_for_a_connection_gets_it_when_its_upload_ends() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicU32::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    // Answers each head at once; the 10-byte upload after the first is
                    // read and dropped.
                    let mut seen = Vec::new();
                    let mut buf = [0u8; 4096];
                    let mut answered = 0;
                    while let Ok(n @ 1..) = tcp.read(&mut buf).await {
                        seen.extend_from_slice(&buf[..n]);
                        let heads = seen.windows(4).filter(|w| w == b"\r\n\r\n").count();
                        while answered < heads {
                            answered += 1;
                            let answer =
                                b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 2\r\n\r\nno";
                            if tcp.write_all(answer).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        let client: EndpointClient<BoxedBody> = pooled(
            addr,
            PoolConfig {
                max_connections: 1,
                ..PoolConfig::default()
            },
        );
        let (more, rx) = tokio::sync::mpsc::unbounded_channel::<
            Result<http_body::Frame<Bytes>, std::convert::Infallible>,
        >();
        let rest = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|frame| (frame, rx))
        });
        more.send(Ok(http_body::Frame::data(Bytes::from_static(b"partial"))))
            .unwrap();
        let upload = http::Request::post("http://users.prod/upload")
            .header(http::header::CONTENT_LENGTH, 10)
            .body(BodyExt::boxed(http_body_util::StreamBody::new(rest)))
            .unwrap();
        let resp = client.send(upload).await.unwrap();
        assert_eq!(resp.status(), 401);
        resp.into_body().collect().await.unwrap();
        let get = || {
            http::Request::get("http://users.prod/")
                .body(BodyExt::boxed(Full::new(Bytes::new())))
                .unwrap()
        };
        let waiting = client.send(get());
        tokio::pin!(waiting);
        assert!(
            tokio::time::timeout(Duration::from_millis(200), &mut waiting)
                .await
                .is_err(),
            "the one connection is still sending the upload"
        );
        more.send(Ok(http_body::Frame::data(Bytes::from_static(b"123"))))
            .unwrap();
        drop(more);
        let resp = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("woken when the connection came back")
            .unwrap();
        assert_eq!(resp.status(), 401);
        assert_eq!(accepted.load(Ordering::Relaxed), 1, "the same connection");
    }

    #[tokio::test]
    async fn concurrent_http1_requests_open_connections_then_reuse_them() {
        let ep = slow_endpoint().await;
        let client = EndpointClient::new(ep.addr(), ConnectSettings::plaintext());
        for round in 0..3 {
            let sends =
                (0..6).map(|_| async { read(client.send(request("x")).await.unwrap()).await });
            for body in futures_util::future::join_all(sends).await {
                assert_eq!(body, "x");
            }
            assert_eq!(
                connections(&ep),
                6,
                "round {round}: one connection per concurrent request, kept"
            );
        }
    }

    #[tokio::test]
    async fn concurrent_first_requests_share_one_http2_dial() {
        let ep = MockEndpoint::spawn(
            "a",
            Behavior {
                latency: crate::mock::Latency::Fixed(Duration::from_millis(10)),
                ..Behavior::default()
            },
        )
        .await
        .unwrap();
        let client = EndpointClient::new(
            ep.addr(),
            ConnectSettings {
                protocol: Protocol::Http2,
                ..ConnectSettings::plaintext()
            },
        );
        let sends = (0..16).map(|_| async {
            let resp = client.send(request("x")).await.unwrap();
            assert_eq!(resp.version(), http::Version::HTTP_2);
            read(resp).await
        });
        for body in futures_util::future::join_all(sends).await {
            assert_eq!(body, "x");
        }
        assert_eq!(connections(&ep), 1);
    }

    /// A request dropped while it dials the HTTP/2 connection (its timeout fired, its
    /// caller went away) releases the requests waiting for that dial: the next one dials
    /// again. Before, they waited forever, and so did every later request.
    #[tokio::test]
    async fn a_dial_dropped_midway_releases_the_requests_waiting_for_it() {
        let ep = MockEndpoint::spawn("a", Behavior::default()).await.unwrap();
        let to = ep.addr();
        let dials = Arc::new(AtomicU32::new(0));
        let count = dials.clone();
        // The first dial never ends; the next reach the endpoint.
        let dialer = Dialer::new(move |_addr| {
            let first = count.fetch_add(1, Ordering::Relaxed) == 0;
            async move {
                if first {
                    std::future::pending::<()>().await;
                }
                let (near, mut far) = tokio::io::duplex(64 * 1024);
                let mut tcp = TcpStream::connect(to).await?;
                tokio::spawn(async move {
                    let _ = tokio::io::copy_bidirectional(&mut far, &mut tcp).await;
                });
                Ok(near)
            }
        });
        let client = EndpointClient::new(
            to,
            ConnectSettings {
                protocol: Protocol::Http2,
                dialer: Some(dialer),
                ..ConnectSettings::plaintext()
            },
        );
        // The first request dials (and is given up after 200 ms, within the connect
        // timeout); the second, polled after it, waits for that dial.
        let dialling = tokio::time::timeout(Duration::from_millis(200), client.send(request("x")));
        let waiting = tokio::time::timeout(Duration::from_secs(10), client.send(request("y")));
        let (dialling, waiting) = tokio::join!(dialling, waiting);
        assert!(dialling.is_err(), "the first request was given up mid-dial");
        let resp = waiting.expect("the waiting request was released").unwrap();
        assert_eq!(read(resp).await, "y");
        assert_eq!(dials.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn requests_waiting_for_a_failed_http2_dial_fail_with_its_cause() {
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        let client = EndpointClient::new(
            addr,
            ConnectSettings {
                protocol: Protocol::Http2,
                ..ConnectSettings::plaintext()
            },
        );
        let sends = (0..8).map(|_| client.send(request("x")));
        for result in futures_util::future::join_all(sends).await {
            let err = result.unwrap_err();
            assert!(err.is_connect(), "{err}");
            assert!(
                err.to_string()
                    .starts_with(&format!("connecting to {addr}: ")),
                "{err}"
            );
        }
        assert_eq!(
            client.conn_state().failures(),
            1,
            "one dial for all of them"
        );
    }

    /// A keep-alive HTTP/1.1 server that answers one request per connection, then closes
    /// it, and counts connections.
    async fn one_answer_per_connection() -> (SocketAddr, Arc<AtomicU32>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicU32::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tcp.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let _ = tcp
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                    // Closed as an idle keep-alive connection would be, with no notice.
                });
            }
        });
        (addr, accepted)
    }

    #[tokio::test]
    async fn a_connection_closed_while_idle_loses_no_request() {
        let (addr, accepted) = one_answer_per_connection().await;
        let client = EndpointClient::new(addr, ConnectSettings::plaintext());
        for i in 0..5 {
            // POSTs: never retried by the retry layer, so only the pool can save them.
            let resp = client.send(request("x")).await.unwrap();
            assert_eq!(read(resp).await, "ok", "request {i}");
        }
        assert_eq!(accepted.load(Ordering::Relaxed), 5);
    }

    /// Idle connections expire after `idle_timeout`, and an expired one frees its place
    /// at once: with one connection allowed and nobody allowed to wait, the request that
    /// finds it expired dials a new one rather than being refused.
    #[tokio::test(start_paused = true)]
    async fn idle_connections_expire() {
        let ep = MockEndpoint::spawn("a", Behavior::default()).await.unwrap();
        let idle_timeout = Duration::from_secs(30);
        let client = EndpointClient::new(
            ep.addr(),
            ConnectSettings {
                protocol: Protocol::Http1,
                pool: PoolConfig {
                    max_connections: 1,
                    max_pending: 0,
                    idle_timeout,
                    ..PoolConfig::default()
                },
                ..ConnectSettings::plaintext()
            },
        );
        read(client.send(request("x")).await.unwrap()).await;
        tokio::time::advance(idle_timeout - Duration::from_secs(1)).await;
        read(client.send(request("x")).await.unwrap()).await;
        assert_eq!(connections(&ep), 1, "not yet expired");
        tokio::time::advance(idle_timeout).await;
        read(client.send(request("x")).await.unwrap()).await;
        assert_eq!(connections(&ep), 2);
    }

    #[tokio::test]
    async fn mtls_negotiates_h2_and_attaches_the_server_identity() {
        let (server, client) = users_and_web();
        let acceptor = MtlsAcceptor::new(&server, Authorizer::any()).unwrap();
        let ep = MockEndpoint::spawn_mtls("users", Behavior::default(), acceptor)
            .await
            .unwrap();
        let expected = mesh_core::SpiffeId::new("spiffe://example.org/users").unwrap();
        let connector = MtlsConnector::new(&client, expected.clone()).unwrap();
        let c = EndpointClient::new(ep.addr(), ConnectSettings::mtls(connector));
        let resp = c.send(request("hi")).await.unwrap();
        assert_eq!(resp.version(), http::Version::HTTP_2);
        assert_eq!(
            resp.extensions().get::<PeerIdentity>().unwrap().id(),
            &expected
        );

        // A client expecting another identity cannot connect, and says why.
        let wrong = MtlsConnector::new(
            &client,
            mesh_core::SpiffeId::new("spiffe://example.org/billing").unwrap(),
        )
        .unwrap();
        let c = EndpointClient::new(ep.addr(), ConnectSettings::mtls(wrong));
        let err = c.send(request("hi")).await.unwrap_err();
        assert!(err.is_connect());
        let message = err.to_string();
        assert!(
            message.starts_with(&format!("TLS with {}", ep.addr()))
                && message.contains("is not authorized"),
            "{message}"
        );
        let chain: Vec<String> = mesh_core::error::chain(&err)
            .map(|e| e.to_string())
            .collect();
        assert!(
            chain.iter().any(|m| m.contains("is not authorized")),
            "{chain:?}"
        );
        assert!(!c.conn_state().is_ready(Instant::now()));
    }

    /// Credentials of `users` (the server) and `web` (the client), from one test CA.
    fn users_and_web() -> (Mtls, Mtls) {
        let mut ca = TestCa::new("example.org").unwrap();
        let mut issue = |id| {
            Mtls::new(CredentialStore::with(
                ca.issue(id).unwrap(),
                ca.bundle_set().unwrap(),
            ))
        };
        (
            issue("spiffe://example.org/users"),
            issue("spiffe://example.org/web"),
        )
    }

    /// A dialer that reaches the real endpoint `to` through an in-memory pipe, whatever
    /// address it is asked for, and counts the dials.
    fn piped(to: SocketAddr, dials: Arc<AtomicU32>) -> Dialer {
        Dialer::new(move |_addr| {
            dials.fetch_add(1, Ordering::Relaxed);
            async move {
                let (near, mut far) = tokio::io::duplex(64 * 1024);
                let mut tcp = TcpStream::connect(to).await?;
                tokio::spawn(async move {
                    let _ = tokio::io::copy_bidirectional(&mut far, &mut tcp).await;
                });
                Ok(near)
            }
        })
    }

    #[tokio::test]
    async fn a_dialer_carries_plaintext_and_mtls_connections_and_its_failures_back_off() {
        // Plaintext, HTTP/1.1 and HTTP/2, at an address nothing listens on: only the
        // dialer can reach the endpoint.
        let ep = MockEndpoint::spawn("a", Behavior::default()).await.unwrap();
        let nowhere: SocketAddr = "192.0.2.1:9".parse().unwrap();
        for protocol in [Protocol::Http1, Protocol::Http2] {
            let dials = Arc::new(AtomicU32::new(0));
            let client = EndpointClient::new(
                nowhere,
                ConnectSettings {
                    protocol,
                    dialer: Some(piped(ep.addr(), dials.clone())),
                    ..ConnectSettings::plaintext()
                },
            );
            for _ in 0..3 {
                let resp = client.send(request("piped")).await.unwrap();
                assert_eq!(read(resp).await, "piped");
            }
            // Pooled or multiplexed as over TCP: one dial.
            assert_eq!(dials.load(Ordering::Relaxed), 1, "{protocol:?}");
        }

        // mTLS over the dialer: the server's identity is verified as over TCP.
        let (server, client) = users_and_web();
        let acceptor = MtlsAcceptor::new(&server, Authorizer::any()).unwrap();
        let tls_ep = MockEndpoint::spawn_mtls("users", Behavior::default(), acceptor)
            .await
            .unwrap();
        let expected = mesh_core::SpiffeId::new("spiffe://example.org/users").unwrap();
        let dials = Arc::new(AtomicU32::new(0));
        let c = EndpointClient::new(
            nowhere,
            ConnectSettings {
                dialer: Some(piped(tls_ep.addr(), dials.clone())),
                ..ConnectSettings::mtls(MtlsConnector::new(&client, expected.clone()).unwrap())
            },
        );
        let resp = c.send(request("hi")).await.unwrap();
        assert_eq!(resp.version(), http::Version::HTTP_2);
        assert_eq!(
            resp.extensions().get::<PeerIdentity>().unwrap().id(),
            &expected
        );
        // A wrong identity still fails closed through a dialer.
        let wrong = MtlsConnector::new(
            &client,
            mesh_core::SpiffeId::new("spiffe://example.org/billing").unwrap(),
        )
        .unwrap();
        let c = EndpointClient::new(
            nowhere,
            ConnectSettings {
                dialer: Some(piped(tls_ep.addr(), dials.clone())),
                ..ConnectSettings::mtls(wrong)
            },
        );
        let err = c.send(request("hi")).await.unwrap_err();
        assert!(err.to_string().contains("is not authorized"), "{err}");

        // A dialer's error is a connect failure naming the endpoint, and backs it off.
        let refusing = Dialer::new(|_| async {
            Err::<tokio::io::DuplexStream, _>(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                "simulated refusal",
            ))
        });
        let c = EndpointClient::new(
            nowhere,
            ConnectSettings {
                dialer: Some(refusing),
                ..ConnectSettings::plaintext()
            },
        );
        let err = c.send(request("hi")).await.unwrap_err();
        assert!(err.is_connect());
        let message = err.to_string();
        assert!(
            message.contains("192.0.2.1:9") && message.contains("simulated refusal"),
            "{message}"
        );
        assert!(!c.conn_state().is_ready(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_failed_connects_escalates_the_back_off_once() {
        let backoff = DEFAULT_CONNECT_BACKOFF;
        let state = ConnState::new();
        // A hundred dials under way together, all failing: one failure's back-off.
        let started: Vec<u64> = (0..100).map(|_| state.attempt()).collect();
        for s in started {
            state.failed(&backoff, s);
        }
        assert_eq!(state.failures(), 1);
        let until = state.backoff_until(Instant::now()).unwrap();
        assert!(
            until <= Instant::now() + Duration::from_millis(150),
            "{until:?}"
        );
        // The next dial, started after that failure, escalates.
        tokio::time::advance(Duration::from_millis(200)).await;
        assert!(state.is_ready(Instant::now()));
        let next = state.attempt();
        state.failed(&backoff, next);
        assert_eq!(state.failures(), 2);
        // A success clears it; a stale failure after it starts a new back-off from one.
        let stale = state.attempt();
        state.connected();
        assert!(state.is_ready(Instant::now()));
        state.failed(&backoff, stale);
        assert_eq!(state.failures(), 1);
    }

    /// Refusals (connections taken, then failed before a byte came back) back an
    /// endpoint off once per outage, not once per connection cut by it; a connection that
    /// goes well ends the run and the back-off.
    #[cfg(feature = "opaque")]
    #[tokio::test(start_paused = true)]
    async fn refusals_escalate_once_per_outage_and_end_with_a_good_connection() {
        let backoff = Backoff::constant(Duration::from_secs(1), Duration::from_secs(60), 0.0);
        let state = ConnState::new();
        for _ in 0..8 {
            state.refused(&backoff, &"reset");
        }
        let until = state.backoff_until(Instant::now()).unwrap();
        assert_eq!(
            until - Instant::now(),
            Duration::from_secs(1),
            "one step, not eight"
        );
        assert!(
            state
                .unready_reason(Instant::now())
                .unwrap()
                .starts_with("1 connection failed before a byte came back (the last: reset)")
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(state.is_ready(Instant::now()));
        state.refused(&backoff, &"reset");
        let until = state.backoff_until(Instant::now()).unwrap();
        assert_eq!(
            until - Instant::now(),
            Duration::from_secs(2),
            "the next outage: longer"
        );
        state.served();
        assert!(state.is_ready(Instant::now()));
        state.refused(&backoff, &"reset");
        let until = state.backoff_until(Instant::now()).unwrap();
        assert_eq!(until - Instant::now(), Duration::from_secs(1), "a new run");
    }

    /// A connect that fails for want of this host's resources (file descriptors, memory)
    /// does not back the endpoint off; one the endpoint refuses does, and so does one
    /// without an address to connect from (an IPv6 endpoint on a host without IPv6).
    #[tokio::test]
    async fn local_shortages_do_not_back_endpoints_off() {
        let addr: SocketAddr = "192.0.2.1:80".parse().unwrap();
        for (error, local) in [
            (
                io::Error::from_raw_os_error(24),
                cfg!(any(target_os = "linux", target_os = "macos")),
            ),
            (io::Error::from(io::ErrorKind::OutOfMemory), true),
            (io::Error::from(io::ErrorKind::AddrNotAvailable), false),
            (io::Error::from(io::ErrorKind::ConnectionRefused), false),
        ] {
            let kind = error.kind();
            let error = Arc::new(std::sync::Mutex::new(Some(error)));
            let dialer = Dialer::new(move |_addr| {
                let error = error.lock().unwrap().take().unwrap();
                async move { Err::<tokio::io::DuplexStream, _>(error) }
            });
            let client: EndpointClient<Full<Bytes>> = EndpointClient::new(
                addr,
                ConnectSettings {
                    dialer: Some(dialer),
                    ..ConnectSettings::plaintext()
                },
            );
            let err = client.send(request("x")).await.unwrap_err();
            assert!(err.is_connect(), "{err}");
            let state = client.conn_state();
            assert_eq!(state.failures() == 0, local, "{kind:?}");
            assert_eq!(state.is_ready(Instant::now()), local, "{kind:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn failed_connects_back_off_and_recover() {
        let ep = MockEndpoint::spawn("a", Behavior::default()).await.unwrap();
        let addr = ep.addr();
        ep.kill();
        drop(ep);
        let client = EndpointClient::new(addr, ConnectSettings::plaintext());
        let state = client.conn_state().clone();
        assert!(state.is_ready(Instant::now()));
        let err = client.send(request("x")).await.unwrap_err();
        assert!(err.is_connect());
        assert!(
            err.to_string()
                .starts_with(&format!("connecting to {addr}: ")),
            "{err}"
        );
        assert!(!state.is_ready(Instant::now()));
        assert_eq!(state.failures(), 1);
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(
            state.is_ready(Instant::now()),
            "back-off over after at most 100 ms"
        );
    }
}
