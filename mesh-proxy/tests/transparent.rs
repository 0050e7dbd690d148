//! Transparent mode end to end, in a network namespace this test creates: the shipped
//! iptables script redirects the namespace's outgoing connections, IPv4 and IPv6, to the
//! outbound proxy's transparent listeners (127.0.0.1 and [::1]), which mesh the ones to a
//! service's address (mTLS to the inbound proxy, then the app) and pass the others
//! through; the script's exempt users are not redirected, and a failed install leaves no
//! rule behind.
//!
//! Needs root (or CAP_NET_ADMIN), `ip` (iproute2), `iptables` and `ip6tables`, `setpriv`,
//! curl and python3;
//! where any is missing or namespaces are not permitted, the test says so and passes,
//! unless `MESH_REQUIRE_NETNS=1` (as CI sets) makes that a failure.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{Proxy, identity};
use mesh_spiffe::test_ca::TestCa;

/// The group the proxies run as: the redirect rules exempt it.
const PROXY_GID: &str = "4242";

/// A network namespace, deleted on drop.
struct Netns(String);

impl Netns {
    fn create() -> Result<Self, String> {
        let name = format!("mesh-transparent-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        let ns = Self(name);
        ns.root(&["ip", "netns", "add", &ns.0])?;
        // 10.55.0.0/24 local to the namespace (on its loopback: no dummy or veth
        // driver needed), so its addresses stand for other hosts.
        for setup in ["ip link set lo up", "ip addr add 10.55.0.1/24 dev lo"] {
            ns.run_sh(setup)?;
        }
        Ok(ns)
    }

    fn root(&self, args: &[&str]) -> Result<(), String> {
        let out = Command::new(args[0])
            .args(&args[1..])
            .output()
            .map_err(|e| format!("{}: {e}", args[0]))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "`{}`: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// A command inside the namespace.
    fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0, program]);
        c
    }

    fn run_sh(&self, script: &str) -> Result<String, String> {
        let out = self
            .command("sh")
            .args(["-c", script])
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "`{script}`: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// `curl` in the namespace: the status and body.
    fn curl(&self, url: &str) -> (u16, String) {
        let out = self
            .command("curl")
            .args([
                "-sS",
                "--max-time",
                "10",
                "-o",
                "-",
                "-w",
                "\n%{http_code}",
                url,
            ])
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let (body, code) = text.rsplit_once('\n').unwrap();
        (code.trim().parse().unwrap_or(0), body.to_owned())
    }

    /// A mesh-proxy in the namespace, in the exempt group.
    fn proxy(&self, config: &Path, listeners: usize) -> Proxy {
        let mut c = self.command("setpriv");
        c.args(["--regid", PROXY_GID, "--clear-groups", "--"])
            .arg(env!("CARGO_BIN_EXE_mesh-proxy"))
            .args(["run", "--config"])
            .arg(config)
            .args(["--log", "info"]);
        Proxy::start_command(c, listeners, Stdio::inherit())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// An HTTP app and a raw TCP echo in the namespace (python3): the app answers
/// `NAME PATH id=<x-mesh-client-id>`.
const APPS: &str = r#"
import http.server, socketserver, sys, threading
name, http_port, echo_host, echo_port = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
class App(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = f"{name} {self.path} id={self.headers.get('x-mesh-client-id', '-')}".encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.sendall(b"echo> ")
        while True:
            data = self.request.recv(4096)
            if not data:
                return
            self.request.sendall(data)
socketserver.ThreadingTCPServer.allow_reuse_address = True
http.server.ThreadingHTTPServer.allow_reuse_address = True
echo = socketserver.ThreadingTCPServer((echo_host, echo_port), Echo)
threading.Thread(target=echo.serve_forever, daemon=True).start()
print("ready", flush=True)
http.server.ThreadingHTTPServer(("0.0.0.0", http_port), App).serve_forever()
"#;

/// A raw TCP exchange from inside the namespace: connect, send `line`, read until the
/// echo of it arrives (python3, so the test needs no netcat).
const CLIENT: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(sys.argv[3].encode())
got = b""
while not got.endswith(sys.argv[3].encode()):
    chunk = s.recv(4096)
    if not chunk:
        break
    got += chunk
print(got.decode(), end="")
"#;

/// A client that keeps its connection: sends `one`, prints the answer, waits for a line
/// on stdin, then sends `two` on the same connection and prints that answer.
const LONG_CLIENT: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
def ask(word):
    s.sendall(word)
    got = b""
    while not got.endswith(word):
        chunk = s.recv(4096)
        if not chunk:
            break
        got += chunk
    print(got.decode(), end="", flush=True)
ask(b"one\n")
sys.stdin.readline()
ask(b"two\n")
"#;

fn skip(why: &str) {
    assert!(
        std::env::var("MESH_REQUIRE_NETNS").as_deref() != Ok("1"),
        "MESH_REQUIRE_NETNS=1 but the transparent-mode test cannot run: {why}"
    );
    eprintln!("SKIPPED transparent mode end to end: {why}");
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/iptables/mesh-redirect.sh")
}

#[test]
fn redirected_connections_are_meshed_by_original_destination_or_passed_through() {
    for tool in ["ip", "iptables", "setpriv", "python3", "curl"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return skip(&format!("`{tool}` is not installed"));
        }
    }
    let ns = match Netns::create() {
        Ok(ns) => ns,
        Err(e) => return skip(&format!("cannot create a network namespace: {e}")),
    };
    if let Err(e) = ns.run_sh("iptables -t nat -S OUTPUT") {
        return skip(&format!("iptables does not work in the namespace: {e}"));
    }
    // IPv6 too: fd55::/64 local to the namespace, as 10.55.0.0/24 is.
    if let Err(e) =
        ns.run_sh("ip -6 route add local fd55::/64 dev lo && ip6tables -t nat -S OUTPUT")
    {
        return skip(&format!(
            "IPv6 (ip6tables) does not work in the namespace: {e}"
        ));
    }

    // The apps: HTTP on :8080 behind the inbound proxy, and the same unmeshed on
    // 10.55.0.1:8080; a TCP echo on 127.0.0.1:7000 behind an opaque inbound listener.
    let mut apps = ns
        .command("python3")
        .args(["-c", APPS, "app", "8080", "127.0.0.1", "7000"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(apps.stdout.take().unwrap()),
        &mut ready,
    )
    .unwrap();
    assert_eq!(ready.trim(), "ready");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _apps = Kill(apps);

    let dir = tempfile::tempdir().unwrap();
    let mut ca = TestCa::new("example.org").unwrap();
    let inbound = dir.path().join("inbound.toml");
    std::fs::write(
        &inbound,
        format!(
            "{}\n\
             [[inbound]]\nname = \"app\"\nlisten = \"127.0.0.1:4143\"\ntarget = \"127.0.0.1:8080\"\n\
             [[inbound]]\nname = \"db\"\nlisten = \"127.0.0.1:4144\"\ntarget = \"127.0.0.1:7000\"\nprotocol = \"opaque\"\n",
            identity(dir.path(), &mut ca, "app")
        ),
    )
    .unwrap();
    let outbound = dir.path().join("outbound.toml");
    std::fs::write(
        &outbound,
        format!(
            "drain_timeout = \"1s\"\n{}\n[admin]\nlisten = \"127.0.0.1:4191\"\n\
             [services.users]\n\
             discovery = {{ kind = \"static\", endpoints = [{{ addr = \"127.0.0.1:4143\" }}] }}\n\
             server_identity = \"spiffe://example.org/app\"\naddresses = [\"10.55.0.10:80\", \"[fd55::10]:80\"]\n\
             [services.db]\n\
             discovery = {{ kind = \"static\", endpoints = [{{ addr = \"127.0.0.1:4144\" }}] }}\n\
             server_identity = \"spiffe://example.org/app\"\naddresses = [\"10.55.0.8/29:5432\"]\n\
             [services.cache]\nprotocol = \"opaque\"\n\
             discovery = {{ kind = \"static\", endpoints = [{{ addr = \"127.0.0.1:4144\" }}] }}\n\
             server_identity = \"spiffe://example.org/app\"\naddresses = [\"10.55.0.20:6379\"]\n\
             [[outbound]]\nname = \"transparent\"\nlisten = \"127.0.0.1:4140\"\ntransparent = true\n\
             [[outbound]]\nname = \"transparent6\"\nlisten = \"[::1]:4140\"\ntransparent = true\n",
            identity(dir.path(), &mut ca, "web")
        ),
    )
    .unwrap();
    let _inbound = ns.proxy(&inbound, 2);
    let _outbound = ns.proxy(&outbound, 3);

    // Without the transparent listener's port the script refuses to install anything:
    // a guessed one could be an explicit listener's.
    let unset = ns
        .command("sh")
        .arg(script())
        .arg("install")
        .env_remove("PROXY_PORT")
        .output()
        .unwrap();
    assert_eq!(unset.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&unset.stderr).contains("set PROXY_PORT"),
        "{}",
        String::from_utf8_lossy(&unset.stderr)
    );
    assert!(ns.run_sh("iptables -t nat -S MESH_OUTPUT").is_err());
    let install = |settings: &[(&str, &str)]| {
        let mut c = ns.command("sh");
        c.arg(script()).arg("install").env("PROXY_PORT", "4140");
        for (name, value) in settings {
            c.env(name, value);
        }
        c.output().unwrap()
    };
    let none_installed = || {
        ns.run_sh("iptables -t nat -S MESH_OUTPUT").is_err()
            && ns.run_sh("ip6tables -t nat -S MESH_OUTPUT").is_err()
    };
    // A network of the other family is refused before anything is installed: IPv6 ones
    // go in ONLY6 and SKIP6.
    let mixed = install(&[("PROXY_GID", PROXY_GID), ("ONLY", "10.55.0.0/24 fd55::/64")]);
    assert_eq!(mixed.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&mixed.stderr).contains("put it in ONLY6"));
    assert!(none_installed());
    // A rule that fails in the second family takes the first family's out again.
    let failed = install(&[
        ("PROXY_GID", PROXY_GID),
        ("ONLY", "10.55.0.0/24"),
        ("IPV6", "1"),
        ("ONLY6", "fd55::/999"),
    ]);
    assert_eq!(failed.status.code(), Some(1));
    assert!(
        none_installed(),
        "{}",
        String::from_utf8_lossy(&failed.stderr)
    );
    // The shipped script: redirect the namespace's 10.55.0.0/24 and fd55::/64 to the
    // listeners, the proxies' own group and user 65534 (as a SPIRE agent's would be)
    // exempt.
    let installed = install(&[
        ("PROXY_GID", PROXY_GID),
        ("EXEMPT_USERS", "65534"),
        ("ONLY", "10.55.0.0/24"),
        ("IPV6", "1"),
        ("ONLY6", "fd55::/64"),
    ]);
    assert!(
        installed.status.success(),
        "{}",
        String::from_utf8_lossy(&installed.stderr)
    );
    for ipt in ["iptables", "ip6tables"] {
        let rules = ns.run_sh(&format!("{ipt} -t nat -S MESH_OUTPUT")).unwrap();
        assert!(rules.contains("--gid-owner 4242 -j RETURN"), "{rules}");
        assert!(rules.contains("--uid-owner 65534 -j RETURN"), "{rules}");
        assert!(rules.contains("-j REDIRECT --to-ports 4140"), "{rules}");
    }

    // The exempt user's connections are not redirected: to a meshed address where
    // nothing listens, it reaches nothing.
    let exempt = ns
        .command("setpriv")
        .args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "--",
        ])
        .args([
            "curl",
            "-sS",
            "--max-time",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg("http://10.55.0.10/")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&exempt.stdout), "000");

    // IPv6: redirected to [::1]:4140, the second transparent listener, and meshed.
    let (status, body) = ns.curl("http://[fd55::10]/six");
    assert_eq!(
        (status, body.as_str()),
        (200, "app /six id=spiffe://example.org/web")
    );

    // A meshed destination: through both proxies over mTLS; the app sees the caller's
    // verified identity.
    let (status, body) = ns.curl("http://10.55.0.10/hello");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, "app /hello id=spiffe://example.org/web");
    for i in 0..20 {
        let (status, body) = ns.curl(&format!("http://10.55.0.10/{i}"));
        assert_eq!(
            (status, body),
            (200, format!("app /{i} id=spiffe://example.org/web"))
        );
    }

    // Opaque TCP to a meshed destination: detected, then relayed over mTLS. The service
    // claims a network (10.55.0.8/29 at 5432): any of its addresses is the service.
    for ip in ["10.55.0.11", "10.55.0.14"] {
        let out = ns
            .command("python3")
            .args(["-c", CLIENT, ip, "5432", "ping\n"])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "echo> ping\n", "{ip}");
    }

    // A service whose protocol is opaque is relayed without detection: bytes that look
    // like an HTTP request line (`SET k v`, as a Redis inline command) reach the target
    // as they are (detected, they went to the HTTP server and got a 400), and a server
    // that speaks first is not held up by the peek timeout.
    let out = ns
        .command("python3")
        .args(["-c", CLIENT, "10.55.0.20", "6379", "SET k v\n"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "echo> SET k v\n");

    // Unmatched: passed through as it is, in the clear (no identity: not meshed).
    let (status, body) = ns.curl("http://10.55.0.1:8080/plain");
    assert_eq!((status, body.as_str()), (200, "app /plain id=-"));

    // Dialled directly rather than redirected: closed, nothing proxied.
    let (status, _) = ns.curl("http://127.0.0.1:4140/");
    assert_eq!(status, 0);

    let (_, metrics) = ns.curl("http://127.0.0.1:4191/metrics");
    common::assert_families_once(&metrics);
    for line in [
        r#"mesh_transparent_connections_total{listener="transparent",outcome="meshed"} 24"#,
        r#"mesh_transparent_connections_total{listener="transparent",outcome="passthrough"} 1"#,
        r#"mesh_transparent_connections_total{listener="transparent6",outcome="meshed"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    // With connection tracking on, the kernel gives an unredirected connection its own
    // destination (the listener: refused); without, none.
    assert!(
        metrics.contains(r#"{listener="transparent",outcome="refused"} 1"#)
            || metrics.contains(r#"{listener="transparent",outcome="no_destination"} 1"#),
        "{metrics}"
    );

    // A connection to `db` open across a reload that changes `db`.
    let mut long = ns
        .command("python3")
        .args(["-c", LONG_CLIENT, "10.55.0.13", "5432"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut long_out = std::io::BufReader::new(long.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut long_out, &mut line).unwrap();
    assert_eq!(line, "echo> one\n");

    // A reload moves `users` to another address, keeping the listener, and changes `db`.
    let text = std::fs::read_to_string(&outbound).unwrap();
    let text = text.replace("10.55.0.10:80", "10.55.0.12:80").replace(
        "addresses = [\"10.55.0.8/29:5432\"]",
        "addresses = [\"10.55.0.8/29:5432\"]\nconnect_timeout = \"3s\"",
    );
    std::fs::write(&outbound, text).unwrap();
    let reload = ns
        .command("curl")
        .args(["-sS", "-X", "POST", "http://127.0.0.1:4191/reload"])
        .output()
        .unwrap();
    assert!(reload.status.success());
    let (status, body) = ns.curl("http://10.55.0.12/moved");
    assert_eq!(
        (status, body.as_str()),
        (200, "app /moved id=spiffe://example.org/web")
    );
    // Past the drain timeout (1 s), the connection still carries bytes: the changed
    // service's server was kept, not drained. (It was drained and cut before.)
    std::thread::sleep(std::time::Duration::from_millis(1500));
    std::io::Write::write_all(long.stdin.as_mut().unwrap(), b"go\n").unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut long_out, &mut rest).unwrap();
    assert_eq!(rest, "two\n", "the connection did not survive the reload");
    assert!(long.wait().unwrap().success());
    // The old address is nobody's now: passed through, to nothing listening there.
    assert_eq!(ns.curl("http://10.55.0.10/hello").0, 0);

    // The script takes its rules out again, both families' even when told only of IPv4
    // (`IPV6` unset): an IPv6 chain left behind would send the host's IPv6 connections
    // to a proxy that is gone.
    let removed = ns
        .command("sh")
        .arg(script())
        .arg("remove")
        .env_remove("IPV6")
        .status()
        .unwrap();
    assert!(removed.success());
    assert!(none_installed());
    let (status, body) = ns.curl("http://10.55.0.1:8080/direct");
    assert_eq!((status, body.as_str()), (200, "app /direct id=-"));
}
