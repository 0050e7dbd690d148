//! Dialing and accepting mutually authenticated connections.
//!
//! [`MtlsConnector`] dials an address and completes a handshake in which the server must
//! present an SVID that the connector's [`Authorizer`] accepts. [`MtlsAcceptor`] completes
//! handshakes on accepted sockets; [`MtlsAcceptor::incoming`] runs a whole listener:
//! every handshake in a task of its own, each bounded by a timeout (default 10 s), at most
//! 1024 at once, so a slow or silent client never stalls accepting others. Both yield the
//! peer's verified [`PeerIdentity`], read from the certificate that passed verification —
//! never from anything the peer could set otherwise, such as a header.
//!
//! A refused handshake is a [`TransportError`] that names the reason: for a verification
//! failure on this side, [`TransportError::Verify`] carries the [`VerifyError`]; for a
//! refusal by the peer, the TLS alert it sent.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::AbortHandle;

use crate::authorize::Authorizer;
use crate::error::VerifyError;
use crate::tls::Mtls;
use crate::verify::spiffe_id_of;
use mesh_core::identity::SpiffeId;
use mesh_core::sock::TcpOptions;

/// The default bound on one TLS handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The default bound on handshakes in progress on one listener.
pub const DEFAULT_MAX_CONCURRENT_HANDSHAKES: usize = 1024;

/// The verified SPIFFE identity of the peer of a connection.
///
/// Servers insert it into each request's extensions, where handlers and authorization
/// read it as a typed value (`request.extensions().get::<PeerIdentity>()`). Cheap to
/// clone (one reference count), as a server does for every request of a connection.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PeerIdentity(Arc<SpiffeId>);

impl PeerIdentity {
    /// The peer's SPIFFE ID.
    pub fn id(&self) -> &SpiffeId {
        &self.0
    }

    /// Reads the identity of a completed handshake's peer.
    pub fn of(conn: &rustls::CommonState) -> Result<Self, TransportError> {
        let leaf = conn
            .peer_certificates()
            .and_then(|certs| certs.first())
            .ok_or(TransportError::NoPeerIdentity)?;
        spiffe_id_of(leaf)
            .map(|id| Self(Arc::new(id)))
            .map_err(TransportError::Verify)
    }
}

/// When the certificate the peer of a completed handshake presented expires (its leaf's
/// `notAfter`); `None` without one (or one expiring before 1970, which no handshake
/// verifies). A server closes a connection then: its peer's identity is vouched for no
/// longer, and a connection held past it would outlive a withdrawn root or SVID.
pub fn peer_not_after(conn: &rustls::CommonState) -> Option<std::time::SystemTime> {
    let leaf = conn.peer_certificates()?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let secs = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
    std::time::UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// Why a connection could not be established.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// Connecting or the transport failed.
    #[error("connection failed: {0}")]
    Io(#[source] io::Error),
    /// This side refused the peer's certificate.
    #[error("TLS handshake refused: {0}")]
    Verify(#[source] VerifyError),
    /// The TLS handshake failed for another reason (including a refusal by the peer, whose
    /// alert is named here, or bytes that are not TLS at all).
    #[error("TLS handshake failed: {0}")]
    Tls(#[source] rustls::Error),
    /// The handshake did not finish in time.
    #[error("TLS handshake timed out after {0:?}")]
    Timeout(Duration),
    /// The handshake finished without a peer certificate.
    #[error("peer presented no certificate")]
    NoPeerIdentity,
}

impl TransportError {
    fn from_io(err: io::Error) -> Self {
        let is_tls = err
            .get_ref()
            .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some());
        if !is_tls {
            return Self::Io(err);
        }
        match err
            .into_inner()
            .map(|inner| inner.downcast::<rustls::Error>())
        {
            Some(Ok(tls)) => match VerifyError::from_rustls(&tls) {
                Some(verify) => Self::Verify(verify),
                None => Self::Tls(*tls),
            },
            _ => Self::Io(io::Error::other("TLS error")),
        }
    }
}

/// Runs a handshake within `timeout`, naming the reason if it fails.
pub(crate) async fn bounded<T>(
    timeout: Duration,
    handshake: impl std::future::Future<Output = io::Result<T>>,
) -> Result<T, TransportError> {
    tokio::time::timeout(timeout, handshake)
        .await
        .map_err(|_| TransportError::Timeout(timeout))?
        .map_err(TransportError::from_io)
}

/// Dials servers that must present an identity the connector's [`Authorizer`] accepts.
#[derive(Clone)]
pub struct MtlsConnector {
    connector: tokio_rustls::TlsConnector,
    handshake_timeout: Duration,
    tcp: TcpOptions,
}

impl fmt::Debug for MtlsConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MtlsConnector")
            .field("handshake_timeout", &self.handshake_timeout)
            .finish_non_exhaustive()
    }
}

impl MtlsConnector {
    /// A connector for servers `expected` accepts.
    pub fn new(mtls: &Mtls, expected: impl Into<Authorizer>) -> Result<Self, rustls::Error> {
        let config = mtls.client_config(expected.into())?;
        Ok(Self {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            tcp: TcpOptions::default(),
        })
    }

    /// Bounds each handshake (default 10 s).
    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// The TCP options [`connect`](Self::connect) sets (default
    /// [`TcpOptions::default`]: keepalive after 10 s and a 40 s `TCP_USER_TIMEOUT` to
    /// other hosts, `TCP_NODELAY` always; see [`mesh_core::sock`]).
    pub fn with_tcp_options(mut self, options: TcpOptions) -> Self {
        self.tcp = options;
        self
    }

    /// Connects to `addr` over TCP, with the connector's TCP options, and runs the
    /// handshake.
    pub async fn connect(
        &self,
        addr: SocketAddr,
    ) -> Result<(tokio_rustls::client::TlsStream<TcpStream>, PeerIdentity), TransportError> {
        let tcp = TcpStream::connect(addr).await.map_err(TransportError::Io)?;
        mesh_core::sock::tune(&tcp, addr, &self.tcp);
        self.handshake(addr, tcp).await
    }

    /// Runs the handshake over an established transport to `addr`.
    pub async fn handshake<IO>(
        &self,
        addr: SocketAddr,
        io: IO,
    ) -> Result<(tokio_rustls::client::TlsStream<IO>, PeerIdentity), TransportError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        // SPIFFE peers are verified by URI SAN, not by name: the IP is only a placeholder
        // (rustls sends no SNI for IP addresses).
        let name = ServerName::IpAddress(addr.ip().into());
        let stream = bounded(self.handshake_timeout, self.connector.connect(name, io)).await?;
        let peer = PeerIdentity::of(stream.get_ref().1)?;
        Ok((stream, peer))
    }
}

/// Completes server handshakes that require an authorized client SVID.
#[derive(Clone)]
pub struct MtlsAcceptor {
    acceptor: tokio_rustls::TlsAcceptor,
    handshake_timeout: Duration,
    max_concurrent: usize,
    tcp: TcpOptions,
}

impl fmt::Debug for MtlsAcceptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MtlsAcceptor")
            .field("handshake_timeout", &self.handshake_timeout)
            .field("max_concurrent", &self.max_concurrent)
            .finish_non_exhaustive()
    }
}

impl MtlsAcceptor {
    /// An acceptor for clients that `clients` authorizes.
    pub fn new(mtls: &Mtls, clients: impl Into<Authorizer>) -> Result<Self, rustls::Error> {
        let config = mtls.server_config(clients.into())?;
        Ok(Self {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_concurrent: DEFAULT_MAX_CONCURRENT_HANDSHAKES,
            tcp: TcpOptions::default(),
        })
    }

    /// The TCP options set on each connection [`incoming`](Self::incoming) accepts
    /// (default [`TcpOptions::default`], as [`MtlsConnector::with_tcp_options`]).
    pub fn with_tcp_options(mut self, options: TcpOptions) -> Self {
        self.tcp = options;
        self
    }

    /// Bounds each handshake (default 10 s).
    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// Bounds the handshakes in progress in [`incoming`](Self::incoming), with the
    /// connections handshaken but not yet taken from its [`Incoming`] past the 64 it
    /// buffers (default 1024); beyond it, accepting waits.
    pub fn with_max_concurrent_handshakes(mut self, max: usize) -> Self {
        self.max_concurrent = max.max(1);
        self
    }

    /// Runs the server handshake on an accepted transport.
    pub async fn accept<IO>(
        &self,
        io: IO,
    ) -> Result<(tokio_rustls::server::TlsStream<IO>, PeerIdentity), TransportError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let stream = bounded(self.handshake_timeout, self.acceptor.accept(io)).await?;
        let peer = PeerIdentity::of(stream.get_ref().1)?;
        Ok((stream, peer))
    }

    /// Accepts connections from `listener` and runs their handshakes concurrently; the
    /// returned [`Incoming`] yields each outcome. Dropping it stops accepting.
    pub fn incoming(self, listener: TcpListener) -> Incoming {
        let (tx, rx) = mpsc::channel(64);
        let task = tokio::spawn(accept_loop(self, listener, tx));
        Incoming {
            rx,
            task: task.abort_handle(),
        }
    }
}

/// A connection that completed a mutually authenticated handshake.
#[derive(Debug)]
pub struct Accepted {
    /// The TLS stream.
    pub stream: tokio_rustls::server::TlsStream<TcpStream>,
    /// The client's verified identity.
    pub peer: PeerIdentity,
    /// The client's address.
    pub remote: SocketAddr,
}

/// A handshake that failed, and from where.
#[derive(Debug, thiserror::Error)]
#[error("handshake with {remote} failed: {error}")]
pub struct HandshakeError {
    /// The client's address.
    pub remote: SocketAddr,
    /// Why it failed.
    #[source]
    pub error: TransportError,
}

/// Outcomes of handshakes on a listener; see [`MtlsAcceptor::incoming`].
#[derive(Debug)]
pub struct Incoming {
    rx: mpsc::Receiver<Result<Accepted, HandshakeError>>,
    task: AbortHandle,
}

impl Incoming {
    /// The next handshake outcome, in completion order. `None` once accepting has stopped.
    pub async fn next(&mut self) -> Option<Result<Accepted, HandshakeError>> {
        self.rx.recv().await
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(
    acceptor: MtlsAcceptor,
    listener: TcpListener,
    tx: mpsc::Sender<Result<Accepted, HandshakeError>>,
) {
    let permits = Arc::new(Semaphore::new(acceptor.max_concurrent));
    let acceptor = Arc::new(acceptor);
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let (tcp, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Typically out of file descriptors: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = tx.closed() => return,
        };
        mesh_core::sock::tune(&tcp, remote, &acceptor.tcp);
        let acceptor = acceptor.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let outcome = match acceptor.accept(tcp).await {
                Ok((stream, peer)) => {
                    tracing::debug!(%remote, %peer, "accepted");
                    Ok(Accepted {
                        stream,
                        peer,
                        remote,
                    })
                }
                Err(error) => {
                    tracing::info!(%remote, %error, "handshake refused");
                    Err(HandshakeError { remote, error })
                }
            };
            // The permit is held until the outcome is handed over, so a consumer that does
            // not take them holds back accepting, not a growing pile of finished
            // connections.
            let _ = tx.send(outcome).await;
            drop(permit);
        });
    }
}
