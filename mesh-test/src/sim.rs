//! Deterministic simulation: the mock mesh on [turmoil]'s simulated network, in virtual
//! time, so that a seed replays a whole scenario exactly.
//!
//! ```
//! # use mesh_test::sim::Simulation;
//! # use mesh_test::Script;
//! # fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let mut sim = Simulation::new(7)?;
//! let flaky = Script::default().with_errors(0.2, http::StatusCode::SERVICE_UNAVAILABLE);
//! let users = sim.service("users").endpoints(3).script(flaky).spawn()?;
//! sim.client("caller", async move {
//!     let client = users.client()?;
//!     for _ in 0..50 {
//!         let req = http::Request::get("http://users/").body(http_body_util::Empty::<bytes::Bytes>::new())?;
//!         client.send(req).await?;
//!     }
//!     Ok(())
//! });
//! sim.run()?;
//! assert!(sim.events().requests("users").count() >= 50);
//! # Ok(()) }
//! ```
//!
//! **What is simulated.** Each endpoint of a [`SimService`] is a turmoil host
//! (`users-0`, `users-1`, ...) running the same scripted application, authorization and
//! rate limit as a [`MockService`](crate::MockService)'s endpoints, served by mesh-tower's
//! own `MeshServer` (its limits, idle and stall checks included) over SPIFFE mTLS on port
//! [`PORT`], on turmoil's connections
//! ([`serve_incoming`](mesh_tower::server::MeshServerBuilder::serve_incoming)). Its
//! timers run in virtual time too: HTTP/2 keep-alive pings (every 20 s, 20 s to answer)
//! close a connection partitioned for longer, as they would on a real network. Responses
//! carry no `Date` header: hyper would read the real clock for it. Clients run in client hosts ([`Simulation::client`]): a
//! [`MeshClient`] from [`SimService::client`] is the real mesh-tower stack — balancer,
//! breakers, retries, timeouts — whose connections go through turmoil's network by a
//! [`Dialer`]. Every host runs on a paused Tokio runtime that turmoil advances, so
//! timeouts, back-offs, ejections and scripted latencies happen in virtual time: waiting
//! costs nothing, only the work does.
//!
//! **What the seed fixes.** The seed gives:
//! - turmoil's own draws (message latencies between `latency(min, max)`, default 0–1 ms);
//! - every endpoint's script draws;
//! - every client's P2C picks;
//! - the breaker, retry and connect back-off jitter. Those draw from the thread's
//!   `fastrand` generator: hosts all run on the thread that calls [`Simulation::step`],
//!   and each simulation keeps that generator's state as its own, seeded from the seed,
//!   put in place for each step and taken back after it. So simulations built with the
//!   same seed replay alike however they are interleaved on a thread, and whatever else
//!   the thread draws between steps (the thread's own state is restored after each).
//!
//! The event log ([`Simulation::events`]) is stamped with the simulation's virtual time,
//! so the same seed and the same scenario give the same log, byte for byte. (The
//! decision record's own times come from each host's clock; its events are as
//! reproducible, not its timestamps.) Unlike a [`MockMesh`]'s, the log holds no
//! [`Breaker`](crate::Event::Breaker) events: the simulation's clients register no
//! metrics, so breaker changes are read from the decision record
//! ([`Simulation::decisions`]).
//!
//! **Faults** are turmoil's: [`crash`](Simulation::crash) and
//! [`bounce`](Simulation::bounce) an endpoint (a process that dies, and restarts with
//! its script), [`partition`](Simulation::partition) and
//! [`repair`](Simulation::repair) links between hosts; plus discovery churn
//! ([`SimService::remove_endpoint`], [`SimService::reinsert_endpoint`]) and script
//! changes, from inside a client or between [`step`](Simulation::step)s. Each is
//! logged.
//!
//! Hosts must not use real sockets (the Tokio runtimes have no I/O driver) nor spawn
//! threads whose timing would leak into the run.

use std::fmt;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use mesh_core::config::{AuthorizationPolicy, RateLimitConfig};
use mesh_core::discover::EndpointSet;
use mesh_core::error::BoxError;
use mesh_core::{Endpoint, SpiffeId};
use mesh_spiffe::{Authorizer, MtlsAcceptor};
use mesh_tonic::test_util::EchoService;
use mesh_tonic::{MeshChannel, MeshChannelBuilder};
use mesh_tower::authz::{AuthorizeLayer, Policy};
use mesh_tower::connect::Dialer;
use mesh_tower::decision::DecisionRecord;
use mesh_tower::server::{MeshServer, ServerLimits};
use mesh_tower::{MeshClient, MeshClientBuilder};
use tokio::sync::watch;

use crate::endpoint::Core;
use crate::error::MockMeshError;
use crate::events::{EndpointChange, EndpointEvent, EndpointRef, Event, EventLog, Log};
use crate::mesh::{DEFAULT_TRUST_DOMAIN, MockMesh};
use crate::script::Script;
use crate::service::{endpoint_seed, follow, plan, rediscover, scripted_stack, undiscover};

/// The port every simulated endpoint serves mTLS on.
pub const PORT: u16 = 443;

/// The default limit on virtual time: a run longer than this fails.
pub const DEFAULT_DURATION: Duration = Duration::from_secs(600);

/// Why a simulation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// A host's software failed, or the run exceeded its virtual duration (turmoil's
    /// message: its error is not `Send`).
    #[error("simulation: {0}")]
    Run(String),
    /// The builder was given a setting the simulation cannot run with.
    #[error("simulation settings: {0}")]
    Invalid(&'static str),
    /// Building part of the mesh failed.
    #[error(transparent)]
    Mesh(#[from] MockMeshError),
}

/// Configures a [`Simulation`].
#[derive(Debug, Clone)]
pub struct SimulationBuilder {
    seed: u64,
    trust_domain: String,
    latency: (Duration, Duration),
    duration: Duration,
    tick: Duration,
    decisions: usize,
}

impl SimulationBuilder {
    /// How many recent decisions [`Simulation::decisions`] keeps (default
    /// [`mesh_tower::decision::DEFAULT_CAPACITY`]).
    pub fn decisions(mut self, capacity: usize) -> Self {
        self.decisions = capacity;
        self
    }

    /// The seed of every random choice (default 0).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// The trust domain (default `example.org`).
    pub fn trust_domain(mut self, trust_domain: impl Into<String>) -> Self {
        self.trust_domain = trust_domain.into();
        self
    }

    /// Each network message takes between `min` and `max` (default 0 to 1 ms), drawn
    /// from the seed.
    pub fn latency(mut self, min: Duration, max: Duration) -> Self {
        self.latency = (min, max.max(min));
        self
    }

    /// The run fails if clients have not finished after this much virtual time
    /// (default [`DEFAULT_DURATION`]).
    pub fn duration(mut self, duration: Duration) -> Self {
        self.duration = duration;
        self
    }

    /// The virtual time one [`Simulation::step`] advances (default 1 ms; not zero:
    /// [`build`](Self::build) refuses it, as time would never advance).
    pub fn tick(mut self, tick: Duration) -> Self {
        self.tick = tick;
        self
    }

    /// Builds the simulation: a trust domain's CA and an empty network. Fails with
    /// [`SimError::Invalid`] for a zero [`tick`](Self::tick).
    pub fn build(self) -> Result<Simulation, SimError> {
        if self.tick.is_zero() {
            return Err(SimError::Invalid("the tick must be longer than zero"));
        }
        let stepped = Arc::new(AtomicU64::new(0));
        let mesh = MockMesh::builder()
            .seed(self.seed)
            .trust_domain(self.trust_domain)
            .decisions(self.decisions)
            .build_with(Log::simulated(stepped.clone()))?;
        let sim = turmoil::Builder::new()
            .rng_seed(self.seed)
            .min_message_latency(self.latency.0)
            .max_message_latency(self.latency.1)
            .simulation_duration(self.duration)
            .tick_duration(self.tick)
            .build();
        Ok(Simulation {
            sim,
            mesh,
            stepped,
            seed: self.seed,
            // Breaker, retry and connect jitter draw from the thread's generator, with
            // this state in place while the simulation steps.
            rng: self.seed,
        })
    }
}

/// A mock mesh on a simulated network; see the [module docs](self).
pub struct Simulation {
    sim: turmoil::Sim<'static>,
    mesh: MockMesh,
    stepped: Arc<AtomicU64>,
    seed: u64,
    /// The state of the thread's `fastrand` generator as this simulation left it.
    rng: u64,
}

impl fmt::Debug for Simulation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Simulation")
            .field("seed", &self.seed)
            .field("elapsed", &self.sim.elapsed())
            .finish_non_exhaustive()
    }
}

impl Simulation {
    /// Starts configuring a simulation.
    pub fn builder() -> SimulationBuilder {
        SimulationBuilder {
            seed: 0,
            trust_domain: DEFAULT_TRUST_DOMAIN.to_owned(),
            latency: (Duration::ZERO, Duration::from_millis(1)),
            duration: DEFAULT_DURATION,
            tick: Duration::from_millis(1),
            decisions: mesh_tower::decision::DEFAULT_CAPACITY,
        }
    }

    /// A simulation with `seed` and every default.
    pub fn new(seed: u64) -> Result<Self, SimError> {
        Self::builder().seed(seed).build()
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The mesh underneath: its CA, credentials and rotation controls.
    pub fn mesh(&self) -> &MockMesh {
        &self.mesh
    }

    /// Starts declaring a simulated service.
    pub fn service(&mut self, name: &str) -> SimServiceBuilder<'_> {
        SimServiceBuilder {
            sim: self,
            name: name.to_owned(),
            scripts: vec![Script::default()],
            count: None,
            policy: None,
            rate_limit: None,
        }
    }

    /// Runs `software` in a client host named `name`; the simulation ends when every
    /// client has returned, and fails if one returns an error.
    pub fn client<F>(&mut self, name: &str, software: F)
    where
        F: Future<Output = Result<(), BoxError>> + 'static,
    {
        self.sim.client(name, async move {
            software
                .await
                .map_err(|e| -> Box<dyn std::error::Error> { e })
        });
    }

    /// Crashes the endpoint's host: its listener and every connection are gone.
    pub fn crash(&mut self, endpoint: &SimEndpoint) {
        self.sim.crash(endpoint.host.as_str());
        endpoint.changed(EndpointChange::Killed);
    }

    /// Restarts the endpoint's host (crashed or not) with its current script.
    pub fn bounce(&mut self, endpoint: &SimEndpoint) {
        self.sim.bounce(endpoint.host.as_str());
        endpoint.changed(EndpointChange::Restarted);
    }

    /// Drops every message between host `from` (a client's name) and the endpoint.
    pub fn partition(&mut self, from: &str, endpoint: &SimEndpoint) {
        self.sim.partition(from, endpoint.host.as_str());
        endpoint.changed(EndpointChange::Partitioned);
    }

    /// Ends a [`partition`](Self::partition).
    pub fn repair(&mut self, from: &str, endpoint: &SimEndpoint) {
        self.sim.repair(from, endpoint.host.as_str());
        endpoint.changed(EndpointChange::Healed);
    }

    /// Advances virtual time by one tick; `true` once every client has finished.
    pub fn step(&mut self) -> Result<bool, SimError> {
        // The hosts' draws from the thread's generator come from this simulation's own
        // state; the thread's is put back after.
        let outer = fastrand::get_seed();
        fastrand::seed(self.rng);
        let stepped = self.sim.step();
        self.rng = fastrand::get_seed();
        fastrand::seed(outer);
        let done = stepped.map_err(|e| SimError::Run(e.to_string()))?;
        let nanos = u64::try_from(self.sim.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.stepped.store(nanos, Ordering::Relaxed);
        Ok(done)
    }

    /// Runs until every client has finished.
    pub fn run(&mut self) -> Result<(), SimError> {
        while !self.step()? {}
        Ok(())
    }

    /// Runs for `duration` of virtual time, or until every client has finished
    /// (`true`).
    pub fn run_for(&mut self, duration: Duration) -> Result<bool, SimError> {
        let until = self.sim.elapsed() + duration;
        while self.sim.elapsed() < until {
            if self.step()? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The virtual time since the simulation started.
    pub fn elapsed(&self) -> Duration {
        self.sim.elapsed()
    }

    /// What happened so far, stamped with virtual time.
    pub fn events(&self) -> EventLog {
        self.mesh.events()
    }

    /// The clients' decision record (picks, breaker transitions, retries): where breaker
    /// changes show in a simulation, whose clients register no metrics (so its
    /// [`events`](Self::events) hold no [`Breaker`](crate::Event::Breaker) events).
    pub fn decisions(&self) -> &DecisionRecord {
        self.mesh.decisions()
    }
}

/// Declares a [`SimService`]; from [`Simulation::service`].
pub struct SimServiceBuilder<'s> {
    sim: &'s mut Simulation,
    name: String,
    scripts: Vec<Script>,
    count: Option<usize>,
    policy: Option<AuthorizationPolicy>,
    rate_limit: Option<RateLimitConfig>,
}

impl fmt::Debug for SimServiceBuilder<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimServiceBuilder")
            .field("name", &self.name)
            .field("endpoints", &self.count.unwrap_or(self.scripts.len()))
            .finish_non_exhaustive()
    }
}

/// How many endpoints and which scripts follow the rule of
/// [`MockServiceBuilder`](crate::MockServiceBuilder): endpoint `i` runs the `i`-th script,
/// the last one repeating beyond them; as many endpoints as
/// [`endpoints`](Self::endpoints) says, or else as scripts.
impl SimServiceBuilder<'_> {
    /// `n` endpoints (default: one per script, so 1 unless
    /// [`scripts`](Self::scripts) gave more). Beyond the scripts given, the last one
    /// repeats; scripts beyond `n` are not used. Called before or after the scripts,
    /// the same.
    pub fn endpoints(mut self, n: usize) -> Self {
        self.count = Some(n);
        self
    }

    /// The same script for every endpoint (default [`Script::default`]): the same as
    /// `scripts([script])`.
    pub fn script(mut self, script: impl Into<Script>) -> Self {
        self.scripts = vec![script.into()];
        self
    }

    /// One script per endpoint, in order. Without [`endpoints`](Self::endpoints), one
    /// endpoint per script (none for an empty list); with more endpoints than scripts,
    /// the last script repeats (the default script for an empty list).
    pub fn scripts(mut self, scripts: impl IntoIterator<Item = Script>) -> Self {
        self.scripts = scripts.into_iter().collect();
        self
    }

    /// Authorizes every request by `policy`, and records each decision.
    pub fn policy(mut self, policy: AuthorizationPolicy) -> Self {
        self.policy = Some(policy);
        self
    }

    /// A server-side rate limit on every endpoint.
    pub fn rate_limit(mut self, limits: RateLimitConfig) -> Self {
        self.rate_limit = Some(limits);
        self
    }

    /// Registers the endpoints' hosts (`NAME-0`, `NAME-1`, ...) and puts them in
    /// discovery.
    pub fn spawn(self) -> Result<SimService, SimError> {
        let sim = self.sim;
        let mesh = sim.mesh.clone();
        let name: Arc<str> = Arc::from(self.name.as_str());
        let id = mesh.id(&self.name)?;
        let recording = Arc::new(AtomicBool::new(self.policy.is_some()));
        let policy = match &self.policy {
            Some(p) => Policy::new(&self.name, p).map_err(MockMeshError::from)?,
            None => Policy::allow_all(&self.name),
        };
        let mut authorize = AuthorizeLayer::new(policy);
        if self.policy.is_some() {
            authorize = authorize.with_decisions(mesh.decisions().recorder(&self.name));
        }
        let acceptor = MtlsAcceptor::new(&mesh.mtls(&id.to_string())?, Authorizer::any())
            .map_err(|e| MockMeshError::Tls(Box::new(e)))?;
        let discovery = watch::Sender::new(EndpointSet::new());
        let scripts = plan(&self.scripts, self.count);
        let mut endpoints = Vec::with_capacity(scripts.len());
        for (index, script) in scripts.into_iter().enumerate() {
            let host = format!("{name}-{index}");
            let addr = SocketAddr::new(sim.sim.lookup(host.as_str()), PORT);
            let at = EndpointRef {
                service: name.clone(),
                index,
                addr,
            };
            let core = Arc::new(Core::new(
                at,
                script,
                endpoint_seed(mesh.seed(), &name, index),
                mesh.inner.log.clone(),
                recording.clone(),
            ));
            let echo = EchoService::new(&host);
            let stack = scripted_stack(&core, &echo, &authorize, self.rate_limit.as_ref());
            let acceptor = acceptor.clone();
            sim.sim.host(host.as_str(), move || {
                serve(acceptor.clone(), stack.clone())
            });
            let endpoint = SimEndpoint {
                core,
                host,
                identity: id.clone(),
            };
            discovery.send_modify(|set| {
                set.insert(endpoint.discovered());
            });
            endpoint.changed(EndpointChange::Started);
            endpoints.push(endpoint);
        }
        Ok(SimService {
            inner: Arc::new(SimServiceInner {
                name,
                id,
                mesh,
                endpoints,
                discovery,
                clients: Mutex::new(0),
            }),
        })
    }
}

/// One endpoint's host software: mesh-tower's own `MeshServer` (mTLS, HTTP/1.1 or HTTP/2,
/// its limits) serving the scripted stack on turmoil's connections, until the host
/// crashes.
async fn serve<S, B>(acceptor: MtlsAcceptor, stack: S) -> turmoil::Result
where
    S: tower_service::Service<Request<Incoming>, Response = http::Response<B>>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), PORT);
    let listener = turmoil::net::TcpListener::bind(addr).await?;
    let incoming = futures_util::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await;
        Some((accepted, listener))
    });
    let mut limits = ServerLimits::default();
    limits.shutdown_timeout = Duration::from_millis(100);
    let _server = MeshServer::builder()
        .mtls(acceptor)
        .limits(limits)
        .date_header(false)
        .serve_incoming(addr, incoming, stack)
        .map_err(|e| e.to_string())?;
    std::future::pending::<()>().await;
    Ok(())
}

/// A simulated service: its endpoints and discovery. Cheap to clone, and `'static`, so
/// that client software can own one.
#[derive(Clone)]
pub struct SimService {
    inner: Arc<SimServiceInner>,
}

struct SimServiceInner {
    name: Arc<str>,
    id: SpiffeId,
    mesh: MockMesh,
    endpoints: Vec<SimEndpoint>,
    discovery: watch::Sender<EndpointSet>,
    /// Clients built, for distinct seeds.
    clients: Mutex<usize>,
}

impl fmt::Debug for SimService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimService")
            .field("name", &self.inner.name)
            .field("endpoints", &self.inner.endpoints.len())
            .finish_non_exhaustive()
    }
}

impl SimService {
    /// The service's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Its endpoints' SPIFFE ID.
    pub fn id(&self) -> &SpiffeId {
        &self.inner.id
    }

    /// Its endpoints, in index order.
    pub fn endpoints(&self) -> &[SimEndpoint] {
        &self.inner.endpoints
    }

    /// Endpoint `index`.
    pub fn endpoint(&self, index: usize) -> Option<&SimEndpoint> {
        self.inner.endpoints.get(index)
    }

    /// A [`MeshClientBuilder`] wired much like [`MockMesh::client_builder`] — discovery
    /// that follows this service, mTLS as the mesh's client, the service's identity
    /// required, seeded picks, the mesh's decision record — dialling through the
    /// simulated network. Unlike the mesh's, it registers no metrics: the simulation's
    /// log holds no [`Breaker`](crate::Event::Breaker) events; read breaker changes from
    /// [`Simulation::decisions`]. Call it inside a client host.
    pub fn client_builder(&self) -> Result<MeshClientBuilder, MockMeshError> {
        let inner = &self.inner;
        let mesh = &inner.mesh;
        let nth = self.next_client()?;
        let client = mesh.client_workload();
        Ok(MeshClient::builder(follow(&inner.discovery))
            .service_name(&*inner.name)
            .mtls(mesh.mtls(client)?)
            .server_identity(mesh.pattern(&inner.id)?)
            .seed(endpoint_seed(
                mesh.seed(),
                &format!("{}/sim-client/{client}", inner.name),
                nth,
            ))
            .dialer(simulated_dialer())
            .decisions(mesh.decisions()))
    }

    /// A [`MeshChannelBuilder`] (gRPC; the endpoints serve `mesh_tonic::test_util`'s
    /// `Echo`) wired like [`client_builder`](Self::client_builder). Call it inside a
    /// client host.
    pub fn channel_builder(&self) -> Result<MeshChannelBuilder, MockMeshError> {
        let inner = &self.inner;
        let mesh = &inner.mesh;
        let nth = self.next_client()?;
        let client = mesh.client_workload();
        Ok(MeshChannel::builder(follow(&inner.discovery))
            .service_name(&*inner.name)
            .mtls(mesh.mtls(client)?)
            .server_identity(mesh.pattern(&inner.id)?)
            .seed(endpoint_seed(
                mesh.seed(),
                &format!("{}/sim-channel/{client}", inner.name),
                nth,
            ))
            .dialer(simulated_dialer())
            .decisions(mesh.decisions()))
    }

    /// A [`MeshChannel`] with every default; see
    /// [`channel_builder`](Self::channel_builder).
    pub fn channel(&self) -> Result<MeshChannel, MockMeshError> {
        Ok(self.channel_builder()?.build()?)
    }

    fn next_client(&self) -> Result<usize, MockMeshError> {
        let mut n = self
            .inner
            .clients
            .lock()
            .map_err(|_| MockMeshError::Poisoned)?;
        *n += 1;
        Ok(*n)
    }

    /// A [`MeshClient`] with every default; see [`client_builder`](Self::client_builder).
    pub fn client(&self) -> Result<MeshClient, MockMeshError> {
        Ok(self.client_builder()?.build()?)
    }

    /// Removes endpoint `index` from discovery (it keeps running, so clients drain
    /// requests in flight); `false` if there is no such endpoint or it was removed.
    pub fn remove_endpoint(&self, index: usize) -> bool {
        let Some(ep) = self.endpoint(index) else {
            return false;
        };
        let removed = undiscover(&self.inner.discovery, ep.addr());
        if removed {
            ep.changed(EndpointChange::Removed);
        }
        removed
    }

    /// Puts endpoint `index` back into discovery.
    pub fn reinsert_endpoint(&self, index: usize) -> bool {
        let Some(ep) = self.endpoint(index) else {
            return false;
        };
        let inserted = rediscover(&self.inner.discovery, ep.discovered());
        if inserted {
            ep.changed(EndpointChange::Started);
        }
        inserted
    }

    /// How many endpoints are in discovery now.
    pub fn discovered(&self) -> usize {
        self.inner.discovery.borrow().len()
    }

    /// Sets every endpoint's script.
    pub fn set_script(&self, script: impl Into<Script>) {
        let script = script.into();
        for ep in self.endpoints() {
            ep.set_script(script.clone());
        }
    }
}

/// Dials turmoil's network.
fn simulated_dialer() -> Dialer {
    Dialer::new(turmoil::net::TcpStream::connect::<SocketAddr>)
}

/// One simulated endpoint: a turmoil host named `SERVICE-INDEX`.
#[derive(Clone)]
pub struct SimEndpoint {
    core: Arc<Core>,
    host: String,
    identity: SpiffeId,
}

impl fmt::Debug for SimEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimEndpoint")
            .field("endpoint", &self.core.at)
            .field("host", &self.host)
            .finish()
    }
}

impl SimEndpoint {
    fn changed(&self, change: EndpointChange) {
        self.core.log.push(Event::Endpoint(EndpointEvent {
            endpoint: self.core.at.clone(),
            change,
        }));
    }

    fn discovered(&self) -> Endpoint {
        Endpoint::new(self.addr()).with_identity(self.identity.clone())
    }

    /// Which endpoint this is.
    pub fn at(&self) -> &EndpointRef {
        &self.core.at
    }

    /// Its turmoil host name.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Its address on the simulated network.
    pub fn addr(&self) -> SocketAddr {
        self.core.at.addr
    }

    /// Its current script.
    pub fn script(&self) -> Script {
        self.core.script.borrow().clone()
    }

    /// Replaces its script; requests already past their draw keep the old one.
    pub fn set_script(&self, script: impl Into<Script>) {
        self.core.set_script(script.into());
        self.changed(EndpointChange::Scripted);
    }
}
