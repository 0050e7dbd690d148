//! One scenario's world on either stack: the mock mesh and its service, a caller, and
//! the controls (kill, restart, drop connections, rotate) that mean the same on both.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use mesh_core::config::ServiceConfig;
use mesh_test::events::EventLog;
use mesh_test::{MockMesh, MockService, Script};
use mesh_tower::MeshClient;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::proxy::Proxies;
use crate::{Failure, Result, Stack};

/// The mock service every scenario calls.
pub(crate) const SERVICE: &str = "users";
/// The mesh's seed: the endpoints' scripts draw the same sequences on every run.
const SEED: u64 = 12;
/// A caller's answer that takes longer than this counts as hung.
const HANG: Duration = Duration::from_secs(5);

/// What a scenario sets up.
#[derive(Clone, Debug)]
pub(crate) struct Setup {
    /// One endpoint per script.
    pub(crate) scripts: Vec<Script>,
    /// The client's policies: the body of a `[services.NAME]` section (without
    /// `discovery` and `server_identity`).
    pub(crate) client: &'static str,
    /// The endpoints' authorization policy: the body of an `[authorization.NAME]` section.
    pub(crate) policy: Option<&'static str>,
    /// The endpoints' rate limit: the body of a `[rate_limits.NAME]` section.
    pub(crate) rate_limit: Option<&'static str>,
}

impl Setup {
    pub(crate) fn new(scripts: impl IntoIterator<Item = Script>) -> Self {
        Self {
            scripts: scripts.into_iter().collect(),
            client: "",
            policy: None,
            rate_limit: None,
        }
    }

    pub(crate) fn client(mut self, section: &'static str) -> Self {
        self.client = section;
        self
    }

    pub(crate) fn policy(mut self, section: &'static str) -> Self {
        self.policy = Some(section);
        self
    }

    pub(crate) fn rate_limit(mut self, section: &'static str) -> Self {
        self.rate_limit = Some(section);
        self
    }
}

/// The client's `ServiceConfig`, parsed from the same text the proxy reads.
fn service_config(section: &str, mesh: &MockMesh) -> Result<ServiceConfig> {
    let text = format!(
        "discovery = {{ kind = \"static\", endpoints = [{{ addr = \"127.0.0.1:9\" }}] }}\n\
         server_identity = \"{}\"\n{section}\n",
        mesh.id(SERVICE)?
    );
    toml::from_str(&text).map_err(|e| Failure::msg(format!("client section: {e}")))
}

/// A scenario's running world.
pub(crate) struct Harness {
    mesh: MockMesh,
    service: MockService,
    caller: Caller,
    proxies: Option<Proxies>,
}

impl fmt::Debug for Harness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Harness")
            .field("service", &self.service)
            .field("proxies", &self.proxies)
            .finish_non_exhaustive()
    }
}

impl Harness {
    pub(crate) async fn start(stack: &Stack, setup: Setup) -> Result<Self> {
        let mesh = MockMesh::builder().seed(SEED).build()?;
        let builder = mesh.service(SERVICE).scripts(setup.scripts.clone());
        match stack {
            Stack::InProcess => {
                let mut builder = builder;
                if let Some(policy) = setup.policy {
                    builder = builder.policy(
                        toml::from_str(policy)
                            .map_err(|e| Failure::msg(format!("policy section: {e}")))?,
                    );
                }
                if let Some(limit) = setup.rate_limit {
                    builder = builder.rate_limit(
                        toml::from_str(limit)
                            .map_err(|e| Failure::msg(format!("rate limit section: {e}")))?,
                    );
                }
                let service = builder.spawn().await?;
                // Everything `MeshClientBuilder::from_config` takes from the section, as
                // the proxy does, on the builder the mesh wires (credentials, discovery,
                // metrics).
                let config = service_config(setup.client, &mesh)?;
                let client = mesh
                    .client_builder_from_config(&service, &config)?
                    .build()?;
                Ok(Self {
                    mesh,
                    service,
                    caller: Caller::Mesh(client),
                    proxies: None,
                })
            }
            Stack::Proxy { binary } => {
                let service = builder.plaintext().spawn().await?;
                let proxies = Proxies::start(
                    binary,
                    &mesh,
                    &service,
                    setup.client,
                    setup.policy,
                    setup.rate_limit,
                )
                .await?;
                let client = Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
                let caller = Caller::Proxy {
                    client,
                    egress: proxies.egress(),
                };
                Ok(Self {
                    mesh,
                    service,
                    caller,
                    proxies: Some(proxies),
                })
            }
        }
    }

    pub(crate) fn in_process(&self) -> bool {
        self.proxies.is_none()
    }

    pub(crate) fn caller(&self) -> Caller {
        self.caller.clone()
    }

    /// The mesh's event log: what each endpoint received and did.
    pub(crate) fn events(&self) -> EventLog {
        self.mesh.events()
    }

    /// Requests endpoint by endpoint.
    pub(crate) fn counts(&self, log: &EventLog) -> Vec<u64> {
        log.request_counts(SERVICE, self.service.len())
    }

    fn endpoint(&self, index: usize) -> Result<mesh_test::MockEndpoint> {
        self.service
            .endpoint(index)
            .ok_or_else(|| Failure::msg(format!("no endpoint {index}")))
    }

    pub(crate) fn set_script(&self, index: usize, script: Script) -> Result<()> {
        self.endpoint(index)?.set_script(script);
        Ok(())
    }

    /// Kills endpoint `index`: nothing answers on its address and its connections drop.
    pub(crate) async fn kill(&self, index: usize) -> Result<()> {
        match &self.proxies {
            None => self.endpoint(index)?.kill(),
            Some(p) => p.kill(index).await?,
        }
        Ok(())
    }

    /// Brings endpoint `index` back on the same address.
    pub(crate) async fn restart(&self, index: usize) -> Result<()> {
        match &self.proxies {
            None => self.endpoint(index)?.restart().await?,
            Some(p) => p.restart(index).await?,
        }
        Ok(())
    }

    /// Drops every connection to endpoint `index`, so that callers handshake again.
    pub(crate) async fn bounce(&self, index: usize) -> Result<()> {
        match &self.proxies {
            None => self.endpoint(index)?.restart().await?,
            Some(p) => p.bounce(index).await?,
        }
        Ok(())
    }

    /// Requests endpoint `index`'s inbound proxy refused by its authorization policy;
    /// `None` in process, where the mesh's log has them
    /// ([`EventLog::denials`](mesh_test::EventLog::denials)).
    pub(crate) async fn proxy_denials(&self, index: usize) -> Result<Option<u64>> {
        match &self.proxies {
            None => Ok(None),
            Some(p) => Ok(Some(p.denials(index).await?)),
        }
    }

    /// A fresh SVID for every workload.
    pub(crate) async fn rotate_svids(&self) -> Result<()> {
        self.mesh.rotate_svids()?;
        if let Some(p) = &self.proxies {
            p.rotate_svids().await?;
        }
        Ok(())
    }

    /// A new root, trusted beside the old one, signs every workload's SVID.
    pub(crate) async fn begin_trust_rotation(&self) -> Result<()> {
        self.mesh.begin_trust_rotation()?;
        if let Some(p) = &self.proxies {
            p.begin_trust_rotation().await?;
        }
        Ok(())
    }

    /// The old root is trusted no more.
    pub(crate) async fn finish_trust_rotation(&self) -> Result<()> {
        self.mesh.finish_trust_rotation()?;
        if let Some(p) = &self.proxies {
            p.finish_trust_rotation().await?;
        }
        Ok(())
    }
}

/// What a caller got for one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Answer {
    /// An HTTP answer, and whether it carried `Retry-After`.
    Status(StatusCode, bool),
    /// No answer: an error.
    Error(String),
    /// No answer within 5 s.
    Hung,
}

/// The test's side of the mesh: the in-process client, or a plain HTTP/1.1 client of the
/// outbound proxy.
#[derive(Clone, Debug)]
pub(crate) enum Caller {
    Mesh(MeshClient),
    Proxy {
        client: Client<HttpConnector, Empty<Bytes>>,
        egress: SocketAddr,
    },
}

impl Caller {
    /// `GET path`.
    pub(crate) async fn get(&self, path: &str) -> Answer {
        match tokio::time::timeout(HANG, self.try_get(path)).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => Answer::Error(e),
            Err(_) => Answer::Hung,
        }
    }

    async fn try_get(&self, path: &str) -> Result<Answer, String> {
        let (status, retry_after, body) = match self {
            Caller::Mesh(client) => {
                let req = Request::get(format!("http://{SERVICE}{path}"))
                    .body(Empty::new())
                    .map_err(|e| e.to_string())?;
                let resp = client.send(req).await.map_err(|e| e.to_string())?;
                let (parts, body) = resp.into_parts();
                let body = body.collect().await.map(drop).map_err(|e| e.to_string());
                (
                    parts.status,
                    parts.headers.contains_key("retry-after"),
                    body,
                )
            }
            Caller::Proxy { client, egress } => {
                let req = Request::get(format!("http://{egress}{path}"))
                    .body(Empty::new())
                    .map_err(|e| e.to_string())?;
                let resp = client.request(req).await.map_err(|e| format!("{e:?}"))?;
                let (parts, body) = resp.into_parts();
                let body = body.collect().await.map(drop).map_err(|e| e.to_string());
                (
                    parts.status,
                    parts.headers.contains_key("retry-after"),
                    body,
                )
            }
        };
        body.map_err(|e| format!("{status}, then the body failed: {e}"))?;
        Ok(Answer::Status(status, retry_after))
    }
}

/// What a load run saw.
#[derive(Debug, Default)]
pub(crate) struct Run {
    /// Requests sent.
    pub(crate) sent: u64,
    /// Answered 2xx.
    pub(crate) ok: u64,
    /// Answers by status (2xx included).
    pub(crate) statuses: BTreeMap<u16, u64>,
    /// 429 answers without `Retry-After`.
    pub(crate) limited_without_retry_after: u64,
    /// Errors (the first few).
    pub(crate) errors: Vec<String>,
    /// Requests that got no answer at all (errors and hangs).
    pub(crate) unanswered: u64,
    /// Requests with no answer within 5 s.
    pub(crate) hung: u64,
    /// Caller tasks that panicked: what they sent is not counted, so each counts as a
    /// failure of its own.
    pub(crate) panicked: u64,
    /// How long the run took.
    pub(crate) elapsed: Duration,
}

impl Run {
    /// Requests that did not get a 2xx, plus one per caller task that panicked.
    pub(crate) fn failed(&self) -> u64 {
        self.sent - self.ok + self.panicked
    }

    pub(crate) fn status(&self, code: u16) -> u64 {
        self.statuses.get(&code).copied().unwrap_or(0)
    }

    fn record(&mut self, answer: Answer) {
        self.sent += 1;
        match answer {
            Answer::Status(status, retry_after) => {
                if status.is_success() {
                    self.ok += 1;
                }
                if status == StatusCode::TOO_MANY_REQUESTS && !retry_after {
                    self.limited_without_retry_after += 1;
                }
                *self.statuses.entry(status.as_u16()).or_default() += 1;
            }
            Answer::Error(e) => {
                self.unanswered += 1;
                if self.errors.len() < 5 {
                    self.errors.push(e);
                }
            }
            Answer::Hung => {
                self.unanswered += 1;
                self.hung += 1;
            }
        }
    }

    fn merge(&mut self, other: Run) {
        self.sent += other.sent;
        self.ok += other.ok;
        for (code, n) in other.statuses {
            *self.statuses.entry(code).or_default() += n;
        }
        self.limited_without_retry_after += other.limited_without_retry_after;
        self.unanswered += other.unanswered;
        self.hung += other.hung;
        self.panicked += other.panicked;
        let room = 5usize.saturating_sub(self.errors.len());
        self.errors.extend(other.errors.into_iter().take(room));
    }
}

impl fmt::Display for Run {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} sent in {:?}: {} ok, statuses {:?}, {} unanswered ({} hung), {} caller \
             tasks panicked, errors {:?}",
            self.sent,
            self.elapsed,
            self.ok,
            self.statuses,
            self.unanswered,
            self.hung,
            self.panicked,
            self.errors
        )
    }
}

/// `workers` callers sending `GET /load/...` back to back (or one every `pace`) for
/// `duration`.
pub(crate) async fn load(
    caller: &Caller,
    workers: usize,
    duration: Duration,
    pace: Option<Duration>,
) -> Run {
    let start = Instant::now();
    let until = start + duration;
    let seq = Arc::new(AtomicU64::new(0));
    let run = Arc::new(Mutex::new(Run::default()));
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (caller, seq, run) = (caller.clone(), seq.clone(), run.clone());
        tasks.push(tokio::spawn(async move {
            let mut mine = Run::default();
            while Instant::now() < until {
                let n = seq.fetch_add(1, Ordering::Relaxed);
                mine.record(caller.get(&format!("/load/{w}/{n}")).await);
                if let Some(pace) = pace {
                    tokio::time::sleep(pace).await;
                }
            }
            run.lock().await.merge(mine);
        }));
    }
    let mut total = Run::default();
    gather(tasks, &mut total).await;
    total.merge(std::mem::take(&mut *run.lock().await));
    total.elapsed = start.elapsed();
    total
}

/// Waits for the caller tasks; each one that failed (panicked) counts in `run`.
async fn gather(tasks: Vec<tokio::task::JoinHandle<()>>, run: &mut Run) {
    for task in tasks {
        if let Err(e) = task.await {
            run.panicked += 1;
            run.errors.push(format!("a caller task failed: {e}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_caller_task_fails_the_run() {
        let mut run = Run::default();
        run.record(Answer::Status(StatusCode::OK, false));
        let tasks = vec![
            tokio::spawn(async {}),
            tokio::spawn(async { panic!("a caller bug") }),
        ];
        gather(tasks, &mut run).await;
        assert_eq!(run.failed(), 1, "{run}");
        assert_eq!(run.panicked, 1);
        assert!(run.to_string().contains("1 caller tasks panicked"), "{run}");
    }
}
