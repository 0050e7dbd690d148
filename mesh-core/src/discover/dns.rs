//! Endpoints resolved from DNS, re-resolved when the records expire.
//!
//! Two kinds of names:
//!
//! - **A/AAAA** ([`DnsDiscovery::host`]): every IPv4 and IPv6 address of the host becomes
//!   an endpoint at the given port. Both families are always queried; when one fails and
//!   the other answers, the failed family keeps its last addresses. An IPv4-mapped IPv6
//!   address (`::ffff:a.b.c.d`) is taken as the IPv4 address, so that a host listed in both
//!   families is one endpoint.
//! - **SRV** ([`DnsDiscovery::srv`], a name like `_http._tcp.users.example.org`): priorities
//!   are honoured as RFC 2782 asks: the targets of the lowest priority are resolved to their
//!   A/AAAA addresses (at most 16 at once), and those of the next priority only while none
//!   of the lower ones has an address; backups are not even asked otherwise. Each address
//!   becomes an endpoint at the record's port. A record's weight, multiplied by 1,000, is
//!   split evenly across its target's addresses (at least 1 each), so that a target with
//!   many addresses gets the share its weight says; where some record of the priority has
//!   a weight above 0, a weight of 0 counts as 1 before that scaling (a very small share),
//!   and where all are 0 they are equal. Two records for the same address and port add
//!   their weights. A target of `.` ("no service") yields nothing.
//!
//! Only the records of the name asked, or of the names its CNAME chain leads to (at most 8
//! links), of class IN and of the type asked, are used: anything else a server puts in its
//! answer is ignored.
//!
//! An address that cannot be a peer — unspecified (`0.0.0.0`, `::`), multicast or broadcast
//! — and an SRV record with port 0 are skipped with a warning (logged once): a DNS filter
//! that null-routes a name to `0.0.0.0` would otherwise send traffic to local ports.
//!
//! # Limits
//!
//! A round uses at most [`MAX_SRV_RECORDS`] SRV records (the lowest priority first, then the
//! highest weight, then the lowest target name), at most [`MAX_ADDRS_PER_NAME`] addresses of
//! each name (the lowest) and yields at most [`MAX_ENDPOINTS`]
//! endpoints (the lowest addresses). Going over a limit is warned about once; the round
//! still succeeds with that deterministic subset.
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
//! A failed lookup — a timeout, SERVFAIL, REFUSED, a referral or any other error — keeps the
//! last good set, is logged with `tracing::warn!` (once per distinct reason) and is retried
//! after the floor. The first resolution is no different: the source is created without
//! waiting for DNS, and the stream stays silent until a lookup succeeds.
//!
//! NXDOMAIN is a failure at first, so that a transient one (a zone being reloaded) changes
//! nothing; once the name has answered NXDOMAIN in every round for at least two rounds and
//! the [NXDOMAIN grace](DnsDiscoveryBuilder::nxdomain_grace) (default 30 s), the set becomes
//! empty, as Envoy does at once: a Kubernetes headless service with no ready endpoint
//! answers NXDOMAIN, and its old pod addresses are soon reused.
//!
//! A *successful* empty answer ("NODATA": NOERROR with no records of the type asked, and an
//! SOA in the authority section or at least no NS records there, RFC 2308 §2.2) is honoured:
//! the name exists and says it has no addresses, so the set becomes empty. A NOERROR answer
//! with no records, NS records and no SOA is a referral or a lame server, not an answer: a
//! failure. While the set is empty, the name is asked again after the floor, doubling each
//! round up to the SOA's negative TTL (within the floor and the ceiling).
//!
//! For SRV, a target that fails to resolve keeps the addresses it had in the last round (or
//! is skipped if it never resolved) so that one broken target does not freeze the others;
//! its failure is logged once per target and reason. When a target of a priority that was
//! resolved (the one in use, or a lower one that had no address) failed, the next round
//! comes after the floor; a backup that was not needed is not resolved, so cannot pin it.
//!
//! # Resolver
//!
//! Either explicit name servers ([`name_server`](DnsDiscoveryBuilder::name_server), UDP
//! with TCP fallback for truncated answers) or, by default, the `nameserver` lines of
//! `/etc/resolv.conf` (read when the source is built, port 53). The `search` and `ndots`
//! settings are not applied: names are always absolute. `/etc/hosts` is not consulted.
//!
//! With several name servers, hickory's pool asks them (two at once) and takes the first
//! answer; a SERVFAIL or REFUSED would end the lookup even when another server is healthy,
//! so such an answer is asked again of each server in turn, in the order given, and the
//! first other answer is used.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_core::Stream;
use futures_util::{StreamExt, stream};
use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::lookup::Lookup;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError, NoRecords};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_resolver::{Resolver, TokioResolver};
use tokio::sync::mpsc;
use tokio::time;

use super::{Change, DiscoverError, EndpointSet, MAX_ENDPOINTS, Updates};
use crate::endpoint::{Endpoint, unusable_ip};
use crate::identity::SpiffeId;

/// Default lower bound of the re-resolution interval.
pub const DEFAULT_TTL_FLOOR: Duration = Duration::from_secs(5);
/// Default upper bound of the re-resolution interval.
pub const DEFAULT_TTL_CEILING: Duration = Duration::from_secs(300);
/// Default timeout of one DNS query (hickory's, as resolv.conf's).
pub const DEFAULT_QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// Default time a name must keep answering NXDOMAIN (over two rounds at least) before its
/// endpoints are removed.
pub const DEFAULT_NXDOMAIN_GRACE: Duration = Duration::from_secs(30);
/// At most this many SRV records are used per round: those of the lowest priority, then
/// the highest weight, then the lowest target name.
pub const MAX_SRV_RECORDS: usize = 256;
/// At most this many addresses of one name are used: the lowest.
pub const MAX_ADDRS_PER_NAME: usize = 512;
/// At most this many SRV targets are resolved at once.
const MAX_CONCURRENT_TARGETS: usize = 16;
/// A SRV record's weight is multiplied by this before being split across its target's
/// addresses.
const WEIGHT_SCALE: u32 = 1000;

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
/// - `nxdomain_grace`: 30 s.
/// - no identity, no zone.
#[derive(Clone, Debug)]
pub struct DnsDiscoveryBuilder {
    query: QuerySpec,
    name_servers: Vec<SocketAddr>,
    ttl_floor: Duration,
    ttl_ceiling: Duration,
    query_timeout: Duration,
    nxdomain_grace: Duration,
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
            nxdomain_grace: DEFAULT_NXDOMAIN_GRACE,
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

    /// How long the name must keep answering NXDOMAIN, over two rounds at least, before
    /// its endpoints are removed (default 30 s). A shorter NXDOMAIN keeps the last set.
    pub fn nxdomain_grace(mut self, grace: Duration) -> Self {
        self.nxdomain_grace = grace;
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
        if let Some(server) = self.name_servers.iter().find(|s| match s {
            SocketAddr::V6(v6) => v6.ip().is_unicast_link_local(),
            SocketAddr::V4(_) => false,
        }) {
            return Err(error(format!(
                "name server {server} is link-local, which the DNS client cannot reach (it takes no interface)"
            )));
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
        let resolver = Resolvers::new(&name_servers, self.query_timeout)
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
            nxdomain_grace: self.nxdomain_grace,
            set: EndpointSet::new(),
            target_addrs: HashMap::new(),
            last_error: None,
            half_failed: None,
            nxdomain: None,
            empty_wait: None,
            target_errors: HashMap::new(),
            warned: HashSet::new(),
            tx,
        };
        runtime.spawn(task.run());
        Ok(DnsDiscovery { updates })
    }
}

/// The resolvers of a source: one pool over all its name servers and, when there are
/// several, one resolver per server. hickory's pool gives up on the first SERVFAIL or
/// REFUSED it gets, even when it comes from one broken server among healthy ones, so such
/// an answer is asked again of each server in turn, in the order given, and the first other
/// answer wins.
#[derive(Clone)]
struct Resolvers {
    pool: TokioResolver,
    each: Vec<TokioResolver>,
}

impl Resolvers {
    fn new(servers: &[SocketAddr], timeout: Duration) -> Result<Self, NetError> {
        let pool = build_resolver(servers, timeout)?;
        let each = if servers.len() > 1 {
            servers
                .iter()
                .map(|s| build_resolver(std::slice::from_ref(s), timeout))
                .collect::<Result<_, _>>()?
        } else {
            Vec::new()
        };
        Ok(Self { pool, each })
    }

    fn clear_cache(&self) {
        self.pool.clear_cache();
        for r in &self.each {
            r.clear_cache();
        }
    }

    async fn lookup(&self, name: &Name, rtype: RecordType) -> Result<Lookup, NetError> {
        let is_server_failure = |r: &Result<Lookup, NetError>| {
            matches!(
                r,
                Err(NetError::Dns(DnsError::ResponseCode(
                    ResponseCode::ServFail | ResponseCode::Refused
                )))
            )
        };
        let result = self.pool.lookup(name.clone(), rtype).await;
        if !is_server_failure(&result) {
            return result;
        }
        for resolver in &self.each {
            let other = resolver.lookup(name.clone(), rtype).await;
            if !is_server_failure(&other) {
                return other;
            }
        }
        result
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
            // An IPv6 address may carry a `%interface` scope, which the DNS client cannot
            // take: a link-local server is left out (every query to it would fail), said.
            let addr = words.next()?.split('%').next()?;
            let ip: IpAddr = addr.parse().ok()?;
            if let IpAddr::V6(v6) = ip
                && v6.is_unicast_link_local()
            {
                tracing::warn!(name_server = %ip, "{RESOLV_CONF}: a link-local name server is left out (the DNS client cannot carry its interface)");
                return None;
            }
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

/// The endpoints of `records`, given each target's addresses: those of the lowest
/// priority with an address (RFC 2782), weighted as [`weighted_endpoints`] says.
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

/// The endpoints of one priority's records: one per address and record. A record's weight,
/// scaled by [`WEIGHT_SCALE`], is split evenly across its target's addresses, so that a
/// target with many addresses gets no more traffic than its weight says. Where some record
/// of the priority has a weight above 0, a weight of 0 becomes 1 while the others are
/// scaled to at least 1,000: such targets get a very small share, as RFC 2782 asks; where
/// all weights are 0 they are equal. Weights of equal addresses add. An address repeated in
/// one target's answer counts once (an RRset has no duplicates, RFC 2181 §5, but a server
/// may send them).
fn weighted_endpoints<'r>(
    records: impl Iterator<Item = &'r SrvRecord> + Clone,
    addrs: &HashMap<Name, Vec<IpAddr>>,
    template: &Template,
) -> EndpointSet {
    let any_weight = records.clone().any(|r| r.weight > 0);
    let mut weights: BTreeMap<SocketAddr, u32> = BTreeMap::new();
    for r in records {
        let ips: BTreeSet<&IpAddr> = addrs.get(&r.target).into_iter().flatten().collect();
        if ips.is_empty() {
            continue;
        }
        let weight = match r.weight {
            0 if any_weight => 1,
            0 => WEIGHT_SCALE,
            w => u32::from(w).saturating_mul(WEIGHT_SCALE),
        };
        let share = (weight / u32::try_from(ips.len()).unwrap_or(u32::MAX)).max(1);
        for ip in ips {
            let w = weights.entry(SocketAddr::new(*ip, r.port)).or_default();
            *w = w.saturating_add(share);
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

/// Why a lookup gave no answer.
#[derive(Debug)]
struct Failure {
    /// The name does not exist (NXDOMAIN), as opposed to a timeout, SERVFAIL, a referral...
    nxdomain: bool,
    reason: String,
}

impl Failure {
    fn other(reason: impl Into<String>) -> Self {
        Self {
            nxdomain: false,
            reason: reason.into(),
        }
    }
}

/// At most this many CNAMEs are followed from the name asked.
const MAX_CNAME_CHAIN: usize = 8;

/// The records of `answers` that answer `rtype` for `name`: of class IN, owned by `name` or
/// by a name the CNAME chain from `name` leads to, and their shortest TTL (the CNAMEs of the
/// chain included). A server may put anything in its answer section; records of other
/// names must never become endpoints.
fn answer_records<'a>(
    answers: &'a [Record],
    name: &Name,
    rtype: RecordType,
) -> (Vec<&'a Record>, Option<u32>) {
    let in_class = |r: &&Record| r.dns_class == DNSClass::IN;
    let mut chain = vec![name];
    let mut ttl: Option<u32> = None;
    while chain.len() <= MAX_CNAME_CHAIN {
        let Some(owner) = chain.last() else { break };
        let next = answers.iter().filter(in_class).find_map(|r| match &r.data {
            RData::CNAME(target) if r.name == **owner => Some((&target.0, r.ttl)),
            _ => None,
        });
        match next {
            Some((target, t)) if !chain.contains(&target) => {
                ttl = Some(ttl.map_or(t, |m| m.min(t)));
                chain.push(target);
            }
            _ => break,
        }
    }
    let records: Vec<&Record> = answers
        .iter()
        .filter(in_class)
        .filter(|r| r.record_type() == rtype && chain.contains(&&r.name))
        .collect();
    if records.is_empty() {
        return (records, None);
    }
    for r in &records {
        ttl = Some(ttl.map_or(r.ttl, |m| m.min(r.ttl)));
    }
    (records, ttl)
}

/// The negative TTL an SOA in `authorities` gives (RFC 2308 §5: the smaller of its TTL and
/// its minimum field), if there is an SOA.
fn negative_ttl(authorities: &[Record]) -> Option<Duration> {
    authorities.iter().find_map(|r| match &r.data {
        RData::SOA(soa) => Some(Duration::from_secs(r.ttl.min(soa.minimum).into())),
        _ => None,
    })
}

/// Looks up `name`'s records of `rtype`, mapping each with `f`.
///
/// A NODATA answer (NOERROR, no records of the type asked, and an SOA in the authority
/// section or at least no NS there, RFC 2308 §2.2) is an empty answer. A NOERROR answer with
/// no records but NS records and no SOA is a referral or a lame server, not an answer: an
/// error, as is NXDOMAIN and any other failure.
async fn lookup<T>(
    resolver: &Resolvers,
    name: &Name,
    rtype: RecordType,
    f: impl Fn(&RData) -> Option<T>,
) -> Result<Answer<T>, Failure> {
    let nxdomain = |e: &dyn std::fmt::Display| Failure {
        nxdomain: true,
        reason: e.to_string(),
    };
    match resolver.lookup(name, rtype).await {
        Ok(lookup) => {
            let (records, ttl) = answer_records(lookup.answers(), name, rtype);
            if !records.is_empty() {
                let items = records.iter().filter_map(|r| f(&r.data)).collect();
                return Ok((items, ttl.map(|s| Duration::from_secs(s.into()))));
            }
            // Answers, but none for this name and type (a CNAME chain that ends in NODATA,
            // or records of other names only).
            let message = lookup.message();
            if message.response_code == ResponseCode::NXDomain {
                return Err(nxdomain(&format!(
                    "no record found for {name} {rtype}: NXDOMAIN"
                )));
            }
            match negative_ttl(lookup.authorities()) {
                Some(ttl) if message.response_code == ResponseCode::NoError => {
                    Ok((Vec::new(), Some(ttl)))
                }
                _ => Err(Failure::other(format!(
                    "the answer ({}) holds no {rtype} record for {name}",
                    message.response_code
                ))),
            }
        }
        Err(NetError::Dns(DnsError::NoRecordsFound(NoRecords {
            response_code: ResponseCode::NoError,
            negative_ttl,
            soa,
            ns,
            ..
        }))) => {
            if soa.is_none() && ns.is_some() {
                return Err(Failure::other(format!(
                    "the answer for {name} {rtype} is a referral (NS records and no SOA in \
                     its authority section): the name server is not authoritative for it"
                )));
            }
            Ok((
                Vec::new(),
                negative_ttl.map(|s| Duration::from_secs(s.into())),
            ))
        }
        Err(
            e @ NetError::Dns(DnsError::NoRecordsFound(NoRecords {
                response_code: ResponseCode::NXDomain,
                ..
            })),
        ) => Err(nxdomain(&e)),
        Err(e) => Err(Failure::other(e.to_string())),
    }
}

/// The A and AAAA addresses of `name` and their shortest TTL, and whether one family's
/// lookup failed (`Some` reason). A failed family keeps its addresses from `previous`,
/// the last good answer: a resolver that answers A but drops or refuses AAAA (some
/// firewalls and DNS proxies do) must not leave the name without endpoints, nor take
/// away the addresses of the family that did not answer this time. Both failing is an
/// error, NXDOMAIN if both say so.
///
/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are taken as the IPv4 address; the result
/// is sorted, without duplicates.
async fn lookup_ips(resolver: &Resolvers, name: &Name, previous: &[IpAddr]) -> LookupIps {
    let (v4, v6) = tokio::join!(
        lookup(resolver, name, RecordType::A, |d| match d {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            _ => None,
        }),
        lookup(resolver, name, RecordType::AAAA, |d| match d {
            RData::AAAA(a) => Some(IpAddr::V6(a.0).to_canonical()),
            _ => None,
        }),
    );
    let kept = |v6: bool| {
        previous
            .iter()
            .filter(move |ip| ip.is_ipv6() == v6)
            .copied()
    };
    let (mut ips, ttl, partial) = match (v4, v6) {
        (Ok((mut ips, ttl4)), Ok((ips6, ttl6))) => {
            ips.extend(ips6);
            (ips, min_ttl(ttl4, ttl6), None)
        }
        (Ok((mut ips, ttl)), Err(e)) => {
            ips.extend(kept(true));
            (ips, ttl, Some(format!("AAAA lookup failed: {}", e.reason)))
        }
        (Err(e), Ok((ips6, ttl))) => {
            let mut ips: Vec<IpAddr> = kept(false).collect();
            ips.extend(ips6);
            (ips, ttl, Some(format!("A lookup failed: {}", e.reason)))
        }
        (Err(e4), Err(e6)) => {
            return Err(Failure {
                nxdomain: e4.nxdomain && e6.nxdomain,
                reason: format!(
                    "A lookup failed: {}; AAAA lookup failed: {}",
                    e4.reason, e6.reason
                ),
            });
        }
    };
    ips.sort_unstable();
    ips.dedup();
    Ok((ips, ttl, partial))
}

fn min_ttl(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Sorts `records` by priority (lowest first), then weight (highest first), then target and
/// port, and keeps the first [`MAX_SRV_RECORDS`]; true if some were dropped.
fn cap_srv_records(records: &mut Vec<SrvRecord>) -> bool {
    records.sort_unstable_by(|a, b| {
        (a.priority, std::cmp::Reverse(a.weight), &a.target, a.port).cmp(&(
            b.priority,
            std::cmp::Reverse(b.weight),
            &b.target,
            b.port,
        ))
    });
    let capped = records.len() > MAX_SRV_RECORDS;
    records.truncate(MAX_SRV_RECORDS);
    capped
}

/// [`lookup_ips`] of one SRV target, owning what it needs so that several run at once.
async fn lookup_target(
    resolver: Resolvers,
    target: Name,
    previous: Vec<IpAddr>,
) -> (Name, LookupIps) {
    let result = lookup_ips(&resolver, &target, &previous).await;
    (target, result)
}

/// What [`lookup_ips`] returns.
type LookupIps = Result<(Vec<IpAddr>, Option<Duration>, Option<String>), Failure>;

/// The background task: resolves, sends diffs, sleeps until the TTL expires.
struct ResolveTask {
    display: String,
    query: Query,
    resolver: Resolvers,
    template: Template,
    floor: Duration,
    ceiling: Duration,
    nxdomain_grace: Duration,
    /// The last endpoints sent.
    set: EndpointSet,
    /// The addresses each SRV target had when it last resolved.
    target_addrs: HashMap<Name, Vec<IpAddr>>,
    /// The last failure logged, so that a persisting failure is logged once.
    last_error: Option<String>,
    /// Why the last round's lookup of one address family failed, if it did.
    half_failed: Option<String>,
    /// Since when, and for how many rounds in a row, the name has been NXDOMAIN.
    nxdomain: Option<(time::Instant, u32)>,
    /// The wait after the last round, while the set is empty: it doubles from the floor.
    empty_wait: Option<Duration>,
    /// The last failure logged for each SRV target, so that it is logged once.
    target_errors: HashMap<Name, String>,
    /// Warnings given once (a cap reached, an unusable address).
    warned: HashSet<String>,
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
                Ok((mut set, ttl)) => {
                    self.nxdomain = None;
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
                    let total = set.len();
                    if set.truncate(MAX_ENDPOINTS) {
                        self.warn_once(format!(
                            "{total} endpoints, more than the {MAX_ENDPOINTS} a source may have; \
                             using the {MAX_ENDPOINTS} lowest addresses"
                        ));
                    }
                    let changes = self.set.diff(&set);
                    self.set = set;
                    tracing::debug!(name = %self.display, changes = changes.len(), ?ttl, "resolved");
                    if !changes.is_empty() && self.tx.send(changes).await.is_err() {
                        return;
                    }
                    let wait = clamp_ttl(ttl, self.floor, self.ceiling);
                    if self.set.is_empty() {
                        // No endpoints at all: ask again soon, backing off toward the TTL.
                        let next = self
                            .empty_wait
                            .map_or(self.floor, |w| w.saturating_mul(2))
                            .min(wait);
                        self.empty_wait = Some(next);
                        next
                    } else {
                        self.empty_wait = None;
                        wait
                    }
                }
                Err(failure) => {
                    if self.last_error.as_ref() != Some(&failure.reason) {
                        tracing::warn!(
                            name = %self.display,
                            endpoints = self.set.len(),
                            "DNS lookup failed: {}; keeping the last good endpoints{}",
                            failure.reason,
                            if failure.nxdomain { " until the name has been missing for the NXDOMAIN grace" } else { "" },
                        );
                        self.last_error = Some(failure.reason);
                    }
                    if failure.nxdomain {
                        if self.nxdomain_persists() && !self.set.is_empty() {
                            tracing::warn!(
                                name = %self.display,
                                endpoints = self.set.len(),
                                grace = ?self.nxdomain_grace,
                                "the name has not existed (NXDOMAIN) for the grace period; \
                                 removing its endpoints"
                            );
                            let changes = self.set.diff(&EndpointSet::new());
                            self.set = EndpointSet::new();
                            if self.tx.send(changes).await.is_err() {
                                return;
                            }
                        }
                    } else {
                        self.nxdomain = None;
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

    /// Counts one more NXDOMAIN round; true once they have lasted at least two rounds and
    /// the grace period.
    fn nxdomain_persists(&mut self) -> bool {
        let now = time::Instant::now();
        let (since, rounds) = self.nxdomain.get_or_insert((now, 0));
        *rounds = rounds.saturating_add(1);
        *rounds >= 2 && now.duration_since(*since) >= self.nxdomain_grace
    }

    /// Logs `message` with `tracing::warn!` unless it was logged before.
    fn warn_once(&mut self, message: String) {
        if self.warned.len() < MAX_ENDPOINTS && !self.warned.contains(&message) {
            tracing::warn!(name = %self.display, "{message}");
            self.warned.insert(message);
        }
    }

    /// Keeps at most [`MAX_ADDRS_PER_NAME`] of `name`'s sorted addresses, and only those
    /// that can be an endpoint's, warning once about the others.
    fn usable_addrs(&mut self, name: &Name, ips: &mut Vec<IpAddr>) {
        if ips.len() > MAX_ADDRS_PER_NAME {
            self.warn_once(format!(
                "{name} has {} addresses, more than the {MAX_ADDRS_PER_NAME} a name may have; \
                 using the {MAX_ADDRS_PER_NAME} lowest",
                ips.len()
            ));
            ips.truncate(MAX_ADDRS_PER_NAME);
        }
        let mut unusable = Vec::new();
        ips.retain(|ip| match unusable_ip(*ip) {
            Some(why) => {
                unusable.push(format!("{name} resolved to {ip}, {why}; skipping it"));
                false
            }
            None => true,
        });
        for message in unusable {
            self.warn_once(message);
        }
    }

    /// One round: the full endpoint set and when to resolve again.
    async fn resolve(&mut self) -> Result<(EndpointSet, Option<Duration>), Failure> {
        // Our TTL logic decides when to ask again; never answer from hickory's cache.
        self.resolver.clear_cache();
        self.half_failed = None;
        match &self.query {
            Query::Host(name, port) => {
                let (name, port) = (name.clone(), *port);
                let previous: Vec<IpAddr> = self.set.iter().map(|e| e.addr().ip()).collect();
                let (mut ips, ttl, partial) = lookup_ips(&self.resolver, &name, &previous).await?;
                // The failed family is asked again with the other at the TTL: a resolver
                // that always drops AAAA would otherwise be asked at the floor for good.
                self.half_failed = partial;
                self.usable_addrs(&name, &mut ips);
                let set = ips
                    .into_iter()
                    .map(|ip| {
                        self.template
                            .endpoint(SocketAddr::new(ip, port), NonZeroU32::MIN)
                    })
                    .collect();
                Ok((set, ttl))
            }
            Query::Srv(name) => {
                let name = name.clone();
                self.resolve_srv(&name).await
            }
        }
    }

    /// One SRV round: the records, then the targets of each priority in turn, lowest
    /// first, until one priority has addresses (RFC 2782).
    async fn resolve_srv(
        &mut self,
        name: &Name,
    ) -> Result<(EndpointSet, Option<Duration>), Failure> {
        let (mut records, mut ttl) = lookup(&self.resolver, name, RecordType::SRV, |d| match d {
            RData::SRV(srv) if !srv.target.is_root() => Some(SrvRecord {
                target: srv.target.clone(),
                port: srv.port,
                weight: srv.weight,
                priority: srv.priority,
            }),
            _ => None,
        })
        .await?;
        let total = records.len();
        if cap_srv_records(&mut records) {
            self.warn_once(format!(
                "{total} SRV records, more than the {MAX_SRV_RECORDS} a round uses; using those \
                 of the lowest priority, then the highest weight"
            ));
        }
        let mut port_zero = Vec::new();
        records.retain(|r| {
            if r.port == 0 {
                port_zero.push(format!("SRV target {} has port 0; skipping it", r.target));
            }
            r.port != 0
        });
        for message in port_zero {
            self.warn_once(message);
        }

        let priorities: BTreeSet<u16> = records.iter().map(|r| r.priority).collect();
        let mut addrs: HashMap<Name, Vec<IpAddr>> = HashMap::new();
        let mut degraded = false;
        let mut set = EndpointSet::new();
        for priority in priorities {
            let targets: BTreeSet<&Name> = records
                .iter()
                .filter(|r| r.priority == priority && !addrs.contains_key(&r.target))
                .map(|r| &r.target)
                .collect();
            let lookups: Vec<_> = targets
                .into_iter()
                .map(|target| {
                    let kept = self.target_addrs.get(target).cloned().unwrap_or_default();
                    lookup_target(self.resolver.clone(), target.clone(), kept)
                })
                .collect();
            let mut results: Vec<_> = stream::iter(lookups)
                .buffer_unordered(MAX_CONCURRENT_TARGETS)
                .collect()
                .await;
            // In target order, so that what is logged does not depend on which answered first.
            results.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            for (target, result) in results {
                let target = &target;
                match result {
                    Ok((mut ips, t, partial)) => {
                        if let Some(reason) = partial {
                            self.half_failed = Some(format!("target {target}: {reason}"));
                        }
                        self.target_errors.remove(target);
                        self.usable_addrs(target, &mut ips);
                        ttl = min_ttl(ttl, t);
                        addrs.insert(target.clone(), ips);
                    }
                    Err(e) => {
                        // A target of this priority failed: ask again at the floor.
                        degraded = true;
                        let previous = self.target_addrs.get(target).cloned();
                        if self.target_errors.get(target) != Some(&e.reason) {
                            tracing::warn!(
                                name = %self.display,
                                target = %target,
                                "resolving SRV target failed: {}; {}",
                                e.reason,
                                if previous.is_some() { "keeping its last addresses" } else { "skipping it" }
                            );
                            self.target_errors.insert(target.clone(), e.reason);
                        }
                        addrs.insert(target.clone(), previous.unwrap_or_default());
                    }
                }
            }
            set = weighted_endpoints(
                records.iter().filter(|r| r.priority == priority),
                &addrs,
                &self.template,
            );
            if !set.is_empty() {
                break;
            }
        }
        // Forget the targets no longer asked for.
        self.target_errors.retain(|t, _| addrs.contains_key(t));
        if degraded {
            ttl = Some(self.floor);
        }
        self.target_addrs = addrs;
        Ok((set, ttl))
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
        assert_eq!(got, [("10.0.0.1:80".to_owned(), 7000)]);
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
        assert_eq!(
            weights(&set),
            [
                // (10 + 5) * 1000, split across a's two addresses.
                ("10.0.0.1:8080".to_owned(), 7500),
                // Weight 0 beside weights above 0: the smallest share.
                ("10.0.0.2:9090".to_owned(), 1),
                ("[fd00::1]:8080".to_owned(), 7500),
            ]
        );
        assert!(set.iter().all(|ep| ep.zone() == Some("z1")
            && ep.identity().map(ToString::to_string).as_deref()
                == Some("spiffe://example.org/users")));
    }

    fn weights(set: &EndpointSet) -> Vec<(String, u32)> {
        set.iter()
            .map(|ep| (ep.addr().to_string(), ep.weight().get()))
            .collect()
    }

    /// A record's weight is split across its addresses, so that a target with many
    /// addresses gets the share its weight says, not that times its address count; weight
    /// 0 is far below weight 1, and all-zero weights are equal.
    #[test]
    fn a_records_weight_is_split_across_its_addresses() {
        let (many, one) = (name("many.example.org."), name("one.example.org."));
        let record = |target: &Name, weight| SrvRecord {
            target: target.clone(),
            port: 80,
            weight,
            priority: 0,
        };
        let addrs = HashMap::from([
            (
                many.clone(),
                (1..=4)
                    .map(|i| IpAddr::from([10, 0, 0, i]))
                    .collect::<Vec<_>>(),
            ),
            (one.clone(), vec![IpAddr::from([10, 0, 1, 1])]),
        ]);
        let set = srv_endpoints(
            &[record(&many, 1), record(&one, 1)],
            &addrs,
            &Template::default(),
        );
        let total = |prefix: &str| -> u32 {
            weights(&set)
                .iter()
                .filter(|(a, _)| a.starts_with(prefix))
                .map(|(_, w)| w)
                .sum()
        };
        assert_eq!(total("10.0.0."), 1000);
        assert_eq!(total("10.0.1."), 1000);

        let set = srv_endpoints(
            &[record(&many, 0), record(&one, 1)],
            &addrs,
            &Template::default(),
        );
        assert_eq!(weights(&set)[0], ("10.0.0.1:80".to_owned(), 1));
        assert_eq!(weights(&set)[4], ("10.0.1.1:80".to_owned(), 1000));

        let set = srv_endpoints(
            &[record(&many, 0), record(&one, 0)],
            &addrs,
            &Template::default(),
        );
        assert_eq!(weights(&set)[0], ("10.0.0.1:80".to_owned(), 250));
        assert_eq!(weights(&set)[4], ("10.0.1.1:80".to_owned(), 1000));
    }

    #[test]
    fn srv_records_are_capped_lowest_priority_then_highest_weight_first() {
        let mut records: Vec<SrvRecord> = (0..600u16)
            .map(|i| SrvRecord {
                target: name(&format!("t{i}.example.org.")),
                port: 80,
                weight: i % 7,
                priority: i % 3,
            })
            .collect();
        assert!(cap_srv_records(&mut records));
        assert_eq!(records.len(), MAX_SRV_RECORDS);
        // All 200 of priority 0, then the heaviest of priority 1.
        assert_eq!(records.iter().filter(|r| r.priority == 0).count(), 200);
        assert!(
            records[200..]
                .iter()
                .all(|r| r.priority == 1 && r.weight >= 5)
        );
        assert_eq!(records[200].weight, 6);
        assert!(
            records[..200]
                .windows(2)
                .all(|w| w[0].weight >= w[1].weight)
        );
        assert!(
            records[200..]
                .windows(2)
                .all(|w| w[0].weight >= w[1].weight)
        );
        let mut few = records[..3].to_vec();
        assert!(!cap_srv_records(&mut few));
    }

    fn record(owner: &str, ttl: u32, data: RData) -> Record {
        Record::from_rdata(name(owner), ttl, data)
    }

    /// Only records of the name asked, or of the CNAME chain from it, of class IN and of
    /// the type asked, are the answer; the TTL is theirs.
    #[test]
    fn answer_records_follow_the_cname_chain_from_the_name_asked() {
        use hickory_resolver::proto::rr::rdata::{A, CNAME};
        let a = |ip: [u8; 4]| RData::A(A(ip.into()));
        let cname = |to: &str| RData::CNAME(CNAME(name(to)));
        let mut chaos = record("users.example.org.", 1, a([10, 0, 0, 8]));
        chaos.dns_class = DNSClass::CH;
        let answers = [
            record("users.example.org.", 60, cname("lb.example.org.")),
            record("lb.example.org.", 30, a([10, 0, 0, 7])),
            record("evil.test.", 1, a([6, 6, 6, 6])),
            // Not in the chain: a CNAME of another name.
            record("other.example.org.", 1, cname("evil.test.")),
            chaos,
        ];
        let (records, ttl) = answer_records(&answers, &name("users.example.org."), RecordType::A);
        let ips: Vec<&RData> = records.iter().map(|r| &r.data).collect();
        assert_eq!(ips, [&a([10, 0, 0, 7])]);
        assert_eq!(ttl, Some(30));

        // A CNAME loop ends.
        let looped = [
            record("x.example.org.", 5, cname("y.example.org.")),
            record("y.example.org.", 5, cname("x.example.org.")),
        ];
        let (records, ttl) = answer_records(&looped, &name("x.example.org."), RecordType::A);
        assert!(records.is_empty());
        assert_eq!(ttl, None);
    }

    #[test]
    fn unusable_addresses() {
        for bad in ["0.0.0.0", "::", "224.0.0.1", "ff02::1", "255.255.255.255"] {
            assert!(unusable_ip(bad.parse().unwrap()).is_some(), "{bad}");
        }
        for good in ["10.0.0.1", "fd00::1", "127.0.0.1"] {
            assert!(unusable_ip(good.parse().unwrap()).is_none(), "{good}");
        }
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
            ["10.0.0.53:53".parse::<SocketAddr>().unwrap()]
        );
    }
}
