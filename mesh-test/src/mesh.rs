//! [`MockMesh`]: one trust domain's CA, the identities it issued, and everything built on
//! them.

use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};

use mesh_core::config::ServiceConfig;
use mesh_core::{IdentityPattern, SpiffeId, TrustDomain};
use mesh_spiffe::credentials::{Bundle, BundleSet, CredentialSource};
use mesh_spiffe::fake_workload_api::{FakeWorkloadApi, X509Update};
use mesh_spiffe::test_ca::TestCa;
use mesh_spiffe::{Authorizer, CredentialStore, Mtls, MtlsAcceptor};
use mesh_tonic::{MeshChannel, MeshChannelBuilder};
use mesh_tower::decision::DecisionRecord;
use mesh_tower::server::{MeshServer, MeshServerBuilder};
use mesh_tower::{MeshClient, MeshClientBuilder};
use prometheus_client::registry::Registry;

use crate::error::MockMeshError;
use crate::events::{CredentialEvent, Event, EventLog, Log};
use crate::service::{MockService, MockServiceBuilder, ServiceInner};

/// The trust domain of [`MockMesh::new`].
pub const DEFAULT_TRUST_DOMAIN: &str = "example.org";
/// The workload name clients are issued SVIDs for unless told otherwise.
pub const DEFAULT_CLIENT: &str = "client";

/// A whole mock mesh for one trust domain; see the [crate docs](crate). Cheap to clone;
/// clones share everything.
#[derive(Clone)]
pub struct MockMesh {
    pub(crate) inner: Arc<MeshInner>,
}

pub(crate) struct MeshInner {
    pub(crate) ca: Mutex<TestCa>,
    pub(crate) trust_domain: TrustDomain,
    pub(crate) seed: u64,
    pub(crate) log: Log,
    /// Every client's and server's decisions.
    decisions: DecisionRecord,
    client: String,
    /// Every credential store handed out, to rotate.
    stores: Mutex<Vec<(SpiffeId, Weak<CredentialStore>)>>,
    /// Every fake Workload API server started, to rotate.
    agents: Mutex<Vec<(SpiffeId, Weak<FakeWorkloadApi>)>>,
    /// Other trust domains' bundles, trusted by every workload.
    federated: Mutex<Vec<(TrustDomain, Bundle)>>,
    pub(crate) services: Mutex<Vec<Weak<ServiceInner>>>,
}

impl fmt::Debug for MockMesh {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MockMesh")
            .field("trust_domain", &self.inner.trust_domain)
            .field("seed", &self.inner.seed)
            .finish_non_exhaustive()
    }
}

/// Configures a [`MockMesh`]; see [`MockMesh::builder`].
#[derive(Debug, Clone)]
#[must_use]
pub struct MockMeshBuilder {
    trust_domain: String,
    seed: Option<u64>,
    client: String,
    decisions: usize,
}

impl MockMeshBuilder {
    /// How many recent decisions [`MockMesh::decisions`] keeps (default
    /// [`mesh_tower::decision::DEFAULT_CAPACITY`]).
    pub fn decisions(mut self, capacity: usize) -> Self {
        self.decisions = capacity;
        self
    }

    /// The trust domain (default `example.org`).
    pub fn trust_domain(mut self, trust_domain: impl Into<String>) -> Self {
        self.trust_domain = trust_domain.into();
        self
    }

    /// Seeds every endpoint's script randomness and every client's balancer, each client
    /// of a service by the order it is built in (default: a
    /// random seed, logged and readable with [`MockMesh::seed`], so that a failing run can
    /// be replayed).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// The workload name (or full SPIFFE ID) of the clients [`MockMesh::client`] builds
    /// (default `client`).
    pub fn client_identity(mut self, workload: impl Into<String>) -> Self {
        self.client = workload.into();
        self
    }

    /// Creates the mesh's CA.
    pub fn build(self) -> Result<MockMesh, MockMeshError> {
        self.build_with(Log::new())
    }

    /// Builds the mesh around `log` (a simulation's, stamped with virtual time).
    pub(crate) fn build_with(self, log: Log) -> Result<MockMesh, MockMeshError> {
        let ca = TestCa::new(&self.trust_domain)?;
        let seed = self.seed.unwrap_or_else(|| fastrand::u64(..));
        tracing::info!(trust_domain = %self.trust_domain, seed, "mock mesh");
        Ok(MockMesh {
            inner: Arc::new(MeshInner {
                trust_domain: ca.trust_domain().clone(),
                ca: Mutex::new(ca),
                seed,
                log,
                decisions: DecisionRecord::new(self.decisions),
                client: self.client,
                stores: Mutex::default(),
                agents: Mutex::default(),
                federated: Mutex::default(),
                services: Mutex::default(),
            }),
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>, MockMeshError> {
    m.lock().map_err(|_| MockMeshError::Poisoned)
}

impl MockMesh {
    /// A mesh for `example.org` with a random seed.
    pub fn new() -> Result<Self, MockMeshError> {
        Self::builder().build()
    }

    /// Starts configuring a mesh.
    pub fn builder() -> MockMeshBuilder {
        MockMeshBuilder {
            trust_domain: DEFAULT_TRUST_DOMAIN.to_owned(),
            seed: None,
            client: DEFAULT_CLIENT.to_owned(),
            decisions: mesh_tower::decision::DEFAULT_CAPACITY,
        }
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.inner.trust_domain
    }

    /// The seed every endpoint's randomness derives from.
    pub fn seed(&self) -> u64 {
        self.inner.seed
    }

    /// The SPIFFE ID of `workload`: a name (`web`, `ns/prod/sa/web`) in this trust domain,
    /// or a full `spiffe://` ID.
    pub fn id(&self, workload: &str) -> Result<SpiffeId, MockMeshError> {
        let text = if workload.starts_with("spiffe://") {
            workload.to_owned()
        } else {
            format!(
                "spiffe://{}/{}",
                self.inner.trust_domain,
                workload.trim_start_matches('/')
            )
        };
        SpiffeId::new(&text).map_err(|e| MockMeshError::Id(text, e.to_string()))
    }

    /// Starts configuring a mock service named `name`, whose endpoints are issued SVIDs
    /// for `spiffe://<trust domain>/<name>`.
    pub fn service(&self, name: &str) -> MockServiceBuilder {
        MockServiceBuilder::new(self.clone(), name)
    }

    /// The bundles every workload trusts: this CA's and the federated ones.
    pub(crate) fn bundles(&self, ca: &TestCa) -> Result<BundleSet, MockMeshError> {
        let mut set = ca.bundle_set()?;
        for (td, bundle) in lock(&self.inner.federated)?.iter() {
            set.insert(td.clone(), bundle.clone());
        }
        Ok(set)
    }

    /// A credential store holding a fresh SVID for `workload` and the mesh's bundles,
    /// rotated with the mesh from now on.
    pub fn credentials(&self, workload: &str) -> Result<Arc<CredentialStore>, MockMeshError> {
        let id = self.id(workload)?;
        let store = {
            let mut ca = lock(&self.inner.ca)?;
            let svid = ca.issue(&id.to_string())?;
            Arc::new(CredentialStore::with(svid, self.bundles(&ca)?))
        };
        let mut stores = lock(&self.inner.stores)?;
        stores.retain(|(_, s)| s.strong_count() > 0);
        stores.push((id, Arc::downgrade(&store)));
        Ok(store)
    }

    /// mTLS settings for `workload`, over credentials the mesh rotates.
    pub fn mtls(&self, workload: &str) -> Result<Mtls, MockMeshError> {
        let store: Arc<dyn CredentialSource> = self.credentials(workload)?;
        Ok(Mtls::from_arc(store))
    }

    /// A [`MeshClientBuilder`] for `service`, already wired: discovery that follows the
    /// service's endpoints, mTLS as the mesh's client workload, the service's identity
    /// expected of every endpoint, balancer picks seeded from the mesh's seed (each
    /// client and channel of a service its own seed, from the order they are built), and
    /// metrics the mesh reads ([`MockService::client_stats`], breaker events). Change any
    /// policy before `build()`.
    ///
    /// The mesh's metrics take the builder's one metrics slot: calling `metrics` or
    /// `shared_metrics` on it replaces them, and the client then counts for nothing in
    /// [`MockService::client_stats`] and the log's breaker events. To read a client's
    /// metrics, leave them and use [`MockService::client_metrics`].
    pub fn client_builder(
        &self,
        service: &MockService,
    ) -> Result<MeshClientBuilder, MockMeshError> {
        self.client_builder_as(service, &self.inner.client.clone())
    }

    /// The same as [`client_builder`](Self::client_builder), as `workload`.
    pub fn client_builder_as(
        &self,
        service: &MockService,
        workload: &str,
    ) -> Result<MeshClientBuilder, MockMeshError> {
        self.wire_client(MeshClient::builder(service.discovery()), service, workload)
    }

    /// The same as [`client_builder`](Self::client_builder), with every policy of
    /// `config` (a `[services.NAME]` section) as [`MeshClientBuilder::from_config`] takes
    /// them, so that a test runs a client configured like a proxy's. The mesh's wiring
    /// replaces the section's discovery, `tls` and `server_identity`.
    pub fn client_builder_from_config(
        &self,
        service: &MockService,
        config: &ServiceConfig,
    ) -> Result<MeshClientBuilder, MockMeshError> {
        let builder = MeshClientBuilder::from_config(service.name(), config, service.discovery());
        self.wire_client(builder, service, &self.inner.client.clone())
    }

    /// Wires `builder` for `service` as `workload`; see
    /// [`client_builder`](Self::client_builder).
    fn wire_client(
        &self,
        builder: MeshClientBuilder,
        service: &MockService,
        workload: &str,
    ) -> Result<MeshClientBuilder, MockMeshError> {
        let mut registry = Registry::default();
        let builder = builder
            .service_name(service.name())
            .mtls(self.mtls(workload)?)
            .server_identity(self.pattern(service.id())?)
            // The balancer's picks follow the mesh's seed too.
            .seed(crate::service::endpoint_seed(
                self.inner.seed,
                &format!("{}/client/{workload}", service.name()),
                service.inner.next_client(),
            ))
            .metrics(&mut registry);
        service.inner.clients.add(registry);
        service.inner.start_sampler();
        Ok(builder.decisions(&self.inner.decisions))
    }

    /// A [`MeshClient`] for `service` with every default; see
    /// [`client_builder`](Self::client_builder).
    pub fn client(&self, service: &MockService) -> Result<MeshClient, MockMeshError> {
        Ok(self.client_builder(service)?.build()?)
    }

    /// A [`MeshChannelBuilder`] for `service`, wired like
    /// [`client_builder`](Self::client_builder) (its metrics slot taken the same way).
    /// The endpoints serve `mesh_tonic::test_util`'s `Echo` service.
    pub fn channel_builder(
        &self,
        service: &MockService,
    ) -> Result<MeshChannelBuilder, MockMeshError> {
        let mut registry = Registry::default();
        let workload = self.inner.client.clone();
        let builder = MeshChannel::builder(service.discovery())
            .service_name(service.name())
            .mtls(self.mtls(&workload)?)
            .server_identity(self.pattern(service.id())?)
            .seed(crate::service::endpoint_seed(
                self.inner.seed,
                &format!("{}/channel/{workload}", service.name()),
                service.inner.next_client(),
            ))
            .decisions(&self.inner.decisions)
            .metrics(&mut registry);
        service.inner.clients.add(registry);
        service.inner.start_sampler();
        Ok(builder)
    }

    /// A [`MeshChannel`] for `service` with every default.
    pub fn channel(&self, service: &MockService) -> Result<MeshChannel, MockMeshError> {
        Ok(self.channel_builder(service)?.build()?)
    }

    /// A [`MeshServerBuilder`] serving over mTLS as `workload` (credentials the mesh
    /// rotates), admitting any verified client of a trusted domain: add a policy, a rate
    /// limit, then `serve` your application.
    pub fn server_builder(&self, workload: &str) -> Result<MeshServerBuilder, MockMeshError> {
        let acceptor = MtlsAcceptor::new(&self.mtls(workload)?, Authorizer::any())
            .map_err(|e| MockMeshError::Tls(Box::new(e)))?;
        Ok(MeshServer::builder()
            .mtls(acceptor)
            .decisions(&self.inner.decisions))
    }

    /// The decision record every client and server the mesh builds writes to (the latest
    /// [`decisions`](MockMeshBuilder::decisions), by default 1,024): balancer picks with both candidates, breaker changes, retry and
    /// authorization decisions; see [`mesh_tower::decision`].
    pub fn decisions(&self) -> &DecisionRecord {
        &self.inner.decisions
    }

    /// The workload the mesh's clients run as.
    #[cfg(feature = "sim")]
    pub(crate) fn client_workload(&self) -> &str {
        &self.inner.client
    }

    pub(crate) fn pattern(&self, id: &SpiffeId) -> Result<IdentityPattern, MockMeshError> {
        id.to_string()
            .parse()
            .map_err(|e: mesh_core::identity::PatternError| {
                MockMeshError::Id(id.to_string(), e.to_string())
            })
    }

    /// Starts a fake SPIFFE Workload API serving an SVID for `workload`: on Unix on a
    /// socket in a new temporary directory, elsewhere on a loopback TCP port; rotations
    /// reach it. Hand [`WorkloadApi::endpoint`] to code that reads
    /// `SPIFFE_ENDPOINT_SOCKET`.
    pub fn workload_api(&self, workload: &str) -> Result<WorkloadApi, MockMeshError> {
        let id = self.id(workload)?;
        let update = {
            let mut ca = lock(&self.inner.ca)?;
            X509Update::new(&ca.issue(&id.to_string())?, &self.bundles(&ca)?)
        };
        let dir = tempfile::tempdir()?;
        #[cfg(unix)]
        let server = FakeWorkloadApi::start(dir.path().join("agent.sock"), update)?;
        #[cfg(not(unix))]
        let server = FakeWorkloadApi::start_tcp(
            std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 0)),
            update,
        )?;
        let server = Arc::new(server);
        let mut agents = lock(&self.inner.agents)?;
        agents.retain(|(_, a)| a.strong_count() > 0);
        agents.push((id.clone(), Arc::downgrade(&server)));
        Ok(WorkloadApi {
            id,
            server,
            _dir: Arc::new(dir),
        })
    }

    /// Gives every workload a fresh SVID from the current root: credential stores and
    /// Workload API servers alike. Connections already open are unaffected; new
    /// handshakes present the new SVIDs.
    pub fn rotate_svids(&self) -> Result<(), MockMeshError> {
        let workloads = self.reissue()?;
        self.inner
            .log
            .push(Event::Credentials(CredentialEvent::SvidsRotated {
                workloads,
            }));
        Ok(())
    }

    fn reissue(&self) -> Result<usize, MockMeshError> {
        let mut ca = lock(&self.inner.ca)?;
        let bundles = self.bundles(&ca)?;
        let mut n = 0;
        for (id, store) in lock(&self.inner.stores)?.iter() {
            if let Some(store) = store.upgrade() {
                store.set(ca.issue(&id.to_string())?, bundles.clone());
                n += 1;
            }
        }
        for (id, agent) in lock(&self.inner.agents)?.iter() {
            if let Some(agent) = agent.upgrade() {
                agent.push(X509Update::new(&ca.issue(&id.to_string())?, &bundles));
                n += 1;
            }
        }
        Ok(n)
    }

    fn publish_bundles(&self) -> Result<(), MockMeshError> {
        let bundles = {
            let ca = lock(&self.inner.ca)?;
            self.bundles(&ca)?
        };
        for (_, store) in lock(&self.inner.stores)?.iter() {
            if let Some(store) = store.upgrade() {
                store.set_bundles(bundles.clone());
            }
        }
        Ok(())
    }

    /// Begins a trust-anchor rotation the way a fleet does it, with no failed handshake:
    /// a new root is made; first every workload's bundles trust the old and the new root,
    /// then every workload gets an SVID signed by the new one.
    pub fn begin_trust_rotation(&self) -> Result<(), MockMeshError> {
        lock(&self.inner.ca)?.begin_rotation()?;
        self.publish_bundles()?;
        self.reissue()?;
        self.inner
            .log
            .push(Event::Credentials(CredentialEvent::TrustRotationBegun));
        Ok(())
    }

    /// Ends the overlap: the old root leaves every workload's bundles.
    pub fn finish_trust_rotation(&self) -> Result<(), MockMeshError> {
        lock(&self.inner.ca)?.finish_rotation();
        self.publish_bundles()?;
        // Workload API clients take bundles with an SVID.
        let mut ca = lock(&self.inner.ca)?;
        let bundles = self.bundles(&ca)?;
        for (id, agent) in lock(&self.inner.agents)?.iter() {
            if let Some(agent) = agent.upgrade() {
                agent.push(X509Update::new(&ca.issue(&id.to_string())?, &bundles));
            }
        }
        drop(ca);
        self.inner
            .log
            .push(Event::Credentials(CredentialEvent::TrustRotationFinished));
        Ok(())
    }

    /// Adds `other`'s trust domain (its current bundle) to every workload's bundles, so
    /// that workloads of the two meshes can authenticate each other's SVIDs in this
    /// mesh (federation). Call it on both meshes for both directions.
    pub fn trust(&self, other: &MockMesh) -> Result<(), MockMeshError> {
        let (td, bundle) = {
            let ca = lock(&other.inner.ca)?;
            (ca.trust_domain().clone(), ca.bundle()?)
        };
        {
            let mut federated = lock(&self.inner.federated)?;
            federated.retain(|(t, _)| *t != td);
            federated.push((td.clone(), bundle));
        }
        self.publish_bundles()?;
        self.inner
            .log
            .push(Event::Credentials(CredentialEvent::TrustDomainAdded {
                trust_domain: td.to_string(),
            }));
        Ok(())
    }

    /// A snapshot of the event log, after a fresh sample of every client's metrics; see
    /// [`events`](crate::events).
    pub fn events(&self) -> EventLog {
        let services: Vec<_> = self
            .inner
            .services
            .lock()
            .map(|s| s.iter().filter_map(Weak::upgrade).collect())
            .unwrap_or_default();
        for service in services {
            service.sample();
        }
        self.inner.log.snapshot()
    }
}

/// A fake SPIFFE Workload API server for one workload; see [`MockMesh::workload_api`].
/// Cheap to clone; the server stops and its socket is removed when the last clone is
/// dropped.
#[derive(Clone, Debug)]
pub struct WorkloadApi {
    id: SpiffeId,
    server: Arc<FakeWorkloadApi>,
    _dir: Arc<tempfile::TempDir>,
}

impl WorkloadApi {
    /// The identity it serves.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// The address, as `SPIFFE_ENDPOINT_SOCKET` takes it: `unix:///path/to/agent.sock`
    /// (on Unix), or `tcp://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        self.server.endpoint()
    }

    /// The socket's path (`None` where the server listens on TCP: off Unix).
    pub fn socket_path(&self) -> Option<&Path> {
        self.server.socket_path()
    }

    /// The underlying fake server, to push hand-made (or malformed) updates.
    pub fn server(&self) -> &FakeWorkloadApi {
        &self.server
    }
}
