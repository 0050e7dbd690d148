//! The `check` command, run as a user would run it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn check(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mesh-proxy"))
        .arg("check")
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn the_example_config_is_valid() {
    let (ok, out, err) = check(&["examples/config/mesh.toml"]);
    assert!(ok, "{err}");
    assert!(out.contains("valid"), "{out}");
    assert!(
        out.contains("4 services, 3 routes, 1 inbound and 2 outbound listeners"),
        "{out}"
    );
}

#[test]
fn print_shows_defaults_filled_in() {
    let (ok, out, err) = check(&["examples/config/mesh.toml", "--print"]);
    assert!(ok, "{err}");
    // The legacy service sets no retry section; its defaults appear.
    assert!(out.contains("[services.legacy.retry]"), "{out}");
    assert!(out.contains("max_replay_body = 65536"), "{out}");
}

#[test]
fn invalid_configs_fail_with_every_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[services.a]\ndiscovery = { kind = \"static\", endpoints = [] }\ntls = \"plaintext\"\n\
         [services.a.retry]\nbudget = { ratio = 2.0 }\n",
    )
    .unwrap();
    let (ok, _, err) = check(&[path.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("2 errors in configuration"), "{err}");
    assert!(
        err.contains("services.a.discovery.endpoints: needs at least one endpoint"),
        "{err}"
    );
    assert!(
        err.contains("services.a.retry.budget.ratio: must be between 0 and 1 (got 2)"),
        "{err}"
    );

    let (ok, _, err) = check(&["does/not/exist.toml"]);
    assert!(!ok);
    assert!(
        err.contains("reading config file does/not/exist.toml"),
        "{err}"
    );
}

#[test]
fn the_vm_config_is_valid() {
    let (ok, out, err) = check(&["examples/config/vm.toml"]);
    assert!(ok, "{err}");
    assert!(out.contains("identity: SPIFFE Workload API"), "{out}");
    assert!(
        out.contains("2 services, 3 routes, 1 inbound and 1 outbound listeners"),
        "{out}"
    );
}

#[test]
fn the_demo_configs_are_valid() {
    for (file, summary) in [
        (
            "web",
            "1 services, 1 routes, 0 inbound and 1 outbound listeners",
        ),
        (
            "users",
            "0 services, 0 routes, 1 inbound and 0 outbound listeners",
        ),
    ] {
        let (ok, out, err) = check(&[&format!("examples/config/demo/{file}.toml")]);
        assert!(ok, "{file}: {err}");
        assert!(out.contains("identity: PEM files"), "{out}");
        assert!(out.contains(summary), "{out}");
    }
}

/// The `mesh.toml` of the Kubernetes manifest's ConfigMap, as the proxy would read it.
#[test]
fn the_kubernetes_config_map_is_valid() {
    let manifest = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../packaging/kubernetes/users.yaml"
    ))
    .unwrap();
    let toml: String = manifest
        .lines()
        .skip_while(|l| l.trim() != "mesh.toml: |")
        .skip(1)
        .take_while(|l| !l.starts_with("---"))
        .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
        .collect();
    assert!(toml.contains("[identity]"), "{toml}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mesh.toml");
    std::fs::write(&path, toml).unwrap();
    let (ok, out, err) = check(&[path.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("1 inbound and 1 outbound listeners"), "{out}");
}

#[test]
fn the_benchmark_configs_are_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../benches/proxy");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let (ok, out, err) = check(&[path.to_str().unwrap()]);
            assert!(ok, "{}: {err}", path.display());
            assert!(out.contains("valid"), "{out}");
            checked += 1;
        }
    }
    assert!(checked >= 4, "{checked} configs in {}", dir.display());
}

/// `--admin` is checked with the file: an address one of its listeners has is refused
/// before anything starts, naming both; so is a worker count past any use.
#[test]
fn run_checks_its_flags_with_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("one.toml");
    std::fs::write(
        &path,
        "[[outbound]]\nname = \"egress\"\nlisten = \"127.0.0.1:4999\"\ndefault_service = \"a\"\n\
         [services.a]\ndiscovery = { kind = \"static\", endpoints = [{ addr = \"127.0.0.1:1\" }] }\n\
         tls = \"plaintext\"\n",
    )
    .unwrap();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_mesh-proxy"))
            .args(["run", "--config", path.to_str().unwrap()])
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&["--admin", "127.0.0.1:4999"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("127.0.0.1:4999 is already used by admin.listen"),
        "{err}"
    );
    let out = run(&["--workers", "100000"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--workers must be between 1 and 1024"),
        "{err}"
    );
}
