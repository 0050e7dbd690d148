//! `ServerTlsAcceptor::watch_files` against real files and real handshakes: a rewritten
//! certificate is presented to new handshakes while an established connection goes on; a
//! certificate written before its key, garbage, an expired replacement and a deleted file
//! keep the last good pair; the watch ends with the acceptor.
#![cfg(all(feature = "test-util", feature = "files"))]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mesh_spiffe::server_tls::{ServerTlsAcceptor, ServerTlsError};
use mesh_spiffe::test_ca::{TestCa, certs_pem, key_pem};
use mesh_spiffe::tls::default_provider;
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Long enough for any file event to arrive on a loaded machine.
const EVENT: Duration = Duration::from_secs(5);

type Pair = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

struct Edge {
    dir: tempfile::TempDir,
    ca: TestCa,
}

impl Edge {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            ca: TestCa::new("example.org").unwrap(),
        }
    }

    fn pair(&mut self) -> Pair {
        self.ca.leaf().dns("localhost").build_raw().unwrap()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Replaces a file as config tools do: a temporary file renamed over it.
    fn replace(&self, name: &str, content: &str) {
        let tmp = self.path(&format!(".{name}.tmp"));
        std::fs::write(&tmp, content).unwrap();
        std::fs::rename(&tmp, self.path(name)).unwrap();
    }

    fn write_cert(&self, pair: &Pair) {
        self.replace("edge.crt", &certs_pem(&pair.0));
    }

    fn write_key(&self, pair: &Pair) {
        self.replace("edge.key", &key_pem(&pair.1));
    }

    async fn watch(&self) -> ServerTlsAcceptor {
        ServerTlsAcceptor::watch_files(self.path("edge.crt"), self.path("edge.key"))
            .await
            .unwrap()
    }

    fn connector(&self) -> tokio_rustls::TlsConnector {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.root().clone()).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(default_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }
}

/// A TLS echo server on loopback with `acceptor`.
async fn serve(acceptor: ServerTlsAcceptor) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = [0u8; 64];
                while let Ok(n) = tls.read(&mut buf).await {
                    if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// Handshakes with `addr`, checks an echo, and returns the connection and the leaf the
/// server presented.
async fn connect(
    edge: &Edge,
    addr: std::net::SocketAddr,
) -> (
    tokio_rustls::client::TlsStream<TcpStream>,
    CertificateDer<'static>,
) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = edge.connector().connect(name, tcp).await.unwrap();
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    echo(&mut tls).await;
    (tls, leaf)
}

async fn echo(tls: &mut tokio_rustls::client::TlsStream<TcpStream>) {
    tls.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tls.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
}

/// Waits (at most [`EVENT`]) until `done` holds; `what` names it in the failure.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + EVENT;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "waited for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `acceptor` has applied `reloads` and refused `rejected` changes.
async fn settled(acceptor: &ServerTlsAcceptor, reloads: u64, rejected: u64) {
    let what = format!("{reloads} reloads and {rejected} refusals");
    until(&what, || {
        let status = acceptor.status();
        status.reloads == reloads && status.rejected == rejected
    })
    .await;
}

fn not_after(pair: &Pair) -> SystemTime {
    let (_, cert) = x509_parser::parse_x509_certificate(pair.0[0].as_ref()).unwrap();
    SystemTime::UNIX_EPOCH
        + Duration::from_secs(cert.validity().not_after.timestamp().try_into().unwrap())
}

#[tokio::test]
async fn a_rewritten_certificate_is_presented_to_new_handshakes() {
    let mut edge = Edge::new();
    let first = edge.pair();
    edge.write_cert(&first);
    edge.write_key(&first);
    let acceptor = edge.watch().await;
    assert_eq!(acceptor.status().not_after, not_after(&first));
    let addr = serve(acceptor.clone()).await;
    let (mut before, leaf) = connect(&edge, addr).await;
    assert_eq!(leaf, first.0[0]);

    // Key first, then certificate: in between the pair does not match, which waits for
    // the other file (2 s) rather than counting as refused.
    let second = edge.pair();
    edge.write_key(&second);
    edge.write_cert(&second);
    until("a reload", || acceptor.status().reloads > 0).await;
    assert_eq!(acceptor.status().reloads, 1);
    assert_eq!(acceptor.status().not_after, not_after(&second));
    // The moment the pair did not match was not a refusal: the other file came in time.
    assert_eq!(acceptor.status().rejected, 0);
    let (_, leaf) = connect(&edge, addr).await;
    assert_eq!(leaf, second.0[0], "new handshakes get the new certificate");
    // The connection made before the rotation goes on.
    echo(&mut before).await;
}

#[tokio::test]
async fn invalid_replacements_keep_the_last_good_pair() {
    let mut edge = Edge::new();
    let good = edge.pair();
    edge.write_cert(&good);
    edge.write_key(&good);
    let acceptor = edge.watch().await;
    let addr = serve(acceptor.clone()).await;

    // A certificate whose key has not arrived: given 2 s for the key, then refused.
    let next = edge.pair();
    edge.write_cert(&next);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(acceptor.status().rejected, 0, "refused within the grace");
    settled(&acceptor, 0, 1).await;
    assert_eq!(connect(&edge, addr).await.1, good.0[0]);
    // Its key arrives: applied.
    edge.write_key(&next);
    settled(&acceptor, 1, 1).await;
    assert_eq!(connect(&edge, addr).await.1, next.0[0]);

    // Garbage, a half-written certificate, an expired one: each refused.
    edge.replace("edge.crt", "not PEM at all");
    settled(&acceptor, 1, 2).await;
    let pem = certs_pem(&next.0);
    edge.replace("edge.crt", &pem[..pem.len() / 2]);
    settled(&acceptor, 1, 3).await;
    let now = SystemTime::now();
    let expired = edge
        .ca
        .leaf()
        .dns("localhost")
        .validity(
            now - Duration::from_secs(7200),
            now - Duration::from_secs(3600),
        )
        .build_raw()
        .unwrap();
    edge.write_key(&expired);
    edge.write_cert(&expired);
    until("the expired pair refused", || {
        acceptor.status().rejected >= 4
    })
    .await;
    // A deleted file is not a change to a pair: nothing is refused or applied.
    std::fs::remove_file(edge.path("edge.crt")).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = acceptor.status();
    assert_eq!(status.reloads, 1, "{status:?}");
    assert_eq!(status.not_after, not_after(&next));
    assert_eq!(connect(&edge, addr).await.1, next.0[0]);

    // The files come back valid: applied.
    let last = edge.pair();
    edge.write_key(&last);
    edge.write_cert(&last);
    until("the second reload", || acceptor.status().reloads >= 2).await;
    assert_eq!(connect(&edge, addr).await.1, last.0[0]);
}

#[tokio::test]
async fn bad_files_at_the_start_are_named() {
    let mut edge = Edge::new();
    let pair = edge.pair();
    let other = edge.pair();
    let missing = edge.path("missing.crt");
    let err = ServerTlsAcceptor::watch_files(&missing, edge.path("edge.key"))
        .await
        .unwrap_err();
    assert!(matches!(err, ServerTlsError::Read { .. }), "{err}");
    assert!(
        err.to_string().starts_with(&missing.display().to_string()),
        "{err}"
    );

    edge.write_cert(&pair);
    edge.write_key(&other);
    let err = ServerTlsAcceptor::watch_files(edge.path("edge.crt"), edge.path("edge.key"))
        .await
        .unwrap_err();
    assert!(matches!(err, ServerTlsError::Tls(_)), "{err}");

    edge.replace(
        "edge.crt",
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    );
    let err = ServerTlsAcceptor::watch_files(edge.path("edge.crt"), edge.path("edge.key"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not X.509"), "{err}");
    assert!(path_named(&err, &edge.path("edge.crt")), "{err}");
}

fn path_named(err: &ServerTlsError, path: &Path) -> bool {
    err.to_string().starts_with(&path.display().to_string())
}

#[tokio::test]
async fn the_watch_ends_with_the_last_acceptor() {
    let mut edge = Edge::new();
    let pair = edge.pair();
    edge.write_cert(&pair);
    edge.write_key(&pair);
    let acceptor = edge.watch().await;
    let clone = acceptor.clone();
    let tasks = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    assert_eq!(tasks(), 1, "the watch task");
    drop(acceptor);
    tokio::task::yield_now().await;
    assert_eq!(tasks(), 1, "a clone keeps it");
    drop(clone);
    until("the watch task to end with its acceptor", || tasks() == 0).await;
}
