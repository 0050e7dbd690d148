//! The semantic rules of a configuration, checked all at once.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use super::*;

/// Why `access_log` is refused on an opaque listener.
const ACCESS_LOG_OPAQUE: &str = "opaque listeners relay bytes, not requests: there is nothing to log per request (use it on an HTTP or `auto` listener)";

/// The most header fields a listener may be told to take (HAProxy's own ceiling).
const MAX_HEADERS_LIMIT: u64 = 32_767;

/// The largest header block a listener may be told to take: 1 MiB (HTTP/1.1 read buffers
/// grow to it, for every connection).
const MAX_HEADER_LIST_SIZE_LIMIT: u64 = 1 << 20;

/// The most connections a listener may be told to hold open.
const MAX_CONNECTIONS_LIMIT: u64 = 10_000_000;

/// Why `pool` is refused on an opaque listener or service.
const POOL_OPAQUE: &str = "bounds HTTP/1.1 connections, and opaque TCP relays each connection as it comes: remove it (an opaque listener bounds its connections with `limits.max_connections`)";

/// Why a request setting is refused on an opaque service.
const SERVICE_SETTING_OPAQUE: &str = "a setting for requests, and an opaque service relays connections as bytes: it takes `discovery`, `tls`, `server_identity`, `connect_timeout` and `addresses`";

/// Why an opaque service cannot take HTTP requests.
const OPAQUE_FOR_HTTP: &str =
    "is an opaque service (protocol = \"opaque\"): HTTP requests cannot go to it";

/// Why an HTTP limit is refused on an opaque listener.
const LIMIT_OPAQUE: &str = "an HTTP limit, and opaque listeners relay bytes, not requests: they take `max_connections` and `tunnel_idle_timeout`";

#[derive(Default)]
pub(super) struct Validator {
    errors: Vec<ValidationError>,
}

/// A TOML key as written in a path: bare when it can be, quoted otherwise.
fn key(k: &str) -> String {
    if !k.is_empty()
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        k.to_owned()
    } else {
        format!("{k:?}")
    }
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

fn is_hostname(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Header fields that frame, route or qualify an HTTP message, or speak for its
/// connection: no identity header may take their name.
fn is_reserved_header(name: &http::HeaderName) -> bool {
    use http::header;
    [
        header::CONNECTION,
        header::CONTENT_LENGTH,
        header::CONTENT_TYPE,
        header::CONTENT_ENCODING,
        header::EXPECT,
        header::HOST,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::AUTHORIZATION,
        header::COOKIE,
    ]
    .contains(name)
        || [
            "keep-alive",
            "proxy-connection",
            "mesh-orig-proto",
            "x-mesh-error",
        ]
        .contains(&name.as_str())
        || name.as_str().starts_with("grpc-")
}

impl Validator {
    pub(super) fn finish(self) -> Result<(), Vec<ValidationError>> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(self.errors)
        }
    }

    fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ValidationError {
            path: path.into(),
            message: message.into(),
        });
    }

    fn ratio(&mut self, path: impl Into<String>, value: f64) {
        if !(0.0..=1.0).contains(&value) {
            self.err(path, format!("must be between 0 and 1 (got {value})"));
        }
    }

    /// Refuses the HTTP-only limits of an opaque listener at `path`.
    fn http_limits(&mut self, path: &str, limits: &ListenerLimits) {
        for key in limits.http_only() {
            self.err(format!("{path}.limits.{key}"), LIMIT_OPAQUE);
        }
    }

    fn positive(&mut self, path: impl Into<String>, value: Duration) {
        if value.is_zero() {
            self.err(path, "must be greater than zero");
        }
    }

    fn min_max(
        &mut self,
        path: &str,
        (min_key, min): (&str, Duration),
        (max_key, max): (&str, Duration),
    ) {
        if min > max {
            self.err(
                format!("{path}.{min_key}"),
                format!(
                    "must not exceed {max_key} ({} > {})",
                    humantime::format_duration(min),
                    humantime::format_duration(max)
                ),
            );
        }
    }

    fn name(&mut self, path: impl Into<String>, name: &str) {
        if !is_name(name) {
            self.err(
                path,
                format!("`{name}` is not a valid name: use 1 to 128 ASCII letters, digits, `-`, `_` or `.`"),
            );
        }
    }

    fn name_servers(&mut self, path: &str, servers: &[std::net::SocketAddr]) {
        for (i, addr) in servers.iter().enumerate() {
            if addr.port() == 0 || addr.ip().is_unspecified() {
                self.err(
                    format!("{path}.discovery.name_servers[{i}]"),
                    format!("`{addr}` is not a name server's address (an IP and a port)"),
                );
            } else if let std::net::SocketAddr::V6(v6) = addr
                && v6.ip().is_unicast_link_local()
            {
                // The DNS client sends without the interface (`%eth0`): every query to
                // such a server would fail.
                self.err(
                    format!("{path}.discovery.name_servers[{i}]"),
                    format!(
                        "`{addr}` is link-local, which the DNS client cannot reach (it takes no interface): use the server's global or unique-local address"
                    ),
                );
            }
        }
    }

    fn regex(&mut self, path: impl Into<String>, pattern: &str) {
        if let Err(e) = super::anchored_regex(pattern) {
            let message = e
                .to_string()
                .lines()
                .last()
                .unwrap_or_default()
                .trim()
                .to_owned();
            self.err(path, format!("invalid regex `{pattern}`: {message}"));
        }
    }

    pub(super) fn mesh(&mut self, c: &MeshConfig) {
        if let Some(identity) = &c.identity {
            self.identity(identity);
        }
        if c.zone.as_deref() == Some("") {
            self.err(
                "zone",
                "must not be empty (omit it when the zone is unknown)",
            );
        }
        for (name, svc) in &c.services {
            let path = format!("services.{}", key(name));
            self.name(&path, name);
            self.service(&path, svc, c.identity.is_some());
        }
        let mut route_names = BTreeSet::new();
        for (i, route) in c.routes.iter().enumerate() {
            let path = format!("routes[{i}]");
            if !route_names.insert(route.name.as_str()) {
                self.err(
                    format!("{path}.name"),
                    format!("duplicate route name `{}`", route.name),
                );
            }
            self.route(&path, route, &c.services);
        }
        self.listeners(c);
        self.tcp(&c.tcp);
        for (name, policy) in &c.authorization {
            let path = format!("authorization.{}", key(name));
            self.name(&path, name);
            self.authorization(&path, policy);
        }
        for (name, limit) in &c.rate_limits {
            let path = format!("rate_limits.{}", key(name));
            self.name(&path, name);
            self.rate_limit(&path, limit);
        }
    }

    fn tcp(&mut self, tcp: &TcpConfig) {
        // Linux takes keepalive times in whole seconds, up to MAX_TCP_KEEPIDLE, and would
        // refuse (or round to zero) anything else when the socket is set up.
        let seconds = |v: &mut Self, key: &str, d: Duration, zero_ok: bool| {
            if d.is_zero() && zero_ok {
                return;
            }
            if d.subsec_nanos() != 0 || d.is_zero() || d.as_secs() > MAX_KEEPALIVE_SECS {
                v.err(
                    format!("tcp.{key}"),
                    format!(
                        "must be whole seconds from 1s to {MAX_KEEPALIVE_SECS}s (the kernel's \
                         range for keepalive){}",
                        if zero_ok { ", or 0s for none" } else { "" }
                    ),
                );
            }
        };
        seconds(self, "keepalive_idle", tcp.keepalive_idle, true);
        if tcp.keepalive() {
            seconds(self, "keepalive_interval", tcp.keepalive_interval, false);
            if !(1..=MAX_KEEPALIVE_PROBES).contains(&tcp.keepalive_probes) {
                self.err(
                    "tcp.keepalive_probes",
                    format!("must be from 1 to {MAX_KEEPALIVE_PROBES} (the kernel's range)"),
                );
            }
        }
        // TCP_USER_TIMEOUT is a C int of milliseconds.
        let max_user_timeout = Duration::from_millis(i32::MAX as u64);
        if tcp.user_timeout > max_user_timeout
            || !tcp.user_timeout.subsec_nanos().is_multiple_of(1_000_000)
        {
            self.err(
                "tcp.user_timeout",
                "must be whole milliseconds up to 2147483647ms (about 24 days), or 0s for none",
            );
        }
    }

    fn identity(&mut self, identity: &IdentityConfig) {
        match identity {
            IdentityConfig::Spire {
                socket: Some(socket),
                ..
            } => {
                let ok = socket
                    .strip_prefix("unix://")
                    .or_else(|| socket.strip_prefix("unix:"))
                    .is_some_and(|p| p.starts_with('/') && p.len() > 1)
                    || socket
                        .strip_prefix("tcp://")
                        .is_some_and(|a| a.parse::<SocketAddr>().is_ok());
                if !ok {
                    self.err(
                        "identity.socket",
                        format!("`{socket}` is not a Workload API address: write `unix:///path/to/socket` or `tcp://ip:port`"),
                    );
                }
            }
            IdentityConfig::Spire { socket: None, .. } => {}
            IdentityConfig::Files { cert, key, bundles } => {
                if cert.as_os_str().is_empty() {
                    self.err("identity.cert", "must not be empty");
                }
                if key.as_os_str().is_empty() {
                    self.err("identity.key", "must not be empty");
                }
                if bundles.is_empty() {
                    self.err(
                        "identity.bundles",
                        "needs at least one trust domain's CA bundle",
                    );
                }
            }
        }
    }

    fn service(&mut self, path: &str, s: &ServiceConfig, have_identity: bool) {
        let mut all_static_with_ids = false;
        match &s.discovery {
            DiscoveryConfig::Static { endpoints } => {
                if endpoints.is_empty() {
                    self.err(
                        format!("{path}.discovery.endpoints"),
                        "needs at least one endpoint",
                    );
                }
                let mut seen = BTreeSet::new();
                for (i, ep) in endpoints.iter().enumerate() {
                    if !seen.insert(ep.key()) {
                        self.err(
                            format!("{path}.discovery.endpoints[{i}].addr"),
                            format!("duplicate endpoint address {}", ep.addr()),
                        );
                    }
                }
                all_static_with_ids =
                    !endpoints.is_empty() && endpoints.iter().all(|e| e.identity().is_some());
            }
            DiscoveryConfig::File { path: file } => {
                if file.as_os_str().is_empty() {
                    self.err(format!("{path}.discovery.path"), "must not be empty");
                }
            }
            DiscoveryConfig::Dns {
                host,
                port,
                min_ttl,
                max_ttl,
                name_servers,
                ..
            } => {
                if host.parse::<std::net::IpAddr>().is_ok() {
                    self.err(
                        format!("{path}.discovery.host"),
                        format!(
                            "`{host}` is an address, not a DNS name: list it with kind = \"static\""
                        ),
                    );
                } else if !is_hostname(host) {
                    self.err(
                        format!("{path}.discovery.host"),
                        format!("`{host}` is not a valid DNS name"),
                    );
                }
                if *port == 0 {
                    self.err(format!("{path}.discovery.port"), "must not be 0");
                }
                self.ttls(path, *min_ttl, *max_ttl);
                self.name_servers(path, name_servers);
            }
            DiscoveryConfig::DnsSrv {
                name,
                min_ttl,
                max_ttl,
                name_servers,
                ..
            } => {
                self.name_servers(path, name_servers);
                let mut labels = name.split('.');
                let srv_form = labels
                    .next()
                    .is_some_and(|l| l.starts_with('_') && l.len() > 1)
                    && labels
                        .next()
                        .is_some_and(|l| l.starts_with('_') && l.len() > 1)
                    && labels.next().is_some();
                if !is_hostname(name) || !srv_form {
                    self.err(
                        format!("{path}.discovery.name"),
                        format!("`{name}` is not an SRV name of the form `_service._proto.domain`"),
                    );
                }
                self.ttls(path, *min_ttl, *max_ttl);
            }
        }
        match s.tls {
            TlsMode::Mtls => {
                if !have_identity {
                    self.err(
                        format!("{path}.tls"),
                        "mtls needs an [identity] section; set tls = \"plaintext\" to send in the clear",
                    );
                }
                if s.server_identity.is_none() && !all_static_with_ids {
                    self.err(
                        format!("{path}.server_identity"),
                        "required with tls = \"mtls\": the identity endpoints must present (e.g. \"spiffe://example.org/ns/prod/sa/users\")",
                    );
                }
            }
            TlsMode::Plaintext => {
                if s.server_identity.is_some() {
                    self.err(
                        format!("{path}.server_identity"),
                        "cannot be verified with tls = \"plaintext\"; remove it or use mtls",
                    );
                }
                // An endpoint's pinned identity would be as unchecked: refused alike, so that
                // nobody takes a plaintext service for a verified one.
                if let DiscoveryConfig::Static { endpoints } = &s.discovery {
                    for (i, ep) in endpoints.iter().enumerate() {
                        if ep.identity().is_some() {
                            self.err(
                                format!("{path}.discovery.endpoints[{i}].identity"),
                                "cannot be verified with tls = \"plaintext\"; remove it or use mtls",
                            );
                        }
                    }
                }
            }
        }
        self.positive(format!("{path}.connect_timeout"), s.connect_timeout);
        if s.protocol == Protocol::Opaque {
            if !s.pool.is_default() {
                self.err(format!("{path}.pool"), POOL_OPAQUE);
            }
            // What judges and steers requests: an opaque service relays connections, and
            // would take these without a word and do nothing with them.
            for (key, set) in [
                ("balancer", s.balancer != BalancerConfig::default()),
                ("retry", s.retry != RetryConfig::default()),
                ("timeout", s.timeout != TimeoutConfig::default()),
                (
                    "circuit_breaker",
                    s.circuit_breaker != BreakerConfig::default(),
                ),
                (
                    "rate_limited",
                    s.rate_limited != RateLimitedConfig::default(),
                ),
                (
                    "classification",
                    s.classification != ClassificationConfig::default(),
                ),
                ("zone", s.zone != ZoneConfig::default()),
            ] {
                if set {
                    self.err(format!("{path}.{key}"), SERVICE_SETTING_OPAQUE);
                }
            }
        } else {
            self.pool(&format!("{path}.pool"), &s.pool);
        }
        self.positive(
            format!("{path}.balancer.default_rtt"),
            s.balancer.default_rtt,
        );
        self.positive(format!("{path}.balancer.decay"), s.balancer.decay);
        self.retry(&format!("{path}.retry"), &s.retry);
        self.timeout(&format!("{path}.timeout"), &s.timeout);
        self.breaker(&format!("{path}.circuit_breaker"), &s.circuit_breaker);
        let rl = &s.rate_limited;
        self.min_max(
            &format!("{path}.rate_limited"),
            ("default_penalty", rl.default_penalty),
            ("max_penalty", rl.max_penalty),
        );
        if !(s.zone.load_band >= 1.0 && s.zone.load_band.is_finite()) {
            self.err(
                format!("{path}.zone.load_band"),
                format!("must be a number of at least 1 (got {})", s.zone.load_band),
            );
        }
    }

    fn pool(&mut self, path: &str, p: &PoolConfig) {
        if !(1..=MAX_POOL_LIMIT).contains(&p.max_connections) {
            self.err(
                format!("{path}.max_connections"),
                format!("must be between 1 and {MAX_POOL_LIMIT}"),
            );
        }
        if p.max_pending > MAX_POOL_LIMIT {
            self.err(
                format!("{path}.max_pending"),
                format!("at most {MAX_POOL_LIMIT} (0: no request waits)"),
            );
        }
        self.positive(format!("{path}.idle_timeout"), p.idle_timeout);
    }

    fn ttls(&mut self, path: &str, min: Duration, max: Duration) {
        self.positive(format!("{path}.discovery.min_ttl"), min);
        self.min_max(
            &format!("{path}.discovery"),
            ("min_ttl", min),
            ("max_ttl", max),
        );
    }

    fn retry(&mut self, path: &str, r: &RetryConfig) {
        if r.max_retries > 10 {
            self.err(
                format!("{path}.max_retries"),
                format!("must be at most 10 (got {})", r.max_retries),
            );
        }
        self.ratio(format!("{path}.budget.ratio"), r.budget.ratio);
        if !(Duration::from_secs(1)..=Duration::from_secs(60)).contains(&r.budget.ttl) {
            self.err(
                format!("{path}.budget.ttl"),
                format!(
                    "must be between 1s and 60s (got {})",
                    humantime::format_duration(r.budget.ttl)
                ),
            );
        }
        if r.max_replay_body > 16 << 20 {
            self.err(
                format!("{path}.max_replay_body"),
                "must be at most 16 MiB (16777216)",
            );
        }
        self.backoff(&format!("{path}.backoff"), &r.backoff);
    }

    fn backoff(&mut self, path: &str, b: &BackoffConfig) {
        self.positive(format!("{path}.min"), b.min);
        self.min_max(path, ("min", b.min), ("max", b.max));
        self.ratio(format!("{path}.jitter"), b.jitter);
    }

    fn timeout(&mut self, path: &str, t: &TimeoutConfig) {
        if let Some(d) = t.request {
            self.positive(format!("{path}.request"), d);
        }
        if let Some(d) = t.per_try {
            self.positive(format!("{path}.per_try"), d);
        }
        if let (Some(request), Some(per_try)) = (t.request, t.per_try) {
            self.min_max(path, ("per_try", per_try), ("request", request));
        }
    }

    fn breaker(&mut self, path: &str, b: &BreakerConfig) {
        if b.consecutive_failures == 0 {
            self.err(format!("{path}.consecutive_failures"), "must be at least 1");
        }
        if let Some(sr) = &b.success_rate {
            self.ratio(format!("{path}.success_rate.threshold"), sr.threshold);
            self.positive(format!("{path}.success_rate.window"), sr.window);
            if sr.min_requests == 0 {
                self.err(
                    format!("{path}.success_rate.min_requests"),
                    "must be at least 1",
                );
            }
        }
        self.backoff(&format!("{path}.backoff"), &b.backoff);
        self.ratio(format!("{path}.max_ejected_share"), b.max_ejected_share);
    }

    fn route(&mut self, path: &str, r: &RouteConfig, services: &BTreeMap<String, ServiceConfig>) {
        self.name(format!("{path}.name"), &r.name);
        for (i, host) in r.hosts.iter().enumerate() {
            let bare = host.strip_prefix("*.").unwrap_or(host);
            if !is_hostname(bare) {
                self.err(
                    format!("{path}.hosts[{i}]"),
                    format!("`{host}` is not a host name or `*.` wildcard (ports are not matched)"),
                );
            }
        }
        for (i, m) in r.matches.iter().enumerate() {
            self.route_match(&format!("{path}.matches[{i}]"), m);
        }
        if r.backends.is_empty() {
            self.err(format!("{path}.backends"), "needs at least one backend");
        } else if r.backends.iter().all(|b| b.weight == 0) {
            self.err(
                format!("{path}.backends"),
                "all weights are 0: the route would send nothing",
            );
        }
        for (i, b) in r.backends.iter().enumerate() {
            match services.get(&b.service) {
                None => self.err(
                    format!("{path}.backends[{i}].service"),
                    format!("no service named `{}`", b.service),
                ),
                Some(s) if s.protocol == Protocol::Opaque => self.err(
                    format!("{path}.backends[{i}].service"),
                    format!("`{}` {OPAQUE_FOR_HTTP}", b.service),
                ),
                Some(_) => {}
            }
        }
        if let Some(retry) = &r.retry {
            self.retry(&format!("{path}.retry"), retry);
        }
        if let Some(timeout) = &r.timeout {
            self.timeout(&format!("{path}.timeout"), timeout);
        }
        if let Some(f) = &r.fault {
            let fpath = format!("{path}.fault");
            if f.delay.is_none() && f.abort_status.is_none() && f.abort_grpc_code.is_none() {
                self.err(
                    &fpath,
                    "injects nothing: set `delay`, `abort_status` or `abort_grpc_code`",
                );
            }
            if let Some(code) = f.abort_grpc_code
                && !(1..=16).contains(&code)
            {
                self.err(
                    format!("{fpath}.abort_grpc_code"),
                    format!("must be a gRPC error code from 1 to 16 (got {code})"),
                );
            }
            if let Some(h) = &f.header {
                if http::HeaderName::from_bytes(h.name.as_bytes()).is_err() {
                    self.err(
                        format!("{fpath}.header.name"),
                        format!("`{}` is not a header name", h.name),
                    );
                }
                if let Some(value) = &h.value
                    && http::HeaderValue::from_str(value).is_err()
                {
                    self.err(
                        format!("{fpath}.header.value"),
                        "is not a header value (control characters?)",
                    );
                }
            }
            self.ratio(format!("{fpath}.delay_ratio"), f.delay_ratio);
            self.ratio(format!("{fpath}.abort_ratio"), f.abort_ratio);
            // A 1xx status is not a final answer: an abort must end the exchange.
            if let Some(status) = f.abort_status
                && !(200..=599).contains(&status)
            {
                self.err(
                    format!("{fpath}.abort_status"),
                    format!("must be a final HTTP status from 200 to 599 (got {status})"),
                );
            }
        }
    }

    fn route_match(&mut self, path: &str, m: &RouteMatch) {
        match &m.path {
            Some(PathMatch::Exact(p) | PathMatch::Prefix(p)) if !p.starts_with('/') => {
                self.err(format!("{path}.path"), format!("`{p}` must start with `/`"));
            }
            Some(PathMatch::Exact(p) | PathMatch::Prefix(p)) if p.contains(['?', '#']) => {
                self.err(
                    format!("{path}.path"),
                    format!("`{p}` can never match: `?` and `#` end a path (match the query with `query`)"),
                );
            }
            Some(PathMatch::Exact(p) | PathMatch::Prefix(p)) if super::is_ambiguous_path(p) => {
                self.err(
                    format!("{path}.path"),
                    format!("`{p}` can never match: a path with a `.`, `..` or empty segment, a `\\`, or an encoded `/`, `\\` or `.` matches no path condition"),
                );
            }
            Some(PathMatch::Regex(re)) => self.regex(format!("{path}.path.regex"), re),
            _ => {}
        }
        let mut names = std::collections::HashSet::new();
        for (i, h) in m.headers.iter().enumerate() {
            let hpath = format!("{path}.headers[{i}]");
            if http::HeaderName::from_bytes(h.name.as_bytes()).is_err() {
                self.err(
                    format!("{hpath}.name"),
                    format!("`{}` is not a valid header name", h.name),
                );
            } else if !names.insert(h.name.to_ascii_lowercase().replace('_', "-")) {
                self.err(
                    format!("{hpath}.name"),
                    format!(
                        "header `{}` is matched twice in this match: give one condition per header",
                        h.name
                    ),
                );
            }
            if let HeaderValueMatch::Regex(re) = &h.value {
                self.regex(format!("{hpath}.regex"), re);
            }
        }
        for (i, q) in m.query.iter().enumerate() {
            let qpath = format!("{path}.query[{i}]");
            if q.name.is_empty() || q.name.contains(['&', '=', '#', ';']) {
                self.err(
                    format!("{qpath}.name"),
                    format!("`{}` is not a query parameter name", q.name),
                );
            } else if m.query[..i].iter().any(|other| other.name == q.name) {
                self.err(
                    format!("{qpath}.name"),
                    format!("parameter `{}` is matched twice in this match: give one condition per parameter", q.name),
                );
            }
            if let QueryValueMatch::Regex(re) = &q.value {
                self.regex(format!("{qpath}.regex"), re);
            }
        }
        if let Some(g) = &m.grpc {
            let valid =
                |s: &str| !s.is_empty() && !s.contains('/') && !s.contains(char::is_whitespace);
            if !valid(&g.service) {
                self.err(
                    format!("{path}.grpc.service"),
                    format!(
                        "`{}` is not a gRPC service name (`package.Service`)",
                        g.service
                    ),
                );
            }
            if let Some(method) = g.method.as_deref().filter(|m| !valid(m)) {
                self.err(
                    format!("{path}.grpc.method"),
                    format!("`{method}` is not a gRPC method name"),
                );
            }
            if m.path.is_some() {
                self.err(
                    format!("{path}.grpc"),
                    "cannot be combined with `path` (a gRPC match is a path match)",
                );
            }
        }
    }

    fn listeners(&mut self, c: &MeshConfig) {
        let mut names = BTreeSet::new();
        let mut addrs: BTreeMap<SocketAddr, String> = BTreeMap::new();
        let mut claim = |v: &mut Self, addr: SocketAddr, path: String| {
            // Port 0: each listener gets its own ephemeral port.
            if addr.port() == 0 {
                return;
            }
            if let Some(first) = addrs.get(&addr) {
                v.err(path, format!("{addr} is already used by {first}"));
            } else {
                addrs.insert(addr, path);
            }
        };
        if let Some(admin) = &c.admin {
            claim(self, admin.listen, "admin.listen".to_owned());
            if admin.decisions > MAX_DECISIONS {
                self.err(
                    "admin.decisions",
                    format!("at most {} (0 keeps no record)", MAX_DECISIONS),
                );
            }
        }
        // What every listener shares: a valid, unique name and an address of its own.
        let common = c
            .inbound
            .iter()
            .enumerate()
            .map(|(i, l)| (format!("inbound[{i}]"), &l.name, l.listen))
            .chain(
                c.outbound
                    .iter()
                    .enumerate()
                    .map(|(i, l)| (format!("outbound[{i}]"), &l.name, l.listen)),
            );
        let limits = c
            .inbound
            .iter()
            .enumerate()
            .map(|(i, l)| (format!("inbound[{i}].limits"), &l.limits))
            .chain(
                c.outbound
                    .iter()
                    .enumerate()
                    .map(|(i, l)| (format!("outbound[{i}].limits"), &l.limits)),
            );
        for (path, l) in limits {
            for (field, value) in [
                ("header_read_timeout", l.header_read_timeout),
                ("idle_timeout", l.idle_timeout),
            ] {
                if let Some(v) = value {
                    self.positive(format!("{path}.{field}"), v);
                }
            }
            for (field, zero) in [
                ("max_header_list_size", l.max_header_list_size == Some(0)),
                ("max_headers", l.max_headers == Some(0)),
                ("max_request_body_size", l.max_request_body_size == Some(0)),
                ("max_connections", l.max_connections == Some(0)),
                (
                    "max_concurrent_streams",
                    l.max_concurrent_streams == Some(0),
                ),
                (
                    "max_cancelled_requests",
                    l.max_cancelled_requests == Some(0),
                ),
            ] {
                if zero {
                    self.err(format!("{path}.{field}"), "must be at least 1");
                }
            }
            // Each is a size the server allocates or a count it holds state for: far
            // past any real need they would abort the process (hyper sizes a parse by
            // `max_headers`; tokio's semaphore panics past 2^61 permits).
            for (field, value, max) in [
                (
                    "max_header_list_size",
                    l.max_header_list_size.map(u64::from),
                    MAX_HEADER_LIST_SIZE_LIMIT,
                ),
                (
                    "max_headers",
                    l.max_headers.map(|v| v as u64),
                    MAX_HEADERS_LIMIT,
                ),
                (
                    "max_connections",
                    l.max_connections.map(|v| v as u64),
                    MAX_CONNECTIONS_LIMIT,
                ),
                (
                    "max_cancelled_requests",
                    l.max_cancelled_requests.map(|v| v as u64),
                    MAX_CONNECTIONS_LIMIT,
                ),
            ] {
                if value.is_some_and(|v| v > max) {
                    self.err(format!("{path}.{field}"), format!("at most {max}"));
                }
            }
        }
        for (path, name, listen) in common {
            self.name(format!("{path}.name"), name);
            if !names.insert(name.as_str()) {
                self.err(
                    format!("{path}.name"),
                    format!("duplicate listener name `{name}`"),
                );
            }
            claim(self, listen, format!("{path}.listen"));
        }
        for (i, l) in c.inbound.iter().enumerate() {
            let path = format!("inbound[{i}]");
            // `[::ffff:127.0.0.1]` reaches what `127.0.0.1` does.
            let target = l.target.ip().to_canonical();
            if l.target.port() == 0 || target.is_unspecified() {
                self.err(
                    format!("{path}.target"),
                    format!(
                        "{} is not an application's address (an IP and a port)",
                        l.target
                    ),
                );
            } else if let Some((listener, by)) = addrs.iter().find(|(a, _)| {
                let listen = a.ip().to_canonical();
                a.port() == l.target.port()
                    && (listen == target
                        // A wildcard listener takes loopback connections of its family (and
                        // `[::]` IPv4 ones too, dual-stack).
                        || (listen.is_unspecified()
                            && target.is_loopback()
                            && (a.is_ipv6() || target.is_ipv4())))
            }) {
                // The application's address reaches one of this proxy's own listeners:
                // itself (a loop), the admin listener (mesh peers would reach `/shutdown`
                // as a loopback client), or an outbound listener (peers would send
                // requests out under this workload's identity).
                self.err(
                    format!("{path}.target"),
                    format!(
                        "{} reaches this proxy's own listener {listener} ({by})",
                        l.target
                    ),
                );
            }
            if l.tls == TlsMode::Mtls && c.identity.is_none() {
                self.err(
                    format!("{path}.tls"),
                    "mtls needs an [identity] section; set tls = \"plaintext\" to accept in the clear",
                );
            }
            if let Some(name) = &l.identity_header {
                match http::HeaderName::from_bytes(name.as_bytes()) {
                    Err(_) => self.err(
                        format!("{path}.identity_header"),
                        format!("`{name}` is not a header name"),
                    ),
                    // The proxy removes every field of this name and writes its own: one
                    // that frames the message, routes it or speaks for the connection would
                    // break the request the application reads (a `Content-Length` of a
                    // SPIFFE ID, a `Host` of one).
                    Ok(header) if is_reserved_header(&header) => self.err(
                        format!("{path}.identity_header"),
                        format!(
                            "`{name}` is a field HTTP itself uses: choose one of your own (default `x-mesh-client-id`)"
                        ),
                    ),
                    Ok(_) => {}
                }
                if l.protocol == Protocol::Opaque {
                    self.err(
                        format!("{path}.identity_header"),
                        "opaque listeners relay bytes, not requests: there is no header to set",
                    );
                }
            }
            if let Some(policy) = &l.authorization
                && !c.authorization.contains_key(policy)
            {
                self.err(
                    format!("{path}.authorization"),
                    format!("no authorization policy named `{policy}`"),
                );
            }
            if let Some(limit) = &l.rate_limit
                && !c.rate_limits.contains_key(limit)
            {
                self.err(
                    format!("{path}.rate_limit"),
                    format!("no rate limit named `{limit}`"),
                );
            }
            if l.access_log && l.protocol == Protocol::Opaque {
                self.err(format!("{path}.access_log"), ACCESS_LOG_OPAQUE);
            }
            if l.protocol == Protocol::Opaque {
                self.http_limits(&path, &l.limits);
                if !l.pool.is_default() {
                    self.err(format!("{path}.pool"), POOL_OPAQUE);
                }
            } else {
                self.pool(&format!("{path}.pool"), &l.pool);
            }
        }
        // Which service each transparent destination means: one at most.
        let mut destinations: BTreeMap<Destination, &str> = BTreeMap::new();
        for (name, s) in &c.services {
            for (j, dst) in s.addresses.iter().enumerate() {
                let path = format!("services.{}.addresses[{j}]", key(name));
                let unspecified = matches!(dst, Destination::Addr(a) if a.ip().is_unspecified());
                if dst.port() == 0 || unspecified {
                    self.err(
                        path,
                        format!(
                            "{dst} is not a destination (a specific IP, or a network, and a port)"
                        ),
                    );
                } else if let Some(first) = destinations.insert(*dst, name)
                    && first != name.as_str()
                {
                    self.err(
                        path,
                        format!("{dst} is already the address of service `{first}`"),
                    );
                } else if let Some(listener) = addrs.keys().find(|l| dst.matches(l)) {
                    let what = match dst {
                        Destination::Addr(_) => format!("{dst} is one of this proxy's listeners"),
                        Destination::Network(_) => {
                            format!("{dst} holds this proxy's listener {listener}")
                        }
                    };
                    self.err(path, format!("{what} (it would loop)"));
                }
            }
        }
        for (i, l) in c.outbound.iter().enumerate() {
            let path = format!("outbound[{i}]");
            if l.access_log && l.protocol == Protocol::Opaque {
                self.err(format!("{path}.access_log"), ACCESS_LOG_OPAQUE);
            }
            if l.protocol == Protocol::Opaque && !l.transparent {
                self.http_limits(&path, &l.limits);
            }
            if let Some(certificate) = &l.certificate {
                for (field, file) in [("cert", &certificate.cert), ("key", &certificate.key)] {
                    if file.as_os_str().is_empty() {
                        self.err(format!("{path}.certificate.{field}"), "must not be empty");
                    }
                }
                if l.transparent || l.protocol == Protocol::Opaque {
                    self.err(
                        format!("{path}.certificate"),
                        "TLS is terminated on HTTP listeners only (not opaque or transparent ones)",
                    );
                }
            }
            if l.transparent {
                if l.default_service.is_some() {
                    self.err(
                        format!("{path}.default_service"),
                        "not used by a transparent listener: each connection's original destination picks its service (see `services.NAME.addresses`)",
                    );
                }
                if l.protocol == Protocol::Opaque {
                    self.err(
                        format!("{path}.protocol"),
                        "a transparent listener detects each connection's protocol (HTTP, else opaque TCP): use `auto`, `http1` or `http2`",
                    );
                }
                continue;
            }
            if l.unmatched.is_some() {
                self.err(
                    format!("{path}.unmatched"),
                    "only for a transparent listener (transparent = true)",
                );
            }
            match &l.default_service {
                Some(s) if !c.services.contains_key(s) => {
                    self.err(
                        format!("{path}.default_service"),
                        format!("no service named `{s}`"),
                    );
                }
                // An HTTP (or `auto`) listener sends its requests to its default service:
                // an opaque one needs an opaque listener, which also waits for no request.
                Some(s)
                    if l.protocol != Protocol::Opaque
                        && c.services
                            .get(s)
                            .is_some_and(|s| s.protocol == Protocol::Opaque) =>
                {
                    self.err(
                        format!("{path}.default_service"),
                        format!(
                            "`{s}` {OPAQUE_FOR_HTTP}: set protocol = \"opaque\" on this listener"
                        ),
                    );
                }
                None if l.protocol == Protocol::Opaque => {
                    self.err(
                        format!("{path}.default_service"),
                        "required with protocol = \"opaque\" (opaque traffic cannot be routed)",
                    );
                }
                _ => {}
            }
        }
    }

    fn authorization(&mut self, path: &str, p: &AuthorizationPolicy) {
        let mut names = BTreeSet::new();
        for (i, rule) in p.rules.iter().enumerate() {
            let rpath = format!("{path}.rules[{i}]");
            self.name(format!("{rpath}.name"), &rule.name);
            if !names.insert(rule.name.as_str()) {
                self.err(
                    format!("{rpath}.name"),
                    format!("duplicate rule name `{}`", rule.name),
                );
            }
            if rule.clients.is_empty() && !rule.unauthenticated {
                self.err(
                    format!("{rpath}.clients"),
                    "admits no client: list identity patterns (`*` for any verified identity) or set unauthenticated = true",
                );
            }
            for (j, m) in rule.routes.iter().enumerate() {
                self.route_match(&format!("{rpath}.routes[{j}]"), m);
            }
        }
    }

    fn rate_limit(&mut self, path: &str, l: &RateLimitConfig) {
        if l.total.is_none() && l.per_client.is_none() && l.overrides.is_empty() {
            self.err(
                path,
                "limits nothing: set `total`, `per_client` or `overrides`",
            );
        }
        if let Some(rate) = &l.total {
            self.rate(&format!("{path}.total"), rate);
        }
        if let Some(rate) = &l.per_client {
            self.rate(&format!("{path}.per_client"), rate);
        }
        for (i, o) in l.overrides.iter().enumerate() {
            let opath = format!("{path}.overrides[{i}]");
            if o.clients.is_empty() {
                self.err(
                    format!("{opath}.clients"),
                    "needs at least one identity pattern",
                );
            }
            self.rate(&format!("{opath}.limit"), &o.limit);
        }
    }

    fn rate(&mut self, path: &str, r: &Rate) {
        if r.requests == 0 {
            self.err(
                format!("{path}.requests"),
                "must be at least 1 (to refuse everything, use authorization)",
            );
        }
        self.positive(format!("{path}.per"), r.per);
        if r.burst == Some(0) {
            self.err(format!("{path}.burst"), "must be at least 1");
        }
        // The limiter holds a burst as the time it takes to earn: (burst - 1) intervals of
        // `per / requests`, in nanoseconds. Past 10 years that overflows its arithmetic.
        let burst = r.burst.unwrap_or(r.requests);
        if r.requests > 0 && burst > 0 {
            let interval = r.per.as_nanos() / u128::from(r.requests);
            let held = interval.saturating_mul(u128::from(burst - 1));
            if held > crate::serde_str::duration::MAX.as_nanos() {
                self.err(
                    format!("{path}.burst"),
                    format!(
                        "a burst of {burst} at {} per {} takes over 10 years to earn: lower `burst` or `per`",
                        r.requests,
                        humantime::format_duration(r.per)
                    ),
                );
            }
        }
    }
}
