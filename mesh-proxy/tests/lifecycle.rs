//! The process's life around its signals: a SIGHUP while the proxy is still starting
//! (waiting for SPIRE) neither kills it nor is lost; `--admin` holds across reloads; a
//! reload that hangs (a discovery file that is a FIFO nobody writes) does not hold up a
//! SIGTERM's drain and exit.
#![cfg(unix)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Proxy, app, curl, metrics_until};

/// The series that counts a first applied reload.
const RELOADED: &str = "mesh_proxy_reloads_total{result=\"applied\"} 1";

/// Sends `signal` to process `pid` with the shell's `kill`.
fn kill(signal: &str, pid: u32) {
    let ok = Command::new("sh")
        .args(["-c", &format!("kill -{signal} {pid}")])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{signal} {pid}");
}

/// A proxy that waits for its first SVID from a SPIRE agent that is not there (it keeps
/// trying, not ready meanwhile), with the address of its admin listener, which starts
/// (and says so) after its signals are watched and before it waits for SPIRE.
fn waiting_for_spire(dir: &std::path::Path) -> (std::process::Child, String) {
    let (child, admin, _) = waiting_for_spire_with(dir, "");
    (child, admin)
}

/// [`waiting_for_spire`] with `extra` appended to its configuration, and every line of
/// its log.
fn waiting_for_spire_with(
    dir: &std::path::Path,
    extra: &str,
) -> (
    std::process::Child,
    String,
    std::sync::mpsc::Receiver<String>,
) {
    let config = dir.join("spire.toml");
    std::fs::write(
        &config,
        format!(
            "[identity]\nsource = \"spire\"\nsocket = \"unix:///nonexistent/agent.sock\"\n\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n{extra}"
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mesh-proxy"))
        .args(["run", "--config"])
        .arg(&config)
        .args(["--log", "info", "--log-format", "plain"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let (lines_tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            if line.contains("admin listening")
                && let Some(addr) = line.split("addr=").nth(1)
            {
                let _ = tx.send(addr.split_whitespace().next().unwrap_or("").to_owned());
            }
            let _ = lines_tx.send(line);
        }
    });
    let admin = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the proxy waits for SPIRE");
    (child, admin, lines)
}

/// Waits up to 10 s for `child` to exit, and asserts it exited with success.
async fn exits_cleanly(mut child: std::process::Child, after: &str) {
    let mut status = None;
    for _ in 0..100 {
        status = child.try_wait().unwrap();
        if status.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = child.kill();
    assert!(
        status
            .unwrap_or_else(|| panic!("exits within 10 s of {after}"))
            .success(),
        "{status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_while_starting_waits_and_sigterm_still_stops_it() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, _) = waiting_for_spire(dir.path());
    assert!(child.try_wait().unwrap().is_none(), "starting");
    kill("HUP", child.id());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "a SIGHUP while starting killed the proxy: {:?}",
        child.try_wait()
    );
    kill("TERM", child.id());
    exits_cleanly(child, "SIGTERM").await;
}

/// `POST /shutdown` while the proxy still waits for its identity ends the start (it was
/// answered "shutting down", and then kept waiting, to drain right after starting).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_asked_for_while_starting_ends_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let (child, admin) = waiting_for_spire(dir.path());
    assert_eq!(curl(&[&format!("http://{admin}/ready")]).0, 503);
    let (code, body) = curl(&["-X", "POST", &format!("http://{admin}/shutdown")]);
    assert_eq!(code, 200, "{body}");
    exits_cleanly(child, "POST /shutdown").await;
}

/// While it waits for SPIRE, a proxy with a transparent listener warns, once, that the
/// listener is not bound yet and what to exempt from the redirect rules (the SPIRE
/// agent's connections to its server would be refused, and the SVID never come).
#[test]
fn waiting_for_spire_with_a_transparent_listener_warns_once() {
    let dir = tempfile::tempdir().unwrap();
    let (child, _, lines) = waiting_for_spire_with(
        dir.path(),
        "[[outbound]]\nname = \"transparent\"\nlisten = \"127.0.0.1:0\"\ntransparent = true\n",
    );
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _child = Kill(child);
    // Two attempts (each gives up after 10 s): one warning, with the first.
    let (mut attempts, mut warnings) = (0, Vec::new());
    while attempts < 2 {
        let line = lines
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("{attempts} attempts, warnings {warnings:?}"));
        if line.contains("no SVID from the Workload API yet") {
            attempts += 1;
        } else if line.contains("transparent listeners are not bound") {
            warnings.push(line);
        }
    }
    // A second warning would follow the second attempt's line at once.
    for _ in 0..10 {
        match lines.recv_timeout(Duration::from_millis(500)) {
            Ok(line) if line.contains("transparent listeners are not bound") => {
                warnings.push(line);
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    for part in ["127.0.0.1:0", "EXEMPT_USERS", "mesh-redirect.sh"] {
        assert!(warnings[0].contains(part), "{part} in {}", warnings[0]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_keep_the_admin_flag_and_a_hung_one_does_not_hold_up_the_drain() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = app().await;
    let endpoints = dir.path().join("endpoints.toml");
    std::fs::write(
        &endpoints,
        format!("[[endpoints]]\naddr = \"{upstream}\"\n"),
    )
    .unwrap();
    // No [admin] in the file: `--admin` gives it.
    let text = |discovery: &str, prefix: &str| {
        format!(
            "[services.app]\ntls = \"plaintext\"\ndiscovery = {{ kind = \"file\", path = \"{discovery}\" }}\n\n\
             [[routes]]\nname = \"only\"\nmatches = [{{ path = {{ prefix = \"{prefix}\" }} }}]\n\
             backends = [{{ service = \"app\" }}]\n\n\
             [[outbound]]\nname = \"egress\"\nlisten = \"127.0.0.1:0\"\n"
        )
    };
    let config = dir.path().join("mesh.toml");
    std::fs::write(&config, text("endpoints.toml", "/a")).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_mesh-proxy"));
    command.args(["run", "--config"]).arg(&config).args([
        "--admin",
        "127.0.0.1:0",
        "--log",
        "info",
    ]);
    let proxy = Proxy::start_command(command, 2, Stdio::inherit());
    let egress = format!("http://{}", proxy.addr("egress"));
    let admin = format!("http://{}", proxy.addr("admin"));
    assert_eq!(curl(&[&format!("{egress}/a")]).0, 200);
    assert_eq!(curl(&[&format!("{egress}/b")]).0, 404);

    // A reload of the file, which has no [admin]: applied, the flag's listener kept.
    std::fs::write(&config, text("endpoints.toml", "/b")).unwrap();
    assert_eq!(curl(&["-X", "POST", &format!("{admin}/reload")]).0, 202);
    let (applied, metrics) = metrics_until(&format!("{admin}/metrics"), &[RELOADED]).await;
    assert!(applied, "the reload was applied: {metrics}");
    // Both results are there from the start: the first failure is an increase.
    assert!(
        metrics.contains("mesh_proxy_reloads_total{result=\"invalid\"} 0"),
        "{metrics}"
    );
    assert_eq!(curl(&[&format!("{egress}/b")]).0, 200);

    // A reload that reads a FIFO no one writes hangs; SIGTERM drains and exits anyway.
    let fifo = dir.path().join("fifo.toml");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success(), "mkfifo");
    std::fs::write(&config, text("fifo.toml", "/c")).unwrap();
    assert_eq!(curl(&["-X", "POST", &format!("{admin}/reload")]).0, 202);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Still serving with the old configuration meanwhile.
    assert_eq!(curl(&[&format!("{egress}/b")]).0, 200);
    let started = tokio::time::Instant::now();
    assert!(proxy.terminate().success(), "exit 0 after SIGTERM");
    eprintln!("exited {:?} after SIGTERM", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_listener_on_every_address_takes_local_ipv4_control() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("mesh.toml");
    std::fs::write(&config, "[admin]\nlisten = \"[::]:0\"\n").unwrap();
    if std::net::TcpListener::bind("[::]:0").is_err() {
        eprintln!("skipped: no IPv6 here");
        return;
    }
    let proxy = Proxy::start(&config, 1);
    let port = proxy.addr("admin").port();
    // With net.ipv6.bindv6only, a `[::]` listener takes no IPv4.
    if std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        eprintln!("skipped: a [::] listener takes no IPv4 here");
        return;
    }
    // 127.0.0.1 reaches a `[::]` listener as ::ffff:127.0.0.1: loopback all the same.
    let reload = format!("http://127.0.0.1:{port}/reload");
    assert_eq!(curl(&["-X", "POST", &reload]).0, 202);
    let metrics = format!("http://127.0.0.1:{port}/metrics");
    let (applied, _) = metrics_until(&metrics, &[RELOADED]).await;
    assert!(applied, "the reload from 127.0.0.1 was taken");
    // A change to what every server took at start needs a restart.
    std::fs::write(
        &config,
        "drain_timeout = \"5s\"\n[admin]\nlisten = \"[::]:0\"\n",
    )
    .unwrap();
    assert_eq!(curl(&["-X", "POST", &reload]).0, 202);
    let (counted, metrics) = metrics_until(
        &metrics,
        &[RELOADED, "mesh_proxy_reloads_total{result=\"invalid\"} 1"],
    )
    .await;
    assert!(
        counted,
        "one reload applied, the drain_timeout change refused: {metrics}"
    );
    assert!(proxy.terminate().success());
}

/// One of this host's own addresses that is not loopback (the one its default route
/// leaves from; nothing is sent), or `None` on a host without one.
fn own_address() -> Option<std::net::IpAddr> {
    let probe = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    probe.connect("192.0.2.1:9").ok()?;
    let ip = probe.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

/// An admin listener reachable from other hosts (a pod's address, for probes) serves
/// probes and metrics there, and keeps the configuration, the decisions and control to
/// loopback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_listener_on_the_network_keeps_configuration_and_control_local() {
    let Some(ip) = own_address() else {
        eprintln!("skipped: this host has no address but loopback");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("mesh.toml");
    std::fs::write(&config, "[admin]\nlisten = \"0.0.0.0:0\"\ndecisions = 16\n").unwrap();
    let proxy = Proxy::start(&config, 1);
    let port = proxy.addr("admin").port();
    let remote = std::net::SocketAddr::new(ip, port);
    for (method, path, code) in [
        ("GET", "/ready", 200),
        ("GET", "/live", 200),
        ("GET", "/metrics", 200),
        ("GET", "/config", 403),
        ("GET", "/decisions", 403),
        ("POST", "/reload", 403),
        ("POST", "/shutdown", 403),
    ] {
        let (got, body) = curl(&["-X", method, &format!("http://{remote}{path}")]);
        assert_eq!(got, code, "{method} {path} from {ip}: {body}");
    }
    // From loopback, all of it.
    for path in ["/config", "/decisions"] {
        let (got, body) = curl(&[&format!("http://127.0.0.1:{port}{path}")]);
        assert_eq!(got, 200, "{path} from loopback: {body}");
    }
    assert!(proxy.terminate().success());
}

/// A TCP server that answers each connection with `tag` and closes.
async fn tagged(tag: &'static str) -> std::net::SocketAddr {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let _ = tcp.write_all(tag.as_bytes()).await;
            let _ = tcp.shutdown().await;
        }
    });
    addr
}

/// What a connection to `addr` is answered (after sending a byte that is no HTTP).
async fn answer(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = tcp.write_all(b"\x00").await;
    let mut out = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_string(&mut out))
        .await
        .expect("answered");
    out
}

/// A reload that changes the service behind an opaque listener, or behind an `auto`
/// listener's opaque fallback, takes the next connections there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_moves_opaque_listeners_to_their_services_new_endpoints() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (tagged("old").await, tagged("new").await);
    let text = |endpoint| {
        format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n\n\
             [services.db]\ntls = \"plaintext\"\n\
             discovery = {{ kind = \"static\", endpoints = [{{ addr = \"{endpoint}\" }}] }}\n\n\
             [[outbound]]\nname = \"opaque\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"opaque\"\n\
             default_service = \"db\"\n\n\
             [[outbound]]\nname = \"auto\"\nlisten = \"127.0.0.1:0\"\ndefault_service = \"db\"\n"
        )
    };
    let config = dir.path().join("mesh.toml");
    std::fs::write(&config, text(old)).unwrap();
    let proxy = Proxy::start(&config, 3);
    for listener in ["opaque", "auto"] {
        assert_eq!(answer(proxy.addr(listener)).await, "old", "{listener}");
    }
    std::fs::write(&config, text(new)).unwrap();
    proxy.signal("HUP");
    let admin = format!("http://{}/metrics", proxy.addr("admin"));
    let (applied, _) = metrics_until(&admin, &[RELOADED]).await;
    assert!(applied, "reloaded");
    for listener in ["opaque", "auto"] {
        assert_eq!(answer(proxy.addr(listener)).await, "new", "{listener}");
    }
    assert!(proxy.terminate().success());
}

#[path = "../../mesh-core/tests/support/dns.rs"]
mod dns;

/// A reload that rebuilds a DNS-discovered service while DNS is down keeps the running
/// clients, which have their endpoints, and says so: swapped in, the new ones would have
/// had none (their first lookup cannot answer), and every request would have failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_while_dns_is_down_keeps_the_services_endpoints() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = app().await;
    let db = tagged("db").await;
    let mut server = dns::TestDns::start().await;
    server.set_a("app.example.test.", 1, &["127.0.0.1"]).await;
    server.set_a("db.example.test.", 1, &["127.0.0.1"]).await;
    let text = |retries: u32| {
        format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n\n\
             [services.app]\ntls = \"plaintext\"\n\
             discovery = {{ kind = \"dns\", host = \"app.example.test\", port = {}, min_ttl = \"1s\", name_servers = [\"{dns}\"] }}\n\
             retry = {{ max_retries = {retries} }}\n\n\
             [services.db]\ntls = \"plaintext\"\nprotocol = \"opaque\"\n\
             discovery = {{ kind = \"dns\", host = \"db.example.test\", port = {}, min_ttl = \"1s\", name_servers = [\"{dns}\"] }}\n\
             connect_timeout = \"{retries}s\"\n\n\
             [[outbound]]\nname = \"egress\"\nlisten = \"127.0.0.1:0\"\ndefault_service = \"app\"\n\n\
             [[outbound]]\nname = \"opaque\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"opaque\"\n\
             default_service = \"db\"\n",
            upstream.port(),
            db.port(),
            dns = server.addr,
        )
    };
    let config = dir.path().join("mesh.toml");
    std::fs::write(&config, text(2)).unwrap();
    let proxy = Proxy::start(&config, 3);
    let egress = format!("http://{}/x", proxy.addr("egress"));
    assert_eq!(curl(&[&egress]).0, 200, "resolved at start");
    assert_eq!(answer(proxy.addr("opaque")).await, "db");

    // DNS goes away; both services change, so both clients are rebuilt.
    server.server.shutdown_gracefully().await.unwrap();
    std::fs::write(&config, text(3)).unwrap();
    proxy.signal("HUP");
    let metrics = format!("http://{}/metrics", proxy.addr("admin"));
    // The reload waits up to 5 s for the new clients' endpoints.
    let invalid = "mesh_proxy_reloads_total{result=\"invalid\"} 1";
    let (mut refused, mut text_now) = metrics_until(&metrics, &[invalid]).await;
    for _ in 0..2 {
        if !refused {
            (refused, text_now) = metrics_until(&metrics, &[invalid]).await;
        }
    }
    assert!(refused, "the reload was not refused: {text_now}");
    assert!(!text_now.contains(RELOADED), "{text_now}");
    // The running clients kept their endpoints.
    assert_eq!(curl(&[&egress]).0, 200);
    assert_eq!(answer(proxy.addr("opaque")).await, "db");
    assert!(proxy.terminate().success());
}

/// A configuration file that cannot be read (here a FIFO no one writes; on a VM, a stale
/// network mount) stalls neither the proxy nor its drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_file_that_hangs_stalls_neither_serving_nor_the_drain() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = app().await;
    let config = dir.path().join("mesh.toml");
    std::fs::write(
        &config,
        format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n\n\
             [services.app]\ntls = \"plaintext\"\n\
             discovery = {{ kind = \"static\", endpoints = [{{ addr = \"{upstream}\" }}] }}\n\n\
             [[outbound]]\nname = \"egress\"\nlisten = \"127.0.0.1:0\"\ndefault_service = \"app\"\n"
        ),
    )
    .unwrap();
    // One worker: a read that blocked it would stop everything.
    let mut command = Command::new(env!("CARGO_BIN_EXE_mesh-proxy"));
    command
        .args(["run", "--config"])
        .arg(&config)
        .args(["--workers", "1", "--log", "info"]);
    let proxy = Proxy::start_command(command, 2, Stdio::inherit());
    let egress = format!("http://{}/", proxy.addr("egress"));
    assert_eq!(curl(&[&egress]).0, 200);
    std::fs::remove_file(&config).unwrap();
    let made = Command::new("mkfifo").arg(&config).status().unwrap();
    assert!(made.success(), "mkfifo");
    proxy.signal("HUP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        curl(&[&egress]).0,
        200,
        "still serving while the reload waits"
    );
    assert!(proxy.terminate().success(), "exit 0 after SIGTERM");
}

/// An SVID that expires with no new one to replace it leaves the proxy not ready (peers
/// refuse it both ways); its expiry is in the metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_svid_makes_the_proxy_not_ready() {
    use std::time::SystemTime;
    let dir = tempfile::tempdir().unwrap();
    let mut ca = mesh_spiffe::test_ca::TestCa::new("example.org").unwrap();
    let now = SystemTime::now();
    // Long enough for the proxy to start and answer on a loaded machine.
    let not_after = now + Duration::from_secs(8);
    let svid = ca
        .leaf()
        .uri("spiffe://example.org/short")
        .validity(now - Duration::from_secs(60), not_after)
        .build()
        .unwrap();
    let (chain, key) = svid.to_pem();
    std::fs::write(dir.path().join("short.crt"), chain).unwrap();
    std::fs::write(dir.path().join("short.key"), key).unwrap();
    std::fs::write(dir.path().join("bundle.pem"), ca.bundle().unwrap().to_pem()).unwrap();
    let file = |name: &str| toml::Value::String(dir.path().join(name).display().to_string());
    let config = dir.path().join("short.toml");
    std::fs::write(
        &config,
        format!(
            "[identity]\nsource = \"files\"\ncert = {}\nkey = {}\n\
             [identity.bundles]\n\"example.org\" = {}\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n",
            file("short.crt"),
            file("short.key"),
            file("bundle.pem"),
        ),
    )
    .unwrap();
    let proxy = Proxy::start(&config, 1);
    let admin = format!("http://{}", proxy.addr("admin"));
    assert_eq!(curl(&[&format!("{admin}/ready")]).0, 200);
    let (_, metrics) = curl(&[&format!("{admin}/metrics")]);
    let expiry = not_after
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        metrics.contains(&format!(
            "mesh_proxy_identity_expiration_timestamp_seconds {expiry}\n"
        )),
        "{metrics}"
    );
    let mut ready = (0, String::new());
    for _ in 0..200 {
        ready = curl(&[&format!("{admin}/ready")]);
        if ready.0 != 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ready.0, 503, "{}", ready.1);
    assert!(ready.1.contains("SVID expired at"), "{}", ready.1);
    assert!(proxy.terminate().success());
}
