//! `GET /decisions` on the admin listener: the caller's proxy shows its balancer's picks
//! over two inbound listeners, the application's proxy its authorization decisions, a
//! deny among them; without `[admin] decisions` the endpoint answers 404, and a reload
//! switches the record on and off.
#![cfg(unix)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Proxy, app, curl, identity};
use mesh_spiffe::test_ca::TestCa;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_show_picks_and_an_authorization_deny() {
    let dir = tempfile::tempdir().unwrap();
    let mut ca = TestCa::new("example.org").unwrap();
    let app = app().await;

    // B: two inbound listeners to one application, one-segment paths allowed.
    let b_config = dir.path().join("b.toml");
    let b_text = format!(
        "{}\n[admin]\nlisten = \"127.0.0.1:0\"\ndecisions = 256\n\n\
         [[inbound]]\nname = \"app1\"\nlisten = \"127.0.0.1:0\"\ntarget = \"{app}\"\n\
         authorization = \"app-policy\"\n\n\
         [[inbound]]\nname = \"app2\"\nlisten = \"127.0.0.1:0\"\ntarget = \"{app}\"\n\
         authorization = \"app-policy\"\n\n\
         [authorization.app-policy]\ndefault = \"deny\"\n\
         [[authorization.app-policy.rules]]\nname = \"callers\"\n\
         clients = [\"spiffe://example.org/caller\"]\n\
         routes = [{{ path = {{ regex = \"/[a-z0-9-]*\" }} }}]\n",
        identity(dir.path(), &mut ca, "app")
    );
    std::fs::write(&b_config, &b_text).unwrap();
    let b = Proxy::start(&b_config, 3);
    let (b1, b2) = (b.addr("app1"), b.addr("app2"));

    // A: the service's two endpoints are B's listeners.
    let a_config = dir.path().join("a.toml");
    let a_text = format!(
        "{}\n[admin]\nlisten = \"127.0.0.1:0\"\ndecisions = 256\n\n\
         [services.app]\ndiscovery = {{ kind = \"static\", endpoints = [{{ addr = \"{b1}\" }}, {{ addr = \"{b2}\" }}] }}\n\
         server_identity = \"spiffe://example.org/app\"\n\n\
         [[outbound]]\nname = \"egress\"\nlisten = \"127.0.0.1:0\"\ndefault_service = \"app\"\n",
        identity(dir.path(), &mut ca, "caller")
    );
    std::fs::write(&a_config, &a_text).unwrap();
    let a = Proxy::start(&a_config, 2);
    let egress = format!("http://{}", a.addr("egress"));

    for _ in 0..10 {
        let (code, body) = curl(&[&format!("{egress}/hello")]);
        assert_eq!(code, 200, "{body}");
    }
    let (code, _) = curl(&[&format!("{egress}/admin/users")]);
    assert_eq!(code, 403);

    let (code, picks) = curl(&[&format!("http://{}/decisions", a.addr("admin"))]);
    assert_eq!(code, 200, "{picks}");
    assert!(picks.starts_with("# "), "{picks}");
    let pick_lines: Vec<&str> = picks.lines().filter(|l| l.contains(" app pick ")).collect();
    assert!(pick_lines.len() >= 11, "{picks}");
    // Every pick went to one of B's listeners; with both ready, a pick names both, its
    // winner first.
    let (b1, b2) = (b1.to_string(), b2.to_string());
    for line in &pick_lines {
        assert!(line.contains(&b1) || line.contains(&b2), "{line}");
    }
    assert!(
        pick_lines
            .iter()
            .any(|l| l.contains(" over ") && l.contains(&b1) && l.contains(&b2)),
        "{picks}"
    );

    let (code, authz) = curl(&[&format!("http://{}/decisions", b.addr("admin"))]);
    assert_eq!(code, 200, "{authz}");
    assert!(
        authz.contains(
            "authz deny spiffe://example.org/caller GET /admin/users by app-policy/default"
        ),
        "{authz}"
    );
    assert!(
        authz.contains("authz allow spiffe://example.org/caller GET /hello by app-policy/callers"),
        "{authz}"
    );
    // Named by listener.
    assert!(
        authz
            .lines()
            .any(|l| l.contains(" app1 authz ") || l.contains(" app2 authz ")),
        "{authz}"
    );
}

/// Without `[admin] decisions` there is no record (404); a reload switches it on, with
/// the layers already built recording into it, and off again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_switches_the_record_on_and_off() {
    let dir = tempfile::tempdir().unwrap();
    let mut ca = TestCa::new("example.org").unwrap();
    let app = app().await;
    let b_config = common::inbound_config(dir.path(), &mut ca, "app", "b.toml", app);
    let b = Proxy::start(&b_config, 2);
    let a_config = common::outbound_config(dir.path(), &mut ca, "caller", &[b.addr("app")], "");
    let a = Proxy::start(&a_config, 2);
    let admin = format!("http://{}", a.addr("admin"));
    let egress = format!("http://{}", a.addr("egress"));
    let decisions = || curl(&[&format!("{admin}/decisions")]);
    let reload_with = |text: &str| {
        std::fs::write(&a_config, text).unwrap();
        let (code, body) = curl(&["-X", "POST", &format!("{admin}/reload")]);
        assert_eq!(code, 202, "{body}");
    };
    let off = std::fs::read_to_string(&a_config).unwrap();
    let on = off.replace(
        "[admin]\nlisten = \"127.0.0.1:0\"\n",
        "[admin]\nlisten = \"127.0.0.1:0\"\ndecisions = 8\n",
    );
    assert_ne!(on, off);

    assert_eq!(curl(&[&format!("{egress}/hello")]).0, 200);
    let (code, body) = decisions();
    assert_eq!(code, 404, "{body}");

    reload_with(&on);
    let mut record = String::new();
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert_eq!(curl(&[&format!("{egress}/hello")]).0, 200);
        let (code, body) = decisions();
        if code == 200 && body.contains(" app pick ") {
            record = body;
            break;
        }
    }
    assert!(
        record.contains(" app pick ") && record.contains(&b.addr("app").to_string()),
        "the service's balancer, built before the reload, records into it: {record}"
    );
    assert!(record.contains("(capacity 8)"), "{record}");

    reload_with(&off);
    let mut code = 0;
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        code = decisions().0;
        if code == 404 {
            break;
        }
    }
    assert_eq!(code, 404);
    assert_eq!(curl(&[&format!("{egress}/hello")]).0, 200);
}
