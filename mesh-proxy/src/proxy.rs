//! The running proxy: identity, inbound and outbound listeners, admin, reload, drain.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use http::HeaderName;
use hyper::body::Incoming;
use mesh_core::config::{IdentityConfig, MeshConfig, Protocol, ServiceConfig, TlsMode};
use mesh_core::error::BoxError;
use mesh_spiffe::{CredentialSource, Mtls};
use mesh_tower::MeshClient;
use mesh_tower::access_log::{AccessLogHandle, AccessLogLayer};
use mesh_tower::forward::{AnswerErrors, AnswerErrorsLayer, Forward, ToMesh, ToMeshLayer};
use mesh_tower::max_forwards::{MaxForwards, MaxForwardsLayer};
use mesh_tower::metrics::ClientMetrics;
use mesh_tower::metrics::server::ServerMetrics;
use mesh_tower::opaque::OpaqueClient;
use mesh_tower::relay::{ListenerTunnels, TunnelMetrics};
use mesh_tower::route::{RouteMetrics, Router, Routes};
use mesh_tower::server::{MeshServer, MeshServerBuilder, Server, StreamTasks};
use mesh_tower::sock::TcpOptions;
use mesh_tower::upgrade::{Tunnel, TunnelLayer};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::Notify;
use tower::Layer;

use crate::admin;

/// Where every listener of the proxy runs HTTP/2 streams: in their connection's task. The
/// proxy's handlers only forward, so no stream computes long enough to hold up the others
/// (see [`StreamTasks::InConnection`]).
pub(crate) const H2_STREAMS: StreamTasks = StreamTasks::InConnection;

/// One outbound backend: a service's client, sent to its peer proxies as HTTP/2.
pub(crate) type Backend = ToMesh<MeshClient>;

/// Why the proxy cannot start (or a reload cannot be applied); each names its key.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StartError {
    #[error("identity: {0}")]
    Identity(String),
    #[error("{key}: {message}")]
    Config { key: String, message: String },
    #[error("{key}: binding {addr}: {source}")]
    Bind {
        key: String,
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Server(#[from] mesh_tower::server::ServerError),
}

/// What the admin endpoints and the signal handlers share.
pub(crate) struct State {
    /// Whether the configuration has an identity: then the proxy is ready once it holds
    /// an SVID.
    needs_identity: bool,
    /// The identity source, once started.
    credentials: OnceLock<Arc<dyn CredentialSource>>,
    /// The metrics of every client, server, route and of the process, once started.
    pub(crate) registry: OnceLock<Registry>,
    /// The effective configuration, as TOML.
    pub(crate) config_text: Mutex<String>,
    /// The configuration file, for reloads.
    pub(crate) path: PathBuf,
    /// Set once shutting down: `/ready` then answers 503.
    pub(crate) draining: AtomicBool,
    /// Wakes the main task to shut down (SIGTERM, Ctrl-C, `POST /shutdown`).
    pub(crate) shutdown: Notify,
    /// Wakes the main task to reload (SIGHUP, `POST /reload`).
    pub(crate) reload: Notify,
    reloads: Family<ReloadLabels, Counter>,
    /// The recent decisions of every client and inbound listener, for `GET /decisions`
    /// (`[admin] decisions`; off when 0). Every layer holds it, off or not, so that a
    /// reload can switch it on, off, or resize it.
    pub(crate) decisions: mesh_tower::decision::DecisionRecord,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct ReloadLabels {
    result: &'static str,
}

impl State {
    /// Whether the proxy can serve: it holds an SVID that has not expired (or needs
    /// none) and is not draining.
    pub(crate) fn is_ready(&self) -> bool {
        !self.draining.load(Ordering::Relaxed)
            && self.registry.get().is_some()
            && (!self.needs_identity
                || self
                    .svid()
                    .is_some_and(|svid| !svid.is_expired(SystemTime::now())))
    }

    /// The SVID the proxy holds, if any.
    pub(crate) fn svid(&self) -> Option<Arc<mesh_spiffe::Svid>> {
        self.credentials.get().and_then(|c| c.svid())
    }
}

/// The running proxy.
pub(crate) struct Proxy {
    pub(crate) state: Arc<State>,
    servers: Vec<(String, Listener)>,
    admin: Option<Server>,
    /// One per outbound listener (none for opaque and transparent ones).
    routers: Vec<Option<Router<Backend>>>,
    /// The transparent outbound listeners' services.
    transparent: Vec<crate::transparent::Transparent>,
    /// The opaque TCP clients of outbound listeners (`opaque` ones, and `auto` ones'
    /// fallback), which a reload replaces when their service changed.
    opaque_clients: Vec<OpaqueHandle>,
    server_metrics: ServerMetrics,
    tunnel_metrics: mesh_tower::upgrade::TunnelMetrics,
    mtls: Option<Mtls>,
    clients: Mutex<BTreeMap<String, (ServiceConfig, MeshClient)>>,
    route_metrics: RouteMetrics,
    client_metrics: ClientMetrics,
    config: Mutex<MeshConfig>,
    /// The access-log switch of each listener, inbound then outbound in configuration
    /// order (none for opaque listeners).
    access_logs: Vec<Option<AccessLogHandle>>,
    /// `--admin`'s address, which every configuration read (at start and at each reload)
    /// takes instead of the file's.
    admin_override: Option<SocketAddr>,
}

/// An outbound listener's opaque TCP client, and where it came from.
struct OpaqueHandle {
    /// The outbound listener's position.
    listener: usize,
    /// Its service.
    service: String,
    client: mesh_tower::opaque::OpaqueClient,
}

/// Moves `config`'s admin listener to `listen` (`--admin`), keeping the file's other
/// admin settings, and validates the result again (the address may be a listener's, or
/// an inbound target's); `None` leaves it. `file` is where `config` came from.
pub(crate) fn override_admin(
    config: &mut MeshConfig,
    listen: Option<SocketAddr>,
    file: &std::path::Path,
) -> Result<(), mesh_core::config::ConfigError> {
    if let Some(listen) = listen {
        let decisions = config.admin.as_ref().map_or(0, |a| a.decisions);
        config.admin = Some(mesh_core::config::AdminConfig { listen, decisions });
        config
            .validate()
            .map_err(|errors| mesh_core::config::ConfigError::Invalid {
                file: Some(file.to_owned()),
                errors,
            })?;
    }
    Ok(())
}

/// The access log of listener `name`, on or off as configured.
pub(crate) fn access_log(name: &str, enabled: bool) -> AccessLogLayer {
    if enabled {
        AccessLogLayer::new(name)
    } else {
        AccessLogLayer::disabled(name)
    }
}

/// What a proxy that is starting has already: its shared state, and the admin listener,
/// which serves (`/live`, `/ready` saying why not yet, `POST /shutdown`) while the rest
/// starts ([`Proxy::start`]); [`Proxy::started`] then joins them.
pub(crate) struct Starting {
    pub(crate) state: Arc<State>,
    admin: Option<Server>,
}

impl Starting {
    /// Stops the admin listener of a start given up on (`POST /shutdown` or a signal
    /// while waiting for the identity), letting its answers in flight go out.
    pub(crate) async fn abandon(self) {
        self.state.draining.store(true, Ordering::Relaxed);
        if let Some(admin) = self.admin {
            admin.shutdown().await;
        }
    }
}

impl Proxy {
    /// The first step of a start: the state every endpoint shares, and the admin
    /// listener, serving at once.
    pub(crate) async fn begin(config: &MeshConfig, path: PathBuf) -> Result<Starting, StartError> {
        let reloads = Family::<ReloadLabels, Counter>::default();
        // Both results exist from the start, at 0: an alert on their increase sees the
        // first failed reload too.
        for result in ["applied", "invalid"] {
            let _ = reloads.get_or_create(&ReloadLabels { result });
        }
        // The admin listener first: `/live` answers and `/ready` says why not while the
        // identity is awaited.
        let state = Arc::new(State {
            needs_identity: config.identity.is_some(),
            credentials: OnceLock::new(),
            registry: OnceLock::new(),
            config_text: Mutex::new(effective(config)),
            path,
            draining: AtomicBool::new(false),
            shutdown: Notify::new(),
            reload: Notify::new(),
            reloads: reloads.clone(),
            decisions: {
                let record = mesh_tower::decision::DecisionRecord::disabled();
                record.set_capacity(config.admin.as_ref().map_or(0, |a| a.decisions));
                record
            },
        });
        let admin = match &config.admin {
            Some(a) => {
                let listener = bind("admin.listen", a.listen).await?;
                let server = admin::serve(listener, state.clone())?;
                tracing::info!(addr = %server.local_addr(), "admin listening");
                Some(server)
            }
            None => None,
        };
        Ok(Starting { state, admin })
    }

    /// Starts every listener `config` describes but the admin one, after
    /// [`begin`](Self::begin).
    pub(crate) async fn start(
        config: MeshConfig,
        state: Arc<State>,
        admin_override: Option<SocketAddr>,
    ) -> Result<Self, StartError> {
        let admin = None;
        let reloads = state.reloads.clone();
        if config.identity.is_some() {
            crate::notify::notify("STATUS=waiting for the identity (the first SVID)");
        }
        let transparent_listeners: Vec<SocketAddr> = config
            .outbound
            .iter()
            .filter(|o| o.transparent)
            .map(|o| o.listen)
            .collect();
        let credentials = identity(config.identity.as_ref(), transparent_listeners).await?;
        if let Some(c) = &credentials {
            let _ = state.credentials.set(c.clone());
        }
        let mtls = credentials.map(Mtls::from_arc);
        let mut registry = Registry::default();
        registry.register(
            "mesh_proxy_reloads",
            "Configuration reloads, by result (applied, invalid)",
            reloads.clone(),
        );
        admin::register_process_metrics(&mut registry);
        admin::register_identity_expiry(&mut registry, state.clone());
        let server_metrics = ServerMetrics::register(&mut registry);
        let route_metrics = RouteMetrics::register(&mut registry);
        // One registration for every client, those a reload makes included.
        let client_metrics = ClientMetrics::register_families(&mut registry);
        let mut clients = BTreeMap::new();
        for (name, service) in &config.services {
            let client = client(
                name,
                service,
                &config,
                mtls.as_ref(),
                &client_metrics,
                &state.decisions,
            )
            .await?;
            clients.insert(name.clone(), (service.clone(), client));
        }

        let tunnel_metrics = TunnelMetrics::register(&mut registry);
        let mut servers = Vec::new();
        let mut access_logs = Vec::new();
        let mut app_pools = Vec::new();
        for (i, inbound) in config.inbound.iter().enumerate() {
            let key = format!("inbound[{i}]");
            if inbound.protocol == Protocol::Opaque {
                let server = opaque_inbound(
                    i,
                    inbound,
                    &config,
                    mtls.as_ref(),
                    &server_metrics,
                    &tunnel_metrics,
                )
                .await?;
                tracing::info!(listener = %inbound.name, addr = %server.local_addr(), target = %inbound.target, "opaque inbound listening");
                servers.push((inbound.name.clone(), Listener::Opaque(server)));
                access_logs.push(None);
                continue;
            }
            let log = access_log(&inbound.name, inbound.access_log);
            access_logs.push(Some(log.handle().clone()));
            let mut builder = MeshServerBuilder::from_config(i, inbound, &config)?
                .metrics(server_metrics.listener(&inbound.name))
                .access_log(log)
                .h2_streams(H2_STREAMS);
            builder = builder.decisions(&state.decisions);
            if inbound.tls == TlsMode::Mtls {
                let mtls = mtls.as_ref().ok_or_else(|| StartError::Config {
                    key: format!("{key}.tls"),
                    message: "mtls needs an [identity] section".into(),
                })?;
                builder = builder.mtls_credentials(mtls)?;
            }
            let header = match &inbound.identity_header {
                Some(name) => {
                    HeaderName::from_bytes(name.as_bytes()).map_err(|_| StartError::Config {
                        key: format!("{key}.identity_header"),
                        message: format!("`{name}` is not a header name"),
                    })?
                }
                None => mesh_tower::forward::DEFAULT_IDENTITY_HEADER,
            };
            let forward = Forward::<Incoming>::new(inbound.target)
                .identity_header(header)
                .pool(inbound.pool);
            app_pools.push((inbound.name.clone(), forward.clone()));
            // Upgrades (WebSocket) are spliced to the application's connection.
            let app = TunnelLayer::new()
                .metrics(tunnel_metrics.listener(&inbound.name))
                .idle_timeout(tunnel_idle(&inbound.limits))
                .layer(MaxForwardsLayer::new().layer(forward));
            let listener = bind(&key, inbound.listen).await?;
            let server = builder.serve(listener, app)?;
            tracing::info!(listener = %inbound.name, addr = %server.local_addr(), target = %inbound.target, "inbound listening");
            servers.push((inbound.name.clone(), Listener::Http(server)));
        }

        let mut routers = Vec::new();
        let mut transparent = Vec::new();
        let mut opaque_clients = Vec::new();
        let mut edge_certificates = Vec::new();
        let transparent_metrics =
            mesh_tower::transparent::TransparentMetrics::register(&mut registry);
        for (i, outbound) in config.outbound.iter().enumerate() {
            let key = format!("outbound[{i}]");
            if outbound.transparent {
                let cx = crate::transparent::Context {
                    config: &config,
                    mtls: mtls.as_ref(),
                    clients: &clients,
                    route_metrics: &route_metrics,
                    server_metrics: &server_metrics,
                    tunnel_metrics: &tunnel_metrics,
                };
                let (listener, serving) =
                    crate::transparent::Transparent::start(i, outbound, &cx, &transparent_metrics)
                        .await?;
                tracing::info!(listener = %outbound.name, addr = %serving.local_addr(), "transparent outbound listening");
                servers.push((outbound.name.clone(), Listener::Opaque(serving)));
                access_logs.push(Some(listener.access_log().clone()));
                transparent.push(listener);
                routers.push(None);
                continue;
            }
            if outbound.protocol == Protocol::Opaque {
                let (server, client) =
                    opaque_outbound(i, outbound, &config, mtls.as_ref(), &tunnel_metrics).await?;
                if let Some(service) = &outbound.default_service {
                    opaque_clients.push(OpaqueHandle {
                        listener: i,
                        service: service.clone(),
                        client,
                    });
                }
                tracing::info!(listener = %outbound.name, addr = %server.local_addr(), "opaque outbound listening");
                servers.push((outbound.name.clone(), Listener::Opaque(server)));
                access_logs.push(None);
                routers.push(None);
                continue;
            }
            let routes = routes(
                &config,
                outbound.default_service.as_deref(),
                &clients,
                &route_metrics,
            )
            .map_err(|message| StartError::Config {
                key: key.clone(),
                message,
            })?;
            let router = Router::new(routes);
            // An edge listener's clients are outside the mesh: its error answers, and the
            // mesh's answers relayed from peers, do not name endpoints or their errors (the
            // log does: at info once a second, else at debug).
            // Nor do they get TRACE: with `Max-Forwards: 1` it would show them what the
            // peer's proxy received.
            let (answers, hops) = if outbound.certificate.is_some() {
                (
                    AnswerErrorsLayer::brief(),
                    MaxForwardsLayer::new().refuse_trace(),
                )
            } else {
                (AnswerErrorsLayer::new(), MaxForwardsLayer::new())
            };
            // Upgrades (WebSocket) are spliced to the upstream's connection.
            let app: Tunnel<MaxForwards<AnswerErrors<Router<Backend>>>> = TunnelLayer::new()
                .metrics(tunnel_metrics.listener(&outbound.name))
                .idle_timeout(tunnel_idle(&outbound.limits))
                .layer(hops.layer(answers.layer(router.clone())));
            let listener = bind(&key, outbound.listen).await?;
            let log = access_log(&outbound.name, outbound.access_log);
            access_logs.push(Some(log.handle().clone()));
            // No WebSocket over HTTP/2 from clients (RFC 8441): the service behind may
            // speak HTTP/1.1 only, so browsers keep to HTTP/1.1 upgrades, which cross.
            let mut builder = MeshServer::builder()
                .tcp(TcpOptions::from_config(&config.tcp))
                .metrics(server_metrics.listener(&outbound.name))
                .access_log(log)
                .h2_streams(H2_STREAMS)
                .extended_connect(false);
            builder = match &outbound.certificate {
                None => builder.plaintext(),
                Some(c) => {
                    // Watched: a rewritten certificate is presented from the next
                    // handshake on, without a restart.
                    let acceptor = mesh_spiffe::ServerTlsAcceptor::watch_files(&c.cert, &c.key)
                        .await
                        .map_err(|e| StartError::Config {
                            key: format!("{key}.certificate"),
                            message: e.to_string(),
                        })?;
                    edge_certificates.push((outbound.name.clone(), acceptor.clone()));
                    builder.server_tls(acceptor)
                }
            };
            let mut limits =
                mesh_tower::server::ServerLimits::default().with_config(&outbound.limits);
            limits.shutdown_timeout = config.drain_timeout;
            builder = builder.limits(limits);
            // Auto with a default service: what is not HTTP goes to it as opaque TCP.
            if outbound.protocol == Protocol::Auto
                && outbound.default_service.is_some()
                && outbound.certificate.is_none()
            {
                let name = outbound.default_service.as_deref().unwrap_or_default();
                let client = opaque_client(
                    &format!("{key}.default_service"),
                    name,
                    &config,
                    mtls.as_ref(),
                    RelayFor {
                        limits: &outbound.limits,
                        tunnels: tunnel_metrics.listener(&outbound.name),
                    },
                )
                .await?;
                opaque_clients.push(OpaqueHandle {
                    listener: i,
                    service: name.to_owned(),
                    client: client.clone(),
                });
                builder = builder.opaque_fallback(client);
            }
            let server = builder.serve(listener, app)?;
            tracing::info!(listener = %outbound.name, addr = %server.local_addr(), "outbound listening");
            servers.push((outbound.name.clone(), Listener::Http(server)));
            routers.push(Some(router));
        }

        admin::register_edge_certificates(&mut registry, edge_certificates);
        admin::register_app_pools(&mut registry, app_pools);
        let _ = state.registry.set(registry);
        Ok(Self {
            admin_override,
            state,
            servers,
            admin,
            routers,
            transparent,
            opaque_clients,
            server_metrics,
            tunnel_metrics,
            mtls,
            clients: Mutex::new(clients),
            route_metrics,
            client_metrics,
            config: Mutex::new(config),
            access_logs,
        })
    }

    /// The proxy, with the admin listener that served while it started.
    pub(crate) fn started(mut self, starting: Starting) -> Self {
        self.admin = starting.admin;
        self
    }

    /// The addresses the listeners are bound to, by name (the admin listener as `admin`).
    pub(crate) fn addrs(&self) -> Vec<(String, std::net::SocketAddr)> {
        let mut addrs: Vec<_> = self
            .servers
            .iter()
            .map(|(n, s)| (n.clone(), s.local_addr()))
            .collect();
        if let Some(a) = &self.admin {
            addrs.push(("admin".into(), a.local_addr()));
        }
        addrs
    }

    /// Re-reads the configuration file and applies its services and routes to the
    /// outbound listeners, keeping every connection. An invalid file, or one that changes
    /// what cannot change without a restart (identity, listeners, `[tcp]`,
    /// `drain_timeout`), keeps the running
    /// configuration; the outcome is logged and counted.
    pub(crate) async fn reload(&self) {
        let outcome = self.try_reload().await;
        let result = match &outcome {
            Ok(()) => {
                tracing::info!(path = %self.state.path.display(), "configuration reloaded");
                "applied"
            }
            Err(e) => {
                tracing::error!(path = %self.state.path.display(), error = %e, "configuration not reloaded; keeping the running one");
                "invalid"
            }
        };
        self.state
            .reloads
            .get_or_create(&ReloadLabels { result })
            .inc();
    }

    async fn try_reload(&self) -> Result<(), BoxError> {
        // The admin listener's address needs a restart; its decision record does not.
        let admin_listen = |c: &MeshConfig| c.admin.as_ref().map(|a| a.listen);
        // Read off the runtime's threads: a file on a stale mount must not stall the
        // proxy, and a shutdown drops this reload while it waits.
        let path = &self.state.path;
        let text = tokio::fs::read_to_string(path).await.map_err(|source| {
            mesh_core::config::ConfigError::Read {
                path: path.clone(),
                source,
            }
        })?;
        let mut next = MeshConfig::from_file_contents(path, &text)?;
        override_admin(&mut next, self.admin_override, path)?;
        let current = lock(&self.config).clone();
        // An inbound listener may change its policy and limit, not its socket or target.
        let fixed = |c: &MeshConfig| {
            c.inbound
                .iter()
                .map(|l| {
                    let mut l = l.clone();
                    l.authorization = None;
                    l.rate_limit = None;
                    l.access_log = false;
                    l
                })
                .collect::<Vec<_>>()
        };
        // An outbound listener may switch its access log.
        let fixed_out = |c: &MeshConfig| {
            c.outbound
                .iter()
                .map(|l| {
                    let mut l = l.clone();
                    l.access_log = false;
                    l
                })
                .collect::<Vec<_>>()
        };
        for (what, same) in [
            ("identity", next.identity == current.identity),
            ("inbound", fixed(&next) == fixed(&current)),
            ("outbound", fixed_out(&next) == fixed_out(&current)),
            ("admin", admin_listen(&next) == admin_listen(&current)),
            // Listeners and services alike hold their sockets' options.
            ("tcp", next.tcp == current.tcp),
            // Every server and relay took it as its shutdown timeout.
            ("drain_timeout", next.drain_timeout == current.drain_timeout),
        ] {
            if !same {
                return Err(format!("`{what}` changed: that needs a restart").into());
            }
        }
        // Unchanged services keep their clients (connections, load, breakers, metrics).
        let old = lock(&self.clients).clone();
        let mut clients = BTreeMap::new();
        // Rebuilt clients that replace one with endpoints: each must find its own before
        // the swap (below).
        let mut replacing = Vec::new();
        for (name, service) in &next.services {
            // A client holds its zone preference: a new zone rebuilds them all.
            let client = match old.get(name) {
                Some((config, client)) if config == service && next.zone == current.zone => {
                    client.clone()
                }
                previous => {
                    let client = client(
                        name,
                        service,
                        &next,
                        self.mtls.as_ref(),
                        &self.client_metrics,
                        &self.state.decisions,
                    )
                    .await?;
                    if previous.is_some_and(|(_, old)| !old.endpoints().is_empty()) {
                        replacing.push((name.clone(), client.clone()));
                    }
                    client
                }
            };
            clients.insert(name.clone(), (service.clone(), client));
        }
        let mut sets = Vec::new();
        for (outbound, router) in next.outbound.iter().zip(&self.routers) {
            if router.is_some() {
                sets.push(Some(routes(
                    &next,
                    outbound.default_service.as_deref(),
                    &clients,
                    &self.route_metrics,
                )?));
            } else {
                sets.push(None);
            }
        }
        // Every inbound listener's policy and limits, compiled before any is applied.
        let mut inbound = Vec::new();
        for (i, (l, was)) in next.inbound.iter().zip(&current.inbound).enumerate() {
            let policy_of = |c: &MeshConfig, name: &Option<String>| {
                name.as_ref()
                    .map(|n| (n.clone(), c.authorization.get(n).cloned()))
            };
            let limit_of = |c: &MeshConfig, name: &Option<String>| {
                name.as_ref()
                    .map(|n| (n.clone(), c.rate_limits.get(n).cloned()))
            };
            let policy_changed =
                policy_of(&next, &l.authorization) != policy_of(&current, &was.authorization);
            let limits_changed =
                limit_of(&next, &l.rate_limit) != limit_of(&current, &was.rate_limit);
            let policy = match &l.authorization {
                Some(name) => {
                    let config = next
                        .authorization
                        .get(name)
                        .ok_or_else(|| format!("inbound[{i}].authorization: no policy `{name}`"))?;
                    mesh_tower::authz::Policy::new(name, config)
                        .map_err(|e| format!("authorization.{name}: {e}"))?
                }
                None => mesh_tower::authz::Policy::allow_all("default"),
            };
            let limits = match &l.rate_limit {
                Some(name) => next
                    .rate_limits
                    .get(name)
                    .ok_or_else(|| format!("inbound[{i}].rate_limit: no rate limit `{name}`"))?
                    .clone(),
                None => Default::default(),
            };
            inbound.push((
                policy_changed.then_some(policy),
                limits_changed.then(|| mesh_tower::ratelimit::Limits::new(&limits)),
            ));
        }
        // Every transparent listener's services, built before any is applied.
        let mut transparent = Vec::new();
        for listener in &self.transparent {
            let cx = crate::transparent::Context {
                config: &next,
                mtls: self.mtls.as_ref(),
                clients: &clients,
                route_metrics: &self.route_metrics,
                server_metrics: &self.server_metrics,
                tunnel_metrics: &self.tunnel_metrics,
            };
            transparent.push(listener.prepare(&cx).await?);
        }
        // Every opaque client whose service changed, rebuilt before any is applied.
        let mut opaque = Vec::new();
        for handle in &self.opaque_clients {
            if next.services.get(&handle.service) == current.services.get(&handle.service) {
                continue;
            }
            let Some(outbound) = next.outbound.get(handle.listener) else {
                continue;
            };
            let relay = RelayFor {
                limits: &outbound.limits,
                tunnels: self.tunnel_metrics.listener(&outbound.name),
            };
            let key = format!("outbound[{}].default_service", handle.listener);
            let client = opaque_client(&key, &handle.service, &next, self.mtls.as_ref(), relay)
                .await
                .map_err(|e| e.to_string())?;
            opaque.push((handle.service.as_str(), &handle.client, client));
        }
        let mut opaque_replacing: Vec<(String, OpaqueClient, OpaqueClient)> = opaque
            .iter()
            .map(|(name, running, next)| ((*name).to_owned(), (*running).clone(), next.clone()))
            .collect();
        for (listener, pending) in self.transparent.iter().zip(&transparent) {
            opaque_replacing.extend(pending.opaque_replacements(listener));
        }
        discovered(&replacing, &opaque_replacing).await?;
        for (listener, pending) in self.transparent.iter().zip(transparent) {
            listener.apply(pending);
        }
        // New opaque connections go by the new service; open ones go on.
        for (_, running, next) in opaque {
            running.replace(&next);
        }
        for (router, set) in self.routers.iter().zip(sets) {
            if let (Some(router), Some(set)) = (router, set) {
                router.replace(set);
            }
        }
        // Inbound servers come first, in configuration order.
        // Only what changed is replaced: unchanged limits keep their limiters' state.
        for ((_, server), (policy, limits)) in self.servers.iter().zip(inbound) {
            let server = match server {
                Listener::Http(server) => server,
                Listener::Opaque(serving) => {
                    if let (Some(policy), Some(handle)) = (policy, serving.policy()) {
                        handle.replace(policy);
                    }
                    if let (Some(limits), Some(handle)) = (limits, serving.rate_limit()) {
                        handle.replace(limits);
                    }
                    continue;
                }
            };
            if let Some(policy) = policy {
                server.policy().replace(policy);
            }
            if let Some(limits) = limits {
                server.rate_limit().replace(limits);
            }
        }
        let wanted = next
            .inbound
            .iter()
            .map(|l| (&l.name, l.access_log))
            .chain(next.outbound.iter().map(|l| (&l.name, l.access_log)));
        for ((name, enabled), handle) in wanted.zip(&self.access_logs) {
            if let Some(handle) = handle
                && handle.is_enabled() != enabled
            {
                handle.set_enabled(enabled);
                tracing::info!(listener = %name, enabled, "access log switched");
            }
        }
        let decisions = next.admin.as_ref().map_or(0, |a| a.decisions);
        if self.state.decisions.capacity() != decisions {
            self.state.decisions.set_capacity(decisions);
            tracing::info!(capacity = decisions, "decision record resized (0: off)");
        }
        *lock(&self.clients) = clients;
        *lock(&self.state.config_text) = effective(&next);
        *lock(&self.config) = next;
        Ok(())
    }

    /// Stops accepting, drains every listener (up to `drain_timeout`), then the admin
    /// listener.
    pub(crate) async fn shutdown(self) {
        self.state.draining.store(true, Ordering::Relaxed);
        type Drain = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
        let drains = self.servers.into_iter().map(|(name, server)| -> Drain {
            Box::pin(async move {
                let (open, forced) = server.shutdown().await;
                tracing::info!(listener = %name, open, forced, "drained");
            })
        });
        let transparent = self
            .transparent
            .into_iter()
            .map(|t| -> Drain { Box::pin(t.shutdown()) });
        futures_join_all(drains.chain(transparent)).await;
        if let Some(admin) = self.admin {
            admin.shutdown().await;
        }
    }
}

/// A running listener: HTTP (a `MeshServer`) or opaque TCP.
enum Listener {
    Http(Server),
    Opaque(mesh_tower::opaque::Serving),
}

impl Listener {
    fn local_addr(&self) -> std::net::SocketAddr {
        match self {
            Self::Http(s) => s.local_addr(),
            Self::Opaque(s) => s.local_addr(),
        }
    }

    async fn shutdown(self) -> (usize, usize) {
        match self {
            Self::Http(s) => {
                let r = s.shutdown().await;
                (r.open_at_shutdown, r.forced)
            }
            Self::Opaque(s) => {
                let r = s.shutdown().await;
                (r.open_at_shutdown, r.forced)
            }
        }
    }
}

/// An opaque TCP inbound listener: mTLS (or plaintext), authorization per connection,
/// bytes to the target.
async fn opaque_inbound(
    i: usize,
    inbound: &mesh_core::config::InboundConfig,
    config: &MeshConfig,
    mtls: Option<&Mtls>,
    metrics: &ServerMetrics,
    tunnels: &TunnelMetrics,
) -> Result<mesh_tower::opaque::Serving, StartError> {
    let key = format!("inbound[{i}]");
    let config_error = |field: &str, message: String| StartError::Config {
        key: format!("{key}.{field}"),
        message,
    };
    let mut builder = mesh_tower::opaque::OpaqueServer::builder()
        .metrics(metrics.listener(&inbound.name))
        .tunnels(tunnels.listener(&inbound.name))
        .idle_timeout(tunnel_idle(&inbound.limits))
        .shutdown_timeout(config.drain_timeout)
        .tcp(TcpOptions::from_config(&config.tcp));
    if let Some(max) = inbound.limits.max_connections {
        builder = builder.max_connections(max);
    }
    builder = match inbound.tls {
        TlsMode::Plaintext => builder.plaintext(),
        _ => {
            let mtls =
                mtls.ok_or_else(|| config_error("tls", "mtls needs an [identity] section".into()))?;
            let acceptor = mesh_spiffe::MtlsAcceptor::new(mtls, mesh_spiffe::Authorizer::any())
                .map_err(|e| config_error("tls", e.to_string()))?;
            builder.mtls(acceptor)
        }
    };
    if let Some(name) = &inbound.authorization {
        let policy = config
            .authorization
            .get(name)
            .ok_or_else(|| config_error("authorization", format!("no policy named `{name}`")))?;
        let policy = mesh_tower::authz::Policy::new(name, policy)
            .map_err(|e| config_error("authorization", e.to_string()))?;
        builder = builder.authorization(policy);
    }
    // On an opaque listener the rate limit counts connections.
    if let Some(name) = &inbound.rate_limit {
        let limit = config
            .rate_limits
            .get(name)
            .ok_or_else(|| config_error("rate_limit", format!("no rate limit named `{name}`")))?;
        builder = builder.rate_limit(mesh_tower::ratelimit::Limits::new(limit));
    }
    let listener = bind(&key, inbound.listen).await?;
    builder
        .serve(listener, inbound.target)
        .map_err(|e| config_error("listen", e.to_string()))
}

/// An opaque TCP outbound listener: each connection relayed to an endpoint of the
/// listener's `default_service`, over mTLS when the service is meshed.
async fn opaque_outbound(
    i: usize,
    outbound: &mesh_core::config::OutboundConfig,
    config: &MeshConfig,
    mtls: Option<&Mtls>,
    tunnels: &TunnelMetrics,
) -> Result<
    (
        mesh_tower::opaque::Serving,
        mesh_tower::opaque::OpaqueClient,
    ),
    StartError,
> {
    let key = format!("outbound[{i}]");
    let name = outbound
        .default_service
        .as_deref()
        .ok_or_else(|| StartError::Config {
            key: format!("{key}.default_service"),
            message: "an opaque listener needs a service".into(),
        })?;
    let relay = RelayFor {
        limits: &outbound.limits,
        tunnels: tunnels.listener(&outbound.name),
    };
    let client =
        opaque_client(&format!("{key}.default_service"), name, config, mtls, relay).await?;
    let listener = bind(&key, outbound.listen).await?;
    let serving = client.serve(listener).map_err(|e| StartError::Config {
        key: format!("{key}.listen"),
        message: e.to_string(),
    })?;
    Ok((serving, client))
}

/// The idle timeout of a listener's relays: its `tunnel_idle_timeout`, the relay's
/// default when unset, none for `0s`.
pub(crate) fn tunnel_idle(
    limits: &mesh_core::config::ListenerLimits,
) -> Option<std::time::Duration> {
    match limits.tunnel_idle_timeout {
        None => Some(mesh_tower::relay::DEFAULT_IDLE_TIMEOUT),
        Some(timeout) if timeout.is_zero() => None,
        Some(timeout) => Some(timeout),
    }
}

/// How a listener relays opaque TCP: its limits and its series of tunnel metrics.
pub(crate) struct RelayFor<'a> {
    pub(crate) limits: &'a mesh_core::config::ListenerLimits,
    pub(crate) tunnels: ListenerTunnels,
}

/// The opaque TCP client of service `name`, for the listener setting `key`, relaying as
/// `relay` says.
pub(crate) async fn opaque_client(
    key: &str,
    name: &str,
    config: &MeshConfig,
    mtls: Option<&Mtls>,
    relay: RelayFor<'_>,
) -> Result<mesh_tower::opaque::OpaqueClient, StartError> {
    let config_error = |message: String| StartError::Config {
        key: key.to_owned(),
        message,
    };
    let service = config
        .services
        .get(name)
        .ok_or_else(|| config_error(format!("no service named `{name}`")))?;
    let discovery = mesh_core::discover::from_config(&service.discovery)
        .await
        .map_err(|e| StartError::Config {
            key: format!("services.{name}.discovery"),
            message: e.to_string(),
        })?;
    let mut builder = mesh_tower::opaque::OpaqueClient::builder(discovery)
        .service_name(name)
        .connect_timeout(service.connect_timeout)
        .tcp(TcpOptions::from_config(&config.tcp))
        .shutdown_timeout(config.drain_timeout)
        .idle_timeout(tunnel_idle(relay.limits))
        .tunnels(relay.tunnels);
    // Bounds an opaque listener's connections (`serve`); an `auto` or transparent
    // listener's fallback relays connections its own server bounds.
    if let Some(max) = relay.limits.max_connections {
        builder = builder.max_connections(max);
    }
    builder = match service.tls {
        TlsMode::Plaintext => builder.plaintext(),
        _ => {
            let mtls = mtls.ok_or_else(|| StartError::Config {
                key: format!("services.{name}.tls"),
                message: "mtls needs an [identity] section".into(),
            })?;
            builder.mtls(mtls.clone())
        }
    };
    if let Some(pattern) = &service.server_identity {
        builder = builder.server_identity(pattern.clone());
    }
    builder.build().map_err(|e| config_error(e.to_string()))
}

/// Awaits every future (a small join without another dependency).
async fn futures_join_all<F: std::future::Future<Output = ()> + Send + 'static>(
    futures: impl IntoIterator<Item = F>,
) {
    let tasks: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    for t in tasks {
        if let Err(e) = t.await {
            tracing::warn!(error = %e, "a drain task failed");
        }
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The configuration as TOML, for `/config` (it holds paths, never key material).
fn effective(config: &MeshConfig) -> String {
    toml::to_string_pretty(config).unwrap_or_else(|e| format!("# cannot print: {e}\n"))
}

pub(crate) async fn bind(
    key: &str,
    addr: std::net::SocketAddr,
) -> Result<tokio::net::TcpListener, StartError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind {
            key: key.to_owned(),
            addr,
            source,
        })
}

/// The identity source `config` describes, started. While it waits for SPIRE, it warns
/// once that `transparent` (the transparent listeners' addresses) is not bound yet.
async fn identity(
    config: Option<&IdentityConfig>,
    mut transparent: Vec<SocketAddr>,
) -> Result<Option<Arc<dyn CredentialSource>>, StartError> {
    let Some(config) = config else {
        return Ok(None);
    };
    let source: Arc<dyn CredentialSource> = match config {
        IdentityConfig::Files { .. } => Arc::new(
            mesh_spiffe::files::PemFiles::from_config(config)
                .await
                .map_err(|e| StartError::Identity(e.to_string()))?,
        ),
        IdentityConfig::Spire {
            socket,
            withdrawal_grace,
        } => {
            // The agent may not be up yet, or this workload not registered yet: keep
            // trying (not ready meanwhile) rather than exit into a restart loop.
            let mut wait = std::time::Duration::from_millis(500);
            loop {
                let mut builder =
                    mesh_spiffe::spire::SpireSource::builder().withdrawal_grace(*withdrawal_grace);
                if let Some(socket) = socket {
                    builder = builder.endpoint(socket.clone());
                }
                match builder.build().await {
                    Ok(source) => break Arc::new(source),
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?wait, "no SVID from the Workload API yet");
                        if !transparent.is_empty() {
                            // The redirect rules may already send connections there: the
                            // agent's own to its server among them, if not exempt, and
                            // then the SVID never comes.
                            tracing::warn!(
                                listeners = ?std::mem::take(&mut transparent),
                                "the transparent listeners are not bound until the first SVID arrives: \
                                 connections redirected to them are refused meanwhile, the SPIRE agent's \
                                 to its server too, and then no SVID ever comes; exempt the agent from \
                                 the redirect rules (EXEMPT_USERS, or SKIP with its server's address, in \
                                 packaging/iptables/mesh-redirect.sh)"
                            );
                        }
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(std::time::Duration::from_secs(10));
                    }
                }
            }
        }
        _ => return Err(StartError::Identity("unsupported identity source".into())),
    };
    Ok(Some(source))
}

/// How long a client rebuilt at a reload may take to find its first endpoints.
const RELOAD_DISCOVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Waits (at most [`RELOAD_DISCOVERY`]) until every rebuilt client that would replace one
/// with endpoints has found its own. A DNS service is rebuilt before its first lookup has
/// answered: swapped in at once it would have no endpoint for a while, and none at all
/// while DNS is down. So the reload waits, and fails if one finds none in time: the
/// running configuration, whose clients have their endpoints, stays.
async fn discovered(
    replacing: &[(String, MeshClient)],
    opaque: &[(String, OpaqueClient, OpaqueClient)],
) -> Result<(), BoxError> {
    let opaque: Vec<_> = opaque
        .iter()
        .filter(|(_, running, _)| running.endpoint_count() > 0)
        .collect();
    // Each discovery runs in its own task: waiting on them one after another takes as
    // long as the slowest.
    let all = async {
        for (_, client) in replacing {
            client.discovered().await;
        }
        for (_, _, next) in &opaque {
            next.discovered().await;
        }
    };
    let _ = tokio::time::timeout(RELOAD_DISCOVERY, all).await;
    let missing: Vec<&str> = replacing
        .iter()
        .filter(|(_, client)| client.endpoints().is_empty())
        .map(|(name, _)| name.as_str())
        .chain(
            opaque
                .iter()
                .filter(|(_, _, next)| next.endpoint_count() == 0)
                .map(|(name, _, _)| name.as_str()),
        )
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(format!(
        "services {}: rebuilt with the new settings, found no endpoint within {}s (is their \
         discovery reachable?); the running clients keep theirs",
        missing.join(", "),
        RELOAD_DISCOVERY.as_secs()
    )
    .into())
}

/// The client of service `name`.
async fn client(
    name: &str,
    service: &ServiceConfig,
    config: &MeshConfig,
    mtls: Option<&Mtls>,
    metrics: &ClientMetrics,
    decisions: &mesh_tower::decision::DecisionRecord,
) -> Result<MeshClient, StartError> {
    let key = format!("services.{name}");
    let discovery = mesh_core::discover::from_config(&service.discovery)
        .await
        .map_err(|e| StartError::Config {
            key: format!("{key}.discovery"),
            message: e.to_string(),
        })?;
    let mut builder = mesh_tower::MeshClientBuilder::from_config(name, service, discovery)
        .zone(config.zone.clone(), service.zone.clone())
        .tcp(TcpOptions::from_config(&config.tcp));
    if service.tls == TlsMode::Mtls {
        let mtls = mtls.ok_or_else(|| StartError::Config {
            key: format!("{key}.tls"),
            message: "mtls needs an [identity] section".into(),
        })?;
        builder = builder.mtls(mtls.clone());
    }
    builder = builder.shared_metrics(metrics);
    builder = builder.decisions(decisions);
    builder.build().map_err(|e| StartError::Config {
        key,
        message: e.to_string(),
    })
}

/// The route set of an outbound listener: the configuration's routes over every service
/// (sent to peer proxies as HTTP/2 when the service is mTLS, that is, meshed), and
/// `default` for requests no route takes.
pub(crate) fn routes(
    config: &MeshConfig,
    default: Option<&str>,
    clients: &BTreeMap<String, (ServiceConfig, MeshClient)>,
    metrics: &RouteMetrics,
) -> Result<Routes<Backend>, String> {
    let mut builder = Routes::builder()
        .routes(config.routes.iter().cloned())
        .metrics(metrics);
    for (name, (service, client)) in clients {
        let layer = if service.tls == TlsMode::Mtls {
            ToMeshLayer::new()
        } else {
            ToMeshLayer::passthrough()
        };
        builder = builder.backend(name.clone(), layer.layer(client.clone()));
    }
    if let Some(name) = default {
        builder = builder.default_backend(name);
    }
    builder.build().map_err(|e| e.to_string())
}
