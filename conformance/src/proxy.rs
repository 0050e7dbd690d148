//! The proxy stack: `mesh-proxy` processes, their configuration files and identities.
//!
//! For a mock service of N plaintext endpoints: N inbound proxies (identity
//! `spiffe://<td>/<service>`, target: the endpoint), each behind a [`Link`](mesh_test::Link), and one
//! outbound proxy (identity `spiffe://<td>/client`, the mesh's default client, so that
//! policies name the same caller on both stacks) whose `[services.<service>]` lists the
//! relays. Identities are PEM files written from the mock mesh's CA into one directory:
//! `<workload>.crt`, `<workload>.key` and `bundle.pem`, replaced by atomic renames.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::mpsc;
use std::time::Duration;

use mesh_spiffe::CredentialSource;
use mesh_test::{DEFAULT_CLIENT, MockMesh, MockService};

use crate::{Failure, Result};
use mesh_test::Link;

/// How long a proxy may take to print its listeners.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long credential files take to reach a proxy: its file watch debounces 100 ms.
const SETTLE: Duration = Duration::from_millis(400);

/// One running `mesh-proxy` process; killed when dropped.
#[derive(Debug)]
pub(crate) struct ProxyProcess {
    child: Child,
    addr: SocketAddr,
    /// Its admin listener, when its configuration has one.
    admin: Option<SocketAddr>,
}

impl ProxyProcess {
    /// Starts `binary run --config config` and waits for the address of its listener
    /// `listener`, and of its admin listener if `admin` (blocking: call it from
    /// `spawn_blocking`). Its log goes to `log`.
    fn start(
        binary: &Path,
        config: &Path,
        listener: &str,
        admin: bool,
        workers: usize,
        log: &Path,
    ) -> Result<Self> {
        let stderr = std::fs::File::create(log)?;
        let mut child = Command::new(binary)
            .args(["run", "--config"])
            .arg(config)
            .args(["--log", "warn", "--workers", &workers.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(|e| Failure::msg(format!("starting {}: {e}", binary.display())))?;
        let Some(stdout) = child.stdout.take() else {
            return Err(Failure::msg("the proxy's stdout is not piped"));
        };
        let (tx, rx) = mpsc::channel();
        // Reads the `listening NAME ADDR` lines, then drains stdout until the proxy exits.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let mut words = line.split_whitespace();
                if words.next() == Some("listening")
                    && let Some(name) = words.next()
                    && let Some(addr) = words.next().and_then(|a| a.parse::<SocketAddr>().ok())
                {
                    let _ = tx.send((name.to_owned(), addr));
                }
            }
        });
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        let (mut addr, mut admin_addr) = (None, None);
        while addr.is_none() || (admin && admin_addr.is_none()) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok((name, a)) if name == listener => addr = Some(a),
                Ok((name, a)) if name == "admin" => admin_addr = Some(a),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        match addr {
            Some(addr) if admin_addr.is_some() || !admin => Ok(Self {
                child,
                addr,
                admin: admin_addr,
            }),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                let text = std::fs::read_to_string(log).unwrap_or_default();
                Err(Failure::msg(format!(
                    "mesh-proxy ({}) did not listen on `{listener}`: {}",
                    config.display(),
                    text.trim()
                )))
            }
        }
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// `GET /metrics` on a proxy's admin listener at `admin`.
async fn metrics(admin: SocketAddr) -> Result<String> {
    {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Empty<bytes::Bytes>>();
        let req = http::Request::get(format!("http://{admin}/metrics"))
            .body(http_body_util::Empty::new())
            .map_err(|e| Failure::msg(e.to_string()))?;
        let resp = client
            .request(req)
            .await
            .map_err(|e| Failure::msg(format!("GET /metrics: {e}")))?;
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .map_err(|e| Failure::msg(format!("GET /metrics: {e}")))?
            .to_bytes();
        Ok(String::from_utf8_lossy(&body).into_owned())
    }
}

/// The sum of the samples of `counter` (`NAME_total`) whose labels include `label`
/// (`key="value"`), in a text exposition.
fn sum_of(text: &str, counter: &str, label: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{counter}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum::<f64>() as u64
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a proxy off the runtime's threads.
async fn spawn_proxy(
    binary: PathBuf,
    config: PathBuf,
    listener: &'static str,
    admin: bool,
    workers: usize,
    log: PathBuf,
) -> Result<ProxyProcess> {
    tokio::task::spawn_blocking(move || {
        ProxyProcess::start(&binary, &config, listener, admin, workers, &log)
    })
    .await?
}

/// One endpoint's inbound proxy and the relay in front of it.
#[derive(Debug)]
struct Inbound {
    relay: Link,
    process: Mutex<Option<ProxyProcess>>,
    config: PathBuf,
    index: usize,
}

/// The proxies' identity files, written from the mock mesh's CA.
#[derive(Debug)]
struct Files {
    dir: tempfile::TempDir,
    mesh: MockMesh,
    service: String,
}

/// What the proxy stack is made of; see the [module docs](self).
#[derive(Debug)]
pub(crate) struct Proxies {
    files: Files,
    binary: PathBuf,
    inbound: Vec<Inbound>,
    outbound: ProxyProcess,
}

/// Writes `text` to `path` by an atomic rename, as a secret volume or a careful tool does.
fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

impl Proxies {
    /// Starts the inbound proxies in front of `service`'s (plaintext) endpoints and the
    /// outbound proxy to them. `client` is the body of the outbound `[services.<name>]`
    /// section, `policy` and `rate_limit` the bodies of the inbound proxies'
    /// `[authorization.<name>]` and `[rate_limits.<name>]` sections.
    pub(crate) async fn start(
        binary: &Path,
        mesh: &MockMesh,
        service: &MockService,
        client: &str,
        policy: Option<&str>,
        rate_limit: Option<&str>,
    ) -> Result<Self> {
        let name = service.name().to_owned();
        let files = Files {
            dir: tempfile::tempdir()?,
            mesh: mesh.clone(),
            service: name.clone(),
        };
        files.write_bundle()?;
        files.write_svids()?;

        let mut inbound = Vec::new();
        for ep in service.endpoints() {
            let index = ep.index();
            let mut text = format!(
                "{}\n[[inbound]]\nname = \"app\"\nlisten = \"127.0.0.1:0\"\ntarget = \"{}\"\n",
                files.identity(&name),
                ep.addr()
            );
            if policy.is_some() {
                text.push_str(&format!("authorization = \"{name}\"\n"));
            }
            if rate_limit.is_some() {
                text.push_str(&format!("rate_limit = \"{name}\"\n"));
            }
            if let Some(policy) = policy {
                text.push_str(&format!("\n[authorization.{name}]\n{policy}\n"));
            }
            if let Some(limit) = rate_limit {
                text.push_str(&format!("\n[rate_limits.{name}]\n{limit}\n"));
            }
            // Its metrics, for what only the proxy sees (authorization decisions).
            text.push_str("\n[admin]\nlisten = \"127.0.0.1:0\"\n");
            let config = files.path(&format!("inbound-{index}.toml"));
            std::fs::write(&config, text)?;
            let process = start_inbound(binary, &files, &config, index).await?;
            let relay = Link::start(process.addr()).await?;
            inbound.push(Inbound {
                relay,
                process: Mutex::new(Some(process)),
                config,
                index,
            });
        }

        let endpoints: Vec<String> = inbound
            .iter()
            .map(|i| format!("{{ addr = \"{}\" }}", i.relay.addr()))
            .collect();
        let text = format!(
            "{}\n[services.{name}]\ndiscovery = {{ kind = \"static\", endpoints = [{}] }}\n\
             server_identity = \"{}\"\n{client}\n\n\
             [[outbound]]\nname = \"egress\"\nlisten = \"127.0.0.1:0\"\ndefault_service = \"{name}\"\n",
            files.identity(DEFAULT_CLIENT),
            endpoints.join(", "),
            service.id(),
        );
        let config = files.path("outbound.toml");
        std::fs::write(&config, text)?;
        let outbound = spawn_proxy(
            binary.to_owned(),
            config,
            "egress",
            false,
            2,
            files.path("outbound.log"),
        )
        .await?;
        Ok(Self {
            files,
            binary: binary.to_owned(),
            inbound,
            outbound,
        })
    }

    /// The outbound proxy's plaintext listener.
    pub(crate) fn egress(&self) -> SocketAddr {
        self.outbound.addr()
    }

    fn inbound(&self, index: usize) -> Result<&Inbound> {
        self.inbound
            .iter()
            .find(|i| i.index == index)
            .ok_or_else(|| Failure::msg(format!("no inbound proxy for endpoint {index}")))
    }

    /// Kills endpoint `index`: its address stops answering and its connections drop, and
    /// its inbound proxy is killed with SIGKILL.
    pub(crate) async fn kill(&self, index: usize) -> Result<()> {
        let inbound = self.inbound(index)?;
        inbound.relay.kill();
        let process = inbound.process.lock().ok().and_then(|mut p| p.take());
        // Dropping it kills it (SIGKILL) and reaps it.
        tokio::task::spawn_blocking(move || drop(process)).await?;
        Ok(())
    }

    /// Starts a new inbound proxy for endpoint `index` (killing the old one, if any) and
    /// listens on the endpoint's address again.
    pub(crate) async fn restart(&self, index: usize) -> Result<()> {
        self.kill(index).await?;
        let inbound = self.inbound(index)?;
        let process =
            start_inbound(&self.binary, &self.files, &inbound.config, inbound.index).await?;
        inbound.relay.restart_to(process.addr()).await?;
        if let Ok(mut slot) = inbound.process.lock() {
            *slot = Some(process);
        }
        Ok(())
    }

    /// Requests the authorization policy of endpoint `index`'s inbound proxy denied (its
    /// `mesh_server_authz_total{outcome="deny"}`).
    pub(crate) async fn denials(&self, index: usize) -> Result<u64> {
        let inbound = self.inbound(index)?;
        let admin = inbound
            .process
            .lock()
            .ok()
            .and_then(|p| p.as_ref().and_then(|p| p.admin))
            .ok_or_else(|| Failure::msg(format!("no admin listener for endpoint {index}")))?;
        let text = metrics(admin).await?;
        Ok(sum_of(&text, "mesh_server_authz_total", "outcome=\"deny\""))
    }

    /// Drops every connection to endpoint `index` (its proxy keeps running), so that the
    /// next ones handshake anew.
    pub(crate) async fn bounce(&self, index: usize) -> Result<()> {
        self.inbound(index)?.relay.restart().await?;
        Ok(())
    }

    /// New SVIDs for every proxy, once their file watches have read them.
    pub(crate) async fn rotate_svids(&self) -> Result<()> {
        self.files.write_svids()?;
        tokio::time::sleep(SETTLE).await;
        Ok(())
    }

    /// After `MockMesh::begin_trust_rotation`: first every proxy trusts both roots, then
    /// every proxy gets an SVID from the new one.
    pub(crate) async fn begin_trust_rotation(&self) -> Result<()> {
        self.files.write_bundle()?;
        tokio::time::sleep(SETTLE).await;
        self.files.write_svids()?;
        tokio::time::sleep(SETTLE).await;
        Ok(())
    }

    /// After `MockMesh::finish_trust_rotation`: the old root leaves every bundle.
    pub(crate) async fn finish_trust_rotation(&self) -> Result<()> {
        self.files.write_bundle()?;
        tokio::time::sleep(SETTLE).await;
        Ok(())
    }
}

async fn start_inbound(
    binary: &Path,
    files: &Files,
    config: &Path,
    index: usize,
) -> Result<ProxyProcess> {
    spawn_proxy(
        binary.to_owned(),
        config.to_owned(),
        "app",
        true,
        1,
        files.path(&format!("inbound-{index}.log")),
    )
    .await
}

impl Files {
    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// `workload`'s `[identity]` section: its PEM files and the mesh's bundle.
    fn identity(&self, workload: &str) -> String {
        // Quoted as TOML strings: a Windows path's backslashes are escapes in `"..."`.
        let file =
            |name: &str| toml::Value::String(self.path(name).display().to_string()).to_string();
        format!(
            "[identity]\nsource = \"files\"\ncert = {}\nkey = {}\n\
             [identity.bundles]\n\"{}\" = {}\n",
            file(&format!("{workload}.crt")),
            file(&format!("{workload}.key")),
            self.mesh.trust_domain(),
            file("bundle.pem"),
        )
    }

    /// Fresh SVIDs from the mesh's current root for the service and the client.
    fn write_svids(&self) -> Result<()> {
        for workload in [self.service.as_str(), DEFAULT_CLIENT] {
            let store = self.mesh.credentials(workload)?;
            let svid = store
                .svid()
                .ok_or_else(|| Failure::msg(format!("the mesh issued no SVID for {workload}")))?;
            let (chain, key) = svid.to_pem();
            // Key first, then chain: the file source takes them once both match.
            write_atomic(&self.path(&format!("{workload}.key")), &key)?;
            write_atomic(&self.path(&format!("{workload}.crt")), &chain)?;
        }
        Ok(())
    }

    /// The mesh's current bundle (one root, or two during a trust-anchor rotation).
    fn write_bundle(&self) -> Result<()> {
        let store = self.mesh.credentials(DEFAULT_CLIENT)?;
        let bundles = store.bundles();
        let bundle = bundles
            .get(self.mesh.trust_domain())
            .ok_or_else(|| Failure::msg("the mesh has no bundle for its trust domain"))?;
        write_atomic(&self.path("bundle.pem"), &bundle.to_pem())
    }
}
