//! Transparent outbound listeners (`transparent = true`, Linux): connections an iptables
//! `REDIRECT` rule sent here, each proxied by its original destination.
//!
//! Every service with `addresses` gets a plaintext `MeshServer` fed through a handoff:
//! its HTTP requests go through the outbound routes with that service as the default
//! backend, and a connection that is not HTTP goes to it as opaque TCP, exactly as on an
//! explicit outbound listener whose `default_service` it is. A service whose `protocol`
//! is `opaque` gets no HTTP server: its connections are relayed as opaque TCP as they
//! come, with no wait to detect a protocol (a server that speaks first, a database or a
//! mail server, is reached at once). The
//! [`TransparentListener`] reads each connection's original destination and hands it to
//! the server of the service that claims it; the rest pass through or are refused, by
//! `unmatched`.
//!
//! A reload rebuilds the servers of services that are new or changed, keeps the others
//! (with their connections) and gives them the new routes, swaps the destination table
//! at once, and drains the servers of services that are gone.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Mutex;

use mesh_core::config::{MeshConfig, OutboundConfig, Protocol, ServiceConfig};
use mesh_core::error::BoxError;
use mesh_spiffe::Mtls;
use mesh_tower::MeshClient;
use mesh_tower::forward::{AnswerErrors, AnswerErrorsLayer};
use mesh_tower::max_forwards::{MaxForwards, MaxForwardsLayer};
use mesh_tower::metrics::server::ServerMetrics;
use mesh_tower::opaque::OpaqueClient;
use mesh_tower::route::{RouteMetrics, Router};
use mesh_tower::server::{Handoff, MeshServer, Server};
use mesh_tower::sock::TcpOptions;
use mesh_tower::transparent::{
    DestinationTable, Destinations, TransparentListener, TransparentMetrics,
};
use mesh_tower::upgrade::{Tunnel, TunnelLayer};
use tower::Layer;

use crate::proxy::{Backend, RelayFor, StartError, lock, opaque_client, routes, tunnel_idle};

/// What a transparent listener's services are built from.
pub(crate) struct Context<'a> {
    pub(crate) config: &'a MeshConfig,
    pub(crate) mtls: Option<&'a Mtls>,
    pub(crate) clients: &'a BTreeMap<String, (ServiceConfig, MeshClient)>,
    pub(crate) route_metrics: &'a RouteMetrics,
    pub(crate) server_metrics: &'a ServerMetrics,
    pub(crate) tunnel_metrics: &'a mesh_tower::upgrade::TunnelMetrics,
}

/// A running transparent listener's services.
pub(crate) struct Transparent {
    index: usize,
    name: String,
    protocol: Protocol,
    limits: mesh_core::config::ListenerLimits,
    addr: SocketAddr,
    table: DestinationTable,
    services: Mutex<BTreeMap<String, Meshed>>,
    /// One access log for every service's server: one switch.
    access_log: mesh_tower::access_log::AccessLogLayer,
}

/// One service's server behind a transparent listener.
struct Meshed {
    config: ServiceConfig,
    server: ServiceServer,
    router: Router<Backend>,
    handoff: Handoff,
    /// The `auto` listener's opaque fallback, replaced in place at a reload.
    opaque: Option<OpaqueClient>,
}

/// What serves a service's connections: an HTTP server (with protocol detection, and an
/// `auto` listener's opaque fallback), or, for a service whose protocol is `opaque`, a
/// relay of every connection as it comes, without waiting to detect anything.
enum ServiceServer {
    Http(Server),
    Opaque(mesh_tower::opaque::Serving),
}

impl ServiceServer {
    async fn shutdown(self) -> mesh_tower::server::ShutdownReport {
        match self {
            Self::Http(server) => server.shutdown().await,
            Self::Opaque(serving) => serving.shutdown().await,
        }
    }
}

/// A reload, built but not applied.
pub(crate) struct Pending {
    /// Services new to this listener: their servers.
    services: BTreeMap<String, Meshed>,
    /// Services it serves already: their new settings and route sets, and their new
    /// opaque fallback when their settings changed. Their servers, and the connections
    /// open on them, stay.
    routes: Vec<Kept>,
}

/// A service a reload keeps serving on its running server.
struct Kept {
    name: String,
    config: ServiceConfig,
    routes: mesh_tower::route::Routes<Backend>,
    opaque: Option<OpaqueClient>,
}

impl Pending {
    /// The opaque fallbacks this reload would replace, each with the service's name, the
    /// running client and the new one: those whose service changed.
    pub(crate) fn opaque_replacements(
        &self,
        listener: &Transparent,
    ) -> Vec<(String, OpaqueClient, OpaqueClient)> {
        let services = lock(&listener.services);
        self.routes
            .iter()
            .filter_map(|kept| {
                let next = kept.opaque.clone()?;
                let running = services.get(&kept.name)?.opaque.clone()?;
                Some((kept.name.clone(), running, next))
            })
            .collect()
    }
}

impl Transparent {
    /// Starts listener `i` of `cx.config.outbound` and a server per service with
    /// addresses.
    pub(crate) async fn start(
        i: usize,
        outbound: &OutboundConfig,
        cx: &Context<'_>,
        metrics: &TransparentMetrics,
    ) -> Result<(Self, mesh_tower::opaque::Serving), StartError> {
        let key = format!("outbound[{i}]");
        if !cfg!(target_os = "linux") {
            return Err(StartError::Config {
                key: format!("{key}.transparent"),
                message: "transparent mode reads SO_ORIGINAL_DST, which only Linux has; use explicit outbound listeners".into(),
            });
        }
        let listener = crate::proxy::bind(&key, outbound.listen).await?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            key: key.clone(),
            addr: outbound.listen,
            source,
        })?;
        let this = Self {
            index: i,
            name: outbound.name.clone(),
            protocol: outbound.protocol,
            limits: outbound.limits.clone(),
            addr,
            table: DestinationTable::default(),
            services: Mutex::new(BTreeMap::new()),
            access_log: crate::proxy::access_log(&outbound.name, outbound.access_log),
        };
        let mut services = BTreeMap::new();
        for (name, service) in &cx.config.services {
            if !service.addresses.is_empty() {
                services.insert(name.clone(), this.meshed(name, service, cx).await?);
            }
        }
        this.table.replace(table(&services));
        *lock(&this.services) = services;
        let mut builder = TransparentListener::builder()
            .name(&outbound.name)
            .unmatched(outbound.unmatched.unwrap_or_default())
            .shutdown_timeout(cx.config.drain_timeout)
            .tcp(TcpOptions::from_config(&cx.config.tcp))
            .idle_timeout(tunnel_idle(&outbound.limits))
            .tunnels(cx.tunnel_metrics.listener(&outbound.name))
            .metrics(metrics);
        if let Some(max) = outbound.limits.max_connections {
            builder = builder.max_connections(max);
        }
        let serving =
            builder
                .serve(listener, this.table.clone())
                .map_err(|e| StartError::Config {
                    key: format!("{key}.listen"),
                    message: e.to_string(),
                })?;
        Ok((this, serving))
    }

    /// The server of service `name`, routing by the outbound routes with it as default.
    async fn meshed(
        &self,
        name: &str,
        service: &ServiceConfig,
        cx: &Context<'_>,
    ) -> Result<Meshed, StartError> {
        let key = format!("outbound[{}]", self.index);
        let set =
            routes(cx.config, Some(name), cx.clients, cx.route_metrics).map_err(|message| {
                StartError::Config {
                    key: key.clone(),
                    message,
                }
            })?;
        let router = Router::new(set);
        let app: Tunnel<MaxForwards<AnswerErrors<Router<Backend>>>> = TunnelLayer::new()
            .metrics(cx.tunnel_metrics.listener(&self.name))
            .idle_timeout(tunnel_idle(&self.limits))
            .layer(MaxForwardsLayer::new().layer(AnswerErrorsLayer::new().layer(router.clone())));
        let (handoff, connections) = mesh_tower::server::handoff(self.addr);
        if service.protocol == Protocol::Opaque {
            // Nothing to detect: a server that speaks first (a database, SMTP) is reached
            // at once, not after the peek timeout.
            let client = self.opaque_client(name, cx).await?;
            let serving = client.serve_handed(connections);
            tracing::info!(listener = %self.name, service = name, addresses = ?service.addresses, "transparent service, opaque TCP");
            return Ok(Meshed {
                config: service.clone(),
                server: ServiceServer::Opaque(serving),
                router,
                handoff,
                opaque: Some(client),
            });
        }
        let mut limits = mesh_tower::server::ServerLimits::default().with_config(&self.limits);
        limits.shutdown_timeout = cx.config.drain_timeout;
        // As an outbound listener: no WebSocket over HTTP/2 from clients (RFC 8441).
        let mut builder = MeshServer::builder()
            .plaintext()
            .tcp(TcpOptions::from_config(&cx.config.tcp))
            .extended_connect(false)
            .limits(limits)
            .metrics(cx.server_metrics.listener(&self.name))
            .access_log(self.access_log.clone())
            .h2_streams(crate::proxy::H2_STREAMS);
        let opaque = self.opaque_fallback(name, service, cx).await?;
        if let Some(client) = &opaque {
            builder = builder.opaque_fallback(client.clone());
        }
        let server = builder.serve_handed(connections, app)?;
        tracing::info!(listener = %self.name, service = name, addresses = ?service.addresses, "transparent service");
        Ok(Meshed {
            config: service.clone(),
            server: ServiceServer::Http(server),
            router,
            handoff,
            opaque,
        })
    }

    /// The opaque client of service `name`: an opaque service's relay, or an `auto`
    /// listener's opaque fallback (none for an HTTP service on `http` listeners).
    async fn opaque_fallback(
        &self,
        name: &str,
        service: &ServiceConfig,
        cx: &Context<'_>,
    ) -> Result<Option<OpaqueClient>, StartError> {
        if self.protocol != Protocol::Auto && service.protocol != Protocol::Opaque {
            return Ok(None);
        }
        Ok(Some(self.opaque_client(name, cx).await?))
    }

    /// A relay to service `name` as opaque TCP, counted as this listener's tunnels.
    async fn opaque_client(
        &self,
        name: &str,
        cx: &Context<'_>,
    ) -> Result<OpaqueClient, StartError> {
        let key = format!("outbound[{}]", self.index);
        let relay = RelayFor {
            limits: &self.limits,
            tunnels: cx.tunnel_metrics.listener(&self.name),
        };
        opaque_client(&key, name, cx.config, cx.mtls, relay).await
    }

    /// The switch of this listener's access log.
    pub(crate) fn access_log(&self) -> &mesh_tower::access_log::AccessLogHandle {
        self.access_log.handle()
    }

    /// Builds what `next` asks of this listener without applying any of it.
    pub(crate) async fn prepare(&self, cx: &Context<'_>) -> Result<Pending, BoxError> {
        let mut pending = Pending {
            services: BTreeMap::new(),
            routes: Vec::new(),
        };
        let running: BTreeMap<String, ServiceConfig> = lock(&self.services)
            .iter()
            .map(|(n, m)| (n.clone(), m.config.clone()))
            .collect();
        for (name, service) in &cx.config.services {
            if service.addresses.is_empty() {
                continue;
            }
            // A service that turns opaque, or stops being opaque, needs another kind of
            // server: a new one, the old one retired.
            let same_kind = |config: &ServiceConfig| {
                (config.protocol == Protocol::Opaque) == (service.protocol == Protocol::Opaque)
            };
            match running.get(name) {
                // Served already: the server stays (and its connections with it); its
                // routes, and its opaque client if the service changed, are replaced.
                Some(config) if same_kind(config) => pending.routes.push(Kept {
                    name: name.clone(),
                    config: service.clone(),
                    routes: routes(cx.config, Some(name), cx.clients, cx.route_metrics)?,
                    opaque: if config == service {
                        None
                    } else {
                        self.opaque_fallback(name, service, cx).await?
                    },
                }),
                _ => {
                    pending
                        .services
                        .insert(name.clone(), self.meshed(name, service, cx).await?);
                }
            }
        }
        Ok(pending)
    }

    /// Applies a prepared reload: new routes (and opaque fallbacks) on the running
    /// servers, new servers for new services, the new table; the servers of services gone
    /// drain in the background.
    pub(crate) fn apply(&self, pending: Pending) {
        let mut services = lock(&self.services);
        let mut next = BTreeMap::new();
        for kept in pending.routes {
            if let Some(mut meshed) = services.remove(&kept.name) {
                meshed.router.replace(kept.routes);
                if let (Some(running), Some(new)) = (&meshed.opaque, &kept.opaque) {
                    running.replace(new);
                }
                meshed.config = kept.config;
                next.insert(kept.name, meshed);
            }
        }
        next.extend(pending.services);
        self.table.replace(table(&next));
        let retired = std::mem::replace(&mut *services, next);
        for (name, meshed) in retired {
            let listener = self.name.clone();
            tokio::spawn(async move {
                let report = meshed.server.shutdown().await;
                tracing::info!(%listener, service = %name, open = report.open_at_shutdown, forced = report.forced, "transparent service retired");
            });
        }
    }

    /// Drains every service's server (after the listener stopped handing any over).
    pub(crate) async fn shutdown(self) {
        let services = std::mem::take(&mut *lock(&self.services));
        // All at once: each gets the whole drain timeout, not what the ones before left.
        let mut drains = tokio::task::JoinSet::new();
        for (name, meshed) in services {
            let listener = self.name.clone();
            drains.spawn(async move {
                let report = meshed.server.shutdown().await;
                tracing::info!(%listener, service = %name, open = report.open_at_shutdown, forced = report.forced, "drained");
            });
        }
        while drains.join_next().await.is_some() {}
    }
}

/// Every address and network of every service, to its server.
fn table(services: &BTreeMap<String, Meshed>) -> Destinations {
    services
        .values()
        .flat_map(|m| m.config.addresses.iter().map(|a| (*a, m.handoff.clone())))
        .collect()
}
