//! `curl` → outbound proxy → mTLS → inbound proxy → a local application, with two real
//! `mesh-proxy` processes on loopback and identities from PEM files written by the test
//! CA: HTTP/1.1 and HTTP/2 end to end, the peer identity header (never the client's),
//! an authorization deny, an application that is down, the admin endpoints, a broken
//! reload that keeps serving, a drain on SIGTERM that exits 0, and access logs.
#![cfg(unix)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod common;

use std::time::Duration;

use common::{Proxy, app, assert_families_once, curl, identity, inbound_config, outbound_config};
use mesh_spiffe::test_ca::TestCa;

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

    // A Host with userinfo would be routed by one name and served by another: 400.
    let (code, body) = curl(&[
        "-H",
        "Host: app:1@admin.internal",
        &format!("{egress}/hello"),
    ]);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("Host"), "{body}");

    // Max-Forwards: each proxy is a hop. 0 stops at A, 1 at B, 2 reaches the app.
    let probe = |method: &str, hops: &str| {
        curl(&[
            "-X",
            method,
            "-H",
            &format!("Max-Forwards: {hops}"),
            "-H",
            "Authorization: Bearer secret",
            &format!("{egress}/probe"),
        ])
    };
    assert_eq!(probe("OPTIONS", "0"), (200, String::new()));
    assert_eq!(probe("OPTIONS", "1"), (200, String::new()));
    let (code, body) = probe("OPTIONS", "2");
    assert_eq!(code, 200);
    assert!(body.starts_with("OPTIONS /probe HTTP/1.1"), "{body}");
    // TRACE says which hop answered: A reflects the request as curl sent it; B the one
    // that crossed the mesh (marked with its HTTP/1.1 origin). Neither shows credentials.
    let (code, body) = probe("TRACE", "0");
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("TRACE /probe HTTP/1.1\r\n"), "{body}");
    assert!(!body.contains("mesh-orig-proto"), "{body}");
    let (code, body) = probe("TRACE", "1");
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("TRACE /probe HTTP/1.1\r\n"), "{body}");
    assert!(body.contains("max-forwards: 0\r\n"), "{body}");
    assert!(body.contains("mesh-orig-proto: HTTP/1.1\r\n"), "{body}");
    assert!(!body.contains("secret"), "{body}");

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
        // The service's endpoint pool; HTTP/2 to B (ALPN), so no HTTP/1.1 connection.
        "mesh_client_pool_connections{service=\"app\",server_address=",
        "mesh_client_pool_overflows_total{service=\"app\",server_address=",
    ] {
        assert!(metrics.contains(series), "{series} missing from\n{metrics}");
    }
    // Each family once, whatever the number of services (Prometheus refuses a family
    // described twice), with both services' series in it.
    assert_families_once(&metrics);
    for service in ["app", "down"] {
        assert!(
            metrics.contains(&format!(
                "mesh_client_try_duration_seconds_count{{service=\"{service}\"}}"
            )),
            "{service}: {metrics}"
        );
    }
    assert_eq!(curl(&["-X", "POST", &format!("{admin}/nope")]).0, 404);
    for series in [
        "process_start_time_seconds ",
        "process_max_fds ",
        "process_threads ",
        "process_virtual_memory_bytes ",
        "process_open_fds ",
        // Both results from the start, so that the first failure is an increase.
        "mesh_proxy_reloads_total{result=\"invalid\"} 0",
    ] {
        assert!(metrics.contains(series), "{series} missing from\n{metrics}");
    }
    // HEAD is GET without the body; a 405 says what is allowed.
    assert_eq!(curl(&["-I", &format!("{admin}/ready")]).0, 200);
    let (code, head) = curl(&["-i", "-X", "PUT", &format!("{admin}/ready")]);
    assert_eq!(code, 405);
    assert!(
        head.to_ascii_lowercase().contains("allow: get, head"),
        "{head}"
    );
    // A web page in a browser on this host reaches neither configuration nor control.
    for args in [
        vec!["-H", "Origin: http://evil.example", "-X", "POST"],
        vec!["-H", "Host: evil.example", "-X", "POST"],
        vec!["-H", "Sec-Fetch-Site: cross-site", "-X", "POST"],
    ] {
        let mut args = args.clone();
        let url = format!("{admin}/shutdown");
        args.push(&url);
        assert_eq!(curl(&args).0, 403, "{args:?}");
    }
    assert_eq!(
        curl(&["-H", "Host: rebound.example", &format!("{admin}/config")]).0,
        403
    );
    assert_eq!(
        curl(&["-H", "Host: localhost:1", &format!("{admin}/config")]).0,
        200
    );
    // B's: its pool to the application (connections kept), in the strict format too.
    let (_, b_metrics) = curl(&[&format!("http://{}/metrics", b.addr("admin"))]);
    assert_families_once(&b_metrics);
    let open: u64 = b_metrics
        .lines()
        .find_map(|l| l.strip_prefix("mesh_proxy_app_connections{listener=\"app\"} "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no connections gauge in\n{b_metrics}"));
    assert!(open >= 1, "{b_metrics}");
    for series in [
        "mesh_proxy_app_requests_waiting{listener=\"app\"} 0\n",
        "mesh_proxy_app_pool_overflows_total{listener=\"app\"} 0\n",
    ] {
        assert!(
            b_metrics.contains(series),
            "{series} missing from\n{b_metrics}"
        );
    }

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
    // So does a valid file that changes what needs a restart: the sockets' options.
    std::fs::write(
        &a_config,
        format!("{a_text}\n[tcp]\nkeepalive_idle = \"60s\"\n"),
    )
    .unwrap();
    a.signal("HUP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(curl(&[&format!("{egress}/after-tcp-reload")]).0, 200);
    let (_, metrics) = curl(&[&format!("{admin}/metrics")]);
    assert!(
        metrics.contains(r#"mesh_proxy_reloads_total{result="invalid"} 2"#),
        "{metrics}"
    );

    // A valid reload applies new routes without a restart, and a changed service's new
    // client records in the same families.
    let answered = |metrics: &str| -> u64 {
        metrics
            .lines()
            .find(|l| l.starts_with("mesh_client_try_duration_seconds_count{service=\"app\"}"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let before = answered(&curl(&[&format!("{admin}/metrics")]).1);
    let reloaded = a_text
        .replace("prefix = \"/down\"", "prefix = \"/gone\"")
        .replace(
            "server_identity = \"spiffe://example.org/app\"\n",
            "server_identity = \"spiffe://example.org/app\"\nconnect_timeout = \"2s\"\n",
        );
    std::fs::write(&a_config, reloaded).unwrap();
    assert_eq!(curl(&["-X", "POST", &format!("{admin}/reload")]).0, 202);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (code, body) = curl(&[&format!("{egress}/down")]);
    assert_eq!(code, 200, "now the default service: {body}");
    let (_, metrics) = curl(&[&format!("{admin}/metrics")]);
    assert_families_once(&metrics);
    assert!(
        answered(&metrics) > before,
        "the reloaded service's answers are counted: {before} before\n{metrics}"
    );

    // A policy reload at B: every path allowed now, on the connections already open.
    std::fs::write(&b_config, b_text.replace("/[a-z0-9-]*", "/.*")).unwrap();
    b.signal("HUP");
    let mut allowed = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if curl(&[&format!("{egress}/admin/users")]).0 == 200 {
            allowed = true;
            break;
        }
    }
    assert!(allowed, "the new policy was not applied");
    // The inbound side's metrics (authorization, servers) parse as well.
    let (_, metrics) = curl(&[&format!("http://{}/metrics", b.addr("admin"))]);
    assert!(metrics.contains("mesh_server_authz_total"), "{metrics}");
    assert_families_once(&metrics);

    assert!(a.terminate().success(), "exit 0 after SIGTERM");
    assert!(b.terminate().success());
}

/// An edge listener (`certificate = {..}`): clients outside the mesh speak HTTPS to the
/// outbound proxy, which verifies nobody but routes into the mesh as before; HTTP/2 by
/// ALPN; plaintext on that port gets nothing; a new pair written over the files is
/// presented without a restart (and counted); a bad key file stops the start with its key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_listener_terminates_tls_from_outside_the_mesh() {
    let dir = tempfile::tempdir().unwrap();
    let mut ca = TestCa::new("example.org").unwrap();
    let app = app().await;
    let b = Proxy::start(
        &common::inbound_config(dir.path(), &mut ca, "app", "b.toml", app),
        2,
    );
    // A certificate for 127.0.0.1 from openssl (not the mesh CA: any PEM chain serves).
    common::self_signed(dir.path(), "edge");
    let config = common::outbound_config(dir.path(), &mut ca, "caller", &[b.addr("app")], "");
    let mut text = std::fs::read_to_string(&config).unwrap();
    // Relative: taken from the configuration file's directory.
    text.push_str("certificate = { cert = \"edge.crt\", key = \"edge.key\" }\n");
    std::fs::write(&config, &text).unwrap();
    let a = Proxy::start(&config, 2);
    let edge = a.addr("egress");
    // A copy: edge.crt is replaced below.
    let cacert_old = dir.path().join("first.crt");
    std::fs::copy(dir.path().join("edge.crt"), &cacert_old).unwrap();
    let cacert = cacert_old.to_str().unwrap();

    let (code, body) = curl(&[
        "--http1.1",
        "--cacert",
        cacert,
        &format!("https://{edge}/from-outside"),
    ]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        body,
        "GET /from-outside HTTP/1.1 id=spiffe://example.org/caller host=127.0.0.1:".to_owned()
            + &edge.port().to_string()
    );
    let version = std::process::Command::new("curl")
        .args(["-sS", "--http2", "--cacert", cacert, "-o", "/dev/null"])
        .args([
            "-w",
            "%{http_code} %{http_version}",
            &format!("https://{edge}/h2"),
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&version.stdout),
        "200 2",
        "HTTP/2 by ALPN"
    );
    // Plaintext on the TLS port: no answer.
    let (code, _) = curl(&[&format!("http://{edge}/plain")]);
    assert_eq!(code, 0);
    // TRACE is refused at the edge, whatever Max-Forwards says (the peer would reflect
    // mesh-internal fields); OPTIONS still counts down.
    for hops in ["0", "1", "5"] {
        let (code, body) = curl(&[
            "--cacert",
            cacert,
            "-X",
            "TRACE",
            "-H",
            &format!("max-forwards: {hops}"),
            &format!("https://{edge}/probe"),
        ]);
        assert_eq!(code, 405, "{hops}: {body}");
        assert_eq!(body, "TRACE is not served on this listener\n");
    }
    let (code, body) = curl(&[
        "--cacert",
        cacert,
        "-X",
        "OPTIONS",
        "-H",
        "max-forwards: 0",
        &format!("https://{edge}/probe"),
    ]);
    assert_eq!((code, body.as_str()), (200, ""));

    // Rotation: a new pair renamed over the files is presented from the next handshake,
    // without a restart; a client trusting only the old certificate is then refused.
    let admin = format!("http://{}/metrics", a.addr("admin"));
    let (_, metrics) = curl(&[&admin]);
    assert!(
        metrics.contains(
            "mesh_proxy_edge_certificate_reloads_total{listener=\"egress\",result=\"applied\"} 0"
        ),
        "{metrics}"
    );
    assert!(
        metrics
            .contains("mesh_proxy_edge_certificate_expiry_timestamp_seconds{listener=\"egress\"} "),
        "{metrics}"
    );
    common::self_signed(dir.path(), "next");
    let next = dir.path().join("next.crt");
    let next = next.to_str().unwrap();
    std::fs::rename(dir.path().join("next.key"), dir.path().join("edge.key")).unwrap();
    std::fs::copy(next, dir.path().join("edge.crt.tmp")).unwrap();
    std::fs::rename(dir.path().join("edge.crt.tmp"), dir.path().join("edge.crt")).unwrap();
    let url = format!("https://{edge}/rotated");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while curl(&["--cacert", next, &url]).0 != 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new certificate was never presented"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, _) = curl(&["--cacert", cacert_old.to_str().unwrap(), &url]);
    assert_eq!(code, 0, "the old certificate is no longer presented");
    let (_, metrics) = curl(&[&admin]);
    assert!(
        metrics.contains(
            "mesh_proxy_edge_certificate_reloads_total{listener=\"egress\",result=\"applied\"} 1"
        ),
        "{metrics}"
    );
    assert_families_once(&metrics);

    // The mesh behind it down: outside clients get the status's reason, not the mesh's
    // addresses and errors.
    let inbound = b.addr("app");
    assert!(b.terminate().success());
    let (code, body) = curl(&["--cacert", next, &format!("https://{edge}/down")]);
    assert!(code == 502 || code == 503, "{code} {body}");
    assert!(
        body == "bad gateway\n" || body == "service unavailable\n",
        "{body}"
    );
    assert!(!body.contains(&inbound.port().to_string()), "{body}");
    assert!(a.terminate().success());

    // A key that is not a key: the start fails, naming the setting.
    std::fs::write(dir.path().join("edge.key"), "not a key").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mesh-proxy"))
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("outbound[0].certificate"), "{stderr}");
    assert!(stderr.contains("edge.key"), "{stderr}");
}

/// systemd's `Type=notify`: with `NOTIFY_SOCKET` set (a path, or on Linux an abstract
/// name), the proxy says `READY=1` once its listeners are up and `STOPPING=1` when SIGTERM
/// starts the drain.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_manager_hears_ready_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let mut ca = TestCa::new("example.org").unwrap();
    let app = app().await;
    let config = common::outbound_config(dir.path(), &mut ca, "caller", &[app], "");
    let path = dir.path().join("notify.sock");
    let mut sockets = vec![(
        UnixDatagram::bind(&path).unwrap(),
        path.to_str().unwrap().to_owned(),
    )];
    #[cfg(target_os = "linux")]
    {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("mesh-proxy-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        sockets.push((UnixDatagram::bind_addr(&addr).unwrap(), format!("@{name}")));
    }
    for (socket, address) in sockets {
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_mesh-proxy"));
        command
            .args(["run", "--config"])
            .arg(&config)
            .env("NOTIFY_SOCKET", &address);
        let proxy = Proxy::start_command(command, 2, std::process::Stdio::inherit());
        let mut buf = [0u8; 256];
        let n = socket.recv(&mut buf).unwrap();
        assert_eq!(
            std::str::from_utf8(&buf[..n]).unwrap(),
            "STATUS=waiting for the identity (the first SVID)",
            "{address}"
        );
        let n = socket.recv(&mut buf).unwrap();
        assert_eq!(
            std::str::from_utf8(&buf[..n]).unwrap(),
            "READY=1\nSTATUS=serving on 2 listeners",
            "{address}"
        );
        // Ready means serving.
        let (code, _) = curl(&[&format!("http://{}/ready", proxy.addr("admin"))]);
        assert_eq!(code, 200);
        proxy.signal("TERM");
        let n = socket.recv(&mut buf).unwrap();
        assert_eq!(
            std::str::from_utf8(&buf[..n]).unwrap(),
            "STOPPING=1\nSTATUS=draining",
            "{address}"
        );
        assert!(proxy.terminate().success());
    }

    // A socket nobody listens on: an error in the log, and the proxy serves all the same.
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_mesh-proxy"));
    command
        .args(["run", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", dir.path().join("nobody.sock"));
    let proxy = Proxy::start_command(command, 2, std::process::Stdio::null());
    let (code, _) = curl(&[&format!("http://{}/ready", proxy.addr("admin"))]);
    assert_eq!(code, 200);
    assert!(proxy.terminate().success());
}

/// A peer's inbound proxy whose application is down answers 502 naming the application's
/// address: the local app behind a plain outbound listener sees that, marked
/// `x-mesh-error`; a client of an edge listener gets the status's reason alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_listener_does_not_relay_a_peers_error_details() {
    let dir = tempfile::tempdir().unwrap();
    let mut ca = TestCa::new("example.org").unwrap();
    // An application address nobody listens on.
    let down = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let b = Proxy::start(
        &common::inbound_config(dir.path(), &mut ca, "app", "b.toml", down),
        2,
    );
    common::self_signed(dir.path(), "edge");
    let config = common::outbound_config(dir.path(), &mut ca, "caller", &[b.addr("app")], "");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(
        "certificate = { cert = \"edge.crt\", key = \"edge.key\" }\n\n\
         [[outbound]]\nname = \"local\"\nlisten = \"127.0.0.1:0\"\ndefault_service = \"app\"\n",
    );
    std::fs::write(&config, &text).unwrap();
    let a = Proxy::start(&config, 3);
    let cacert = dir.path().join("edge.crt");

    let local = format!("http://{}/x", a.addr("local"));
    let (code, body) = curl(&[&local]);
    assert_eq!(code, 502, "{body}");
    assert!(
        body.contains(&down.to_string()),
        "the local app is told why: {body}"
    );
    let headers = std::process::Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-D", "-", &local])
        .output()
        .unwrap();
    let headers = String::from_utf8_lossy(&headers.stdout).to_ascii_lowercase();
    assert!(headers.contains("x-mesh-error: true"), "{headers}");

    let edge = format!("https://{}/x", a.addr("egress"));
    let (code, body) = curl(&["--cacert", cacert.to_str().unwrap(), &edge]);
    assert_eq!((code, body.as_str()), (502, "bad gateway\n"));
    assert!(a.terminate().success());
    assert!(b.terminate().success());
}

/// The access-log events `stderr` holds, by a JSON log (`--log-format json`).
fn json_access_lines(stderr: &str) -> Vec<serde_json::Value> {
    stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "mesh_access")
        .collect()
}

/// `access_log = true` on both sides: one line per request on each, whatever `--log`
/// says of the rest, with the caller's identity on the inbound side and the answering
/// peer's on the outbound side; JSON and plain; a reload switches one off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_logs_name_the_caller_the_peer_and_the_answer() {
    let dir = tempfile::tempdir().unwrap();
    let mut ca = TestCa::new("example.org").unwrap();
    let app = app().await;
    let b_config = inbound_config(dir.path(), &mut ca, "app", "b.toml", app);
    let mut b_text = std::fs::read_to_string(&b_config).unwrap();
    b_text.push_str(
        "access_log = true\nauthorization = \"p\"\n\n\
         [authorization.p]\ndefault = \"deny\"\n\
         [[authorization.p.rules]]\nname = \"web\"\n\
         clients = [\"spiffe://example.org/web\"]\n\
         routes = [{ path = { regex = \"/(orders/[0-9]+|second)\" } }]\n",
    );
    std::fs::write(&b_config, &b_text).unwrap();
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_mesh-proxy"));
    command.args(["run", "--config"]).arg(&b_config).args([
        "--log",
        "warn",
        "--log-format",
        "json",
    ]);
    let b = Proxy::start_command(command, 2, std::process::Stdio::piped());
    let a_config = outbound_config(dir.path(), &mut ca, "web", &[b.addr("app")], "");
    let mut a_text = std::fs::read_to_string(&a_config).unwrap();
    a_text.push_str("access_log = true\n");
    std::fs::write(&a_config, &a_text).unwrap();
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_mesh-proxy"));
    command
        .args(["run", "--config"])
        .arg(&a_config)
        .args(["--log", "warn"]);
    let a = Proxy::start_command(command, 2, std::process::Stdio::piped());
    let egress = a.addr("egress");

    let (code, _) = curl(&[
        "-A",
        "tester \"quoted\" status=500",
        &format!("http://{egress}/orders/7?page=2"),
    ]);
    assert_eq!(code, 200);

    // Off by a reload on the outbound side: the next request is logged by the inbound
    // side only.
    a_text = a_text.replace("access_log = true\n", "");
    std::fs::write(&a_config, &a_text).unwrap();
    a.signal("HUP");
    let admin = format!("http://{}", a.addr("admin"));
    let mut switched = false;
    for _ in 0..50 {
        let (_, metrics) = curl(&[&format!("{admin}/metrics")]);
        if metrics.contains("mesh_proxy_reloads_total{result=\"applied\"} 1") {
            switched = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(switched, "the reload was applied");
    let (code, _) = curl(&[&format!("http://{egress}/second")]);
    assert_eq!(code, 200);
    // Denied by the inbound policy: logged there with its 403.
    let (code, _) = curl(&[&format!("http://{egress}/admin")]);
    assert_eq!(code, 403);

    let stderr = |mut proxy: Proxy| {
        let mut pipe = proxy.child.stderr.take().unwrap();
        assert!(proxy.terminate().success());
        let mut text = String::new();
        std::io::Read::read_to_string(&mut pipe, &mut text).unwrap();
        text
    };
    let (a_log, b_log) = (stderr(a), stderr(b));

    // The inbound side, in JSON: the caller's identity, the request as the app got it.
    let lines = json_access_lines(&b_log);
    assert_eq!(lines.len(), 3, "{b_log}");
    let f = &lines[0]["fields"];
    assert_eq!(f["listener"], "app", "{f}");
    assert_eq!(f["client.id"], "spiffe://example.org/web", "{f}");
    assert_eq!(f["method"], "GET", "{f}");
    assert_eq!(f["uri"], "/orders/7?page=2", "{f}");
    assert_eq!(f["user_agent"], "tester \"quoted\" status=500", "{f}");
    assert_eq!(f["status"], "200", "{f}");
    assert_eq!(f["outcome"], "complete", "{f}");
    assert!(f["response_bytes"].as_u64().unwrap() > 0, "{f}");
    assert!(f["duration_us"].as_u64().is_some(), "{f}");
    assert_eq!(lines[1]["fields"]["uri"], "/second");
    let denied = &lines[2]["fields"];
    assert_eq!(
        (&denied["uri"], &denied["status"], &denied["outcome"]),
        (&"/admin".into(), &"403".into(), &"complete".into()),
        "{denied}"
    );
    // Nothing else at info: `--log warn` still holds for the other targets.
    assert!(!b_log.contains("\"level\":\"INFO\",\"fields\":{\"message\":\"inbound listening"));

    // The outbound side, plain: the answering peer's identity; one line, as the second
    // request came after the reload switched it off.
    let lines: Vec<&str> = a_log
        .lines()
        .filter(|l| l.contains("mesh_access"))
        .collect();
    assert_eq!(lines.len(), 1, "{a_log}");
    let line = lines[0];
    for field in [
        "listener=egress",
        "server.id=spiffe://example.org/app",
        "client.addr=127.0.0.1:",
        "method=GET",
        "uri=\"/orders/7?page=2\"",
        // The client's text is quoted and escaped: it cannot forge a field.
        "user_agent=\"tester \\\"quoted\\\" status=500\"",
        "status=200",
        "outcome=\"complete\"",
    ] {
        assert!(line.contains(field), "{field} in {line}");
    }
}
