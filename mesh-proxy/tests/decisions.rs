//! `GET /decisions` on the admin listener: the caller's proxy shows its balancer's picks
//! over two inbound listeners, the application's proxy its authorization decisions, a
//! deny among them; without `[admin] decisions` the endpoint answers 404.
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_capacity_there_is_no_record() {
    let dir = tempfile::tempdir().unwrap();
    let mut ca = TestCa::new("example.org").unwrap();
    let app = app().await;
    let config = common::inbound_config(dir.path(), &mut ca, "app", "b.toml", app);
    let b = Proxy::start(&config, 2);
    let (code, body) = curl(&[&format!("http://{}/decisions", b.addr("admin"))]);
    assert_eq!(code, 404, "{body}");
}
