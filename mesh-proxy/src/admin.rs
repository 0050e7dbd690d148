//! The admin listener: `/metrics`, `/ready`, `/live`, `/config`, `/decisions`,
//! `POST /shutdown` and `POST /reload`, in plaintext on the admin address (loopback by
//! default).
//!
//! `GET /decisions` dumps the decision record as text, oldest first, one decision a line
//! (see `mesh_tower::decision`): the balancer's picks, circuit-breaker changes, retry and
//! authorization decisions of every service and inbound listener. It is kept only when
//! `[admin] decisions` is set (its capacity); otherwise the answer is 404. A reload
//! applies a changed capacity: on, off, larger or smaller (the oldest entries go).

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use mesh_tower::metrics::PoolFamilies;
use mesh_tower::server::{MeshServer, Server, ServerError, ServerLimits};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::proxy::State;

/// Serves the admin endpoints for `state` on `listener`.
pub(crate) fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<State>,
) -> Result<Server, ServerError> {
    let renders = Arc::new(tokio::sync::Semaphore::new(MAX_RENDERS));
    let app = tower::service_fn(move |req: Request<Incoming>| {
        let state = state.clone();
        let renders = renders.clone();
        async move {
            if req.uri().path() != "/metrics" || !is_get(req.method()) {
                return Ok::<_, std::convert::Infallible>(answer(&state, &req));
            }
            // Each render holds the whole exposition: a few at once, the rest told to
            // come back (scrapers and probes do not need more).
            let Ok(permit) = renders.try_acquire_owned() else {
                let mut busy = text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    PLAIN,
                    "metrics are being rendered for other scrapes: retry\n",
                );
                busy.headers_mut()
                    .insert(header::RETRY_AFTER, http::HeaderValue::from_static("1"));
                return Ok(busy);
            };
            // Rendering reads /proc (every open file descriptor) and walks every metric
            // family: on the blocking pool, not the runtime's thread, which with one worker
            // (the default) is the only one serving traffic.
            // The permit goes with the render, which runs on whether or not its client
            // waits for it (a blocking task cannot be cancelled).
            let rendered = tokio::task::spawn_blocking(move || {
                let _permit = permit;
                answer(&state, &req)
            })
            .await;
            Ok(rendered.unwrap_or_else(|e| {
                tracing::error!(error = %e, "rendering /metrics failed");
                text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    PLAIN,
                    "rendering metrics failed\n",
                )
            }))
        }
    });
    MeshServer::builder()
        .plaintext()
        .limits(admin_limits())
        .serve(listener, app)
}

/// How many `/metrics` renders run at once; more scrapes get 503 with `Retry-After`.
const MAX_RENDERS: usize = 2;

/// The admin listener's limits: probes, scrapes and an operator's requests, never the
/// data plane's thousands of connections and streams, nor its bodies (no endpoint reads
/// one); a shutdown waits for little.
fn admin_limits() -> ServerLimits {
    let mut limits = ServerLimits::default();
    limits.max_connections = 128;
    limits.max_concurrent_streams = 8;
    limits.max_request_body_size = Some(64 * 1024);
    limits.max_header_list_size = 16 * 1024;
    limits.idle_timeout = std::time::Duration::from_secs(60);
    limits.shutdown_timeout = std::time::Duration::from_secs(2);
    limits
}

/// GET, or HEAD (answered as GET without the body, which hyper leaves out).
fn is_get(method: &Method) -> bool {
    *method == Method::GET || *method == Method::HEAD
}

fn text(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    resp
}

const PLAIN: &str = "text/plain; charset=utf-8";

fn answer(state: &State, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    // HEAD is GET without the body (RFC 9110 §9.3.2): health checkers send it.
    let method = if *req.method() == Method::HEAD {
        &Method::GET
    } else {
        req.method()
    };
    let path = req.uri().path();
    if matches!(path, "/config" | "/decisions" | "/shutdown" | "/reload")
        && let Some(refused) = browser_problem(req)
    {
        return text(StatusCode::FORBIDDEN, PLAIN, refused);
    }
    match (method, path) {
        (&Method::GET, "/metrics") => {
            let mut out = String::new();
            let Some(registry) = state.registry.get() else {
                return text(StatusCode::SERVICE_UNAVAILABLE, PLAIN, "starting\n");
            };
            match prometheus_client::encoding::text::encode(&mut out, registry) {
                Ok(()) => text(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    out,
                ),
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    PLAIN,
                    format!("encoding metrics: {e}\n"),
                ),
            }
        }
        (&Method::GET, "/ready") => {
            if state.is_ready() {
                text(StatusCode::OK, PLAIN, "ready\n")
            } else if state.draining.load(std::sync::atomic::Ordering::Relaxed) {
                text(StatusCode::SERVICE_UNAVAILABLE, PLAIN, "draining\n")
            } else if state.registry.get().is_none() {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    PLAIN,
                    "starting (waiting for an SVID?)\n",
                )
            } else if let Some(svid) = state.svid() {
                // Peers refuse it: no caller should be sent here until a new one comes.
                // humantime formats no time before 1970 (a UTCTime year of 50 to 69 is one).
                let expired = match svid.not_after().duration_since(std::time::UNIX_EPOCH) {
                    Ok(_) => humantime::format_rfc3339_seconds(svid.not_after()).to_string(),
                    Err(_) => "a time before 1970".to_owned(),
                };
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    PLAIN,
                    format!("the SVID expired at {expired}, and no new one came\n"),
                )
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, PLAIN, "no SVID yet\n")
            }
        }
        (&Method::GET, "/live") => text(StatusCode::OK, PLAIN, "live\n"),
        // What the configuration says (a header value an authorization rule matches, say)
        // and the recent decisions (callers, paths) stay on this machine too: probes and
        // scrapes need only the endpoints above.
        (&Method::GET, "/config" | "/decisions") if !from_loopback(req) => text(
            StatusCode::FORBIDDEN,
            PLAIN,
            "/config and /decisions are served to loopback only\n",
        ),
        (&Method::GET, "/decisions") if state.decisions.is_enabled() => {
            text(StatusCode::OK, PLAIN, state.decisions.dump())
        }
        (&Method::GET, "/decisions") => text(
            StatusCode::NOT_FOUND,
            PLAIN,
            "no decision record: set [admin] decisions = 1024 (its capacity), then reload\n",
        ),
        (&Method::GET, "/config") => {
            let config = state
                .config_text
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            text(StatusCode::OK, "application/toml", config)
        }
        // Control only from this machine, even when the admin listener is reachable from
        // elsewhere (Kubernetes probes need it on the pod's address).
        (&Method::POST, "/shutdown" | "/reload") if !from_loopback(req) => text(
            StatusCode::FORBIDDEN,
            PLAIN,
            "POST /shutdown and /reload are taken from loopback only\n",
        ),
        (&Method::POST, "/shutdown") => {
            tracing::info!("shutdown asked for on the admin listener");
            state.shutdown.notify_one();
            text(StatusCode::OK, PLAIN, "shutting down\n")
        }
        (&Method::POST, "/reload") => {
            state.reload.notify_one();
            text(
                StatusCode::ACCEPTED,
                PLAIN,
                "reloading (the outcome is logged and in mesh_proxy_reloads_total)\n",
            )
        }
        (
            _,
            "/metrics" | "/ready" | "/live" | "/config" | "/decisions" | "/shutdown" | "/reload",
        ) => {
            // RFC 9110 §15.5.6: a 405 says which methods the resource takes.
            let allow = if matches!(path, "/shutdown" | "/reload") {
                "POST"
            } else {
                "GET, HEAD"
            };
            let mut resp = text(
                StatusCode::METHOD_NOT_ALLOWED,
                PLAIN,
                format!("method not allowed: {allow}\n"),
            );
            resp.headers_mut()
                .insert(header::ALLOW, http::HeaderValue::from_static(allow));
            resp
        }
        _ => text(
            StatusCode::NOT_FOUND,
            PLAIN,
            "not found: /metrics, /ready, /live, /config, /decisions, POST /shutdown, POST /reload\n",
        ),
    }
}

/// Why a request to a loopback-only endpoint (`/config`, `/decisions`, `POST /shutdown`,
/// `POST /reload`) is refused, if it came from a web page: a page in a browser on this
/// host could otherwise post to them (a form or `fetch` needs no preflight for a plain
/// POST), or read them through a DNS name rebound to 127.0.0.1. Such requests carry an
/// `Origin` (or `Sec-Fetch-Site` other than `none`), or a `Host` that is a name other
/// than `localhost`; curl, probes and scripts send none of these.
fn browser_problem(req: &Request<Incoming>) -> Option<&'static str> {
    let headers = req.headers();
    if headers.contains_key(header::ORIGIN)
        || headers
            .get("sec-fetch-site")
            .is_some_and(|site| site.as_bytes() != b"none")
    {
        return Some("refused: a request from a web page (Origin or Sec-Fetch-Site)\n");
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().host())
        .unwrap_or("");
    // The name without its port; an IPv6 literal keeps its brackets.
    let name = match host.rsplit_once(':') {
        Some((name, port)) if !port.contains(']') => name,
        _ => host,
    };
    let literal = name
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>()
        .is_ok();
    if name.is_empty() || literal || name.eq_ignore_ascii_case("localhost") {
        None
    } else {
        Some("refused: Host must be an IP address or localhost\n")
    }
}

/// Whether the request came from a loopback address (an IPv4 one seen by a listener on
/// `[::]`, `::ffff:127.0.0.1`, included).
fn from_loopback(req: &Request<Incoming>) -> bool {
    req.extensions()
        .get::<mesh_tower::server::ClientAddr>()
        .is_some_and(|a| a.0.ip().to_canonical().is_loopback())
}

/// Registers the process metrics (CPU, resident memory, open file descriptors), read
/// from `/proc/self` at each scrape on Linux; absent elsewhere. Its start time is always
/// there (see [`record_start`]).
pub(crate) fn register_process_metrics(registry: &mut Registry) {
    registry.register_collector(Box::new(ProcessCollector));
}

/// When the process started, in seconds since the Unix epoch, once known.
static START_TIME: std::sync::OnceLock<f64> = std::sync::OnceLock::new();

/// Records when the process started, for `process_start_time_seconds`: call it first
/// thing at launch. The kernel's record (`starttime` in `/proc/self/stat` after the boot
/// time, `btime` in `/proc/stat`) where both are readable, else the wall clock now: a
/// sandbox may hide `/proc/stat` (systemd's `ProcSubset=pid`, as the shipped unit sets),
/// and other systems have no `/proc`.
pub(crate) fn record_start() {
    let _ = start_time_seconds();
}

fn start_time_seconds() -> f64 {
    *START_TIME.get_or_init(|| {
        let read = |path: &str| std::fs::read_to_string(path).ok();
        start_time(
            read("/proc/self/stat").as_deref(),
            read("/proc/stat").as_deref(),
            std::time::SystemTime::now(),
        )
    })
}

/// The start time `stat` (`/proc/self/stat`) and `boot` (`/proc/stat`) give, or `now`'s
/// when either is missing or unreadable.
fn start_time(stat: Option<&str>, boot: Option<&str>, now: std::time::SystemTime) -> f64 {
    // After the command name (in parentheses, which may hold spaces): field 3 on.
    // starttime is field 22, in USER_HZ ticks (100 per second on Linux, whatever the
    // kernel's HZ) since boot.
    let ticks = stat
        .and_then(|s| s.rsplit_once(')'))
        .and_then(|(_, rest)| rest.split_whitespace().nth(19))
        .and_then(|f| f.parse::<u64>().ok());
    let boot = boot.and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<u64>().ok())
    });
    match (ticks, boot) {
        (Some(ticks), Some(boot)) => boot as f64 + ticks as f64 / 100.0,
        _ => now
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64()),
    }
}

/// Registers when the SVID the proxy holds expires, read at each scrape (none before it
/// holds one, nor without an identity).
pub(crate) fn register_identity_expiry(registry: &mut Registry, state: Arc<State>) {
    registry.register_collector(Box::new(IdentityExpiry(state)));
}

struct IdentityExpiry(Arc<State>);

impl std::fmt::Debug for IdentityExpiry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IdentityExpiry")
    }
}

impl Collector for IdentityExpiry {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let Some(svid) = self.0.svid() else {
            return Ok(());
        };
        let secs = svid
            .not_after()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        let metric = ConstGauge::new(secs);
        let m = encoder.encode_descriptor(
            "mesh_proxy_identity_expiration_timestamp_seconds",
            "When the SVID the proxy holds expires (its notAfter), in seconds since the Unix epoch",
            None,
            metric.metric_type(),
        )?;
        metric.encode(m)
    }
}

/// Registers, for each edge listener (`certificate = {..}`), when its certificate expires
/// and how its reloads went, read from the acceptor at each scrape.
pub(crate) fn register_edge_certificates(
    registry: &mut Registry,
    listeners: Vec<(String, mesh_spiffe::ServerTlsAcceptor)>,
) {
    if !listeners.is_empty() {
        registry.register_collector(Box::new(EdgeCertificates(listeners)));
    }
}

/// Registers, for each HTTP inbound listener, how its pool of HTTP/1.1 connections to
/// the application stands, read at each scrape.
pub(crate) fn register_app_pools(
    registry: &mut Registry,
    listeners: Vec<(String, mesh_tower::forward::Forward<Incoming>)>,
) {
    if !listeners.is_empty() {
        registry.register_collector(Box::new(AppPools(listeners)));
    }
}

#[derive(Debug)]
struct AppPools(Vec<(String, mesh_tower::forward::Forward<Incoming>)>);

impl Collector for AppPools {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let rows: Vec<_> = self
            .0
            .iter()
            .map(|(listener, forward)| ([("listener", listener.as_str())], forward.pool_status()))
            .collect();
        mesh_tower::metrics::encode_pools(
            &mut encoder,
            &PoolFamilies {
                connections: (
                    "mesh_proxy_app_connections",
                    "HTTP/1.1 connections open to each inbound listener's application (in use, idle or being dialled; at most pool.max_connections)",
                ),
                waiting: (
                    "mesh_proxy_app_requests_waiting",
                    "Requests waiting for an HTTP/1.1 connection to the application (at most pool.max_pending)",
                ),
                overflows: (
                    "mesh_proxy_app_pool_overflows",
                    "Requests answered 503 without being sent: every HTTP/1.1 connection to the application busy and pool.max_pending waiting",
                ),
            },
            &rows,
        )
    }
}

#[derive(Debug)]
struct EdgeCertificates(Vec<(String, mesh_spiffe::ServerTlsAcceptor)>);

impl Collector for EdgeCertificates {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "mesh_proxy_edge_certificate_expiry_timestamp_seconds",
            "When each edge listener's certificate expires (its notAfter, in Unix seconds)",
            None,
            MetricType::Gauge,
        )?;
        for (listener, acceptor) in &self.0 {
            let not_after = acceptor.status().not_after;
            let secs = not_after
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
            let labels = [("listener", listener.as_str())];
            ConstGauge::new(secs).encode(family.encode_family(&labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "mesh_proxy_edge_certificate_reloads",
            "Changes to an edge listener's certificate files, by result (applied, invalid: the last good certificate stays)",
            None,
            MetricType::Counter,
        )?;
        for (listener, acceptor) in &self.0 {
            let status = acceptor.status();
            for (result, count) in [("applied", status.reloads), ("invalid", status.rejected)] {
                let labels = [("listener", listener.as_str()), ("result", result)];
                ConstCounter::new(count).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let stats = process_stats();
        if let Some(cpu) = stats.cpu_seconds {
            let metric = ConstCounter::new(cpu);
            let m = encoder.encode_descriptor(
                "process_cpu_seconds",
                "User and system CPU time spent",
                None,
                metric.metric_type(),
            )?;
            metric.encode(m)?;
        }
        let metric = ConstGauge::new(start_time_seconds());
        let m = encoder.encode_descriptor(
            "process_start_time_seconds",
            "When the process started, in seconds since the Unix epoch",
            None,
            metric.metric_type(),
        )?;
        metric.encode(m)?;
        for (name, help, value) in [
            (
                "process_resident_memory_bytes",
                "Resident memory size",
                stats.resident_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size",
                stats.virtual_bytes,
            ),
            ("process_open_fds", "Open file descriptors", stats.open_fds),
            (
                "process_max_fds",
                "The most file descriptors the process may open (its soft limit)",
                stats.max_fds,
            ),
            ("process_threads", "Threads of the process", stats.threads),
        ] {
            if let Some(value) = value {
                let metric = ConstGauge::new(value);
                let m = encoder.encode_descriptor(name, help, None, metric.metric_type())?;
                metric.encode(m)?;
            }
        }
        Ok(())
    }
}

#[derive(Debug, Default)]
struct ProcessStats {
    cpu_seconds: Option<f64>,
    resident_bytes: Option<i64>,
    virtual_bytes: Option<i64>,
    open_fds: Option<i64>,
    max_fds: Option<i64>,
    threads: Option<i64>,
}

fn process_stats() -> ProcessStats {
    let mut stats = ProcessStats::default();
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // After the command name (in parentheses, which may hold spaces): field 3 on.
        // utime and stime are fields 14 and 15, in USER_HZ ticks (100 per second on
        // Linux, whatever the kernel's HZ).
        if let Some((_, rest)) = stat.rsplit_once(')') {
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
            if let (Some(utime), Some(stime)) = (ticks(11), ticks(12)) {
                stats.cpu_seconds = Some((utime + stime) as f64 / 100.0);
            }
        }
    }
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().trim_end_matches("kB").trim())
                .and_then(|v| v.parse::<i64>().ok())
        };
        stats.resident_bytes = field("VmRSS:").map(|kb| kb * 1024);
        stats.virtual_bytes = field("VmSize:").map(|kb| kb * 1024);
        stats.threads = field("Threads:");
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        stats.open_fds = i64::try_from(dir.count()).ok();
    }
    if let Ok(limits) = std::fs::read_to_string("/proc/self/limits") {
        // `Max open files            1024                 1048576              files`
        stats.max_fds = limits
            .lines()
            .find_map(|l| l.strip_prefix("Max open files"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|soft| soft.parse::<i64>().ok());
    }
    stats
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use super::*;

    /// A `/proc/self/stat` line whose command name holds spaces and a parenthesis, with
    /// starttime (field 22) 12345 ticks.
    const STAT: &str = "4242 (mesh (proxy) x) S 1 4242 4242 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 1 0 12345 1000 200";
    const BOOT: &str = "cpu  1 2 3\nintr 5\nbtime 1700000000\nprocesses 9\n";

    #[test]
    fn start_time_is_the_kernels_record_or_else_the_launch() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let kernel = start_time(Some(STAT), Some(BOOT), now);
        assert!((kernel - 1_700_000_123.45).abs() < 1e-6, "{kernel}");
        // /proc/stat hidden (ProcSubset=pid), or no /proc at all: the time given.
        assert_eq!(start_time(Some(STAT), None, now), 1_800_000_000.0);
        assert_eq!(start_time(None, None, now), 1_800_000_000.0);
        assert_eq!(
            start_time(Some("garbage"), Some(BOOT), now),
            1_800_000_000.0
        );
    }

    #[test]
    fn the_start_time_is_always_exposed_and_does_not_move() {
        let before = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        record_start();
        let mut registry = Registry::default();
        register_process_metrics(&mut registry);
        let scrape = || {
            let mut out = String::new();
            prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
            out.lines()
                .find_map(|l| l.strip_prefix("process_start_time_seconds "))
                .map(|v| v.parse::<f64>().unwrap())
                .unwrap_or_else(|| panic!("no process_start_time_seconds in\n{out}"))
        };
        let first = scrape();
        // Not after it was recorded (the kernel's record is earlier still), and not
        // before 2020.
        assert!(first <= before + 1.0 && first > 1_577_836_800.0, "{first}");
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(scrape(), first);
    }
}
