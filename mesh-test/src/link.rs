//! An endpoint's network link: a TCP relay on the address clients dial, in front of the
//! endpoint's server on a private port. Public as [`Link`], to put any server (a
//! `mesh-proxy` process, say) behind an address a test can kill, restart and partition.
//!
//! The relay moves bytes, nothing else (TLS runs end to end through it), and is what
//! kills, restarts and partitions act on:
//!
//! - **kill**: the listener closes (new connections are refused) and every relayed
//!   connection is dropped at once, as when a process dies;
//! - **restart**: the listener binds the same address again (retrying for up to 2 s if
//!   the port is briefly unavailable);
//! - **partition**: a black hole — connections are still accepted (the kernel would
//!   complete the TCP handshake anyway) but no byte moves either way, so TLS handshakes
//!   and requests hang until the client's timeouts fire; **heal** delivers what was held.

use std::io;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// How long a restart keeps trying to bind the old address.
const REBIND_FOR: Duration = Duration::from_secs(2);

/// A TCP relay on a loopback address of its own to a backend. It moves bytes only (TLS
/// runs end to end through it). [`kill`](Self::kill) closes the listener and drops every
/// relayed connection at once, as when a process dies; [`restart`](Self::restart) binds
/// the same address again (retrying for up to 2 s); a partition
/// ([`set_partitioned`](Self::set_partitioned)) is a black hole: connections are still
/// accepted but no byte moves either way until it ends.
#[derive(Debug)]
pub struct Link {
    addr: SocketAddr,
    /// Read for each new connection: a restart may point it elsewhere.
    backend: Mutex<SocketAddr>,
    partitioned: watch::Sender<bool>,
    /// The accept loop and, inside it, the relayed connections; `None` while killed.
    tasks: Mutex<Option<JoinSet<()>>>,
}

impl Link {
    /// A relay on a new loopback port to `backend`.
    pub async fn start(backend: SocketAddr) -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let link = Self {
            addr,
            backend: Mutex::new(backend),
            partitioned: watch::Sender::new(false),
            tasks: Mutex::new(None),
        };
        link.run(listener);
        Ok(link)
    }

    /// The address clients dial.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The backend new connections are relayed to.
    pub fn backend(&self) -> SocketAddr {
        *self
            .backend
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn run(&self, listener: TcpListener) {
        let backend = self.backend();
        let partitioned = self.partitioned.subscribe();
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            // Dropped (aborted) with the accept task: a kill cuts them all.
            let mut conns = JoinSet::new();
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let partitioned = partitioned.clone();
                conns.spawn(relay(client, backend, partitioned));
                while conns.try_join_next().is_some() {}
            }
        });
        if let Ok(mut slot) = self.tasks.lock() {
            *slot = Some(tasks);
        }
    }

    /// Whether it listens (not killed).
    pub fn is_running(&self) -> bool {
        self.tasks.lock().map(|t| t.is_some()).unwrap_or(false)
    }

    /// Closes the listener and drops every relayed connection at once.
    pub fn kill(&self) {
        if let Ok(mut tasks) = self.tasks.lock() {
            tasks.take();
        }
    }

    /// Listens on the same address again (after a kill, or to drop every connection now).
    pub async fn restart(&self) -> io::Result<()> {
        self.restart_to(self.backend()).await
    }

    /// The same, relaying to `backend` from now on (a backend restarted elsewhere).
    pub async fn restart_to(&self, backend: SocketAddr) -> io::Result<()> {
        self.kill();
        *self
            .backend
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = backend;
        let deadline = tokio::time::Instant::now() + REBIND_FOR;
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        self.run(listener);
        Ok(())
    }

    /// Starts (`true`) or ends (`false`) a partition: a black hole in both directions.
    pub fn set_partitioned(&self, partitioned: bool) {
        self.partitioned.send_replace(partitioned);
    }

    /// Whether a partition holds the link.
    pub fn is_partitioned(&self) -> bool {
        *self.partitioned.borrow()
    }
}

async fn relay(client: TcpStream, backend: SocketAddr, partitioned: watch::Receiver<bool>) {
    // A partition holds the connection before it even reaches the backend.
    if !healed(&mut partitioned.clone()).await {
        return;
    }
    let Ok(server) = TcpStream::connect(backend).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = pump(cr, sw, partitioned.clone());
    let down = pump(sr, cw, partitioned);
    // Either direction ending (EOF or error) ends the connection, as a closed socket does.
    tokio::select! {
        () = up => {}
        () = down => {}
    }
}

/// Copies bytes from `r` to `w`, moving none while partitioned.
async fn pump(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    mut partitioned: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if !healed(&mut partitioned).await {
            return;
        }
        let n = tokio::select! {
            read = r.read(&mut buf) => match read {
                Ok(0) | Err(_) => {
                    let _ = w.shutdown().await;
                    return;
                }
                Ok(n) => n,
            },
            // Partitioned while waiting: stop reading.
            () = async { let _ = partitioned.wait_for(|p| *p).await; } => continue,
        };
        // Bytes read just as a partition began are held, as TCP would retransmit them.
        if !healed(&mut partitioned).await {
            return;
        }
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Waits until no partition holds the link; `false` if the link is gone.
async fn healed(partitioned: &mut watch::Receiver<bool>) -> bool {
    partitioned.wait_for(|p| !*p).await.is_ok()
}
