//! Endpoints resolved from DNS, re-resolved when the records expire.
//!
//! Two kinds of names:
//!
//! - **A/AAAA** ([`DnsDiscovery::host`]): every IPv4 and IPv6 address of the host becomes
//!   an endpoint at the given port. Both families are always queried; when one fails and
//!   the other answers, the failed family keeps its last addresses.
//! - **SRV** ([`DnsDiscovery::srv`], a name like `_http._tcp.users.example.org`): every
//!   SRV target is resolved to its A/AAAA addresses; each address becomes an endpoint at
//!   the record's port, weighted by the record's weight (a weight of 0 counts as 1; two
//!   records for the same address and port add their weights). Priorities are honoured
//!   as RFC 2782 asks: only the targets of the lowest priority are used, and those of the
//!   next only while none of the lower ones has an address. A target of `.` ("no
//!   service") yields nothing.
//!
//! An expected [identity](DnsDiscoveryBuilder::identity) and a
//! [zone](DnsDiscoveryBuilder::zone) can be set for all endpoints of the source.
//!
//! # Re-resolution
//!
//! A background task resolves the name at once, then again when the shortest TTL of the
//! records it used (SRV, CNAME, A, AAAA) expires, clamped between a floor (default 5 s) and a
//! ceiling (default 5 min). hickory's own cache is cleared before each round, so the
//! ceiling is honoured even for records with long TTLs. Each round emits only the
//! difference from the last set emitted.
//!
//! # Failures and empty answers
//!
//! A failed lookup — NXDOMAIN, a timeout, SERVFAIL or any other error — keeps the last good
//! set, is logged with `tracing::warn!` (once per distinct reason) and is retried after the
//! floor. The first resolution is no different: the source is created without waiting for
//! DNS, and the stream stays silent until a lookup succeeds.
//!
//! A *successful* empty answer (NOERROR with no records of the type asked, "NODATA") is
//! honoured: the name exists and says it has no addresses, so the set becomes empty. It is
//! re-resolved after the SOA's negative TTL, or the floor if there is none. For SRV, a
//! target that fails to resolve keeps the addresses it had in the last round (or is
//! skipped, with a warning, if it never resolved) so that one broken target does not freeze
//! the others; the next round then comes after the floor.
//!
//! # Resolver
//!
//! Either explicit name servers ([`name_server`](DnsDiscoveryBuilder::name_server), UDP
//! with TCP fallback for truncated answers) or, by default, the `nameserver` lines of
//! `/etc/resolv.conf` (read when the source is built, port 53). The `search` and `ndots`
//! settings are not applied: names are always absolute. `/etc/hosts` is not consulted.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_core::Stream;
use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError, NoRecords};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use hickory_resolver::{Resolver, TokioResolver};
use tokio::sync::mpsc;
use tokio::time;

use super::{Change, DiscoverError, EndpointSet, Updates};
use crate::endpoint::Endpoint;
use crate::identity::SpiffeId;

/// Default lower bound of the re-resolution interval.
pub const DEFAULT_TTL_FLOOR: Duration = Duration::from_secs(5);
/// Default upper bound of the re-resolution interval.
pub const DEFAULT_TTL_CEILING: Duration = Duration::from_secs(300);
/// Default timeout of one DNS query (hickory's, as resolv.conf's).
pub const DEFAULT_QUERY_TIMEOUT: Duration = Duration::from_secs(5);

const RESOLV_CONF: &str = "/etc/resolv.conf";

/// Discovery from DNS A/AAAA or SRV records, re-resolved on their TTL.
///
/// See the [module docs](self) for the algorithm.
///
/// ```no_run
/// use std::time::Duration;
/// use futures_util::StreamExt;
/// use mesh_core::discover::DnsDiscovery;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let mut changes = DnsDiscovery::srv("_http._tcp.users.example.org")
///     .name_server("10.96.0.10:53".parse()?)
///     .ttl_floor(Duration::from_secs(1))
///     .zone("eu-west-1a")
///     .build()?;
/// while let Some(change) = changes.next().await {
///     println!("{:?}", change?);
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct DnsDiscovery {
    updates: Updates,
}

impl DnsDiscovery {
    /// Discovery of the A and AAAA records of `host`, each address an endpoint at `port`.
    pub fn host(host: impl Into<String>, port: u16) -> DnsDiscoveryBuilder {
        DnsDiscoveryBuilder::new(QuerySpec::Host(host.into(), port))
    }

    /// Discovery of the SRV records at `name` (`_service._proto.domain`), each target
    /// resolved to its A and AAAA records.
    pub fn srv(name: impl Into<String>) -> DnsDiscoveryBuilder {
        DnsDiscoveryBuilder::new(QuerySpec::Srv(name.into()))
    }
}

impl Stream for DnsDiscovery {
    type Item = Result<Change, DiscoverError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.updates).poll_next(cx)
    }
}

#[derive(Clone, Debug)]
enum QuerySpec {
    Host(String, u16),
    Srv(String),
}

/// How a [`DnsDiscovery`] resolves its name.
///
/// # Defaults
///
/// - name servers: those of `/etc/resolv.conf`.
/// - `ttl_floor`: 5 s; `ttl_ceiling`: 5 min.
/// - `query_timeout`: 5 s (two attempts).
/// - no identity, no zone.
#[derive(Clone, Debug)]
pub struct DnsDiscoveryBuilder {
    query: QuerySpec,
    name_servers: Vec<SocketAddr>,
    ttl_floor: Duration,
    ttl_ceiling: Duration,
    query_timeout: Duration,
    identity: Option<SpiffeId>,
    zone: Option<String>,
}

impl DnsDiscoveryBuilder {
    fn new(query: QuerySpec) -> Self {
        Self {
            query,
            name_servers: Vec::new(),
            ttl_floor: DEFAULT_TTL_FLOOR,
            ttl_ceiling: DEFAULT_TTL_CEILING,
            query_timeout: DEFAULT_QUERY_TIMEOUT,
            identity: None,
            zone: None,
        }
    }

    /// Queries this name server (UDP, TCP for truncated answers) instead of the system's.
    /// Call it several times for several servers.
    pub fn name_server(mut self, addr: SocketAddr) -> Self {
        self.name_servers.push(addr);
        self
    }

    /// Never re-resolves sooner than this after a success, and retries after this long
    /// after a failure (default 5 s).
    pub fn ttl_floor(mut self, floor: Duration) -> Self {
        self.ttl_floor = floor;
        self
    }

    /// Re-resolves at least this often, whatever the TTL (default 5 min).
    pub fn ttl_ceiling(mut self, ceiling: Duration) -> Self {
        self.ttl_ceiling = ceiling;
        self
    }

    /// The timeout of one DNS query (default 5 s; a query is tried twice).
    pub fn query_timeout(mut self, timeout: Duration) -> Self {
        self.query_timeout = timeout;
        self
    }

    /// The SPIFFE ID every endpoint of this source must present.
    pub fn identity(mut self, id: SpiffeId) -> Self {
        self.identity = Some(id);
        self
    }

    /// The zone of every endpoint of this source.
    pub fn zone(mut self, zone: impl Into<String>) -> Self {
        self.zone = Some(zone.into());
        self
    }

    /// Starts resolving in a background task. Must be called within a tokio runtime.
    ///
    /// # Errors
    ///
    /// [`DiscoverError::Dns`] if the name is not a valid host name (or, for SRV, not of the
    /// form `_service._proto.domain`), if the floor is zero or exceeds the ceiling, if no name server
    /// is configured and `/etc/resolv.conf` names none, or if there is no tokio runtime.
    pub fn build(self) -> Result<DnsDiscovery, DiscoverError> {
        let (query, display) = match &self.query {
            QuerySpec::Host(host, port) => (Query::Host(parse_host(host)?, *port), host),
            QuerySpec::Srv(name) => (Query::Srv(parse_srv(name)?), name),
        };
        let error = |message: String| DiscoverError::Dns {
            name: display.clone(),
            message,
        };
        if self.ttl_floor.is_zero() {
            return Err(error(
                "TTL floor must be above zero: after a failure the name servers would be \
                 asked again at once, without end"
                    .into(),
            ));
        }
        if self.ttl_floor > self.ttl_ceiling {
            return Err(error(format!(
                "TTL floor {:?} exceeds TTL ceiling {:?}",
                self.ttl_floor, self.ttl_ceiling
            )));
        }
        let name_servers = if self.name_servers.is_empty() {
            let text = std::fs::read_to_string(RESOLV_CONF)
                .map_err(|e| error(format!("reading {RESOLV_CONF}: {e}")))?;
            let servers = parse_resolv_conf(&text);
            if servers.is_empty() {
                return Err(error(format!("{RESOLV_CONF} names no name server")));
            }
            servers
        } else {
            self.name_servers.clone()
        };
        let resolver = build_resolver(&name_servers, self.query_timeout)
            .map_err(|e| error(format!("building the resolver: {e}")))?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|e| {
            error(format!(
                "DnsDiscovery must be built in a tokio runtime: {e}"
            ))
        })?;

        let (tx, updates) = Updates::channel();
        let task = ResolveTask {
            display: display.clone(),
            query,
            resolver,
            template: Template {
                identity: self.identity,
                zone: self.zone,
            },
            floor: self.ttl_floor,
            ceiling: self.ttl_ceiling,
            set: EndpointSet::new(),
            target_addrs: HashMap::new(),
            last_error: None,
            half_failed: None,
            tx,
        };
        runtime.spawn(task.run());
        Ok(DnsDiscovery { updates })
    }
}

fn build_resolver(servers: &[SocketAddr], timeout: Duration) -> Result<TokioResolver, NetError> {
    let name_servers = servers
        .iter()
        .map(|addr| {
            let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
            for conn in &mut ns.connections {
                conn.port = addr.port();
            }
            ns
        })
        .collect();
    let mut opts = ResolverOpts::default();
    opts.timeout = timeout;
    opts.use_hosts_file = ResolveHosts::Never;
    opts.ndots = 0;
    Resolver::builder_with_config(
        ResolverConfig::from_name_servers(name_servers),
        TokioRuntimeProvider::default(),
    )
    .with_options(opts)
    .build()
}

/// The `nameserver` addresses of a resolv.conf, at port 53.
fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            if words.next() != Some("nameserver") {
                return None;
            }
            // An IPv6 address may carry a `%interface` scope, which we cannot use.
            let addr = words.next()?.split('%').next()?;
            let ip: IpAddr = addr.parse().ok()?;
            Some(SocketAddr::new(ip, 53))
        })
        .collect()
}

/// Parses a host name into an absolute DNS name.
fn parse_host(host: &str) -> Result<Name, DiscoverError> {
    if host.parse::<IpAddr>().is_ok() {
        return Err(DiscoverError::Dns {
            name: host.to_owned(),
            message: "is an IP address, not a DNS name; use a static source".to_owned(),
        });
    }
    parse_name(host)
}

/// Parses an SRV name, which must be of the form `_service._proto.domain`.
fn parse_srv(name: &str) -> Result<Name, DiscoverError> {
    let parsed = parse_name(name)?;
    let labels: Vec<&str> = name.split('.').collect();
    if labels.len() < 3 || !labels[0].starts_with('_') || !labels[1].starts_with('_') {
        return Err(DiscoverError::Dns {
            name: name.to_owned(),
            message: "an SRV name must look like `_service._proto.domain`".to_owned(),
        });
    }
    Ok(parsed)
}

/// Parses a DNS name: letters, digits, `-` and `_` in labels of 1 to 63 characters, 253 at
/// most in all, with an optional final dot. The result is absolute.
fn parse_name(name: &str) -> Result<Name, DiscoverError> {
    let invalid = |message: String| DiscoverError::Dns {
        name: name.to_owned(),
        message,
    };
    let bare = name.strip_suffix('.').unwrap_or(name);
    if bare.is_empty() {
        return Err(invalid("empty name".to_owned()));
    }
    if bare.len() > 253 {
        return Err(invalid("longer than 253 characters".to_owned()));
    }
    for label in bare.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(invalid(format!(
                "label `{label}` must have 1 to 63 characters"
            )));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return Err(invalid(format!(
                "invalid character {c:?} in label `{label}`"
            )));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(invalid(format!("label `{label}` starts or ends with `-`")));
        }
    }
    Name::from_ascii(format!("{bare}.")).map_err(|e| invalid(e.to_string()))
}

/// What is resolved, parsed.
#[derive(Debug)]
enum Query {
    Host(Name, u16),
    Srv(Name),
}

/// What every endpoint of the source carries besides its address and weight.
#[derive(Debug, Default)]
struct Template {
    identity: Option<SpiffeId>,
    zone: Option<String>,
}

impl Template {
    fn endpoint(&self, addr: SocketAddr, weight: NonZeroU32) -> Endpoint {
        let mut ep = Endpoint::new(addr).with_weight(weight);
        if let Some(id) = &self.identity {
            ep = ep.with_identity(id.clone());
        }
        if let Some(zone) = &self.zone {
            ep = ep.with_zone(zone.clone());
        }
        ep
    }
}

/// One SRV record, as far as discovery cares.
#[derive(Clone, Debug, PartialEq, Eq)]
struct SrvRecord {
    target: Name,
    port: u16,
    weight: u16,
    priority: u16,
}

/// The endpoints of `records`, given each target's addresses: one per address and record,
/// weighted by the record's weight (0 counts as 1), weights of equal addresses added. An
/// address repeated in one target's answer counts once (an RRset has no duplicates, RFC
/// 2181 §5, but a server may send them).
fn srv_endpoints(
    records: &[SrvRecord],
    addrs: &HashMap<Name, Vec<IpAddr>>,
    template: &Template,
) -> EndpointSet {
    // RFC 2782: the targets of the lowest priority are used; those of the next only when
    // none of the lower ones has an address.
    let priorities: BTreeSet<u16> = records.iter().map(|r| r.priority).collect();
    for priority in priorities {
        let set = weighted_endpoints(
            records.iter().filter(|r| r.priority == priority),
            addrs,
            template,
        );
        if !set.is_empty() {
            return set;
        }
    }
    EndpointSet::new()
}

/// The endpoints of one priority's records.
fn weighted_endpoints<'r>(
    records: impl Iterator<Item = &'r SrvRecord>,
    addrs: &HashMap<Name, Vec<IpAddr>>,
    template: &Template,
) -> EndpointSet {
    let mut weights: BTreeMap<SocketAddr, u32> = BTreeMap::new();
    for r in records {
        let ips: BTreeSet<&IpAddr> = addrs.get(&r.target).into_iter().flatten().collect();
        for ip in ips {
            let w = weights.entry(SocketAddr::new(*ip, r.port)).or_default();
            *w = w.saturating_add(u32::from(r.weight.max(1)));
        }
    }
    weights
        .into_iter()
        .map(|(addr, w)| template.endpoint(addr, NonZeroU32::new(w).unwrap_or(NonZeroU32::MIN)))
        .collect()
}

/// The endpoints discovery makes of an SRV answer, as each round does: `records` as
/// `(target, port, weight)` and `addrs` each target's A/AAAA addresses (a target that is
/// not a valid DNS name, or whose addresses are missing, yields nothing).
///
/// Exposed for the fuzz targets in `fuzz/`; not a stable API.
#[doc(hidden)]
pub fn srv_answer_endpoints(
    records: &[(String, u16, u16)],
    addrs: &[(String, Vec<IpAddr>)],
) -> EndpointSet {
    let records: Vec<SrvRecord> = records
        .iter()
        .filter_map(|(target, port, weight)| {
            Some(SrvRecord {
                target: Name::from_ascii(target).ok()?,
                port: *port,
                weight: *weight,
                priority: 0,
            })
        })
        .collect();
    let addrs = addrs
        .iter()
        .filter_map(|(name, ips)| Some((Name::from_ascii(name).ok()?, ips.clone())))
        .collect();
    srv_endpoints(&records, &addrs, &Template::default())
}

/// The time until the next resolution: the TTL, or the floor when unknown, within the
/// floor and the ceiling.
fn clamp_ttl(ttl: Option<Duration>, floor: Duration, ceiling: Duration) -> Duration {
    ttl.unwrap_or(floor).clamp(floor, ceiling.max(floor))
}

/// The records of one lookup and their shortest TTL (`None`: no TTL known).
type Answer<T> = (Vec<T>, Option<Duration>);

/// Looks up `name`'s records of `rtype`, mapping each with `f`. A NODATA answer is an empty
/// answer; any other error (including NXDOMAIN) is an error.
async fn lookup<T>(
    resolver: &TokioResolver,
    name: &Name,
    rtype: RecordType,
    f: impl Fn(&RData) -> Option<T>,
) -> Result<Answer<T>, NetError> {
    match resolver.lookup(name.clone(), rtype).await {
        Ok(lookup) => {
            let ttl = lookup.answers().iter().map(|r| r.ttl).min();
            let items = lookup.answers().iter().filter_map(|r| f(&r.data)).collect();
            Ok((items, ttl.map(|s| Duration::from_secs(s.into()))))
        }
        Err(NetError::Dns(DnsError::NoRecordsFound(NoRecords {
            response_code: ResponseCode::NoError,
            negative_ttl,
            ..
        }))) => Ok((
            Vec::new(),
            negative_ttl.map(|s| Duration::from_secs(s.into())),
        )),
        Err(e) => Err(e),
    }
}

/// The A and AAAA addresses of `name` and their shortest TTL, and whether one family's
/// lookup failed (`Some` reason). A failed family keeps its addresses from `previous`,
/// the last good answer: a resolver that answers A but drops or refuses AAAA (some
/// firewalls and DNS proxies do) must not leave the name without endpoints, nor take
/// away the addresses of the family that did not answer this time. Both failing is an
/// error.
async fn lookup_ips(
    resolver: &TokioResolver,
    name: &Name,
    previous: &[IpAddr],
) -> Result<(Vec<IpAddr>, Option<Duration>, Option<String>), NetError> {
    let (v4, v6) = tokio::join!(
        lookup(resolver, name, RecordType::A, |d| match d {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            _ => None,
        }),
        lookup(resolver, name, RecordType::AAAA, |d| match d {
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        }),
    );
    let kept = |v6: bool| {
        previous
            .iter()
            .filter(move |ip| ip.is_ipv6() == v6)
            .copied()
    };
    match (v4, v6) {
        (Ok((mut ips, ttl4)), Ok((ips6, ttl6))) => {
            ips.extend(ips6);
            Ok((ips, min_ttl(ttl4, ttl6), None))
        }
        (Ok((mut ips, ttl)), Err(e)) => {
            ips.extend(kept(true));
            Ok((ips, ttl, Some(format!("AAAA lookup failed: {e}"))))
        }
        (Err(e), Ok((ips6, ttl))) => {
            let mut ips: Vec<IpAddr> = kept(false).collect();
            ips.extend(ips6);
            Ok((ips, ttl, Some(format!("A lookup failed: {e}"))))
        }
        (Err(e), Err(_)) => Err(e),
    }
}

fn min_ttl(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The background task: resolves, sends diffs, sleeps until the TTL expires.
struct ResolveTask {
    display: String,
    query: Query,
    resolver: TokioResolver,
    template: Template,
    floor: Duration,
    ceiling: Duration,
    /// The last endpoints sent.
    set: EndpointSet,
    /// The addresses each SRV target had when it last resolved.
    target_addrs: HashMap<Name, Vec<IpAddr>>,
    /// The last failure logged, so that a persisting failure is logged once.
    last_error: Option<String>,
    /// Why the last round's lookup of one address family failed, if it did.
    half_failed: Option<String>,
    tx: mpsc::Sender<Vec<Change>>,
}

impl ResolveTask {
    async fn run(mut self) {
        let tx = self.tx.clone();
        loop {
            // Stop as soon as the stream is dropped, even in the middle of a lookup.
            let resolved = tokio::select! {
                () = tx.closed() => return,
                r = self.resolve() => r,
            };
            let wait = match resolved {
                Ok((set, ttl)) => {
                    // A lookup that half failed is logged once per distinct reason, as
                    // failures are.
                    match self.half_failed.take() {
                        Some(reason) if self.last_error.as_ref() != Some(&reason) => {
                            tracing::warn!(
                                name = %self.display,
                                "{reason}; that address family keeps its last addresses"
                            );
                            self.last_error = Some(reason);
                        }
                        Some(_) => {}
                        None => self.last_error = None,
                    }
                    let changes = self.set.diff(&set);
                    self.set = set;
                    tracing::debug!(name = %self.display, changes = changes.len(), ?ttl, "resolved");
                    if !changes.is_empty() && self.tx.send(changes).await.is_err() {
                        return;
                    }
                    clamp_ttl(ttl, self.floor, self.ceiling)
                }
                Err(reason) => {
                    if self.last_error.as_ref() != Some(&reason) {
                        tracing::warn!(
                            name = %self.display,
                            endpoints = self.set.len(),
                            "DNS lookup failed: {reason}; keeping the last good endpoints"
                        );
                        self.last_error = Some(reason);
                    }
                    self.floor
                }
            };
            tokio::select! {
                () = self.tx.closed() => return,
                () = time::sleep(wait) => {}
            }
        }
    }

    /// One round: the full endpoint set and when to resolve again.
    async fn resolve(&mut self) -> Result<(EndpointSet, Option<Duration>), String> {
        // Our TTL logic decides when to ask again; never answer from hickory's cache.
        self.resolver.clear_cache();
        let mut half_failed = None;
        let resolved = match &self.query {
            Query::Host(name, port) => {
                let previous: Vec<IpAddr> = self.set.iter().map(|e| e.addr().ip()).collect();
                let (ips, ttl, partial) = lookup_ips(&self.resolver, name, &previous)
                    .await
                    .map_err(|e| e.to_string())?;
                // The failed family is asked again with the other at the TTL: a resolver
                // that always drops AAAA would otherwise be asked at the floor for good.
                half_failed = partial;
                let set = ips
                    .into_iter()
                    .map(|ip| {
                        self.template
                            .endpoint(SocketAddr::new(ip, *port), NonZeroU32::MIN)
                    })
                    .collect();
                Ok((set, ttl))
            }
            Query::Srv(name) => {
                let (records, mut ttl) =
                    lookup(&self.resolver, name, RecordType::SRV, |d| match d {
                        RData::SRV(srv) if !srv.target.is_root() => Some(SrvRecord {
                            target: srv.target.clone(),
                            port: srv.port,
                            weight: srv.weight,
                            priority: srv.priority,
                        }),
                        _ => None,
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                let mut addrs = HashMap::new();
                let mut degraded = false;
                for r in &records {
                    if addrs.contains_key(&r.target) {
                        continue;
                    }
                    let previous = self
                        .target_addrs
                        .get(&r.target)
                        .map_or(&[][..], Vec::as_slice);
                    match lookup_ips(&self.resolver, &r.target, previous).await {
                        Ok((ips, t, partial)) => {
                            if let Some(reason) = partial {
                                half_failed = Some(format!("target {}: {reason}", r.target));
                            }
                            ttl = min_ttl(ttl, t);
                            addrs.insert(r.target.clone(), ips);
                        }
                        Err(e) => {
                            degraded = true;
                            let previous = self.target_addrs.get(&r.target).cloned();
                            tracing::warn!(
                                name = %self.display,
                                target = %r.target,
                                "resolving SRV target failed: {e}; {}",
                                if previous.is_some() { "keeping its last addresses" } else { "skipping it" }
                            );
                            addrs.insert(r.target.clone(), previous.unwrap_or_default());
                        }
                    }
                }
                if degraded {
                    ttl = Some(self.floor);
                }
                let set = srv_endpoints(&records, &addrs, &self.template);
                self.target_addrs = addrs;
                Ok((set, ttl))
            }
        };
        self.half_failed = half_failed;
        resolved
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn ttl_is_clamped_to_floor_and_ceiling() {
        let (floor, ceiling) = (5 * S, 300 * S);
        assert_eq!(clamp_ttl(Some(Duration::ZERO), floor, ceiling), floor);
        assert_eq!(clamp_ttl(Some(4 * S), floor, ceiling), floor);
        assert_eq!(clamp_ttl(Some(30 * S), floor, ceiling), 30 * S);
        assert_eq!(clamp_ttl(Some(86_400 * S), floor, ceiling), ceiling);
        assert_eq!(clamp_ttl(None, floor, ceiling), floor);
        // A ceiling below the floor (rejected by the builder) must not panic.
        assert_eq!(clamp_ttl(Some(S), floor, S), floor);
    }

    fn name(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    /// Found by the `dns_srv` fuzz target: a duplicated A record multiplied the weight.
    #[test]
    fn an_address_repeated_in_one_answer_counts_once() {
        let a = name("a.example.org.");
        let records = [SrvRecord {
            target: a.clone(),
            port: 80,
            weight: 7,
            priority: 0,
        }];
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let addrs = HashMap::from([(a, vec![ip, ip, ip])]);
        let set = srv_endpoints(&records, &addrs, &Template::default());
        let got: Vec<(String, u32)> = set
            .iter()
            .map(|ep| (ep.addr().to_string(), ep.weight().get()))
            .collect();
        assert_eq!(got, [("10.0.0.1:80".to_owned(), 7)]);
    }

    /// RFC 2782: the lowest priority's targets, the next's only while none of those has an
    /// address.
    #[test]
    fn only_the_lowest_priority_with_addresses_is_used() {
        let (primary, backup) = (name("primary.example.org."), name("backup.example.org."));
        let record = |target: &Name, priority| SrvRecord {
            target: target.clone(),
            port: 80,
            weight: 1,
            priority,
        };
        let records = [record(&backup, 20), record(&primary, 10)];
        let endpoints = |addrs: &HashMap<Name, Vec<IpAddr>>| -> Vec<String> {
            srv_endpoints(&records, addrs, &Template::default())
                .iter()
                .map(|ep| ep.addr().to_string())
                .collect()
        };
        let both = HashMap::from([
            (primary.clone(), vec!["10.0.0.1".parse().unwrap()]),
            (backup.clone(), vec!["10.0.0.2".parse().unwrap()]),
        ]);
        assert_eq!(endpoints(&both), ["10.0.0.1:80"]);
        let primary_empty = HashMap::from([
            (primary, vec![]),
            (backup, vec!["10.0.0.2".parse().unwrap()]),
        ]);
        assert_eq!(endpoints(&primary_empty), ["10.0.0.2:80"]);
        assert!(endpoints(&HashMap::new()).is_empty());
    }

    #[test]
    fn srv_records_map_to_weighted_endpoints() {
        let a = name("a.example.org.");
        let b = name("b.example.org.");
        let records = [
            SrvRecord {
                target: a.clone(),
                port: 8080,
                weight: 10,
                priority: 0,
            },
            SrvRecord {
                target: b.clone(),
                port: 9090,
                weight: 0,
                priority: 0,
            },
            // The same address and port twice: weights add.
            SrvRecord {
                target: a.clone(),
                port: 8080,
                weight: 5,
                priority: 0,
            },
            // A target with no known addresses yields nothing.
            SrvRecord {
                target: name("c.example.org."),
                port: 1,
                weight: 1,
                priority: 0,
            },
        ];
        let addrs = HashMap::from([
            (
                a,
                vec!["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()],
            ),
            (b, vec!["10.0.0.2".parse().unwrap()]),
        ]);
        let template = Template {
            identity: Some(SpiffeId::new("spiffe://example.org/users").unwrap()),
            zone: Some("z1".to_owned()),
        };
        let set = srv_endpoints(&records, &addrs, &template);
        let got: Vec<(String, u32)> = set
            .iter()
            .map(|ep| (ep.addr().to_string(), ep.weight().get()))
            .collect();
        assert_eq!(
            got,
            [
                ("10.0.0.1:8080".to_owned(), 15),
                ("10.0.0.2:9090".to_owned(), 1),
                ("[fd00::1]:8080".to_owned(), 15),
            ]
        );
        assert!(set.iter().all(|ep| ep.zone() == Some("z1")
            && ep.identity().map(ToString::to_string).as_deref()
                == Some("spiffe://example.org/users")));
    }

    #[test]
    fn names_are_validated() {
        assert_eq!(
            parse_host("users.example.org").unwrap(),
            name("users.example.org.")
        );
        assert_eq!(
            parse_host("users.example.org.").unwrap(),
            name("users.example.org.")
        );
        assert!(parse_srv("_http._tcp.users.example.org").is_ok());
        for (bad, want) in [
            ("", "empty"),
            (".", "empty"),
            ("a..b", "1 to 63"),
            ("has space.org", "invalid character ' '"),
            ("-a.org", "starts or ends"),
            ("10.0.0.1", "IP address"),
            ("::1", "IP address"),
        ] {
            let err = parse_host(bad).unwrap_err().to_string();
            assert!(err.contains(want), "{bad:?}: {err}");
        }
        let long = format!("{}.org", "a".repeat(64));
        assert!(
            parse_host(&long)
                .unwrap_err()
                .to_string()
                .contains("1 to 63")
        );
        for bad in ["users.example.org", "_http.users.example.org", "_http._tcp"] {
            let err = parse_srv(bad).unwrap_err().to_string();
            assert!(err.contains("_service._proto"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn resolv_conf_nameservers() {
        let text = "# comment\nsearch example.org\nnameserver 10.0.0.53\nnameserver fe80::1%eth0\n\
                    nameserver bogus\noptions ndots:5\n";
        assert_eq!(
            parse_resolv_conf(text),
            [
                "10.0.0.53:53".parse::<SocketAddr>().unwrap(),
                "[fe80::1]:53".parse().unwrap()
            ]
        );
    }
}
