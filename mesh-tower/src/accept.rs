//! The accept loop the HTTP server and the opaque TCP listener share: a bound on open
//! connections, accept errors waited out, and a graceful drain on shutdown. Connections
//! come from a listener, or are handed over by another loop (a transparent listener that
//! picked this server for them).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;

/// How a shutdown went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Connections open when the shutdown began.
    pub open_at_shutdown: usize,
    /// Connections still open at the shutdown timeout, closed then.
    pub forced: usize,
}

/// Where connections come from.
pub(crate) enum Source {
    /// Accepted here.
    Listener(TcpListener),
    /// Accepted elsewhere and handed over; ends when every sender is gone.
    Handed(mpsc::Receiver<(TcpStream, SocketAddr)>),
}

impl From<TcpListener> for Source {
    fn from(listener: TcpListener) -> Self {
        Self::Listener(listener)
    }
}

impl Source {
    /// The next connection; `None` once no more can come.
    async fn next(&mut self) -> Option<std::io::Result<(TcpStream, SocketAddr)>> {
        match self {
            Self::Listener(l) => Some(l.accept().await),
            Self::Handed(rx) => rx.recv().await.map(Ok),
        }
    }
}

/// Accepts connections from `source` until `shutdown` turns true, at most
/// `max_connections` open at once, each served by `handle` (given the connection, its
/// peer and the shutdown signal) in a task of its own. On shutdown: stops accepting,
/// waits up to `shutdown_timeout` for open connections to end, then closes the rest.
pub(crate) async fn accept_loop<F, Fut>(
    source: impl Into<Source>,
    max_connections: usize,
    shutdown_timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
    handle: F,
) -> ShutdownReport
where
    F: Fn(TcpStream, SocketAddr, watch::Receiver<bool>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut source = source.into();
    let permits = Arc::new(Semaphore::new(max_connections.max(1)));
    let mut conns = JoinSet::new();
    loop {
        let permit = tokio::select! {
            biased;
            () = stopped(&mut shutdown) => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let (tcp, remote) = tokio::select! {
            biased;
            () = stopped(&mut shutdown) => break,
            accepted = source.next() => match accepted {
                Some(Ok(accepted)) => accepted,
                None => break,
                Some(Err(error)) => {
                    // Out of descriptors and the like: wait rather than spin.
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let conn = handle(tcp, remote, shutdown.clone());
        // The permit is released when the connection ends. A combinator rather than an
        // `async move` block: the block would keep `conn` twice in the task (captured,
        // and again as the future it awaits), doubling every connection's task.
        conns.spawn(futures_util::FutureExt::map(conn, move |()| drop(permit)));
        // Reap finished connections as we go.
        while conns.try_join_next().is_some() {}
    }
    drop(source);
    while conns.try_join_next().is_some() {}
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
