//! A fake SPIFFE Workload API server for tests (feature `test-util`).
//!
//! [`FakeWorkloadApi`] plays the part of a SPIRE agent: it serves the X.509 half of the
//! Workload API over a Unix socket ([`start`](FakeWorkloadApi::start), Unix only) or a
//! loopback TCP port ([`start_tcp`](FakeWorkloadApi::start_tcp), every platform: the
//! Workload API's `tcp://IP:PORT` endpoints, which Windows tests need) to any client (the
//! `spiffe` crate's `X509Source` and `WorkloadApiClient`, SPIRE's Go client, our
//! [`SpireSource`](crate::spire)), and streams whatever [`X509Update`] the test pushes to
//! every open `FetchX509SVID` and `FetchX509Bundles` call, as an agent does on rotation.
//! Updates come from the [`TestCa`](crate::test_ca::TestCa) through [`X509Update::new`],
//! or from raw bytes through [`X509Update::from_der`] to feed clients malformed input.
//!
//! What it checks, like the specification asks of a real agent: every call must carry the
//! gRPC metadata `workload.spiffe.io: true` ([`SECURITY_HEADER`]), otherwise it is refused
//! with `INVALID_ARGUMENT`. What it does not do: attest the caller (every caller gets the
//! same SVID), serve JWT-SVIDs (those methods answer `UNIMPLEMENTED`), or send CRLs.
//!
//! The gRPC code is generated from `proto/workload.proto` (written from the specification)
//! by `build.rs` with `protox`, so building it needs no system `protoc`.
//!
//! ```
//! use mesh_spiffe::fake_workload_api::{FakeWorkloadApi, X509Update};
//! use mesh_spiffe::test_ca::TestCa;
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let mut ca = TestCa::new("example.org").unwrap();
//! let first = X509Update::new(&ca.issue("spiffe://example.org/web").unwrap(), &ca.bundle_set().unwrap());
//! // On Unix, `FakeWorkloadApi::start(dir.path().join("agent.sock"), first)` serves on a socket.
//! let agent = FakeWorkloadApi::start_tcp("127.0.0.1:0".parse().unwrap(), first).unwrap();
//! assert!(agent.endpoint().starts_with("tcp://127.0.0.1:"));
//! // Point a client at `agent.endpoint()` (or `SPIFFE_ENDPOINT_SOCKET`), then rotate:
//! agent.push(X509Update::new(&ca.issue("spiffe://example.org/web").unwrap(), &ca.bundle_set().unwrap()));
//! agent.shutdown().await;
//! # });
//! ```

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
#[cfg(unix)]
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

#[cfg(unix)]
use tokio::net::UnixListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
#[cfg(unix)]
use tokio_stream::wrappers::UnixListenerStream;
use tokio_stream::wrappers::{TcpListenerStream, WatchStream};
use tokio_stream::{Stream, StreamExt as _};
use tonic::{Request, Response, Status};

use crate::credentials::{Bundle, BundleSet, Svid};
use mesh_core::identity::TrustDomain;

/// The messages and server trait generated from `proto/workload.proto` by `build.rs`.
#[allow(
    missing_docs,
    unreachable_pub,
    missing_debug_implementations,
    clippy::all,
    clippy::pedantic,
    reason = "generated code"
)]
mod pb {
    include!(concat!(env!("OUT_DIR"), "/_.rs"));
}

use pb::spiffe_workload_api_server::{SpiffeWorkloadApi, SpiffeWorkloadApiServer};

/// The gRPC metadata key every Workload API call must carry, with the value `true`.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

/// How long [`FakeWorkloadApi::shutdown`] lets connections close before it aborts them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What the fake agent serves: one X.509 SVID (the default one), its trust domain's bundle
/// and any federated bundles.
#[derive(Clone)]
pub struct X509Update {
    spiffe_id: String,
    trust_domain: String,
    chain: Vec<u8>,
    key: Vec<u8>,
    bundle: Vec<u8>,
    hint: String,
    federated: HashMap<String, Vec<u8>>,
    /// Refuse every call with `PERMISSION_DENIED` instead.
    denied: bool,
}

impl fmt::Debug for X509Update {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("X509Update")
            .field("spiffe_id", &self.spiffe_id)
            .field("hint", &self.hint)
            .field("federated", &self.federated.keys().collect::<Vec<_>>())
            .field("denied", &self.denied)
            .finish_non_exhaustive()
    }
}

fn concat<'a>(certs: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    certs.into_iter().flatten().copied().collect()
}

impl X509Update {
    /// Serves `svid`, with the bundle of its trust domain from `bundles` as its own bundle
    /// and every other bundle in `bundles` as a federated one.
    ///
    /// When `bundles` has none for the SVID's trust domain, the SVID goes out with an empty
    /// bundle, which clients refuse as malformed.
    pub fn new(svid: &Svid, bundles: &BundleSet) -> Self {
        let own = svid.id().trust_domain();
        let der = |bundle: &Bundle| concat(bundle.certs().iter().map(|c| c.as_ref()));
        let federated = bundles
            .trust_domains()
            .filter(|td| *td != own)
            .filter_map(|td| Some((td.id_string(), der(bundles.get(td)?))))
            .collect();
        Self {
            spiffe_id: svid.id().to_string(),
            trust_domain: own.to_string(),
            chain: concat(svid.chain().iter().map(|c| c.as_ref())),
            key: svid.key().secret_der().to_vec(),
            bundle: bundles.get(own).map(der).unwrap_or_default(),
            hint: String::new(),
            federated,
            denied: false,
        }
    }

    /// No identity for the caller: every `FetchX509SVID` and `FetchX509Bundles` call, the
    /// open ones and each a client makes next, ends with `PERMISSION_DENIED`, as a SPIRE
    /// agent answers a workload it holds no registration entry for (one deleted, say), until
    /// an update with an SVID is pushed.
    pub fn permission_denied() -> Self {
        Self {
            spiffe_id: String::new(),
            trust_domain: String::new(),
            chain: Vec::new(),
            key: Vec::new(),
            bundle: Vec::new(),
            hint: String::new(),
            federated: HashMap::new(),
            denied: true,
        }
    }

    /// Serves raw fields, unchecked, to test how clients take malformed or mismatched
    /// input: the `spiffe_id` field, the certificate chain (DER certificates concatenated,
    /// leaf first), the PKCS#8 DER private key, and the own trust domain's bundle (DER
    /// certificates concatenated).
    pub fn from_der(spiffe_id: &str, chain: Vec<u8>, key: Vec<u8>, bundle: Vec<u8>) -> Self {
        let trust_domain = spiffe_id
            .strip_prefix("spiffe://")
            .and_then(|rest| rest.split('/').next())
            .unwrap_or_default();
        Self {
            spiffe_id: spiffe_id.to_owned(),
            trust_domain: trust_domain.to_owned(),
            chain,
            key,
            bundle,
            hint: String::new(),
            federated: HashMap::new(),
            denied: false,
        }
    }

    /// Sets the SVID's hint (empty by default).
    pub fn with_hint(mut self, hint: &str) -> Self {
        hint.clone_into(&mut self.hint);
        self
    }

    /// Adds (or replaces) the federated bundle of `trust_domain`.
    pub fn with_federated_bundle(mut self, trust_domain: &TrustDomain, bundle: &Bundle) -> Self {
        let der = concat(bundle.certs().iter().map(|c| c.as_ref()));
        self.federated.insert(trust_domain.id_string(), der);
        self
    }

    /// Adds (or replaces) a federated bundle as raw fields, unchecked: its key (the
    /// Workload API keys bundles by the trust domain's SPIFFE ID, `spiffe://other.org`)
    /// and its DER certificates, concatenated (empty: a trust domain with no X.509
    /// authorities).
    pub fn with_raw_federated_bundle(mut self, key: &str, der: Vec<u8>) -> Self {
        self.federated.insert(key.to_owned(), der);
        self
    }

    fn svid_response(&self) -> pb::X509svidResponse {
        pb::X509svidResponse {
            svids: vec![pb::X509svid {
                spiffe_id: self.spiffe_id.clone(),
                x509_svid: self.chain.clone(),
                x509_svid_key: self.key.clone(),
                bundle: self.bundle.clone(),
                hint: self.hint.clone(),
            }],
            crl: Vec::new(),
            federated_bundles: self.federated.clone(),
        }
    }

    fn bundles_response(&self) -> pb::X509BundlesResponse {
        let mut bundles = self.federated.clone();
        bundles.insert(
            format!("spiffe://{}", self.trust_domain),
            self.bundle.clone(),
        );
        pb::X509BundlesResponse {
            crl: Vec::new(),
            bundles,
        }
    }
}

/// A running fake Workload API server; see the [module docs](self).
///
/// Dropping it stops the server at once (open calls are cut) and removes its socket file,
/// if it has one; [`shutdown`](Self::shutdown) stops it gracefully.
pub struct FakeWorkloadApi {
    listen: Listen,
    updates: Option<watch::Sender<Arc<X509Update>>>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
}

/// Where a [`FakeWorkloadApi`] listens.
#[derive(Debug)]
enum Listen {
    #[cfg(unix)]
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl fmt::Debug for FakeWorkloadApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeWorkloadApi")
            .field("listen", &self.listen)
            .field("open_streams", &self.open_streams())
            .finish_non_exhaustive()
    }
}

impl FakeWorkloadApi {
    /// Binds a Unix socket at `socket` and serves `initial` to every caller until the next
    /// [`push`](Self::push).
    ///
    /// Must be called within a Tokio runtime. Fails when the socket cannot be bound, for
    /// instance because a file already exists at `socket`. Use an absolute path (a
    /// temporary directory's) so that [`endpoint`](Self::endpoint) is a valid address.
    #[cfg(unix)]
    pub fn start(socket: impl Into<PathBuf>, initial: X509Update) -> io::Result<Self> {
        let socket = socket.into();
        let listener = UnixListener::bind(&socket)?;
        tracing::debug!(socket = %socket.display(), "fake Workload API listening");
        Ok(Self::serve(
            Listen::Unix(socket),
            UnixListenerStream::new(listener),
            initial,
        ))
    }

    /// Binds a TCP listener at `addr` (`127.0.0.1:0` picks a free port) and serves
    /// `initial` to every caller until the next [`push`](Self::push); the Workload API
    /// allows `tcp://IP:PORT` endpoints, and this works on every platform.
    ///
    /// Must be called within a Tokio runtime. Fails when `addr` cannot be bound. The
    /// Workload API has no transport security of its own: keep it on loopback.
    pub fn start_tcp(addr: SocketAddr, initial: X509Update) -> io::Result<Self> {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let addr = listener.local_addr()?;
        tracing::debug!(%addr, "fake Workload API listening");
        Ok(Self::serve(
            Listen::Tcp(addr),
            TcpListenerStream::new(listener),
            initial,
        ))
    }

    /// Serves the Workload API on the connections `incoming` yields.
    fn serve<S, IO>(listen: Listen, incoming: S, initial: X509Update) -> Self
    where
        S: Stream<Item = io::Result<IO>> + Send + 'static,
        IO: tokio::io::AsyncRead
            + tokio::io::AsyncWrite
            + tonic::transport::server::Connected
            + Send
            + Unpin
            + 'static,
    {
        let (updates, rx) = watch::channel(Arc::new(initial));
        let (shutdown, signal) = oneshot::channel::<()>();
        let service = SpiffeWorkloadApiServer::with_interceptor(
            WorkloadApi { updates: rx },
            require_security_header,
        );
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .serve_with_incoming_shutdown(service, incoming, async move {
                    let _ = signal.await;
                })
                .await
        });
        Self {
            listen,
            updates: Some(updates),
            shutdown: Some(shutdown),
            task: Some(task),
        }
    }

    /// The Unix socket's path; `None` for a server on TCP.
    pub fn socket_path(&self) -> Option<&Path> {
        match &self.listen {
            #[cfg(unix)]
            Listen::Unix(path) => Some(path),
            Listen::Tcp(_) => None,
        }
    }

    /// The TCP address it listens on; `None` for a server on a Unix socket.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match &self.listen {
            #[cfg(unix)]
            Listen::Unix(_) => None,
            Listen::Tcp(addr) => Some(*addr),
        }
    }

    /// The address in the form clients and `SPIFFE_ENDPOINT_SOCKET` take:
    /// `unix:///path/to/socket`, or `tcp://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        match &self.listen {
            #[cfg(unix)]
            Listen::Unix(path) => format!("unix://{}", path.display()),
            Listen::Tcp(addr) => format!("tcp://{addr}"),
        }
    }

    /// Serves `update` from now on: every open `FetchX509SVID` and `FetchX509Bundles` call
    /// receives it as its next response, and new calls start with it.
    pub fn push(&self, update: X509Update) {
        if let Some(updates) = &self.updates {
            updates.send_replace(Arc::new(update));
        }
    }

    /// The number of calls currently streaming updates (`FetchX509SVID` and
    /// `FetchX509Bundles` together).
    pub fn open_streams(&self) -> usize {
        // The service itself holds one receiver; every open call holds one more.
        self.updates
            .as_ref()
            .map_or(0, |updates| updates.receiver_count().saturating_sub(1))
    }

    /// Stops the server: ends every open call (as an agent that goes away does), stops
    /// accepting, and waits up to 5 s for connections to close before cutting them.
    pub async fn shutdown(mut self) {
        // Dropping the sender ends every update stream once it has sent what it has.
        self.updates = None;
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(mut task) = self.task.take() {
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(error))) => tracing::warn!(%error, "fake Workload API failed"),
                Ok(Err(error)) => tracing::warn!(%error, "fake Workload API task failed"),
                Err(_) => {
                    tracing::warn!("fake Workload API connections still open: aborting them");
                    task.abort();
                }
            }
        }
    }
}

impl Drop for FakeWorkloadApi {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        #[cfg(unix)]
        if let Listen::Unix(path) = &self.listen {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Refuses calls without `workload.spiffe.io: true`, as the specification requires.
fn require_security_header(request: Request<()>) -> Result<Request<()>, Status> {
    let present = request
        .metadata()
        .get(SECURITY_HEADER)
        .is_some_and(|value| value.to_str().is_ok_and(|v| v == "true"));
    if present {
        Ok(request)
    } else {
        Err(Status::invalid_argument(
            "security header missing from request",
        ))
    }
}

type UpdateStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The gRPC service: each call streams the current update, then every later one.
#[derive(Debug)]
struct WorkloadApi {
    updates: watch::Receiver<Arc<X509Update>>,
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = UpdateStream<pb::X509svidResponse>;
    type FetchX509BundlesStream = UpdateStream<pb::X509BundlesResponse>;

    async fn fetch_x509svid(
        &self,
        _request: Request<pb::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let stream = WatchStream::new(self.updates.clone()).map(|u| {
            if u.denied {
                return Err(Status::permission_denied("no identity issued"));
            }
            Ok(u.svid_response())
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn fetch_x509_bundles(
        &self,
        _request: Request<pb::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let stream = WatchStream::new(self.updates.clone()).map(|u| {
            if u.denied {
                return Err(Status::permission_denied("no identity issued"));
            }
            Ok(u.bundles_response())
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
