//! What the end-to-end tests share: proxy processes, curl, a local app, identities.
#![allow(
    dead_code,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stderr
)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use mesh_spiffe::test_ca::TestCa;

/// A running proxy and the addresses it printed.
pub struct Proxy {
    pub child: Child,
    pub addrs: Vec<(String, SocketAddr)>,
}

impl Proxy {
    pub fn start(config: &Path, listeners: usize) -> Self {
        Self::start_with(config, listeners, Stdio::inherit())
    }

    /// Starts a proxy whose log goes to `stderr`.
    pub fn start_with(config: &Path, listeners: usize, stderr: Stdio) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_mesh-proxy"));
        command
            .args(["run", "--config"])
            .arg(config)
            .args(["--log", "info"]);
        Self::start_command(command, listeners, stderr)
    }

    /// Starts the proxy `command` runs (through a wrapper, say) and reads the addresses
    /// of its first `listeners` listeners.
    pub fn start_command(mut command: Command, listeners: usize, stderr: Stdio) -> Self {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut addrs = Vec::new();
        while addrs.len() < listeners {
            let line = lines
                .next()
                .expect("the proxy exited before listening")
                .unwrap();
            let mut words = line.split_whitespace();
            if words.next() == Some("listening") {
                let name = words.next().unwrap().to_owned();
                addrs.push((name, words.next().unwrap().parse().unwrap()));
            }
        }
        Self { child, addrs }
    }

    pub fn addr(&self, name: &str) -> SocketAddr {
        self.addrs.iter().find(|(n, _)| n == name).unwrap().1
    }

    pub fn signal(&self, signal: &str) {
        // The shell's own `kill`: no procps needed.
        let ok = Command::new("sh")
            .args(["-c", &format!("kill -{signal} {}", self.child.id())])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{signal}");
    }

    /// Sends SIGTERM and waits for the exit (at most 10 s).
    pub fn terminate(mut self) -> std::process::ExitStatus {
        self.signal("TERM");
        for _ in 0..100 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.child.kill().unwrap();
        panic!("the proxy did not exit within 10 s of SIGTERM");
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `curl`'s status line and body for `args`.
pub fn curl(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl is installed");
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// The local application: answers every request with what it saw.
pub async fn app() -> SocketAddr {
    app_with_delay(Duration::ZERO).await
}

/// The local application, answering after `delay`.
pub async fn app_with_delay(delay: Duration) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: Request<Incoming>| async move {
                        tokio::time::sleep(delay).await;
                        let header = |name: &str| {
                            req.headers()
                                .get(name)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("-")
                                .to_owned()
                        };
                        let seen = format!(
                            "{} {} {:?} id={} host={}",
                            req.method(),
                            req.uri().path(),
                            req.version(),
                            header("x-mesh-client-id"),
                            header("host"),
                        );
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(
                            seen,
                        ))))
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            });
        }
    });
    addr
}

/// Writes `name`'s SVID, key and the bundle, and returns its `[identity]` section.
pub fn identity(dir: &Path, ca: &mut TestCa, name: &str) -> String {
    let svid = ca.issue(&format!("spiffe://example.org/{name}")).unwrap();
    let (chain, key) = svid.to_pem();
    std::fs::write(dir.join(format!("{name}.crt")), chain).unwrap();
    std::fs::write(dir.join(format!("{name}.key")), key).unwrap();
    std::fs::write(dir.join("bundle.pem"), ca.bundle().unwrap().to_pem()).unwrap();
    // Quoted as TOML strings, whatever characters the temporary directory's path holds.
    let file = |name: &str| toml::Value::String(dir.join(name).display().to_string());
    format!(
        "[identity]\nsource = \"files\"\ncert = {}\nkey = {}\n\
         [identity.bundles]\n\"example.org\" = {}\n",
        file(&format!("{name}.crt")),
        file(&format!("{name}.key")),
        file("bundle.pem"),
    )
}

/// An inbound proxy's config: `name`'s identity, admitting any peer, to `target`.
pub fn inbound_config(
    dir: &Path,
    ca: &mut TestCa,
    name: &str,
    file: &str,
    target: SocketAddr,
) -> std::path::PathBuf {
    let path = dir.join(file);
    let text = format!(
        "{}\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [[inbound]]\nname = \"app\"\nlisten = \"127.0.0.1:0\"\ntarget = \"{target}\"\n",
        identity(dir, ca, name)
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// An outbound proxy's config: `name`'s identity, everything to service `app` at
/// `endpoints` (inbound proxies with the identity `spiffe://example.org/app`).
pub fn outbound_config(
    dir: &Path,
    ca: &mut TestCa,
    name: &str,
    endpoints: &[SocketAddr],
    extra: &str,
) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.toml"));
    let endpoints: Vec<String> = endpoints
        .iter()
        .map(|a| format!("{{ addr = \"{a}\" }}"))
        .collect();
    let text = format!(
        "{}\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [services.app]\ndiscovery = {{ kind = \"static\", endpoints = [{}] }}\n\
         server_identity = \"spiffe://example.org/app\"\n{extra}\n\n\
         [[outbound]]\nname = \"egress\"\nlisten = \"127.0.0.1:0\"\ndefault_service = \"app\"\n",
        identity(dir, ca, name),
        endpoints.join(", ")
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Every `# TYPE` line of a Prometheus text exposition appears once, and the whole
/// parses with the Python `prometheus_client`'s strict OpenMetrics parser (someone else's,
/// as a scraper is), when the test Python has it (`.ci/run` installs it in `target/py`).
pub fn assert_families_once(metrics: &str) {
    use std::io::Write;
    let mut seen = std::collections::BTreeSet::new();
    for line in metrics.lines().filter(|l| l.starts_with("# TYPE ")) {
        assert!(seen.insert(line), "described twice: {line}\n{metrics}");
    }
    const PARSE: &str = "import sys\n\
        from prometheus_client.openmetrics.parser import text_string_to_metric_families as p\n\
        print(len(list(p(sys.stdin.read()))))";
    let Some(python) = python_with("prometheus_client", "the OpenMetrics parser check") else {
        return;
    };
    let mut child = std::process::Command::new(&python)
        .args(["-c", PARSE])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the OpenMetrics parser refused /metrics: {}\n{metrics}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The test Python (`$MESH_PYTHON_GRPC`, else `target/py/bin/python`, the venv `.ci/run`
/// fills) if it has `module`; else `None`, after a message that `what` is skipped, or a
/// failure when `MESH_REQUIRE_PYTHON_GRPC=1` (as in CI).
pub fn python_with(module: &str, what: &str) -> Option<std::path::PathBuf> {
    let python = std::env::var_os("MESH_PYTHON_GRPC").map_or_else(
        || std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/py/bin/python"),
        std::path::PathBuf::from,
    );
    let found = Command::new(&python)
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some(python);
    }
    let message = format!("no Python with {module} at {}", python.display());
    if std::env::var_os("MESH_REQUIRE_PYTHON_GRPC").is_some_and(|v| v == "1") {
        panic!("MESH_REQUIRE_PYTHON_GRPC=1: {message}");
    }
    eprintln!("\n!!!!! SKIPPED: {what}: {message} !!!!!\n");
    None
}

/// A self-signed ECDSA certificate for 127.0.0.1 by openssl: `NAME.crt` and `NAME.key` in
/// `dir`.
pub fn self_signed(dir: &std::path::Path, name: &str) {
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=edge",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
        ])
        .arg(format!("{name}.key"))
        .arg("-out")
        .arg(format!("{name}.crt"))
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
}

/// Scrapes `metrics` (a proxy's `/metrics` URL) every 100 ms, for up to 5 s, until its
/// text holds every one of `series`: whether it came to, and the last text read.
pub async fn metrics_until(metrics: &str, series: &[&str]) -> (bool, String) {
    let mut text = String::new();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        text = curl(&[metrics]).1;
        if series.iter().all(|s| text.contains(s)) {
            return (true, text);
        }
    }
    (false, text)
}
