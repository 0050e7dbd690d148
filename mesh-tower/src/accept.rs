//! The accept loop the HTTP server and the opaque TCP listener share: a bound on open
//! connections, accept errors waited out, and a graceful drain on shutdown. Connections
//! come from a listener, are handed over by another loop (a transparent listener that
//! picked this server for them), or are byte streams of any kind from a stream the owner
//! feeds (Unix sockets, a simulated network).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
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
/// peer and the shutdown signal) in a task of its own. On shutdown: stops accepting,
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
    F: Fn(I::Conn, SocketAddr, watch::Receiver<bool>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(max_connections.max(1)));
    let mut conns = JoinSet::new();
    let mut ended = false;
    loop {
        let permit = match permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(tokio::sync::TryAcquireError::Closed) => break,
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                // Full: new connections wait in the kernel's backlog, unanswered. Said
                // (once a second at most), so that an operator sees why callers time out.
                full(max_connections);
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
        let conn = handle(conn, remote, shutdown.clone());
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
