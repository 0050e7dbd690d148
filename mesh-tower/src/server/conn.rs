//! Accepting connections and serving each: TLS, HTTP/1.1 or HTTP/2, limits, shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use mesh_core::error::BoxError;
use mesh_spiffe::{MtlsAcceptor, PeerIdentity, ServerTlsAcceptor};
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::time::Instant;
use tower::ServiceExt;
use tower::util::Oneshot;
use tower_service::Service;

use super::head_timer::{HeadClock, HeadTimer, Watched};
use super::streams::{StreamExec, Streams};
use super::{ClientAddr, ServerLimits, ShutdownReport};
use crate::accept::{Newcomer, stopped};
use crate::metrics::server::ListenerMetrics;

/// How connections are secured.
pub(super) enum Transport {
    /// Not at all (chosen explicitly).
    Plain,
    /// SPIFFE mTLS: clients present an SVID.
    Mtls(MtlsAcceptor),
    /// TLS with the listener's own certificate; clients are not authenticated.
    Tls(ServerTlsAcceptor),
}

/// What every connection shares.
pub(super) struct Shared<S> {
    pub(super) app: S,
    pub(super) tls: Transport,
    pub(super) limits: ServerLimits,
    /// The HTTP versions served (each connection builds its server with its own stream
    /// executor: see [`super::streams`]).
    pub(super) protocol: mesh_core::config::Protocol,
    /// Where HTTP/2 streams run.
    pub(super) streams: super::StreamTasks,
    /// Whether responses without a `Date` get one.
    pub(super) date_header: bool,
    /// Whether HTTP/2 clients may send extended CONNECT (RFC 8441).
    pub(super) extended_connect: bool,
    pub(super) metrics: Option<ListenerMetrics>,
    /// Plaintext connections that are not HTTP, relayed to a service as opaque TCP.
    #[cfg(feature = "opaque")]
    pub(super) opaque: Option<OpaqueFallback>,
}

/// Where a plaintext server relays what is not HTTP, and the server's own policy and
/// rate limit, which judge each such connection as an opaque inbound port would (the HTTP
/// layers that judge requests never see it).
#[cfg(feature = "opaque")]
pub(super) struct OpaqueFallback {
    pub(super) client: crate::opaque::OpaqueClient,
    pub(super) policy: crate::authz::PolicyHandle,
    pub(super) limits: crate::ratelimit::LimitsHandle,
}

/// The application as a connection serves it: a cloneable service of requests, its
/// futures sendable to other tasks. (The server's public methods spell the same bounds
/// out.)
pub(super) trait App<B>:
    Service<
        Request<Incoming>,
        Response = Response<B>,
        Future: Send + 'static,
        Error: Into<BoxError>,
    > + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S, B> App<B> for S where
    S: Service<
            Request<Incoming>,
            Response = Response<B>,
            Future: Send + 'static,
            Error: Into<BoxError>,
        > + Clone
        + Send
        + Sync
        + 'static
{
}

/// A response body a connection can send.
pub(super) trait AppBody:
    http_body::Body<Data = Bytes, Error: Into<BoxError>> + Send + 'static
{
}

impl<B> AppBody for B where B: http_body::Body<Data = Bytes, Error: Into<BoxError>> + Send + 'static {}

/// hyper's default bound on HTTP/1.1 request headers.
const HYPER_MAX_HEADERS: usize = 100;

/// The HTTP server settings of `limits`, with `exec` running HTTP/2 streams and
/// `head_timer` bounding HTTP/1.1 heads (see [`super::head_timer`]).
pub(super) fn http_builder<E>(
    limits: &ServerLimits,
    protocol: mesh_core::config::Protocol,
    date_header: bool,
    extended_connect: bool,
    exec: E,
    head_timer: HeadTimer,
) -> auto::Builder<E> {
    use mesh_core::config::Protocol;
    let mut builder = auto::Builder::new(exec);
    builder = match protocol {
        Protocol::Http1 => builder.http1_only(),
        Protocol::Http2 | Protocol::Grpc => builder.http2_only(),
        _ => builder,
    };
    let mut http1 = builder.http1();
    http1
        .auto_date_header(date_header)
        .timer(head_timer)
        .header_read_timeout(limits.header_read_timeout)
        // hyper answers 431 when the head outgrows its read buffer (at least 8 KiB).
        .max_buf_size((limits.max_header_list_size as usize).max(8192));
    // hyper's own bound is 100, parsed into a buffer on the stack; an explicit bound costs
    // a heap buffer per request, so it is set only when it differs.
    if limits.max_headers != HYPER_MAX_HEADERS {
        http1.max_headers(limits.max_headers);
    }
    builder
        .http2()
        .auto_date_header(date_header)
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_list_size)
        .max_concurrent_streams(limits.max_concurrent_streams)
        .keep_alive_interval(limits.keep_alive_interval)
        .keep_alive_timeout(limits.keep_alive_timeout)
        .max_pending_accept_reset_streams(limits.max_pending_accept_reset_streams)
        .max_local_error_reset_streams(limits.max_local_error_reset_streams);
    if extended_connect {
        // Extended CONNECT (RFC 8441): WebSocket over HTTP/2, and upgrades from peer
        // proxies (see `crate::upgrade`).
        builder.http2().enable_connect_protocol();
    }
    builder
}

/// Accepts until `shutdown` turns true, then shuts every connection down gracefully
/// within the shutdown timeout: TCP connections (from a listener, or handed over) or
/// byte streams of any kind.
pub(super) async fn accept_loop<S, B>(
    source: Accepted,
    shared: Arc<Shared<S>>,
    shutdown: watch::Receiver<bool>,
) -> ShutdownReport
where
    S: App<B>,
    B: AppBody,
{
    let max = shared.limits.max_connections;
    let timeout = shared.limits.shutdown_timeout;
    match source {
        Accepted::Tcp(source) => {
            crate::accept::accept_loop(
                source,
                max,
                timeout,
                shutdown,
                move |tcp, remote, stop, newcomer| {
                    counted(
                        &shared,
                        connection(tcp, remote, shared.clone(), stop, newcomer),
                    )
                },
            )
            .await
        }
        Accepted::Streams(source) => {
            crate::accept::accept_loop(
                source,
                max,
                timeout,
                shutdown,
                move |io, remote, stop, newcomer| {
                    counted(&shared, secured(io, remote, shared.clone(), stop, newcomer))
                },
            )
            .await
        }
    }
}

/// `conn`, counted as open (when the server has metrics) from its accept to its end; a
/// combinator rather than an `async` block, so that the task holds the connection's future
/// once.
fn counted<S, F: Future<Output = ()>>(
    shared: &Shared<S>,
    conn: F,
) -> impl Future<Output = ()> + use<S, F> {
    let open = shared
        .metrics
        .as_ref()
        .map(ListenerMetrics::connection_opened);
    futures_util::FutureExt::map(conn, move |()| drop(open))
}

/// Where a server's connections come from.
pub(super) enum Accepted {
    /// TCP: a listener's, or handed over.
    Tcp(crate::accept::Source),
    /// Byte streams of any kind.
    Streams(crate::accept::Streams),
}

/// One TCP connection: relayed as opaque TCP when it is not HTTP and an opaque fallback
/// is set, otherwise secured and served. It is a newcomer, shed when the listener is full
/// (see `crate::accept`), until its mTLS handshake verified a peer or its first request
/// began (or, relayed as opaque TCP, it sent its first bytes).
async fn connection<S, B>(
    tcp: tokio::net::TcpStream,
    remote: SocketAddr,
    shared: Arc<Shared<S>>,
    shutdown: watch::Receiver<bool>,
    newcomer: Newcomer,
) where
    S: App<B>,
    B: AppBody,
{
    #[cfg(feature = "opaque")]
    if let (Transport::Plain, Some(fallback)) = (&shared.tls, &shared.opaque) {
        use crate::detect::{DEFAULT_PEEK_TIMEOUT, Detected, detect};
        let Some(detected) = newcomer
            .unless_shed(detect(&tcp, DEFAULT_PEEK_TIMEOUT))
            .await
        else {
            shed(&shared, remote);
            return;
        };
        if detected == Detected::Closed {
            tracing::debug!(%remote, "the client closed without sending anything");
            return;
        }
        if detected == Detected::Opaque {
            if !newcomer.proven() {
                shed(&shared, remote);
                return;
            }
            drop(newcomer);
            Box::pin(opaque_fallback(
                tcp,
                remote,
                fallback,
                shared.metrics.as_ref(),
            ))
            .await;
            return;
        }
    }
    secured(tcp, remote, shared, shutdown, newcomer).await;
}

/// Counts (and says at debug) a connection closed as a newcomer to make room.
#[cold]
#[inline(never)]
fn shed<S>(shared: &Shared<S>, remote: SocketAddr) {
    tracing::debug!(%remote, "listener full: a connection that had not finished its handshake or sent a request closed to make room");
    closed(shared, "shed");
}

/// A plaintext connection that is not HTTP, relayed by the server's opaque fallback. A
/// plaintext client has no identity: only a policy whose default allows (or a rule for
/// unauthenticated clients) lets it through, and only within the rate limit's bounds for
/// unauthenticated clients and in total, as on an opaque inbound port; each decision and
/// refusal is counted in the listener's metrics. A policy that replaces the server's
/// judges the open connection again, and one it denies is closed.
#[cfg(feature = "opaque")]
async fn opaque_fallback(
    mut tcp: tokio::net::TcpStream,
    remote: SocketAddr,
    fallback: &OpaqueFallback,
    metrics: Option<&ListenerMetrics>,
) {
    use crate::authz::Client;
    use crate::relay::Abort;
    // Before the decision: a policy replaced from here on judges the connection again.
    let replaced = fallback.policy.subscribe();
    if !crate::opaque::judge_connection(&fallback.policy.current(), None, remote, metrics) {
        return;
    }
    if let Err(refused) = fallback.limits.current().admit(None) {
        tracing::debug!(%remote, limit = refused.limit, wait = ?refused.wait, "opaque connection refused by the rate limit: closed");
        if let Some(metrics) = metrics {
            let limit = if refused.limit == "total" {
                "total"
            } else {
                "client"
            };
            metrics.rate_limited_counter(limit).inc();
        }
        return;
    }
    let _ = tcp.set_nodelay(true);
    // A replaced policy judges the open connection again: one it denies is closed.
    let relayed = fallback
        .policy
        .until_denied(fallback.client.relay_io(&mut tcp), replaced, None, |current| {
            tracing::info!(%remote, client = %Client(None), policy = current.name(), "open connection denied by a replaced policy: closed");
            if let Some(metrics) = metrics {
                metrics.authz_counter(current.name(), None, "deny").inc();
            }
        })
        .await;
    match &relayed {
        Some(Ok(stats)) => {
            tracing::debug!(%remote, endpoint = %stats.endpoint, sent = stats.sent, received = stats.received, "opaque connection closed");
        }
        Some(Err(error)) => tracing::debug!(%remote, %error, "opaque relay ended"),
        None => {}
    }
    // Closed by a replaced policy (`None`), or failed at the endpoint's side: reset, so
    // that the client does not take the cut for the end of its transfer (the endpoint's
    // side, cut short, is reset by the relay).
    if relayed.as_ref().is_none_or(crate::opaque::resets_local) {
        tcp.abort_on_drop();
    }
}

/// One connection: the TLS handshake (bounded by the acceptor's timeout), then HTTP.
async fn secured<IO, S, B>(
    io: IO,
    remote: SocketAddr,
    shared: Arc<Shared<S>>,
    shutdown: watch::Receiver<bool>,
    newcomer: Newcomer,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: App<B>,
    B: AppBody,
{
    // The handshake and the serving of each kind of stream are boxed, each bound before it
    // is awaited: a task is as large as the largest future it awaits inline, for its whole
    // life, and a connection needs one of them at a time (measured: the future of a
    // plaintext connection went from 10 KB to 3 KB, plus a 2.3 KB box while serving).
    // A TLS stream goes to `serve` boxed: an async fn keeps room for its arguments for its
    // whole life, so the 1.2 KB stream would sit in the future twice, once as the argument
    // and once inside hyper's connection (measured in a debug build: the serving future
    // 4.9 KB -> 2.5 KB, plus the stream's 1.2 KB box: 1.2 KB less per TLS connection).
    match &shared.tls {
        Transport::Plain => {
            let serving = Box::pin(serve(io, None, remote, &shared, shutdown, Some(newcomer)));
            serving.await;
        }
        Transport::Tls(acceptor) => {
            let accept = Box::pin(acceptor.accept(io));
            match newcomer.unless_shed(accept).await {
                None => shed(&shared, remote),
                Some(Ok(tls)) => {
                    // No client certificate: established at its first request.
                    let serving = Box::pin(serve(
                        Box::new(tls),
                        None,
                        remote,
                        &shared,
                        shutdown,
                        Some(newcomer),
                    ));
                    serving.await;
                }
                Some(Err(error)) => {
                    tracing::debug!(%remote, %error, "TLS handshake failed");
                    if let Some(metrics) = &shared.metrics {
                        metrics.tls_failure(failure_reason(&error));
                    }
                }
            }
        }
        Transport::Mtls(acceptor) => {
            let accept = Box::pin(acceptor.accept(io));
            match newcomer.unless_shed(accept).await {
                // Shed in its handshake, or as it completed.
                None => shed(&shared, remote),
                Some(Ok(_)) if !newcomer.proven() => shed(&shared, remote),
                Some(Ok((tls, peer))) => {
                    // A verified peer: established.
                    drop(newcomer);
                    let expires = crate::connect::peer_expiry(tls.get_ref().1);
                    let serving = Box::pin(serve(
                        Box::new(tls),
                        Some((peer, expires)),
                        remote,
                        &shared,
                        shutdown,
                        None,
                    ));
                    serving.await;
                }
                Some(Err(error)) => {
                    // Plaintext on the mTLS port, an untrusted or unauthorized
                    // certificate, garbage, a stalled client: nothing is served.
                    tracing::debug!(%remote, %error, "TLS handshake refused");
                    if let Some(metrics) = &shared.metrics {
                        metrics.tls_failure(failure_reason(&error));
                    }
                }
            }
        }
    }
}

/// A handshake failure's `reason` label.
fn failure_reason(error: &mesh_spiffe::TransportError) -> &'static str {
    use mesh_spiffe::TransportError;
    match error {
        TransportError::Io(_) => "io",
        TransportError::Verify(_) => "certificate_refused",
        TransportError::Tls(_) => "tls",
        TransportError::Timeout(_) => "timeout",
        TransportError::NoPeerIdentity => "no_client_certificate",
        _ => "other",
    }
}

/// A verified peer, and when its certificate expires.
type Peer = (PeerIdentity, Option<Instant>);

/// Serves HTTP on `io` until the client closes, the connection idles out, or shutdown; a
/// `newcomer` is shed (closed) when its listener is full, until its first request. A
/// connection is shut down (as at its idle timeout) once its peer's certificate expires.
async fn serve<IO, S, B>(
    io: IO,
    peer: Option<Peer>,
    remote: SocketAddr,
    shared: &Shared<S>,
    shutdown: watch::Receiver<bool>,
    newcomer: Option<Newcomer>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: App<B>,
    B: AppBody,
{
    let activity = Arc::new(Activity {
        max_cancelled: shared.limits.max_cancelled_requests.max(1),
        premature: shared.limits.premature_cancel_window,
        ..Activity::default()
    });
    // However this task ends, normally (its tunnels closed) or aborted by a drain's
    // timeout, the tunnels out of it end with it.
    let _cut = CutOnDrop(activity.clone());
    // hyper's connection and its streams are dropped before the wait: a request that
    // still holds a tunnel's hold (waiting for its answer) ends with them.
    if serve_http(io, peer, remote, shared, shutdown, &activity, newcomer).await {
        // A switched HTTP/1.1 connection has left hyper for a tunnel: it stays counted
        // (connections, drain) until the tunnel ends.
        activity.tunnels_closed().await;
    }
}

/// [`serve`]'s HTTP: true when hyper's connection ended (the client closed it, or it
/// switched protocols), false when this side closed it.
async fn serve_http<IO, S, B>(
    io: IO,
    peer: Option<Peer>,
    remote: SocketAddr,
    shared: &Shared<S>,
    mut shutdown: watch::Receiver<bool>,
    activity: &Arc<Activity>,
    newcomer: Option<Newcomer>,
) -> bool
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: App<B>,
    B: AppBody,
{
    let (peer, expires) = peer.map_or((None, None), |(id, at)| (Some(id), at));
    let service = ConnService {
        app: std::sync::Mutex::new(shared.app.clone()),
        peer,
        remote: ClientAddr(remote),
        activity: activity.clone(),
        newcomer: newcomer.clone(),
    };
    let limits = &shared.limits;
    // This connection's HTTP/2 streams, in this task or spawned (see `streams`).
    let exec = match shared.streams {
        super::StreamTasks::InConnection => StreamExec::in_connection(),
        super::StreamTasks::Spawned => StreamExec::spawn(),
    };
    let clock = HeadClock::new(limits.header_read_timeout);
    let http = http_builder(
        limits,
        shared.protocol,
        shared.date_header,
        shared.extended_connect,
        exec.clone(),
        HeadTimer::new(clock.clone()),
    );
    let mut streams = Streams::new(exec);
    let io = TokioIo::new(Watched::new(io, clock.clone()));
    // With upgrades: a request's `OnUpgrade` takes the connection over once a `101` (or a
    // `2xx` to CONNECT) is written (see `crate::upgrade`); the connection's task ends.
    let mut conn = pin!(http.serve_connection_with_upgrades(io, service));
    // Until the first request begins, the header-read bound covers the silence too;
    // after it, the idle timeout. Activity is not timed per request: a check every
    // `step` sees whether there was any, so a connection closes between `idle_timeout`
    // and `idle_timeout + step` after its last request ends (its response's last byte
    // taken, for a streamed response). A connection whose client stops reading (see
    // `waits_on_client`) for `idle_timeout` is closed, shutting down or not.
    let connected = Instant::now();
    let step = idle_check_step(limits.idle_timeout);
    let mut check = pin!(tokio::time::sleep(step.min(limits.header_read_timeout)));
    let mut stop = pin!(stopped(&mut shutdown));
    let mut abuse = pin!(activity.abusive.notified());
    // Shed while a newcomer, when the listener is full (never, once its first request
    // began).
    let mut shed_signal = pin!(async {
        match &newcomer {
            Some(newcomer) => newcomer.shed().await,
            None => std::future::pending().await,
        }
    });
    let mut idle_since = connected;
    let mut stalled_since = connected;
    let mut moved_at_check = 0;
    let mut closing = false;
    // When a connection shut down for its peer's expired certificate closes anyway.
    let mut force_close_at: Option<Instant> = None;
    // Counted once per connection, whether shut down first or closed at once.
    let mut abused = false;
    // The connection is polled whenever the task wakes; the shutdown, abuse and idle
    // signals only when one of them woke it (they are polled with a waker of their own),
    // so that each request's many wake-ups do not re-poll three timers and channels.
    let signals = Arc::new(SignalWaker {
        // Polled once at first, which registers them.
        woken: AtomicBool::new(true),
        task: futures_util::task::AtomicWaker::new(),
    });
    let signal_waker = std::task::Waker::from(signals.clone());
    loop {
        let event = std::future::poll_fn(|cx| {
            // Streams first: what they answer is written by the connection's poll.
            streams.poll(cx);
            if let Poll::Ready(result) = conn.as_mut().poll(cx) {
                return Poll::Ready(Event::Ended(result.err()));
            }
            // The streams the connection just accepted.
            streams.poll_queued(cx);
            signals.task.register(cx.waker());
            if !signals.woken.swap(false, Ordering::AcqRel) {
                return Poll::Pending;
            }
            let mut scx = Context::from_waker(&signal_waker);
            if abuse.as_mut().poll(&mut scx).is_ready() {
                return Poll::Ready(Event::Abuse);
            }
            if !closing && stop.as_mut().poll(&mut scx).is_ready() {
                return Poll::Ready(Event::Stop);
            }
            if check.as_mut().poll(&mut scx).is_ready() {
                return Poll::Ready(Event::Check);
            }
            if shed_signal.as_mut().poll(&mut scx).is_ready() {
                return Poll::Ready(Event::Shed);
            }
            Poll::Pending
        })
        .await;
        // Whatever fired is replaced or reset below: poll the signals again next time.
        signals.woken.store(true, Ordering::Release);
        match event {
            Event::Ended(error) => {
                if let Some(error) = error {
                    tracing::debug!(%remote, error = %error, "connection ended with an error");
                    closed(shared, "error");
                }
                return true;
            }
            Event::Shed => {
                shed(shared, remote);
                return false;
            }
            Event::Stop => {
                closing = true;
                conn.as_mut().graceful_shutdown();
                check.as_mut().reset(Instant::now() + step);
            }
            Event::Abuse => {
                if closing || activity.abuse_closes() {
                    // It went on after the GOAWAY: close at once.
                    tracing::info!(%remote, "client keeps cancelling its requests: closing the connection");
                    if !abused {
                        closed(shared, "cancelled_requests");
                    }
                    return false;
                }
                tracing::info!(%remote, "client cancels most of its requests: shutting the connection down");
                closed(shared, "cancelled_requests");
                abused = true;
                closing = true;
                conn.as_mut().graceful_shutdown();
                check.as_mut().reset(Instant::now() + step);
                abuse.set(activity.abusive.notified());
            }
            Event::Check => {
                let now = Instant::now();
                if !activity.started.load(Ordering::Relaxed) {
                    let deadline = connected + limits.header_read_timeout;
                    if now >= deadline {
                        tracing::debug!(%remote, "no request within the header read timeout");
                        closed(shared, "no_request");
                        return false;
                    }
                    stalled_since = now;
                    moved_at_check = clock.moved();
                    check.as_mut().reset(deadline.min(now + step));
                    continue;
                }
                // A client that stopped reading (see `MIN_PROGRESS`): something waits on
                // it, and for the idle timeout the connection made no progress.
                let moved = clock.moved();
                let progress =
                    activity.take_pulled() || moved.wrapping_sub(moved_at_check) >= MIN_PROGRESS;
                moved_at_check = moved;
                if progress || !waits_on_client(&clock, activity, closing) {
                    stalled_since = now;
                }
                let stalled = stalled_since + limits.idle_timeout;
                if now >= stalled {
                    tracing::debug!(%remote, "the client stopped reading: closed");
                    closed(shared, "stalled_client");
                    return false;
                }
                if closing {
                    // Shut down for its peer's expired certificate: streams that stay
                    // (a gRPC watch, a tunnel) end with the connection after the shutdown
                    // timeout, so that the identity does not outlive it for long.
                    if let Some(at) = force_close_at {
                        if now >= at {
                            tracing::debug!(%remote, "the client's certificate expired and its streams outlived the shutdown timeout: closed");
                            return false;
                        }
                        check.as_mut().reset(stalled.min(now + step).min(at));
                        continue;
                    }
                    check.as_mut().reset(stalled.min(now + step));
                    continue;
                }
                if activity.busy() || activity.take_touched() {
                    idle_since = now;
                }
                let deadline = idle_since + limits.idle_timeout;
                let expired = expires.is_some_and(|at| now >= at);
                if now >= deadline || expired {
                    if expired {
                        // The identity the handshake verified is vouched for no longer
                        // (an SVID lives an hour or so): the client reconnects with its
                        // current one, verified against the current bundles.
                        tracing::debug!(%remote, "the client's certificate expired: shutting the connection down");
                        closed(shared, "peer_certificate_expired");
                        force_close_at = Some(now + limits.shutdown_timeout);
                    } else {
                        tracing::debug!(%remote, "idle timeout");
                        closed(shared, "idle");
                    }
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                    check.as_mut().reset(stalled.min(now + step));
                } else {
                    let mut next = deadline.min(stalled).min(now + step);
                    if let Some(at) = expires {
                        next = next.min(at);
                    }
                    check.as_mut().reset(next);
                }
            }
        }
    }
}

/// Counts a connection this server closed (or shut down) on its own, when it has metrics.
#[cold]
#[inline(never)]
fn closed<S>(shared: &Shared<S>, reason: &'static str) {
    if let Some(metrics) = &shared.metrics {
        metrics.connection_closed(reason);
    }
}

/// The bytes a connection must move, either way, between two of its checks to count as
/// progress when no response body was polled: 1 KiB.
///
/// Any byte would do but for HTTP/2 pings: the server's keep-alive pings and their
/// answers (34 bytes a round) go on while a client holds its flow-control window shut,
/// and must not pass for reading.
///
/// A reader is seen through the socket: a write goes through once the kernel's send
/// buffer has drained enough (about a third of it on Linux), so, as with nginx's
/// `send_timeout`, a client is taken for one that stopped when it reads less than that
/// in an idle timeout. Send buffers grow with what a connection carries, so that is
/// little for a slow client's, and several MB on loopback.
const MIN_PROGRESS: u64 = 1024;

/// Whether what the connection waits for is the client: a write waits on it (HTTP/1.1,
/// or a full socket); or, with no request waiting for the application's answer, every
/// response body in flight has a frame taken and waits to be asked for the next (the
/// client's HTTP/2 window is shut), or the connection is shutting down with nothing of
/// the application's left in flight (what remains is in hyper's and h2's buffers, for
/// the client to take: the last piece of an HTTP/2 body, say).
///
/// Anything of the application's still at work keeps the connection open: a request
/// waiting for its answer, or a response waiting for its next message. Closing would
/// cut those too, for one stream whose reader paused: the stalled stream waits for them
/// to end (the bound is the connection's, not each stream's).
fn waits_on_client(clock: &HeadClock, activity: &Activity, closing: bool) -> bool {
    if clock.write_blocked() {
        return true;
    }
    if activity.in_flight.load(Ordering::Relaxed) > 0 {
        return false;
    }
    let bodies = activity.bodies.load(Ordering::Relaxed);
    // A tunnel's silence is its own business; bodies beside it are judged as ever.
    if bodies == 0 && activity.tunnels.load(Ordering::Relaxed) > 0 {
        return false;
    }
    activity.all_owe_a_pull() || (closing && bodies == 0)
}

/// How often a connection looks for activity: an eighth of the idle timeout, at least
/// 100 ms.
fn idle_check_step(idle_timeout: std::time::Duration) -> std::time::Duration {
    (idle_timeout / 8).max(std::time::Duration::from_millis(100))
}

/// What ended a wait in [`serve`].
enum Event {
    Ended(Option<BoxError>),
    Stop,
    Abuse,
    Check,
    Shed,
}

/// The waker of a connection's signals: notes that one of them fired, and wakes the
/// connection's task.
#[derive(Debug)]
struct SignalWaker {
    woken: AtomicBool,
    task: futures_util::task::AtomicWaker,
}

impl std::task::Wake for SignalWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// Cuts a connection's tunnels when dropped: with the connection's task.
struct CutOnDrop(Arc<Activity>);

impl Drop for CutOnDrop {
    fn drop(&mut self) {
        self.0.cut.store(true, Ordering::Release);
        self.0.cut_notify.notify_waiters();
    }
}

/// One tunnel out of a connection, counted in its [`Activity`] while alive: the
/// [`Hold`](crate::upgrade::Hold) a request that may switch carries.
struct TunnelCount(Arc<Activity>);

impl TunnelCount {
    fn new(activity: &Arc<Activity>) -> Self {
        activity.tunnels.fetch_add(1, Ordering::AcqRel);
        Self(activity.clone())
    }
}

impl Drop for TunnelCount {
    fn drop(&mut self) {
        self.0.tunnels.fetch_sub(1, Ordering::AcqRel);
        self.0.tunnel_ended.notify_waiters();
    }
}

impl crate::upgrade::Held for TunnelCount {
    fn cut(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            loop {
                let cut = self.0.cut_notify.notified();
                let mut cut = pin!(cut);
                cut.as_mut().enable();
                if self.0.cut.load(Ordering::Acquire) {
                    return;
                }
                cut.await;
            }
        })
    }
}

/// Requests and responses in flight on one connection, read by its idle and stall checks;
/// and how its requests ended, read by the cancellation bound.
#[derive(Debug, Default)]
struct Activity {
    /// Requests whose response head is not yet answered.
    in_flight: AtomicUsize,
    /// Response bodies not yet ended (dropped by hyper).
    bodies: AtomicUsize,
    /// Response bodies whose last poll was pending: waiting on the application, not on
    /// the client.
    bodies_waiting: AtomicUsize,
    /// A response body was polled since the stall check last looked.
    pulled: AtomicBool,
    /// A request began (ever).
    started: AtomicBool,
    /// A request began or ended since the idle check last looked.
    touched: AtomicBool,
    completed: AtomicUsize,
    /// Requests cancelled prematurely (see `premature`).
    cancelled: AtomicUsize,
    max_cancelled: usize,
    /// An HTTP/2 request cancelled within this of its start counts in `cancelled`.
    premature: std::time::Duration,
    /// Tunnels out of this connection's requests still open (see [`TunnelCount`]).
    tunnels: AtomicUsize,
    /// Signalled when a tunnel ends.
    tunnel_ended: tokio::sync::Notify,
    /// The connection's task ended: its tunnels end (see [`TunnelCount`]).
    cut: AtomicBool,
    /// Signalled when `cut` turns true.
    cut_notify: tokio::sync::Notify,
    /// Wakes the connection when its client cancels too many requests.
    abusive: tokio::sync::Notify,
    /// How far the cancellation bound was signalled: [`ABUSE_SHUTDOWN`], then
    /// [`ABUSE_CLOSE`].
    abuse_stage: std::sync::atomic::AtomicU8,
    /// `cancelled` when the connection was told to shut down.
    shutdown_at: AtomicUsize,
}

/// The client cancelled at least `max_cancelled` requests, more than it let finish: the
/// connection shuts down.
const ABUSE_SHUTDOWN: u8 = 1;
/// It cancelled `max_cancelled` more since: the connection closes.
const ABUSE_CLOSE: u8 = 2;

impl Activity {
    fn take_touched(&self) -> bool {
        self.touched.swap(false, Ordering::Relaxed)
    }

    fn take_pulled(&self) -> bool {
        self.pulled.swap(false, Ordering::Relaxed)
    }

    /// A request, a response or a tunnel is in flight.
    fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) > 0
            || self.bodies.load(Ordering::Relaxed) > 0
            || self.tunnels.load(Ordering::Relaxed) > 0
    }

    /// Waits until no tunnel out of this connection is open.
    async fn tunnels_closed(&self) {
        loop {
            let ended = self.tunnel_ended.notified();
            let mut ended = pin!(ended);
            ended.as_mut().enable();
            if self.tunnels.load(Ordering::Acquire) == 0 {
                return;
            }
            ended.await;
        }
    }

    /// Every response body in flight (at least one) has a frame taken and waits to be
    /// polled again: the next move is the client's (reading, or opening its HTTP/2
    /// window), and none waits on the application.
    fn all_owe_a_pull(&self) -> bool {
        self.bodies_waiting.load(Ordering::Relaxed) == 0 && self.bodies.load(Ordering::Relaxed) > 0
    }

    /// A request's head is answered; its body is in flight until [`Self::body_ended`].
    fn answered(&self) {
        self.bodies.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.completed.fetch_add(1, Ordering::Relaxed);
    }

    fn body_ended(&self) {
        self.bodies.fetch_sub(1, Ordering::Relaxed);
        self.touched.store(true, Ordering::Relaxed);
    }

    /// A request ended without a response: failed, or cancelled by the client (`Some`,
    /// with whether it was cancelled prematurely).
    fn ended(&self, cancelled: Option<bool>) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.touched.store(true, Ordering::Relaxed);
        match cancelled {
            None => {
                self.completed.fetch_add(1, Ordering::Relaxed);
                return;
            }
            // A slow request given up on (a caller's timeout): neither finished nor abuse.
            Some(false) => return,
            Some(true) => {}
        }
        // Rapid reset after acceptance: requests started and cancelled without end.
        // Past the bound the connection shuts down; as many more, it closes. Judged at
        // every cancellation, not at the two counts only: a client that first let enough
        // requests finish would otherwise pass both unseen and cancel without end.
        let cancelled = self.cancelled.fetch_add(1, Ordering::Relaxed) + 1;
        if cancelled < self.max_cancelled || cancelled <= self.completed.load(Ordering::Relaxed) {
            return;
        }
        // First a shutdown (GOAWAY: the client learns which of its requests were not
        // taken, and may retry them); then, `max_cancelled` cancellations past it, a close.
        match self.abuse_stage.load(Ordering::Relaxed) {
            0 if self
                .abuse_stage
                .compare_exchange(0, ABUSE_SHUTDOWN, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok() =>
            {
                self.shutdown_at.store(cancelled, Ordering::Relaxed);
                self.abusive.notify_one();
            }
            ABUSE_SHUTDOWN => {
                let at = self.shutdown_at.load(Ordering::Relaxed);
                if cancelled >= at.saturating_add(self.max_cancelled)
                    && self
                        .abuse_stage
                        .compare_exchange(
                            ABUSE_SHUTDOWN,
                            ABUSE_CLOSE,
                            Ordering::Relaxed,
                            Ordering::Relaxed,
                        )
                        .is_ok()
                {
                    self.abusive.notify_one();
                }
            }
            _ => {}
        }
    }

    /// Whether the client cancelled `max_cancelled` more requests since it was told to shut
    /// down: the connection closes.
    fn abuse_closes(&self) -> bool {
        self.abuse_stage.load(Ordering::Relaxed) >= ABUSE_CLOSE
    }
}

/// The application as hyper calls it for one connection: each request gets the peer's
/// identity and address as extensions, and counts as activity while it runs.
///
/// The connection keeps its own instance of the application, called in place when it is
/// ready at once (the usual case: the mesh's layers are always ready), so that a request
/// does not clone and drop the whole stack, whose reference counts every worker thread
/// shares. Only a service that is not ready at once is cloned and driven to readiness in
/// the request's future. The lock is the connection's own: hyper calls the service from
/// the connection's task only, so it is never contended.
struct ConnService<S> {
    app: std::sync::Mutex<S>,
    peer: Option<PeerIdentity>,
    remote: ClientAddr,
    activity: Arc<Activity>,
    /// Until its first request: the connection's standing as a newcomer.
    newcomer: Option<Newcomer>,
}

impl<S, B> hyper::service::Service<Request<Incoming>> for ConnService<S>
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = Response<InFlight<B>>;
    type Error = BoxError;
    type Future = Tracked<Call<S>>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        let extensions = req.extensions_mut();
        // Whatever a client sent, these come from the connection only.
        match &self.peer {
            Some(peer) => {
                extensions.insert(peer.clone());
            }
            None => {
                extensions.remove::<PeerIdentity>();
            }
        }
        extensions.insert(self.remote);
        let http2 = req.version() == http::Version::HTTP_2;
        if !http2 {
            // What `Connection` names is this hop's and never reaches the application
            // (`crate::forward`): it goes here, so that authorization, rate limits and
            // routes judge the request the application will get, not fields a client
            // named away. (HTTP/2 carries none: h2 refuses a request with them.)
            crate::forward::strip_keeping_upgrade(req.headers_mut());
        }
        // A request that may switch (hyper gave it its half of the switch: HTTP/1.x with
        // `Upgrade`, or CONNECT) carries the connection's hold for its tunnel.
        if (!http2 || req.method() == http::Method::CONNECT)
            && req
                .extensions()
                .get::<hyper::upgrade::OnUpgrade>()
                .is_some()
        {
            let hold = crate::upgrade::Hold::new(TunnelCount::new(&self.activity));
            req.extensions_mut().insert(hold);
        }
        self.activity.in_flight.fetch_add(1, Ordering::Relaxed);
        let mut shed = false;
        if !self.activity.started.load(Ordering::Relaxed) {
            self.activity.started.store(true, Ordering::Relaxed);
            // Established, unless shed just before: the connection is closing, and the
            // request must not reach the application (its client sees the connection
            // drop, and may not send it again).
            if let Some(newcomer) = &self.newcomer {
                shed = !newcomer.proven();
            }
        }
        self.activity.touched.store(true, Ordering::Relaxed);
        let mut app = self
            .app
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut ready = Context::from_waker(std::task::Waker::noop());
        let inner = if shed {
            Call::Failed {
                error: Some("the connection was closed to make room (listener full)".into()),
            }
        } else {
            match app.poll_ready(&mut ready) {
                Poll::Ready(Ok(())) => Call::Called { fut: app.call(req) },
                Poll::Ready(Err(error)) => Call::Failed {
                    error: Some(error.into()),
                },
                // Not ready at once: a clone of its own waits for readiness, woken properly.
                Poll::Pending => Call::Waiting {
                    fut: app.clone().oneshot(req),
                },
            }
        };
        Tracked {
            inner,
            activity: Some(self.activity.clone()),
            http2,
            // Only HTTP/2 clients can cancel and go on (an HTTP/1.1 one hangs up), so only
            // they need the clock read.
            began: http2.then(Instant::now),
        }
    }
}

pin_project! {
    /// A request's call of the application: made in place, waiting for readiness, or
    /// failed readiness.
    #[project = CallProj]
    enum Call<S>
    where
        S: Service<Request<Incoming>>,
    {
        Called { #[pin] fut: S::Future },
        Waiting { #[pin] fut: Oneshot<S, Request<Incoming>> },
        Failed { error: Option<BoxError> },
    }
}

impl<S> Future for Call<S>
where
    S: Service<Request<Incoming>>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            CallProj::Called { fut } => fut.poll(cx).map_err(Into::into),
            CallProj::Waiting { fut } => fut.poll(cx).map_err(Into::into),
            CallProj::Failed { error } => match error.take() {
                Some(error) => Poll::Ready(Err(error)),
                // Polled again after it completed (hyper does not).
                None => Poll::Ready(Err("request future polled after it completed".into())),
            },
        }
    }
}

pin_project! {
    /// A request's future, counted in flight until it completes or is dropped; its
    /// response's body is counted from then on.
    struct Tracked<F> {
        #[pin]
        inner: F,
        activity: Option<Arc<Activity>>,
        // The response goes out on HTTP/2: its body is handed over in pieces.
        http2: bool,
        // When an HTTP/2 request began, for the cancellation bound.
        began: Option<Instant>,
    }

    impl<F> PinnedDrop for Tracked<F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(activity) = this.activity.take() {
                let premature = this
                    .began
                    .is_none_or(|began| began.elapsed() < activity.premature);
                activity.ended(Some(premature));
            }
        }
    }
}

impl<F, B> Future for Tracked<F>
where
    F: Future<Output = Result<Response<B>, BoxError>>,
{
    type Output = Result<Response<InFlight<B>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let output = std::task::ready!(this.inner.poll(cx));
        let activity = this.activity.take();
        Poll::Ready(match output {
            Ok(response) => {
                if let Some(activity) = &activity {
                    activity.answered();
                }
                let http2 = *this.http2;
                Ok(response.map(|body| InFlight {
                    body,
                    activity,
                    waiting: false,
                    http2,
                    rest: None,
                }))
            }
            Err(error) => {
                if let Some(activity) = activity {
                    activity.ended(None);
                }
                Err(error)
            }
        })
    }
}

/// The largest piece of a response body handed to HTTP/2 at once (64 KiB).
///
/// hyper's HTTP/2 server polls a body for its next frame as soon as the previous one is
/// handed to the h2 crate, which takes a whole frame's data whatever the client's window,
/// and buffers what the window does not yet let out. A body of one large frame would be
/// handed over at once and end, leaving its bytes to a client that may never open its
/// window, out of the stall check's sight. In pieces, the body waits for the window as
/// an HTTP/1.1 body waits for the socket, and at most two pieces are buffered beyond the
/// window. Splitting is a reference count, not a copy.
const HTTP2_PIECE: usize = 64 * 1024;

pin_project! {
    /// A response body, counted in flight until hyper drops it (its end, or the client
    /// gone), and noting for the stall check when it was polled and whether it waits on
    /// the application. On HTTP/2 its data is handed over in pieces of at most
    /// [`HTTP2_PIECE`].
    pub(super) struct InFlight<B> {
        #[pin]
        body: B,
        activity: Option<Arc<Activity>>,
        // The last poll was pending (counted in `bodies_waiting`).
        waiting: bool,
        // Handed over in pieces.
        http2: bool,
        // What is left of a frame larger than a piece (boxed: hyper moves a body several
        // times, and only large HTTP/2 frames need it).
        rest: Option<Box<Bytes>>,
    }

    impl<B> PinnedDrop for InFlight<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(activity) = this.activity.take() {
                if *this.waiting {
                    activity.bodies_waiting.fetch_sub(1, Ordering::Relaxed);
                }
                activity.body_ended();
            }
        }
    }
}

impl<B: http_body::Body<Data = Bytes>> http_body::Body for InFlight<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, B::Error>>> {
        let this = self.project();
        if let Some(activity) = this.activity {
            activity.pulled.store(true, Ordering::Relaxed);
        }
        if let Some(rest) = this.rest {
            let piece = rest.split_to(HTTP2_PIECE.min(rest.len()));
            if rest.is_empty() {
                *this.rest = None;
            }
            return Poll::Ready(Some(Ok(http_body::Frame::data(piece))));
        }
        let mut polled = this.body.poll_frame(cx);
        if let Some(activity) = this.activity {
            // Only a change is counted: a body answering at once costs no count.
            if polled.is_pending() != *this.waiting {
                *this.waiting = polled.is_pending();
                if *this.waiting {
                    activity.bodies_waiting.fetch_add(1, Ordering::Relaxed);
                } else {
                    activity.bodies_waiting.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
        if *this.http2
            && let Poll::Ready(Some(Ok(frame))) = &mut polled
            && let Some(data) = frame.data_mut()
            && data.len() > HTTP2_PIECE
        {
            *this.rest = Some(Box::new(data.split_off(HTTP2_PIECE)));
        }
        polled
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        self.rest.is_none() && self.body.is_end_stream()
    }

    #[inline]
    fn size_hint(&self) -> http_body::SizeHint {
        let mut hint = self.body.size_hint();
        if let Some(rest) = &self.rest {
            let rest = rest.len() as u64;
            // The upper bound first: `set_lower` asserts that it stays below it.
            if let Some(upper) = hint.upper() {
                hint.set_upper(upper.saturating_add(rest));
            }
            hint.set_lower(hint.lower().saturating_add(rest));
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An HTTP/2 request's future as `ConnService` makes it, never answered.
    fn pending_request(
        activity: &Arc<Activity>,
    ) -> Tracked<std::future::Pending<Result<Response<()>, BoxError>>> {
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        Tracked {
            inner: std::future::pending(),
            activity: Some(activity.clone()),
            http2: true,
            began: Some(Instant::now()),
        }
    }

    /// Cancellations count toward the bound only within the window of their request's
    /// start; the bound wakes the connection once the counted ones reach it.
    #[tokio::test(start_paused = true)]
    async fn only_premature_cancellations_count() {
        let window = std::time::Duration::from_secs(1);
        let activity = Arc::new(Activity {
            max_cancelled: 3,
            premature: window,
            ..Activity::default()
        });
        let abuse = activity.abusive.notified();
        let mut abuse = pin!(abuse);
        abuse.as_mut().enable();
        let mut noop = Context::from_waker(std::task::Waker::noop());
        // Three requests cancelled just as the window closes: none counts.
        let late: Vec<_> = (0..3).map(|_| pending_request(&activity)).collect();
        tokio::time::advance(window).await;
        drop(late);
        assert_eq!(activity.cancelled.load(Ordering::Relaxed), 0);
        assert_eq!(activity.in_flight.load(Ordering::Relaxed), 0);
        // Two cancelled just inside it count, and do not reach the bound yet.
        let early: Vec<_> = (0..2).map(|_| pending_request(&activity)).collect();
        tokio::time::advance(window - std::time::Duration::from_millis(1)).await;
        drop(early);
        assert_eq!(activity.cancelled.load(Ordering::Relaxed), 2);
        assert!(abuse.as_mut().poll(&mut noop).is_pending());
        // The third reaches it.
        drop(pending_request(&activity));
        assert_eq!(activity.cancelled.load(Ordering::Relaxed), 3);
        assert!(abuse.as_mut().poll(&mut noop).is_ready());
    }

    /// A client that first lets requests finish, so that its cancellations do not
    /// outnumber them at the bound nor at twice it, is judged again at every later one.
    #[tokio::test(start_paused = true)]
    async fn cancellations_after_finished_requests_still_reach_the_bound() {
        let activity = Arc::new(Activity {
            max_cancelled: 3,
            premature: std::time::Duration::from_secs(1),
            ..Activity::default()
        });
        let mut noop = Context::from_waker(std::task::Waker::noop());
        for _ in 0..6 {
            activity.in_flight.fetch_add(1, Ordering::Relaxed);
            activity.ended(None);
        }
        let abuse = activity.abusive.notified();
        let mut abuse = pin!(abuse);
        abuse.as_mut().enable();
        // Six cancellations: no more than the six finished.
        for _ in 0..6 {
            drop(pending_request(&activity));
        }
        assert!(abuse.as_mut().poll(&mut noop).is_pending());
        assert!(!activity.abuse_closes());
        // The seventh outnumbers them, past twice the bound: the connection shuts down
        // first (GOAWAY), whatever the count.
        drop(pending_request(&activity));
        assert!(abuse.as_mut().poll(&mut noop).is_ready());
        assert!(!activity.abuse_closes());
        // `max_cancelled` more close it.
        let abuse = activity.abusive.notified();
        let mut abuse = pin!(abuse);
        abuse.as_mut().enable();
        for _ in 0..2 {
            drop(pending_request(&activity));
        }
        assert!(abuse.as_mut().poll(&mut noop).is_pending());
        drop(pending_request(&activity));
        assert!(abuse.as_mut().poll(&mut noop).is_ready());
        assert!(activity.abuse_closes());
    }
}
