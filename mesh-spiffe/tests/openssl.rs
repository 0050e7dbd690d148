//! Interop with a TLS stack we did not write: the `openssl` command line, client and
//! server, with certificates from our CA and certificates openssl made itself.
#![cfg(feature = "test-util")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use mesh_core::identity::{SpiffeId, TrustDomain};
use mesh_spiffe::test_ca::{TestCa, certs_pem, key_pem};
use mesh_spiffe::{
    Authorizer, Bundle, BundleSet, CredentialStore, MtlsAcceptor, MtlsConnector, Svid,
    TransportError, VerifyError,
};
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// Kills the child process when dropped.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn write_svid(dir: &Path, name: &str, svid: &Svid) -> (PathBuf, PathBuf) {
    (
        write(dir, &format!("{name}.pem"), &certs_pem(svid.chain())),
        write(dir, &format!("{name}.key"), &key_pem(svid.key())),
    )
}

fn openssl(args: &[&str], dir: &Path) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `openssl s_server` and waits until it accepts connections. The free port can
/// be taken by a test running beside this one before openssl binds it: then openssl
/// exits, and it is started again on another port.
async fn s_server(dir: &Path, extra: &[&str]) -> (SocketAddr, Reaped) {
    for _ in 0..5 {
        let port = free_port();
        let accept = format!("127.0.0.1:{port}");
        let child = Command::new("openssl")
            .args(["s_server", "-accept", &accept, "-rev", "-naccept", "1"])
            .args(extra)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl is installed");
        let mut child = Reaped(child);
        let addr: SocketAddr = accept.parse().unwrap();
        let bound = tokio::time::timeout(Duration::from_secs(10), async {
            // Probe readiness without spending the server's single accept: wait for the
            // port to be bound by trying to bind it ourselves.
            while std::net::TcpListener::bind(addr).is_ok() {
                if child.0.try_wait().unwrap().is_some() {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            true
        })
        .await
        .expect("openssl s_server did not start");
        if bound {
            return (addr, child);
        }
    }
    panic!("openssl s_server exited five times before listening");
}

fn bundle_from_pem(path: &Path) -> Bundle {
    let text = std::fs::read(path).unwrap();
    let certs = pem::parse_many(text)
        .unwrap()
        .into_iter()
        .map(|p| CertificateDer::from(p.into_contents()))
        .collect();
    Bundle::new(certs).unwrap()
}

#[tokio::test]
async fn openssl_client_handshakes_with_our_server() {
    let dir = tempfile::tempdir().unwrap();
    let mut ca = TestCa::with_intermediate("example.org").unwrap();
    write(dir.path(), "root.pem", &certs_pem(&[ca.root().clone()]));
    let client_svid = ca.issue("spiffe://example.org/openssl-client").unwrap();
    write_svid(dir.path(), "client", &client_svid);
    // `-cert` reads only the leaf; the intermediate goes in `-cert_chain`.
    write(
        dir.path(),
        "client-chain.pem",
        &certs_pem(&client_svid.chain()[1..]),
    );

    let server = store(&mut ca, "spiffe://example.org/api");
    let acceptor = MtlsAcceptor::new(&mtls(&server), authorizer_any_in(&ca)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut incoming = acceptor.incoming(listener);
    let served = tokio::spawn(async move {
        let accepted = incoming.next().await.unwrap().unwrap();
        let mut stream = BufReader::new(accepted.stream);
        let mut line = String::new();
        stream.read_line(&mut line).await.unwrap();
        let reply = format!("hello {} you said {}", accepted.peer, line);
        stream.get_mut().write_all(reply.as_bytes()).await.unwrap();
        stream.get_mut().shutdown().await.unwrap();
    });

    let dir_path = dir.path().to_owned();
    let out = tokio::task::spawn_blocking(move || {
        let mut child = Command::new("openssl")
            .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
            .args([
                "-cert",
                "client.pem",
                "-key",
                "client.key",
                "-cert_chain",
                "client-chain.pem",
            ])
            .args(["-CAfile", "root.pem"])
            .args(["-verify_return_error", "-quiet"])
            .current_dir(&dir_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(b"hi\n").unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    served.await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("hello spiffe://example.org/openssl-client you said hi"),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn our_client_handshakes_with_an_openssl_server() {
    let dir = tempfile::tempdir().unwrap();
    let mut ca = TestCa::new("example.org").unwrap();
    write(dir.path(), "root.pem", &certs_pem(&[ca.root().clone()]));
    write_svid(
        dir.path(),
        "server",
        &ca.issue("spiffe://example.org/openssl-server").unwrap(),
    );
    let (addr, _server) = s_server(
        dir.path(),
        &[
            "-cert",
            "server.pem",
            "-key",
            "server.key",
            "-CAfile",
            "root.pem",
            "-Verify",
            "1",
            "-verify_return_error",
        ],
    )
    .await;

    let client = store(&mut ca, "spiffe://example.org/web");
    let connector = MtlsConnector::new(
        &mtls(&client),
        SpiffeId::new("spiffe://example.org/openssl-server").unwrap(),
    )
    .unwrap();
    let (mut stream, peer) = connector.connect(addr).await.unwrap();
    assert_eq!(peer.to_string(), "spiffe://example.org/openssl-server");
    stream.write_all(b"ping\n").await.unwrap();
    let mut reply = [0u8; 5];
    stream.read_exact(&mut reply).await.unwrap();
    assert_eq!(&reply, b"gnip\n");
}

/// An openssl-made CA, `ca.pem` and `ca.key`.
fn openssl_ca(dir: &Path) {
    openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=openssl test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
        dir,
    );
}

/// A leaf `{name}.pem` with key `{name}.key`, signed by the CA of [`openssl_ca`], whose
/// extensions are `extensions` (openssl extension-file lines).
fn openssl_leaf(dir: &Path, name: &str, extensions: &str) {
    let (key, csr, ext, pem) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.ext"),
        format!("{name}.pem"),
    );
    openssl(
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &format!("/CN={name}"),
        ],
        dir,
    );
    write(dir, &ext, extensions);
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            &ext,
            "-out",
            &pem,
        ],
        dir,
    );
}

/// The extensions of a correct leaf SVID with the given subjectAltName.
fn svid_extensions(san: &str) -> String {
    format!(
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
         extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName={san}\n"
    )
}

/// An openssl-made CA, and a leaf (`leaf.pem`, `leaf.key`) with the given subjectAltName.
fn openssl_pki(dir: &Path, san: &str) {
    openssl_ca(dir);
    openssl_leaf(dir, "leaf", &svid_extensions(san));
}

/// Leaves that break the X509-SVID leaf rules (4.1 basic constraints, 4.3 key usage, 5.2
/// leaf validation), as openssl writes them: the file name, the basic constraints and key
/// usage lines, and the reason a verifier must give. Each breaks exactly one rule.
fn bad_leaves() -> Vec<(&'static str, &'static str, VerifyError, &'static str)> {
    vec![
        (
            "key-cert-sign",
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyCertSign\n",
            VerifyError::KeyCertSignOnLeaf,
            "has keyCertSign set",
        ),
        (
            "crl-sign",
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,cRLSign\n",
            VerifyError::CrlSignOnLeaf,
            "has cRLSign set",
        ),
        (
            "no-digital-signature",
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,keyAgreement\n",
            VerifyError::NoDigitalSignature,
            "lacks digitalSignature",
        ),
        (
            "no-key-usage",
            "basicConstraints=critical,CA:FALSE\n",
            VerifyError::NoKeyUsage,
            "has no key usage extension",
        ),
        (
            "ca-true",
            "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,digitalSignature\n",
            VerifyError::CaAsLeaf,
            "CA=true",
        ),
    ]
}

/// An openssl CA in `dir` and its leaves: `good.pem` (a correct SVID,
/// `spiffe://example.org/good`) and one per [`bad_leaves`] case, each for
/// `spiffe://example.org/{name}`.
fn openssl_leaves(dir: &Path) {
    openssl_ca(dir);
    openssl_leaf(
        dir,
        "good",
        &svid_extensions("URI:spiffe://example.org/good"),
    );
    for (name, constraints, _, _) in bad_leaves() {
        openssl_leaf(
            dir,
            name,
            &format!(
                "{constraints}extendedKeyUsage=serverAuth,clientAuth\n\
                 subjectAltName=URI:spiffe://example.org/{name}\n"
            ),
        );
    }
}

/// This workload's credentials from the test CA, trusting only the openssl CA in `dir`
/// for `example.org`.
fn store_trusting_openssl_ca(dir: &Path, id: &str) -> Arc<CredentialStore> {
    let mut ca = TestCa::new("example.org").unwrap();
    let bundles = BundleSet::new().with(
        TrustDomain::new("example.org").unwrap(),
        bundle_from_pem(&dir.join("ca.pem")),
    );
    Arc::new(CredentialStore::with(ca.issue(id).unwrap(), bundles))
}

/// Connects our client to an `openssl s_server` presenting `{name}.pem`.
async fn connect_to_openssl_server(dir: &Path, name: &str) -> Result<String, TransportError> {
    let (cert, key) = (format!("{name}.pem"), format!("{name}.key"));
    let (addr, _server) = s_server(dir, &["-cert", &cert, "-key", &key]).await;
    let client = store_trusting_openssl_ca(dir, "spiffe://example.org/web");
    let connector = MtlsConnector::new(&mtls(&client), Authorizer::any()).unwrap();
    let (mut stream, peer) = connector.connect(addr).await?;
    drop(stream.shutdown());
    Ok(peer.to_string())
}

#[tokio::test]
async fn our_client_refuses_openssl_server_leaves_breaking_the_x509_svid_leaf_rules() {
    let dir = tempfile::tempdir().unwrap();
    openssl_leaves(dir.path());
    for (name, _, want, text) in bad_leaves() {
        let err = connect_to_openssl_server(dir.path(), name)
            .await
            .err()
            .unwrap_or_else(|| panic!("{name}: accepted"));
        match &err {
            TransportError::Verify(got) => assert_eq!(got, &want, "{name}: {err}"),
            other => panic!("{name}: refused for another reason: {other}"),
        }
        assert!(err.to_string().contains(text), "{name}: {err}");
    }
    // The positive control: a correct leaf from the same openssl CA is accepted.
    let peer = connect_to_openssl_server(dir.path(), "good").await.unwrap();
    assert_eq!(peer, "spiffe://example.org/good");
}

/// What the server saw next, within 10 s.
async fn next_seen(seen: &mut Seen) -> Result<String, mesh_spiffe::transport::HandshakeError> {
    tokio::time::timeout(Duration::from_secs(10), seen.recv())
        .await
        .expect("the server saw the handshake")
        .unwrap()
}

/// Runs `openssl s_client` against `port` presenting `{name}.pem`, to completion.
async fn openssl_client(dir: &Path, port: u16, name: &str) {
    let dir = dir.to_owned();
    let (cert, key) = (format!("{name}.pem"), format!("{name}.key"));
    tokio::task::spawn_blocking(move || {
        Command::new("openssl")
            .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
            .args(["-cert", &cert, "-key", &key])
            .current_dir(&dir)
            .stdin(Stdio::null())
            .output()
            .expect("openssl is installed")
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn our_server_refuses_openssl_client_leaves_breaking_the_x509_svid_leaf_rules() {
    let dir = tempfile::tempdir().unwrap();
    openssl_leaves(dir.path());
    let server = store_trusting_openssl_ca(dir.path(), "spiffe://example.org/api");
    let (addr, mut seen) =
        echo_server(MtlsAcceptor::new(&mtls(&server), Authorizer::any()).unwrap()).await;
    for (name, _, want, text) in bad_leaves() {
        openssl_client(dir.path(), addr.port(), name).await;
        let err = next_seen(&mut seen)
            .await
            .err()
            .unwrap_or_else(|| panic!("{name}: accepted"));
        match &err.error {
            TransportError::Verify(got) => assert_eq!(got, &want, "{name}: {err}"),
            other => panic!("{name}: refused for another reason: {other}"),
        }
        assert!(err.to_string().contains(text), "{name}: {err}");
    }
    // The positive control: a correct leaf from the same openssl CA is accepted.
    openssl_client(dir.path(), addr.port(), "good").await;
    assert_eq!(
        next_seen(&mut seen).await.unwrap(),
        "spiffe://example.org/good"
    );
}

async fn connect_to_openssl_leaf(san: &str) -> Result<String, TransportError> {
    let dir = tempfile::tempdir().unwrap();
    openssl_pki(dir.path(), san);
    let (addr, _server) = s_server(dir.path(), &["-cert", "leaf.pem", "-key", "leaf.key"]).await;
    let mut ca = TestCa::new("example.org").unwrap();
    let bundles = BundleSet::new().with(
        TrustDomain::new("example.org").unwrap(),
        bundle_from_pem(&dir.path().join("ca.pem")),
    );
    let client = Arc::new(CredentialStore::with(
        ca.issue("spiffe://example.org/web").unwrap(),
        bundles,
    ));
    let connector = MtlsConnector::new(&mtls(&client), Authorizer::any()).unwrap();
    connector.connect(addr).await.map(|(mut stream, peer)| {
        drop(stream.shutdown());
        peer.to_string()
    })
}

#[tokio::test]
async fn an_openssl_made_svid_is_accepted() {
    let peer = connect_to_openssl_leaf("URI:spiffe://example.org/made-by-openssl")
        .await
        .unwrap();
    assert_eq!(peer, "spiffe://example.org/made-by-openssl");
}

#[tokio::test]
async fn an_openssl_made_certificate_without_a_uri_san_is_refused() {
    let err = connect_to_openssl_leaf("DNS:leaf.example.org")
        .await
        .unwrap_err();
    assert!(
        matches!(err, TransportError::Verify(VerifyError::NoUriSan)),
        "{err}"
    );
    assert!(err.to_string().contains("has no URI SAN"), "{err}");
}

#[tokio::test]
async fn openssl_cannot_connect_without_a_client_certificate() {
    let mut ca = TestCa::new("example.org").unwrap();
    let server = store(&mut ca, "spiffe://example.org/api");
    let (addr, mut seen) =
        echo_server(MtlsAcceptor::new(&mtls(&server), Authorizer::any()).unwrap()).await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "root.pem", &certs_pem(&[ca.root().clone()]));
    let dir_path = dir.path().to_owned();
    let port = addr.port();
    tokio::task::spawn_blocking(move || {
        Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &format!("127.0.0.1:{port}"),
                "-CAfile",
                "root.pem",
            ])
            .current_dir(&dir_path)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let err = seen.recv().await.unwrap().unwrap_err();
    assert!(
        matches!(
            &err.error,
            TransportError::Tls(rustls::Error::NoCertificatesPresented)
        ),
        "{err}"
    );
}
