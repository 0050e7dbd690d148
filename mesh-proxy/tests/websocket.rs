//! WebSocket through mesh-proxy, with the Python `websockets` library as both the client
//! and the application (`tests/ws/peer.py`): a client → outbound proxy → mTLS → inbound
//! proxy → application, where the upgrade crosses the mesh as an HTTP/2 extended CONNECT
//! on the proxies' shared connection and is restored to HTTP/1.1 for the application;
//! the same through a plaintext HTTP/1.1 hop; several at once; a policy that admits `GET`
//! admits the upgrade and one that does not refuses it (403 to the client's handshake),
//! leaving the client's connection HTTP for its next request; and plain HTTP to the same
//! application still works beside the tunnels. Also `wss://` through an edge listener
//! that terminates TLS, and a quiet tunnel closed at the listener's
//! `tunnel_idle_timeout`.
//!
//! The interpreter is `$MESH_PYTHON_GRPC`, else `target/py/bin/python` (the venv
//! `.ci/run` fills); without `websockets` the test is skipped with a message, or fails
//! when `MESH_REQUIRE_PYTHON_GRPC=1` (as in CI).
#![cfg(unix)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use common::{Proxy, curl, identity};
use mesh_spiffe::test_ca::TestCa;

fn peer_script() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ws/peer.py")
}

/// The WebSocket echo application, killed when dropped.
struct App(Child);

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_app(python: &PathBuf) -> (App, u16) {
    let mut child = Command::new(python)
        .arg(peer_script())
        .arg("server")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line
        .trim()
        .strip_prefix("port ")
        .unwrap_or_else(|| panic!("the WebSocket app said {line:?}"))
        .parse()
        .unwrap();
    (App(child), port)
}

/// Starts `peer.py` with `args` ([`finish`] waits for it and checks it succeeded).
fn peer(python: &PathBuf, args: &[&str]) -> std::process::Child {
    peer_trusting(python, args, None)
}

/// [`peer`], verifying a `wss://` server against the CA file `ca`.
fn peer_trusting(python: &PathBuf, args: &[&str], ca: Option<&std::path::Path>) -> Child {
    let mut command = Command::new(python);
    if let Some(ca) = ca {
        command.env("MESH_WS_CA", ca);
    }
    command
        .arg(peer_script())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// What a `peer.py` run printed, once it exited; fails the test if it failed.
fn finish(child: Child) -> String {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "peer.py failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_cross_the_mesh_and_a_plaintext_hop() {
    let Some(python) = common::python_with("websockets", "WebSocket end to end") else {
        return;
    };
    let (_app, port) = start_app(&python);
    let dir = tempfile::tempdir().unwrap();
    let mut ca = TestCa::new("example.org").unwrap();

    // B: the application's side. Its policy admits the caller's GETs under /chat only: an
    // upgrade that crossed as an extended CONNECT is judged as its GET.
    let b_config = dir.path().join("b.toml");
    let b_text = format!(
        "{}\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [[inbound]]\nname = \"app\"\nlisten = \"127.0.0.1:0\"\ntarget = \"127.0.0.1:{port}\"\n\
         authorization = \"app-policy\"\n\n\
         [authorization.app-policy]\ndefault = \"deny\"\n\
         [[authorization.app-policy.rules]]\nname = \"callers\"\n\
         clients = [\"spiffe://example.org/caller\"]\n\
         routes = [{{ path = {{ prefix = \"/chat\" }}, methods = [\"GET\"] }}]\n",
        identity(dir.path(), &mut ca, "app")
    );
    std::fs::write(&b_config, &b_text).unwrap();
    let b = Proxy::start(&b_config, 2);
    let b_inbound = b.addr("app");

    // A: the caller's side; /direct goes to the application over plaintext HTTP/1.1.
    let a_config = dir.path().join("a.toml");
    let a_text = format!(
        "{}\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [services.app]\ndiscovery = {{ kind = \"static\", endpoints = [{{ addr = \"{b_inbound}\" }}] }}\n\
         server_identity = \"spiffe://example.org/app\"\n\n\
         [services.direct]\ntls = \"plaintext\"\nprotocol = \"http1\"\n\
         discovery = {{ kind = \"static\", endpoints = [{{ addr = \"127.0.0.1:{port}\" }}] }}\n\n\
         [[routes]]\nname = \"direct\"\nmatches = [{{ path = {{ prefix = \"/direct\" }} }}]\n\
         backends = [{{ service = \"direct\" }}]\n\n\
         [[outbound]]\nname = \"egress\"\nlisten = \"127.0.0.1:0\"\ndefault_service = \"app\"\n",
        identity(dir.path(), &mut ca, "caller")
    );
    std::fs::write(&a_config, &a_text).unwrap();
    let a = Proxy::start(&a_config, 2);
    let egress = a.addr("egress");

    // Across the mesh: the application saw the handshake's path and the caller's
    // verified identity, and every message came back unchanged.
    let said = finish(peer(
        &python,
        &["client", &format!("ws://{egress}/chat/room"), "50"],
    ));
    assert_eq!(said, "ok /chat/room spiffe://example.org/caller");

    // Over the plaintext hop: no identity.
    let said = finish(peer(
        &python,
        &["client", &format!("ws://{egress}/direct"), "10"],
    ));
    assert_eq!(said, "ok /direct -");

    // Several at once, all on the proxies' one mTLS connection.
    let clients: Vec<Child> = (0..4)
        .map(|i| {
            peer(
                &python,
                &["client", &format!("ws://{egress}/chat/{i}"), "20"],
            )
        })
        .collect();
    for (i, child) in clients.into_iter().enumerate() {
        assert_eq!(
            finish(child),
            format!("ok /chat/{i} spiffe://example.org/caller")
        );
    }

    // B's policy does not admit /private: the handshake is refused with 403.
    let said = finish(peer(
        &python,
        &["status", &format!("ws://{egress}/private")],
    ));
    assert_eq!(said, "status 403");

    // A refused switch leaves the client's connection HTTP: curl sends two upgrade
    // requests on one connection, the first refused by B's policy, the second answered
    // by the application (400: no WebSocket key), and opens no second connection.
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(["-o", "/dev/null", "-o", "/dev/null"])
        .args(["-w", "%{http_code} %{num_connects}\n"])
        .args(["-H", "Connection: Upgrade", "-H", "Upgrade: websocket"])
        .arg(format!("http://{egress}/private"))
        .arg(format!("http://{egress}/chat"))
        .output()
        .expect("curl is installed");
    let said = String::from_utf8(out.stdout).unwrap();
    assert_eq!(said, "403 1\n400 0\n", "{said}");

    // The tunnels in each proxy's metrics: six opened by A's egress (one, one plaintext,
    // four at once), five by B's inbound; none left open; every byte counted.
    let metrics = |admin: std::net::SocketAddr| curl(&[&format!("http://{admin}/metrics")]).1;
    let value = |text: &str, series: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
    };
    let mut text = metrics(a.addr("admin"));
    for _ in 0..50 {
        if value(&text, "mesh_tunnels_open{listener=\"egress\"}") == 0.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        text = metrics(a.addr("admin"));
    }
    assert_eq!(value(&text, "mesh_tunnels_open{listener=\"egress\"}"), 0.0);
    assert_eq!(value(&text, "mesh_tunnels_total{listener=\"egress\"}"), 6.0);
    let up = value(
        &text,
        "mesh_tunnel_bytes_total{listener=\"egress\",direction=\"client_to_upstream\"}",
    );
    assert!(up > 6.0 * f64::from(1 << 20), "{up}");
    common::assert_families_once(&text);
    let text = metrics(b.addr("admin"));
    assert_eq!(value(&text, "mesh_tunnels_total{listener=\"app\"}"), 5.0);

    // Plain HTTP to the same application beside the tunnels: its own answer (426, a
    // WebSocket server's to a request that does not upgrade) comes back.
    let (code, body) = curl(&[&format!("http://{egress}/chat")]);
    assert_eq!(code, 426, "{body}");
    let (code, body) = curl(&[&format!("http://{egress}/direct")]);
    assert_eq!(code, 426, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_through_an_edge_listener_and_a_quiet_tunnel_closed_at_its_idle_timeout() {
    let Some(python) = common::python_with("websockets", "WebSocket end to end") else {
        return;
    };
    let (_app, port) = start_app(&python);
    let dir = tempfile::tempdir().unwrap();
    let mut ca = TestCa::new("example.org").unwrap();
    let b_config = dir.path().join("b.toml");
    std::fs::write(
        &b_config,
        format!(
            "{}\n[[inbound]]\nname = \"app\"\nlisten = \"127.0.0.1:0\"\ntarget = \"127.0.0.1:{port}\"\n",
            identity(dir.path(), &mut ca, "app")
        ),
    )
    .unwrap();
    let b = Proxy::start(&b_config, 1);

    // A: an edge listener terminating TLS (a certificate from openssl), whose tunnels
    // close after 2 s without a byte.
    common::self_signed(dir.path(), "edge");
    let a_config = dir.path().join("a.toml");
    std::fs::write(
        &a_config,
        format!(
            "{}\n[services.app]\ndiscovery = {{ kind = \"static\", endpoints = [{{ addr = \"{}\" }}] }}\n\
             server_identity = \"spiffe://example.org/app\"\n\n\
             [[outbound]]\nname = \"edge\"\nlisten = \"127.0.0.1:0\"\ndefault_service = \"app\"\n\
             certificate = {{ cert = \"edge.crt\", key = \"edge.key\" }}\n\
             limits = {{ tunnel_idle_timeout = \"2s\" }}\n",
            identity(dir.path(), &mut ca, "caller"),
            b.addr("app")
        ),
    )
    .unwrap();
    let a = Proxy::start(&a_config, 1);
    let edge = a.addr("edge");
    let cert = dir.path().join("edge.crt");

    // wss:// verified against the edge certificate, then across the mesh.
    let said = finish(peer_trusting(
        &python,
        &["client", &format!("wss://{edge}/chat"), "20"],
        Some(&cert),
    ));
    assert_eq!(said, "ok /chat spiffe://example.org/caller");

    // A quiet tunnel is closed at the edge listener's idle timeout (B's is an hour).
    let said = finish(peer_trusting(
        &python,
        &["quiet", &format!("wss://{edge}/quiet")],
        Some(&cert),
    ));
    let waited: f64 = said
        .strip_prefix("closed after ")
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{said}"));
    assert!(
        (1.5..20.0).contains(&waited),
        "closed {waited} s after its last byte, for an idle timeout of 2 s"
    );
}
