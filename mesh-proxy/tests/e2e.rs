//! `curl` → outbound proxy → mTLS → inbound proxy → a local application, with two real
//! `mesh-proxy` processes on loopback and identities from PEM files written by the test
//! CA: HTTP/1.1 and HTTP/2 end to end, the peer identity header (never the client's),
//! an authorization deny, an application that is down, the admin endpoints, a broken
//! reload that keeps serving, and a drain on SIGTERM that exits 0.
#![cfg(unix)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

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
struct Proxy {
    child: Child,
    addrs: Vec<(String, SocketAddr)>,
}

impl Proxy {
    fn start(config: &Path, listeners: usize) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mesh-proxy"))
            .args(["run", "--config"])
            .arg(config)
            .args(["--log", "info"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
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

    fn addr(&self, name: &str) -> SocketAddr {
        self.addrs.iter().find(|(n, _)| n == name).unwrap().1
    }

    fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{signal}");
    }

    /// Sends SIGTERM and waits for the exit (at most 10 s).
    fn terminate(mut self) -> std::process::ExitStatus {
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
fn curl(args: &[&str]) -> (u16, String) {
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
async fn app() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
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
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(seen))))
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
fn identity(dir: &Path, ca: &mut TestCa, name: &str) -> String {
    let svid = ca.issue(&format!("spiffe://example.org/{name}")).unwrap();
    let (chain, key) = svid.to_pem();
    std::fs::write(dir.join(format!("{name}.crt")), chain).unwrap();
    std::fs::write(dir.join(format!("{name}.key")), key).unwrap();
    std::fs::write(dir.join("bundle.pem"), ca.bundle().unwrap().to_pem()).unwrap();
    format!(
        "[identity]\nsource = \"files\"\ncert = \"{d}/{name}.crt\"\nkey = \"{d}/{name}.key\"\n\
         [identity.bundles]\n\"example.org\" = \"{d}/bundle.pem\"\n",
        d = dir.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_through_two_proxies_to_an_app() {
    let dir = tempfile::tempdir().unwrap();
    let mut ca = TestCa::new("example.org").unwrap();
    let app = app().await;

    // B: the application's side.
    let b_config = dir.path().join("b.toml");
    let b_text = format!(
        "{}\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [[inbound]]\nname = \"app\"\nlisten = \"127.0.0.1:0\"\ntarget = \"{app}\"\n\
         authorization = \"app-policy\"\n\n\
         [authorization.app-policy]\ndefault = \"deny\"\n\
         [[authorization.app-policy.rules]]\nname = \"callers\"\n\
         clients = [\"spiffe://example.org/caller\"]\n\
         routes = [{{ path = {{ regex = \"/[a-z0-9-]*\" }} }}]\n",
        identity(dir.path(), &mut ca, "app")
    );
    std::fs::write(&b_config, &b_text).unwrap();
    let b = Proxy::start(&b_config, 2);
    let b_inbound = b.addr("app");

    // A: the caller's side, with a service for the app and one that is down.
    let a_config = dir.path().join("a.toml");
    let a_text = format!(
        "{}\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [services.app]\ndiscovery = {{ kind = \"static\", endpoints = [{{ addr = \"{b_inbound}\" }}] }}\n\
         server_identity = \"spiffe://example.org/app\"\n\n\
         [services.down]\ntls = \"plaintext\"\n\
         discovery = {{ kind = \"static\", endpoints = [{{ addr = \"127.0.0.1:9\" }}] }}\n\
         retry = {{ enabled = false }}\n\n\
         [[routes]]\nname = \"down\"\nmatches = [{{ path = {{ prefix = \"/down\" }} }}]\n\
         backends = [{{ service = \"down\" }}]\n\n\
         [[outbound]]\nname = \"egress\"\nlisten = \"127.0.0.1:0\"\ndefault_service = \"app\"\n",
        identity(dir.path(), &mut ca, "caller")
    );
    std::fs::write(&a_config, &a_text).unwrap();
    let a = Proxy::start(&a_config, 2);
    let egress = format!("http://{}", a.addr("egress"));
    let admin = format!("http://{}", a.addr("admin"));

    // HTTP/1.1 from the app's side to the app: the peer identity is the caller's proxy's,
    // whatever the client sent; HTTP/1.1 is restored at the far side.
    let (code, body) = curl(&[
        "-H",
        "x-mesh-client-id: spiffe://example.org/spoofed",
        &format!("{egress}/hello"),
    ]);
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("GET /hello HTTP/1.1"), "{body}");
    assert!(body.contains("id=spiffe://example.org/caller"), "{body}");
    assert!(
        body.contains(&format!("host={}", a.addr("egress"))),
        "{body}"
    );

    // HTTP/2 in the clear from the client: HTTP/2 to the app.
    let (code, body) = curl(&["--http2-prior-knowledge", &format!("{egress}/h2")]);
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("GET /h2 HTTP/2.0"), "{body}");

    // Authorization at B (one-segment paths only): a deny seen by the caller as 403.
    let (code, _) = curl(&[&format!("{egress}/admin/users")]);
    assert_eq!(code, 403);

    // A service that is down: an answer with a reason, never a hang.
    let (code, body) = curl(&[&format!("{egress}/down")]);
    assert!(code == 502 || code == 503, "{code} {body}");
    assert!(!body.is_empty());

    // Admin.
    assert_eq!(curl(&[&format!("{admin}/ready")]).0, 200);
    assert_eq!(curl(&[&format!("{admin}/live")]).0, 200);
    let (code, config) = curl(&[&format!("{admin}/config")]);
    assert_eq!(code, 200);
    assert!(config.contains("[services.app]"), "{config}");
    let (_, metrics) = curl(&[&format!("{admin}/metrics")]);
    for series in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "mesh_route_unmatched_total",
        "mesh_client_responses_total",
    ] {
        assert!(metrics.contains(series), "{series} missing from\n{metrics}");
    }
    assert_eq!(curl(&["-X", "POST", &format!("{admin}/nope")]).0, 404);

    // A broken reload keeps serving and says so.
    std::fs::write(&a_config, "this is not toml [").unwrap();
    a.signal("HUP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(curl(&[&format!("{egress}/after-reload")]).0, 200);
    let (_, metrics) = curl(&[&format!("{admin}/metrics")]);
    assert!(
        metrics.contains(r#"mesh_proxy_reloads_total{result="invalid"} 1"#),
        "{metrics}"
    );

    // A valid reload applies new routes without a restart.
    let reloaded = a_text.replace("prefix = \"/down\"", "prefix = \"/gone\"");
    std::fs::write(&a_config, reloaded).unwrap();
    assert_eq!(curl(&["-X", "POST", &format!("{admin}/reload")]).0, 202);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (code, body) = curl(&[&format!("{egress}/down")]);
    assert_eq!(code, 200, "now the default service: {body}");

    assert!(a.terminate().success(), "exit 0 after SIGTERM");
    assert!(b.terminate().success());
}
