//! Mock services: named groups of scripted endpoints behind one discovery feed.
//!
//! # Defaults
//!
//! - **Endpoints**: 1, each with [`Script::default`] (healthy, no latency).
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
use std::sync::atomic::AtomicBool;
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
    policy: Option<AuthorizationPolicy>,
    rate_limit: Option<RateLimitConfig>,
    plaintext: bool,
}

impl fmt::Debug for MockServiceBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MockServiceBuilder")
            .field("name", &self.name)
            .field("endpoints", &self.scripts.len())
            .finish_non_exhaustive()
    }
}

impl MockServiceBuilder {
    pub(crate) fn new(mesh: MockMesh, name: &str) -> Self {
        Self {
            mesh,
            name: name.to_owned(),
            scripts: vec![Script::default()],
            policy: None,
            rate_limit: None,
            plaintext: false,
        }
    }

    /// `n` endpoints, each with the script of the first (default 1).
    pub fn endpoints(mut self, n: usize) -> Self {
        let script = self.scripts.first().cloned().unwrap_or_default();
        self.scripts = vec![script; n];
        self
    }

    /// The same script for every endpoint.
    pub fn script(mut self, script: impl Into<Script>) -> Self {
        let script = script.into();
        self.scripts.iter_mut().for_each(|s| *s = script.clone());
        self
    }

    /// One endpoint per script, in order.
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
            sampler: Mutex::new(None),
        });
        if let Ok(mut services) = self.mesh.inner.services.lock() {
            services.retain(|s| s.strong_count() > 0);
            services.push(Arc::downgrade(&inner));
        }
        let service = MockService { inner };
        for script in self.scripts {
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
    endpoints: Mutex<Vec<MockEndpoint>>,
    discovery: watch::Sender<EndpointSet>,
    authorize: AuthorizeLayer,
    recording: Arc<AtomicBool>,
    rate_limit: Option<RateLimitConfig>,
    plaintext: bool,
    pub(crate) clients: Clients,
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

/// The seed of endpoint `index` of `service`: the mesh's seed mixed (splitmix64) with
/// both, so that endpoints draw independent, reproducible sequences.
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
    pub(crate) fn sample(&self) {
        let endpoints: Vec<(SocketAddr, usize)> = self
            .endpoints
            .lock()
            .map(|e| e.iter().map(|e| (e.addr(), e.index())).collect())
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

    /// Every endpoint it spawned, removed ones included, by index.
    pub fn endpoints(&self) -> Vec<MockEndpoint> {
        self.inner
            .endpoints
            .lock()
            .map(|e| e.clone())
            .unwrap_or_default()
    }

    /// Endpoint `index`.
    pub fn endpoint(&self, index: usize) -> Option<MockEndpoint> {
        self.inner
            .endpoints
            .lock()
            .ok()
            .and_then(|e| e.get(index).cloned())
    }

    /// The number of endpoints spawned, removed ones included.
    pub fn len(&self) -> usize {
        self.inner.endpoints.lock().map(|e| e.len()).unwrap_or(0)
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

    /// Starts one more endpoint with `script` and adds it to discovery.
    pub async fn add_endpoint(
        &self,
        script: impl Into<Script>,
    ) -> Result<MockEndpoint, MockMeshError> {
        let inner = &self.inner;
        let mesh = &inner.mesh;
        let index = self.len();
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
            script.into(),
            endpoint_seed(mesh.seed(), &inner.name, index),
            mesh.inner.log.clone(),
            inner.recording.clone(),
        ));
        let echo = EchoService::new(&format!("{}-{index}", inner.name));
        let stack = scripted_stack(&core, &echo, &inner.authorize, inner.rate_limit.as_ref());
        let mut server_limits = ServerLimits::default();
        server_limits.shutdown_timeout = Duration::from_millis(100);
        let server = builder.limits(server_limits).serve(listener, stack)?;
        let endpoint = MockEndpoint {
            inner: Arc::new(EndpointInner {
                core,
                link,
                _server: server,
                echo,
            }),
        };
        if let Ok(mut endpoints) = inner.endpoints.lock() {
            endpoints.push(endpoint.clone());
        }
        let discovered = self.discovered(&endpoint);
        inner.discovery.send_modify(|set| {
            set.insert(discovered);
        });
        endpoint.changed(EndpointChange::Started);
        Ok(endpoint)
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
}
