//! A TCP relay in front of each inbound proxy, on the address the outbound proxy's
//! discovery names: what kills, restarts and connection drops act on in the proxy stack,
//! as `mesh-test`'s link does in front of each in-process endpoint.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// How long a restart keeps trying to bind the old address.
const REBIND_FOR: Duration = Duration::from_secs(2);

#[derive(Debug)]
pub(crate) struct Relay {
    addr: SocketAddr,
    backend: Arc<Mutex<SocketAddr>>,
    /// The accept loop, which owns the relayed connections; `None` while killed.
    tasks: Mutex<Option<JoinSet<()>>>,
}

impl Relay {
    /// A relay on a new loopback port to `backend`.
    pub(crate) async fn start(backend: SocketAddr) -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let relay = Self {
            addr: listener.local_addr()?,
            backend: Arc::new(Mutex::new(backend)),
            tasks: Mutex::new(None),
        };
        relay.run(listener);
        Ok(relay)
    }

    /// The address clients dial.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn run(&self, listener: TcpListener) {
        let backend = self.backend.clone();
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            // Dropped (aborted) with the accept task: a kill cuts every connection.
            let mut conns = JoinSet::new();
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let Ok(to) = backend.lock().map(|b| *b) else {
                    continue;
                };
                conns.spawn(async move {
                    let Ok(mut server) = TcpStream::connect(to).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
                while conns.try_join_next().is_some() {}
            }
        });
        if let Ok(mut slot) = self.tasks.lock() {
            *slot = Some(tasks);
        }
    }

    /// Closes the listener and drops every relayed connection.
    pub(crate) fn kill(&self) {
        if let Ok(mut tasks) = self.tasks.lock() {
            tasks.take();
        }
    }

    /// Listens on the same address again, relaying to `backend` from now on.
    pub(crate) async fn restart(&self, backend: SocketAddr) -> io::Result<()> {
        self.kill();
        if let Ok(mut b) = self.backend.lock() {
            *b = backend;
        }
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

    /// The backend it relays to now.
    pub(crate) fn backend(&self) -> Option<SocketAddr> {
        self.backend.lock().ok().map(|b| *b)
    }
}
