//! Mock services: named groups of scripted endpoints behind one discovery feed.
//!
//! # Defaults
//!
//! - **Endpoints**: 1, with [`Script::default`] (healthy, no latency). How many and
//!   which script each runs follow one rule, here and in the simulation (feature `sim`,
//!   `SimServiceBuilder`): endpoint `i` runs the `i`-th
//!   script given to [`scripts`](MockServiceBuilder::scripts) (or the one given to
//!   [`script`](MockServiceBuilder::script)), the last one repeating beyond them; there
//!   are as many endpoints as [`endpoints`](MockServiceBuilder::endpoints) says, or
//!   else as scripts.
//! - **Identity**: every endpoint gets its own SVID for `spiffe://<trust domain>/<name>`;
//!   clients built by the mesh expect exactly that ID.
//! - **Authorization**: none (every verified caller admitted, nothing recorded); with
//!   [`MockServiceBuilder::policy`] or [`MockService::set_policy`], the policy decides and
//!   each decision is logged as an [`Authz`](crate::events::Event::Authz) event.
//! - **Server-side rate limit**: none; [`MockServiceBuilder::rate_limit`] sets one GCRA
//!   limiter per endpoint.
//! - **Shutdown**: when the service and every endpoint handle are dropped, the endpoints'
//!   servers close their connections within 100 ms.
//! - **Discovery**: every client of the service follows its endpoint set;
//!   [`MockService::add_endpoint`] inserts, [`MockService::remove_endpoint`] removes
//!   (clients drain requests in flight). Killing or partitioning an endpoint does not
//!   touch discovery, as when a process dies behind a stale registry.

use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use mesh_core::config::{AuthorizationPolicy, RateLimitConfig};
use mesh_core::discover::{BoxDiscover, Change, EndpointSet};
use mesh_core::{Endpoint, SpiffeId};
use mesh_spiffe::{Authorizer, MtlsAcceptor};
use mesh_tonic::test_util::EchoService;
use mesh_tower::authz::{AuthorizeLayer, Policy};
use mesh_tower::ratelimit::{Limits, RateLimitLayer};
use mesh_tower::server::{MeshServer, ServerLimits};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::Layer;

use crate::client_stats::{ClientStats, Clients};
use crate::endpoint::{App, Core, EndpointInner, MockEndpoint, Record, Stack, mark};
use crate::error::MockMeshError;
use crate::events::{EndpointChange, EndpointRef};
use crate::link::Link;
use crate::mesh::MockMesh;
use crate::script::Script;

/// How often the metrics of a service's clients are sampled for breaker events.
const SAMPLE_EVERY: Duration = Duration::from_millis(20);

/// Configures a mock service; see [`MockMesh::service`].
#[must_use]
pub struct MockServiceBuilder {
    mesh: MockMesh,
    name: String,
    scripts: Vec<Script>,
    count: Option<usize>,
    policy: Option<AuthorizationPolicy>,
    rate_limit: Option<RateLimitConfig>,
    plaintext: bool,
}

impl fmt::Debug for MockServiceBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MockServiceBuilder")
            .field("name", &self.name)
            .field("endpoints", &self.count.unwrap_or(self.scripts.len()))
            .finish_non_exhaustive()
    }
}

impl MockServiceBuilder {
    pub(crate) fn new(mesh: MockMesh, name: &str) -> Self {
        Self {
            mesh,
            name: name.to_owned(),
            scripts: vec![Script::default()],
            count: None,
            policy: None,
            rate_limit: None,
            plaintext: false,
        }
    }

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

    /// Limits each endpoint's requests (GCRA, 429 / `RESOURCE_EXHAUSTED` beyond).
    pub fn rate_limit(mut self, limits: RateLimitConfig) -> Self {
        self.rate_limit = Some(limits);
        self
    }

    /// Serves plaintext HTTP/1.1 and HTTP/2 instead of mTLS: the endpoints stand for
    /// applications behind a proxy (an inbound `mesh-proxy` listener forwarding to
    /// [`MockEndpoint::addr`]), so that the same scripts and the same event log serve
    /// tests of the proxy. Clients the mesh builds for the service expect mTLS and cannot
    /// reach such endpoints; requests carry no verified peer identity.
    pub fn plaintext(mut self) -> Self {
        self.plaintext = true;
        self
    }

    /// Starts every endpoint on loopback.
    pub async fn spawn(self) -> Result<MockService, MockMeshError> {
        let id = self.mesh.id(&self.name)?;
        let policy = match &self.policy {
            Some(p) => Policy::new(&self.name, p)?,
            None => Policy::allow_all(&self.name),
        };
        let mut authorize = AuthorizeLayer::new(policy);
        if self.policy.is_some() {
            // The endpoints' authorization decisions, in the mesh's decision record.
            authorize = authorize.with_decisions(self.mesh.decisions().recorder(&self.name));
        }
        let inner = Arc::new(ServiceInner {
            name: Arc::from(self.name.as_str()),
            id,
            mesh: self.mesh.clone(),
            endpoints: Mutex::default(),
            discovery: watch::Sender::new(EndpointSet::new()),
            authorize,
            recording: Arc::new(AtomicBool::new(self.policy.is_some())),
            rate_limit: self.rate_limit,
            plaintext: self.plaintext,
            clients: Clients::default(),
            built: AtomicUsize::new(0),
            sampler: Mutex::new(None),
        });
        if let Ok(mut services) = self.mesh.inner.services.lock() {
            services.retain(|s| s.strong_count() > 0);
            services.push(Arc::downgrade(&inner));
        }
        let service = MockService { inner };
        for script in plan(&self.scripts, self.count) {
            service.add_endpoint(script).await?;
        }
        Ok(service)
    }
}

/// A running mock service. Cheap to clone; clones share the endpoints.
#[derive(Clone)]
pub struct MockService {
    pub(crate) inner: Arc<ServiceInner>,
}

pub(crate) struct ServiceInner {
    name: Arc<str>,
    id: SpiffeId,
    mesh: MockMesh,
    /// By index: `None` while an endpoint is starting (its index reserved), or if its
    /// start failed after a later one had reserved the next index.
    endpoints: Mutex<Vec<Option<MockEndpoint>>>,
    discovery: watch::Sender<EndpointSet>,
    authorize: AuthorizeLayer,
    recording: Arc<AtomicBool>,
    rate_limit: Option<RateLimitConfig>,
    plaintext: bool,
    pub(crate) clients: Clients,
    /// Clients and channels built for the service, so that each gets its own seed.
    built: AtomicUsize,
    sampler: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Drop for ServiceInner {
    fn drop(&mut self) {
        if let Ok(Some(sampler)) = self.sampler.lock().map(|mut s| s.take()) {
            sampler.abort();
        }
    }
}

impl fmt::Debug for MockService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MockService")
            .field("name", &self.inner.name)
            .field("endpoints", &self.endpoints())
            .finish_non_exhaustive()
    }
}

/// The scripts of the endpoints a service builder declared: `count` of them (`None`: one
/// per script), endpoint `i` running `scripts[i]`, the last one repeating beyond them
/// (the default script if there is none). The one rule of [`MockServiceBuilder`] and
/// the simulation's `SimServiceBuilder`.
pub(crate) fn plan(scripts: &[Script], count: Option<usize>) -> Vec<Script> {
    (0..count.unwrap_or(scripts.len()))
        .map(|i| {
            scripts
                .get(i)
                .or(scripts.last())
                .cloned()
                .unwrap_or_default()
        })
        .collect()
}

/// Takes the endpoint at `addr` out of `set`; whether it was in.
pub(crate) fn undiscover(set: &watch::Sender<EndpointSet>, addr: SocketAddr) -> bool {
    set.send_if_modified(|set| {
        let next: EndpointSet = set.iter().filter(|e| e.addr() != addr).cloned().collect();
        let changed = next.len() != set.len();
        *set = next;
        changed
    })
}

/// Puts `endpoint` into `set`; whether it was not in already.
pub(crate) fn rediscover(set: &watch::Sender<EndpointSet>, endpoint: Endpoint) -> bool {
    set.send_if_modified(|set| set.insert(endpoint).is_none())
}

/// The scripted stack one endpoint serves: the recorder, the service's authorization,
/// its rate limit (none by default), the application.
pub(crate) fn scripted_stack(
    core: &Arc<Core>,
    echo: &EchoService,
    authorize: &AuthorizeLayer,
    rate_limit: Option<&RateLimitConfig>,
) -> Stack {
    let app = App {
        core: core.clone(),
        echo: echo.server(),
    };
    let limits = Limits::new(&rate_limit.cloned().unwrap_or_default());
    Record {
        inner: authorize.layer(tower::util::MapRequest::new(
            RateLimitLayer::new(limits).layer(app),
            mark as fn(_) -> _,
        )),
        core: core.clone(),
    }
}

/// A discovery stream that follows `set`: an `Insert` per endpoint now, then the changes.
pub(crate) fn follow(set: &watch::Sender<EndpointSet>) -> BoxDiscover {
    let mut rx = set.subscribe();
    rx.mark_changed();
    let state = (rx, EndpointSet::new(), VecDeque::<Change>::new());
    Box::pin(futures_util::stream::unfold(
        state,
        |(mut rx, mut last, mut pending)| async move {
            loop {
                if let Some(change) = pending.pop_front() {
                    return Some((Ok(change), (rx, last, pending)));
                }
                // The service is gone: the stream ends and clients keep what they have.
                rx.changed().await.ok()?;
                let next = rx.borrow_and_update().clone();
                pending.extend(last.diff(&next));
                last = next;
            }
        },
    ))
}

/// The seed of endpoint `index` of `service` (or of the `index`-th client of a name like
/// `users/client/web`): the mesh's seed mixed (splitmix64) with both, so that each draws
/// an independent, reproducible sequence.
pub(crate) fn endpoint_seed(seed: u64, service: &str, index: usize) -> u64 {
    // FNV-1a: unlike std's `DefaultHasher`, stable across Rust releases.
    let name = service.bytes().fold(0xCBF2_9CE4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3)
    });
    let mut z = seed ^ name ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl ServiceInner {
    /// The index of the next client or channel built for the service, from 0.
    pub(crate) fn next_client(&self) -> usize {
        self.built
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn sample(&self) {
        let endpoints: Vec<(SocketAddr, usize)> = self
            .endpoints
            .lock()
            .map(|e| e.iter().flatten().map(|e| (e.addr(), e.index())).collect())
            .unwrap_or_default();
        let index_of = |addr| endpoints.iter().find(|(a, _)| *a == addr).map(|(_, i)| *i);
        self.clients
            .sample(&self.name, index_of, &self.mesh.inner.log);
    }

    /// Starts sampling client metrics in the background, once.
    pub(crate) fn start_sampler(self: &Arc<Self>) {
        let Ok(mut sampler) = self.sampler.lock() else {
            return;
        };
        if sampler.is_some() || self.clients.is_empty() {
            return;
        }
        let weak: Weak<Self> = Arc::downgrade(self);
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(SAMPLE_EVERY).await;
                let Some(service) = weak.upgrade() else {
                    return;
                };
                service.sample();
            }
        });
        *sampler = Some(task.abort_handle());
    }
}

impl MockService {
    /// Its name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The SPIFFE ID its endpoints present.
    pub fn id(&self) -> &SpiffeId {
        &self.inner.id
    }

    /// Every endpoint it spawned, removed ones included, by index (those still
    /// starting left out).
    pub fn endpoints(&self) -> Vec<MockEndpoint> {
        self.inner
            .endpoints
            .lock()
            .map(|e| e.iter().flatten().cloned().collect())
            .unwrap_or_default()
    }

    /// Endpoint `index` (`None` while it is starting).
    pub fn endpoint(&self, index: usize) -> Option<MockEndpoint> {
        self.inner
            .endpoints
            .lock()
            .ok()
            .and_then(|e| e.get(index).cloned().flatten())
    }

    /// The number of endpoints spawned, removed ones included (those still starting
    /// left out).
    pub fn len(&self) -> usize {
        self.inner
            .endpoints
            .lock()
            .map(|e| e.iter().flatten().count())
            .unwrap_or(0)
    }

    /// Whether it has no endpoint.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A discovery stream that follows this service's endpoint set: an `Insert` per
    /// endpoint now, then the changes as endpoints are added and removed.
    pub fn discovery(&self) -> BoxDiscover {
        follow(&self.inner.discovery)
    }

    fn discovered(&self, ep: &MockEndpoint) -> Endpoint {
        Endpoint::new(ep.addr()).with_identity(self.inner.id.clone())
    }

    /// Starts one more endpoint with `script` and adds it to discovery. Its index is
    /// the next one, reserved on the call, so that concurrent calls get distinct indexes
    /// in call order.
    pub async fn add_endpoint(
        &self,
        script: impl Into<Script>,
    ) -> Result<MockEndpoint, MockMeshError> {
        let index = {
            let mut endpoints = self
                .inner
                .endpoints
                .lock()
                .map_err(|_| MockMeshError::Poisoned)?;
            endpoints.push(None);
            endpoints.len() - 1
        };
        let started = self.start_endpoint(index, script.into()).await;
        let Ok(mut endpoints) = self.inner.endpoints.lock() else {
            return Err(MockMeshError::Poisoned);
        };
        match started {
            Ok(endpoint) => {
                if let Some(slot) = endpoints.get_mut(index) {
                    *slot = Some(endpoint.clone());
                }
                drop(endpoints);
                let discovered = self.discovered(&endpoint);
                self.inner.discovery.send_modify(|set| {
                    set.insert(discovered);
                });
                endpoint.changed(EndpointChange::Started);
                Ok(endpoint)
            }
            Err(e) => {
                // Free the index unless a later endpoint holds the next one.
                if endpoints.len() == index + 1 {
                    endpoints.pop();
                }
                Err(e)
            }
        }
    }

    /// Starts endpoint `index`: its server and its link.
    async fn start_endpoint(
        &self,
        index: usize,
        script: Script,
    ) -> Result<MockEndpoint, MockMeshError> {
        let inner = &self.inner;
        let mesh = &inner.mesh;
        let builder = if inner.plaintext {
            MeshServer::builder().plaintext()
        } else {
            let acceptor = MtlsAcceptor::new(&mesh.mtls(&inner.id.to_string())?, Authorizer::any())
                .map_err(|e| MockMeshError::Tls(Box::new(e)))?;
            MeshServer::builder().mtls(acceptor)
        };
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let link = Link::start(listener.local_addr()?).await?;
        let at = EndpointRef {
            service: inner.name.clone(),
            index,
            addr: link.addr(),
        };
        let core = Arc::new(Core::new(
            at.clone(),
            script,
            endpoint_seed(mesh.seed(), &inner.name, index),
            mesh.inner.log.clone(),
            inner.recording.clone(),
        ));
        let echo = EchoService::new(&format!("{}-{index}", inner.name));
        let stack = scripted_stack(&core, &echo, &inner.authorize, inner.rate_limit.as_ref());
        let mut server_limits = ServerLimits::default();
        server_limits.shutdown_timeout = Duration::from_millis(100);
        let server = builder.limits(server_limits).serve(listener, stack)?;
        Ok(MockEndpoint {
            inner: Arc::new(EndpointInner {
                core,
                link,
                _server: server,
                echo,
            }),
        })
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

    /// Puts endpoint `index` back into discovery after a removal.
    pub fn reinsert_endpoint(&self, index: usize) -> bool {
        let Some(ep) = self.endpoint(index) else {
            return false;
        };
        let inserted = rediscover(&self.inner.discovery, self.discovered(&ep));
        if inserted {
            ep.changed(EndpointChange::Started);
        }
        inserted
    }

    /// Replaces the authorization policy of every endpoint, and records decisions from
    /// now on.
    pub fn set_policy(&self, policy: &AuthorizationPolicy) -> Result<(), MockMeshError> {
        self.inner
            .authorize
            .handle()
            .replace(Policy::new(&self.inner.name, policy)?);
        self.inner
            .recording
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Sets every endpoint's script.
    pub fn set_script(&self, script: impl Into<Script>) {
        let script = script.into();
        for ep in self.endpoints() {
            ep.set_script(script.clone());
        }
    }

    /// What the clients the mesh built for this service report; see
    /// [`client_stats`](crate::client_stats).
    pub fn client_stats(&self) -> ClientStats {
        self.inner.clients.stats()
    }

    /// The metrics of each client and channel the mesh built for this service, in the
    /// text exposition format, in the order they were built: what a test reads instead of
    /// replacing the mesh's registry with its own (see
    /// [`MockMesh::client_builder`](crate::MockMesh::client_builder)).
    pub fn client_metrics(&self) -> Vec<String> {
        self.inner.clients.texts()
    }
}
