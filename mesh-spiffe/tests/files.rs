//! `PemFiles` against real files: loading, SVID rotation by in-place write, atomic rename
//! and config-map symlink swap, mismatched and half-written files, bundle rotation, errors
//! at start, and mTLS over a rotating `PemFiles` source.
#![cfg(all(feature = "test-util", feature = "files"))]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mesh_core::config::{IdentityConfig, TrustDomainKey};
use mesh_spiffe::credentials::{CredentialSource, CredentialStore, Svid};
use mesh_spiffe::files::{FilesError, PemFiles};
use mesh_spiffe::test_ca::{TestCa, certs_pem, key_pem};
use mesh_spiffe::{Authorizer, CredentialError, Mtls, MtlsAcceptor, MtlsConnector};
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::timeout;

/// Long enough for any file event to arrive on a loaded machine.
const EVENT: Duration = Duration::from_secs(5);
/// How long "nothing happens" is observed.
const QUIET: Duration = Duration::from_millis(500);

const ID: &str = "spiffe://example.org/ns/prod/sa/api";

/// A temp dir with `svid.pem`, `svid.key` and `bundle.pem` from `ca`.
struct Files {
    dir: tempfile::TempDir,
    ca: TestCa,
}

/// Logs to the test's output, filtered by `RUST_LOG`.
fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
}

impl Files {
    fn new() -> Self {
        init_tracing();
        let mut ca = TestCa::new("example.org").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let svid = ca.issue(ID).unwrap();
        let files = Self { dir, ca };
        files.write_svid(&svid);
        files.write_bundle();
        files
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write_svid(&self, svid: &Svid) {
        let (cert, key) = svid.to_pem();
        std::fs::write(self.path("svid.pem"), cert).unwrap();
        std::fs::write(self.path("svid.key"), key).unwrap();
    }

    fn write_bundle(&self) {
        std::fs::write(self.path("bundle.pem"), self.ca.bundle().unwrap().to_pem()).unwrap();
    }

    async fn start(&self) -> PemFiles {
        PemFiles::builder(self.path("svid.pem"), self.path("svid.key"))
            .bundle(self.ca.trust_domain().clone(), self.path("bundle.pem"))
            .debounce(Duration::from_millis(30))
            .poll_interval(Duration::from_secs(3600))
            .start()
            .await
            .unwrap()
    }
}

fn leaf(source: &impl CredentialSource) -> CertificateDer<'static> {
    source.svid().unwrap().chain()[0].clone()
}

/// Waits (bounded) until `pred` holds, re-checking on every update.
async fn wait_until(
    source: &impl CredentialSource,
    updates: &mut watch::Receiver<u64>,
    what: &str,
    pred: impl Fn(&Current) -> bool,
) {
    let ok = timeout(EVENT, async {
        loop {
            if pred(&source_ref(source)) {
                return;
            }
            updates.changed().await.unwrap();
        }
    })
    .await;
    assert!(ok.is_ok(), "timed out waiting for {what}");
}

/// What a predicate in [`wait_until`] looks at: the leaf and the number of roots.
struct Current {
    leaf: CertificateDer<'static>,
    roots: usize,
}

fn source_ref(source: &impl CredentialSource) -> Current {
    let roots = source
        .bundles()
        .trust_domains()
        .map(|td| source.bundles().get(td).unwrap().certs().len())
        .sum();
    Current {
        leaf: leaf(source),
        roots,
    }
}

/// Asserts that no update arrives for a while.
async fn assert_quiet(updates: &mut watch::Receiver<u64>) {
    if timeout(QUIET, updates.changed()).await.is_ok() {
        panic!("unexpected credential update");
    }
}

#[tokio::test]
async fn loads_and_rotates_by_in_place_write() {
    let mut f = Files::new();
    let files = f.start().await;
    assert_eq!(files.svid().unwrap().id().to_string(), ID);
    assert_eq!(files.bundles().len(), 1);
    let first = leaf(&files);
    let mut updates = files.updates();
    updates.mark_unchanged();

    let next = f.ca.issue(ID).unwrap();
    let want = next.chain()[0].clone();
    f.write_svid(&next);
    wait_until(&files, &mut updates, "the rotated SVID", |c| c.leaf == want).await;
    assert_ne!(first, want);
    assert_eq!(files.svid().unwrap().id().to_string(), ID);
    // Rewriting the same bytes is not an update.
    updates.mark_unchanged();
    f.write_svid(&next);
    assert_quiet(&mut updates).await;
}

#[tokio::test]
async fn rotates_by_atomic_rename() {
    let mut f = Files::new();
    let files = f.start().await;
    let mut updates = files.updates();

    for i in 0..2 {
        let next = f.ca.issue(ID).unwrap();
        let (cert, key) = next.to_pem();
        // The key first, then the certificate, each renamed into place.
        for (name, content) in [("svid.key", key), ("svid.pem", cert)] {
            let tmp = f.path(&format!(".{name}.tmp{i}"));
            std::fs::write(&tmp, content).unwrap();
            std::fs::rename(&tmp, f.path(name)).unwrap();
        }
        let want = next.chain()[0].clone();
        wait_until(&files, &mut updates, "the renamed SVID", |c| c.leaf == want).await;
    }
}

/// The layout kubelet writes for a secret or config-map volume, updated by swapping the
/// `..data` symlink: the SVID and the bundle change in one step.
#[cfg(unix)]
#[tokio::test]
async fn rotates_by_config_map_symlink_swap() {
    use std::os::unix::fs::symlink;

    let mut ca = TestCa::new("example.org").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let write_generation = |name: &str, svid: &Svid, bundle: String| {
        let gen_dir = root.join(name);
        std::fs::create_dir(&gen_dir).unwrap();
        let (cert, key) = svid.to_pem();
        std::fs::write(gen_dir.join("tls.crt"), cert).unwrap();
        std::fs::write(gen_dir.join("tls.key"), key).unwrap();
        std::fs::write(gen_dir.join("ca.crt"), bundle).unwrap();
    };
    let svid = ca.issue(ID).unwrap();
    write_generation(
        "..2024_01_01_00_00_00.1",
        &svid,
        ca.bundle().unwrap().to_pem(),
    );
    symlink("..2024_01_01_00_00_00.1", root.join("..data")).unwrap();
    for name in ["tls.crt", "tls.key", "ca.crt"] {
        symlink(format!("..data/{name}"), root.join(name)).unwrap();
    }

    let files = PemFiles::builder(root.join("tls.crt"), root.join("tls.key"))
        .bundle(ca.trust_domain().clone(), root.join("ca.crt"))
        .debounce(Duration::from_millis(30))
        .poll_interval(Duration::from_secs(3600))
        .start()
        .await
        .unwrap();
    assert_eq!(source_ref(&files).roots, 1);
    let mut updates = files.updates();
    updates.mark_unchanged();

    // A root rotation: the new SVID is signed by the new root, the bundle holds both.
    ca.begin_rotation().unwrap();
    let next = ca.issue(ID).unwrap();
    write_generation(
        "..2024_01_02_00_00_00.2",
        &next,
        ca.bundle().unwrap().to_pem(),
    );
    symlink("..2024_01_02_00_00_00.2", root.join("..data_tmp")).unwrap();
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
    std::fs::remove_dir_all(root.join("..2024_01_01_00_00_00.1")).unwrap();

    let want = next.chain()[0].clone();
    wait_until(&files, &mut updates, "the swapped SVID and bundle", |c| {
        c.leaf == want && c.roots == 2
    })
    .await;
    // Both arrived as one update.
    assert_eq!(*updates.borrow_and_update(), 2);
}

#[tokio::test]
async fn mismatched_key_keeps_the_last_good_svid_until_the_key_arrives() {
    let mut f = Files::new();
    let files = f.start().await;
    let first = leaf(&files);
    let mut updates = files.updates();
    updates.mark_unchanged();

    // The certificate is replaced, the key not yet.
    let next = f.ca.issue(ID).unwrap();
    let (cert, key) = next.to_pem();
    std::fs::write(f.path("svid.pem"), cert).unwrap();
    assert_quiet(&mut updates).await;
    assert_eq!(leaf(&files), first);

    std::fs::write(f.path("svid.key"), key).unwrap();
    let want = next.chain()[0].clone();
    wait_until(&files, &mut updates, "the matching key", |c| c.leaf == want).await;
}

#[tokio::test]
async fn half_written_and_garbage_files_keep_the_last_good_credentials() {
    let mut f = Files::new();
    let files = f.start().await;
    let first = leaf(&files);
    let mut updates = files.updates();
    updates.mark_unchanged();

    let next = f.ca.issue(ID).unwrap();
    let (cert, key) = next.to_pem();
    // Half of the new certificate, with the new key: not a valid pair yet.
    std::fs::write(f.path("svid.key"), &key).unwrap();
    std::fs::write(f.path("svid.pem"), &cert[..cert.len() / 2]).unwrap();
    assert_quiet(&mut updates).await;
    // Garbage, an empty key file, a deleted bundle, a garbage bundle.
    std::fs::write(f.path("svid.pem"), "garbage").unwrap();
    assert_quiet(&mut updates).await;
    std::fs::write(f.path("svid.key"), "").unwrap();
    assert_quiet(&mut updates).await;
    std::fs::remove_file(f.path("bundle.pem")).unwrap();
    assert_quiet(&mut updates).await;
    std::fs::write(f.path("bundle.pem"), "-----BEGIN CERTIFICATE-----\nAAAA\n").unwrap();
    assert_quiet(&mut updates).await;
    assert_eq!(leaf(&files), first);
    assert_eq!(source_ref(&files).roots, 1);

    // Good files apply.
    std::fs::write(f.path("svid.key"), &key).unwrap();
    std::fs::write(f.path("svid.pem"), &cert).unwrap();
    let want = next.chain()[0].clone();
    wait_until(&files, &mut updates, "the complete SVID", |c| {
        c.leaf == want
    })
    .await;
    f.ca.begin_rotation().unwrap();
    f.write_bundle();
    wait_until(&files, &mut updates, "the bundle", |c| c.roots == 2).await;
}

/// An expired pair written over a working one (a restored backup, say) is not taken: every
/// peer would refuse it. A good one after it is.
#[tokio::test]
async fn an_expired_replacement_keeps_the_last_good_svid() {
    let mut f = Files::new();
    let files = f.start().await;
    let first = leaf(&files);
    let mut updates = files.updates();
    updates.mark_unchanged();
    let hour = std::time::Duration::from_secs(3600);
    let now = std::time::SystemTime::now();
    let expired =
        f.ca.leaf()
            .uri(ID)
            .validity(now - 3 * hour, now - hour)
            .build()
            .unwrap();
    let (cert, key) = expired.to_pem();
    std::fs::write(f.path("svid.key"), &key).unwrap();
    std::fs::write(f.path("svid.pem"), &cert).unwrap();
    assert_quiet(&mut updates).await;
    assert_eq!(leaf(&files), first);

    let next = f.ca.issue(ID).unwrap();
    let (cert, key) = next.to_pem();
    std::fs::write(f.path("svid.key"), &key).unwrap();
    std::fs::write(f.path("svid.pem"), &cert).unwrap();
    let want = next.chain()[0].clone();
    wait_until(&files, &mut updates, "the good SVID", |c| c.leaf == want).await;
}

/// Starting with an expired SVID is allowed (a renewal may be about to replace it), but
/// said: every handshake will fail until then, and nothing else on this side would say why.
#[tokio::test]
async fn starting_with_an_expired_svid_warns() {
    #[derive(Clone, Default)]
    struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
        type Writer = Self;
        fn make_writer(&'a self) -> Self {
            self.clone()
        }
    }
    let mut f = Files::new();
    let captured = Captured::default();
    let _log = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_writer(captured.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .finish(),
    );
    let hour = std::time::Duration::from_secs(3600);
    let now = std::time::SystemTime::now();
    let expired =
        f.ca.leaf()
            .uri(ID)
            .validity(now - 3 * hour, now - hour)
            .build()
            .unwrap();
    f.write_svid(&expired);
    let files = f.start().await;
    assert!(files.svid().is_some());
    let log = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    assert!(
        log.contains("has expired") && log.contains("svid.pem"),
        "{log}"
    );
}

/// A new SVID whose chain does not lead to its domain's bundle (issued by another CA,
/// or written before its intermediate) does not replace one that verifies: every peer
/// would refuse it. Once the bundle trusts its CA, it is taken.
#[tokio::test]
async fn an_svid_from_an_untrusted_ca_waits_for_its_bundle() {
    let f = Files::new();
    let files = f.start().await;
    let first = leaf(&files);
    let mut updates = files.updates();
    updates.mark_unchanged();
    let mut other = TestCa::new("example.org").unwrap();
    let foreign = other.issue(ID).unwrap();
    f.write_svid(&foreign);
    assert_quiet(&mut updates).await;
    assert_eq!(leaf(&files), first);
    // The bundle now trusts both CAs (a root rotation's first step): the waiting SVID is
    // taken, with the new bundle.
    let both = format!(
        "{}{}",
        f.ca.bundle().unwrap().to_pem(),
        other.bundle().unwrap().to_pem()
    );
    std::fs::write(f.path("bundle.pem"), both).unwrap();
    let want = foreign.chain()[0].clone();
    wait_until(&files, &mut updates, "the foreign SVID", |c| c.leaf == want).await;
}

/// A renewed SVID that is not yet valid by this host's clock (it lags its issuer's) is
/// still taken: peers with the right time accept it, and nothing would bring it back once
/// the old one expired.
#[tokio::test]
async fn an_svid_valid_only_by_its_issuers_clock_is_taken() {
    let mut f = Files::new();
    let files = f.start().await;
    let mut updates = files.updates();
    updates.mark_unchanged();
    let now = std::time::SystemTime::now();
    let ahead =
        f.ca.leaf()
            .uri(ID)
            .validity(
                now + Duration::from_secs(30),
                now + Duration::from_secs(3600),
            )
            .build()
            .unwrap();
    f.write_svid(&ahead);
    let want = ahead.chain()[0].clone();
    wait_until(&files, &mut updates, "the renewed SVID", |c| c.leaf == want).await;
}

#[tokio::test]
async fn bundle_rotation_applies_independently_of_the_svid() {
    let mut f = Files::new();
    let files = f.start().await;
    let first = leaf(&files);
    let mut updates = files.updates();

    f.ca.begin_rotation().unwrap();
    f.write_bundle();
    wait_until(&files, &mut updates, "two roots", |c| c.roots == 2).await;
    assert_eq!(leaf(&files), first);
    let bundles = files.bundles();
    let bundle = bundles.get(f.ca.trust_domain()).unwrap();
    assert!(bundle.certs().contains(f.ca.root()));

    f.ca.finish_rotation();
    f.write_bundle();
    wait_until(&files, &mut updates, "one root", |c| c.roots == 1).await;
}

#[tokio::test]
async fn errors_at_start_name_the_file() {
    let f = Files::new();
    let td = f.ca.trust_domain().clone();
    let start = |cert: &str, key: &str, bundle: &str| {
        PemFiles::builder(f.path(cert), f.path(key))
            .bundle(td.clone(), f.path(bundle))
            .start()
    };

    for (cert, key, bundle, missing) in [
        ("nope.pem", "svid.key", "bundle.pem", "nope.pem"),
        ("svid.pem", "nope.key", "bundle.pem", "nope.key"),
        ("svid.pem", "svid.key", "nope-bundle.pem", "nope-bundle.pem"),
    ] {
        let err = start(cert, key, bundle).await.unwrap_err();
        assert!(matches!(err, FilesError::Read { .. }), "{err:?}");
        assert!(err.to_string().contains(missing), "{err}");
    }

    // A key of another SVID.
    let mut ca = TestCa::new("example.org").unwrap();
    let other = ca.issue(ID).unwrap();
    std::fs::write(f.path("other.key"), key_pem(other.key())).unwrap();
    let err = start("svid.pem", "other.key", "bundle.pem")
        .await
        .unwrap_err();
    assert!(matches!(err, FilesError::KeyMismatch { .. }), "{err:?}");
    assert!(err.to_string().contains("other.key"), "{err}");

    // A certificate that is not an SVID.
    let (chain, key) = ca.leaf().dns("api.example.org").build_raw().unwrap();
    std::fs::write(f.path("dns.pem"), certs_pem(&chain)).unwrap();
    std::fs::write(f.path("dns.key"), key_pem(&key)).unwrap();
    let err = start("dns.pem", "dns.key", "bundle.pem").await.unwrap_err();
    assert!(
        matches!(
            &err,
            FilesError::Invalid {
                source: CredentialError::Leaf(_),
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("dns.pem"), "{err}");

    // A bundle that is not PEM, and no bundle at all.
    std::fs::write(f.path("bad-bundle.pem"), "not pem").unwrap();
    let err = start("svid.pem", "svid.key", "bad-bundle.pem")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("bad-bundle.pem"), "{err}");
    let err = PemFiles::builder(f.path("svid.pem"), f.path("svid.key"))
        .start()
        .await
        .unwrap_err();
    assert!(matches!(err, FilesError::NoBundles), "{err:?}");
}

#[tokio::test]
async fn combined_file_and_identity_config() {
    let f = Files::new();
    // The chain and the key in one file.
    let combined = std::fs::read_to_string(f.path("svid.pem")).unwrap()
        + &std::fs::read_to_string(f.path("svid.key")).unwrap();
    std::fs::write(f.path("combined.pem"), combined).unwrap();
    let config = IdentityConfig::Files {
        cert: f.path("combined.pem"),
        key: f.path("combined.pem"),
        bundles: [(
            TrustDomainKey(f.ca.trust_domain().clone()),
            f.path("bundle.pem"),
        )]
        .into_iter()
        .collect(),
    };
    let files = PemFiles::from_config(&config).await.unwrap();
    assert_eq!(files.svid().unwrap().id().to_string(), ID);
    assert!(files.bundles().get(f.ca.trust_domain()).is_some());
}

#[tokio::test(flavor = "current_thread")]
async fn dropping_the_source_stops_its_task() {
    let f = Files::new();
    let metrics = tokio::runtime::Handle::current().metrics();
    let before = metrics.num_alive_tasks();
    let files = f.start().await;
    assert_eq!(metrics.num_alive_tasks(), before + 1);
    drop(files);
    timeout(EVENT, async {
        while metrics.num_alive_tasks() > before {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the reload task outlived its source");
}

/// Echoes every accepted connection until it closes.
async fn echo_server(mtls: &Mtls) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut incoming = MtlsAcceptor::new(mtls, Authorizer::any())
        .unwrap()
        .incoming(listener);
    tokio::spawn(async move {
        while let Some(accepted) = incoming.next().await {
            let Ok(accepted) = accepted else { continue };
            tokio::spawn(async move {
                let (mut rd, mut wr) = tokio::io::split(accepted.stream);
                let _ = tokio::io::copy(&mut rd, &mut wr).await;
            });
        }
    });
    addr
}

async fn ping<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(stream: &mut S, msg: &[u8]) {
    stream.write_all(msg).await.unwrap();
    let mut buf = vec![0; msg.len()];
    timeout(EVENT, stream.read_exact(&mut buf))
        .await
        .expect("echo timed out")
        .unwrap();
    assert_eq!(buf, msg);
}

#[tokio::test]
async fn mtls_over_pem_files_across_svid_rotation() {
    let mut f = Files::new();
    let files = Arc::new(f.start().await);
    let server = Mtls::new(files.clone());
    let addr = echo_server(&server).await;

    let client_svid = f.ca.issue("spiffe://example.org/ns/prod/sa/web").unwrap();
    let client = Mtls::new(CredentialStore::with(
        client_svid,
        f.ca.bundle_set().unwrap(),
    ));
    let connector = MtlsConnector::new(&client, mesh_core::SpiffeId::new(ID).unwrap()).unwrap();

    let first = leaf(&files);
    let (mut before, peer) = connector.connect(addr).await.unwrap();
    assert_eq!(peer.to_string(), ID);
    assert_eq!(before.get_ref().1.peer_certificates().unwrap()[0], first);
    ping(&mut before, b"before rotation").await;

    let mut updates = files.updates();
    let next = f.ca.issue(ID).unwrap();
    let want = next.chain()[0].clone();
    f.write_svid(&next);
    wait_until(&files, &mut updates, "the rotated SVID", |c| c.leaf == want).await;

    // New connections get the new certificate; the established one keeps working.
    let (mut after, peer) = connector.connect(addr).await.unwrap();
    assert_eq!(peer.to_string(), ID);
    assert_eq!(after.get_ref().1.peer_certificates().unwrap()[0], want);
    ping(&mut after, b"after rotation").await;
    ping(&mut before, b"still up").await;
}
