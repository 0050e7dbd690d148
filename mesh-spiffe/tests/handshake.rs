//! Real TLS handshakes over loopback with certificates from the test CA: who is accepted,
//! who is refused, and why.
#![cfg(feature = "test-util")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod common;

use std::time::{Duration, SystemTime};

use common::*;
use mesh_core::identity::SpiffeId;
use mesh_spiffe::test_ca::TestCa;
use mesh_spiffe::{
    Authorizer, Bundle, BundleSet, CredentialStore, Mtls, MtlsAcceptor, MtlsConnector,
    TransportError, VerifyError,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

fn id(s: &str) -> SpiffeId {
    SpiffeId::new(s).unwrap()
}

async fn identities_are_exchanged(mut ca: TestCa) {
    let server = store(&mut ca, "spiffe://example.org/api");
    let client = store(&mut ca, "spiffe://example.org/web");
    let acceptor = MtlsAcceptor::new(&mtls(&server), authorizer_any_in(&ca)).unwrap();
    let (addr, mut seen) = echo_server(acceptor).await;

    let connector = MtlsConnector::new(&mtls(&client), id("spiffe://example.org/api")).unwrap();
    let (mut stream, server_id) = connector.connect(addr).await.unwrap();
    assert_eq!(server_id.id(), &id("spiffe://example.org/api"));
    assert_eq!(
        seen.recv().await.unwrap().unwrap(),
        "spiffe://example.org/web"
    );
    ping(&mut stream, 7).await.unwrap();
    let (_, conn) = stream.get_ref();
    assert_eq!(conn.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(
        conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
}

#[tokio::test]
async fn both_sides_see_each_others_spiffe_id() {
    identities_are_exchanged(TestCa::new("example.org").unwrap()).await;
}

#[tokio::test]
async fn a_chain_through_an_intermediate_works() {
    let mut ca = TestCa::with_intermediate("example.org").unwrap();
    assert_eq!(ca.issue("spiffe://example.org/x").unwrap().chain().len(), 2);
    identities_are_exchanged(ca).await;
}

/// The certificates a verifier must refuse, with the reason it must give.
type Case = (
    &'static str,
    (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
    &'static str,
);

fn bad_certificates(ca: &mut TestCa) -> Vec<Case> {
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let mut other_ca = TestCa::new("example.org").unwrap();
    let mut foreign_ca = TestCa::new("other.org").unwrap();
    let good = "spiffe://example.org/peer";
    vec![
        (
            "no URI SAN",
            ca.leaf().dns("peer.example.org").build_raw().unwrap(),
            "has no URI SAN",
        ),
        (
            "two URI SANs",
            ca.leaf()
                .uri(good)
                .uri("spiffe://example.org/other")
                .build_raw()
                .unwrap(),
            "has 2 URI SANs",
        ),
        (
            "non-SPIFFE URI",
            ca.leaf()
                .uri("https://example.org/peer")
                .build_raw()
                .unwrap(),
            "is not a workload SPIFFE ID",
        ),
        (
            "upper-case trust domain",
            ca.leaf()
                .uri("spiffe://EXAMPLE.org/peer")
                .build_raw()
                .unwrap(),
            "must be lower-case",
        ),
        (
            "upper-case scheme",
            ca.leaf()
                .uri("SPIFFE://example.org/peer")
                .build_raw()
                .unwrap(),
            "must be lower-case",
        ),
        (
            "trust-domain ID as a leaf",
            ca.leaf().uri("spiffe://example.org").build_raw().unwrap(),
            "needs a path",
        ),
        (
            "CA certificate as leaf",
            ca.leaf().uri(good).ca().build_raw().unwrap(),
            "CA certificate",
        ),
        (
            "expired",
            ca.leaf()
                .uri(good)
                .validity(now - 3 * hour, now - hour)
                .build_raw()
                .unwrap(),
            "has expired",
        ),
        (
            "not yet valid",
            ca.leaf()
                .uri(good)
                .validity(now + hour, now + 3 * hour)
                .build_raw()
                .unwrap(),
            "not valid yet",
        ),
        (
            "unknown CA",
            other_ca.leaf().uri(good).build_raw().unwrap(),
            "is not signed by a trusted root of `example.org`",
        ),
        (
            "wrong trust domain",
            foreign_ca
                .leaf()
                .uri("spiffe://other.org/peer")
                .build_raw()
                .unwrap(),
            "no trust bundle for the peer's trust domain `other.org`",
        ),
        (
            "unauthorized ID",
            ca.leaf()
                .uri("spiffe://example.org/intruder")
                .build_raw()
                .unwrap(),
            "`spiffe://example.org/intruder` is not authorized",
        ),
    ]
}

#[tokio::test]
async fn clients_verifying_servers_refuse_bad_certificates_naming_the_reason() {
    let mut ca = TestCa::new("example.org").unwrap();
    let client = store(&mut ca, "spiffe://example.org/web");
    let expected = Authorizer::one_of([
        id("spiffe://example.org/peer"),
        id("spiffe://other.org/peer"),
    ]);
    let connector = MtlsConnector::new(&mtls(&client), expected.clone()).unwrap();
    for (case, (chain, key), want) in bad_certificates(&mut ca) {
        let addr = raw_server(chain, key).await;
        let err = connector
            .connect(addr)
            .await
            .err()
            .unwrap_or_else(|| panic!("{case}: accepted"));
        let why = reason(&err);
        assert!(matches!(err, TransportError::Verify(_)), "{case}: {why}");
        assert!(
            why.contains(want),
            "{case}: {why:?} should contain {want:?}"
        );
    }
    // An authorized `other.org` peer fails only for lack of a bundle, which proves the
    // bundle lookup is per trust domain and not a pooled root set.
    let err = connector
        .connect(
            raw_server_from(
                &mut TestCa::new("other.org").unwrap(),
                "spiffe://other.org/peer",
            )
            .await,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, TransportError::Verify(VerifyError::NoBundle(_))),
        "{err}"
    );
}

async fn raw_server_from(ca: &mut TestCa, id: &str) -> std::net::SocketAddr {
    let (chain, key) = ca.leaf().uri(id).build_raw().unwrap();
    raw_server(chain, key).await
}

#[tokio::test]
async fn servers_verifying_clients_refuse_bad_certificates_naming_the_reason() {
    let mut ca = TestCa::new("example.org").unwrap();
    let server = store(&mut ca, "spiffe://example.org/api");
    let clients = Authorizer::one_of([
        id("spiffe://example.org/peer"),
        id("spiffe://other.org/peer"),
    ]);
    let acceptor = MtlsAcceptor::new(&mtls(&server), clients).unwrap();
    let (addr, mut seen) = echo_server(acceptor).await;
    for (case, (chain, key), want) in bad_certificates(&mut ca) {
        let client_side = raw_client(addr, chain, key).await;
        assert!(client_side.is_err(), "{case}: the client was served");
        let err = seen
            .recv()
            .await
            .unwrap()
            .err()
            .unwrap_or_else(|| panic!("{case}: accepted"));
        let why = reason(&err.error);
        assert!(
            matches!(err.error, TransportError::Verify(_)),
            "{case}: {why}"
        );
        assert!(
            why.contains(want),
            "{case}: {why:?} should contain {want:?}"
        );
    }
    // And a good client still gets through.
    let good = ca.issue("spiffe://example.org/peer").unwrap();
    raw_client(addr, good.chain().to_vec(), good.key().clone_key())
        .await
        .unwrap();
    assert_eq!(
        seen.recv().await.unwrap().unwrap(),
        "spiffe://example.org/peer"
    );
}

/// X509-SVID 4.3: a signing certificate must have `keyCertSign`. webpki checks only that
/// an intermediate is a CA; the verifier refuses one whose key usage may not sign, on
/// both sides, and a bundle refuses a certificate that is no CA.
#[tokio::test]
async fn an_intermediate_that_may_not_sign_certificates_is_refused() {
    let mut good = TestCa::new("example.org").unwrap();
    let mut weak = TestCa::with_non_signing_intermediate("example.org").unwrap();
    // Both roots are trusted: only the intermediate's key usage is wrong.
    let bundle = Bundle::new(vec![good.root().clone(), weak.root().clone()]).unwrap();
    let bundles = BundleSet::new().with(good.trust_domain().clone(), bundle);
    let server = Mtls::new(CredentialStore::with(
        good.issue("spiffe://example.org/api").unwrap(),
        bundles.clone(),
    ));
    let acceptor = MtlsAcceptor::new(&server, Authorizer::any()).unwrap();
    let (addr, mut seen) = echo_server(acceptor).await;
    let weak_svid = weak.issue("spiffe://example.org/web").unwrap();
    assert_eq!(weak_svid.chain().len(), 2);
    let client_side = raw_client(
        addr,
        weak_svid.chain().to_vec(),
        weak_svid.key().clone_key(),
    )
    .await;
    assert!(client_side.is_err(), "the client was served");
    let err = seen.recv().await.unwrap().unwrap_err();
    let why = reason(&err.error);
    assert!(why.contains("may not sign certificates"), "{why}");
    // As a server's chain.
    let (chain, key) = weak
        .leaf()
        .uri("spiffe://example.org/api")
        .build_raw()
        .unwrap();
    let addr = raw_server(chain, key).await;
    let client = Mtls::new(CredentialStore::with(
        good.issue("spiffe://example.org/web").unwrap(),
        bundles,
    ));
    let connector = MtlsConnector::new(&client, Authorizer::any()).unwrap();
    let Err(err) = connector.connect(addr).await else {
        panic!("accepted");
    };
    let why = reason(&err);
    assert!(why.contains("may not sign certificates"), "{why}");

    // A leaf in a bundle (its SVID file given as the bundle, say) cannot become a root:
    // it is left out, and a bundle of nothing else is refused.
    let leaf = good.issue("spiffe://example.org/x").unwrap().chain()[0].clone();
    let mixed = Bundle::new(vec![good.root().clone(), leaf.clone()]).unwrap();
    assert_eq!(mixed.certs(), std::slice::from_ref(good.root()));
    let Err(err) = Bundle::new(vec![leaf]) else {
        panic!("a leaf taken as a root");
    };
    assert!(
        err.to_string().contains("#0") && err.to_string().contains("is not a CA certificate"),
        "{err}"
    );
}

/// A peer whose certificate has expired (or is not valid yet) hears so in the TLS alert
/// (`certificate_expired`), so its own logs can point at its clock or its rotation; other
/// refusals get `certificate_unknown`, their details kept to this side's error.
#[tokio::test]
async fn an_expired_peer_hears_certificate_expired() {
    let mut ca = TestCa::new("example.org").unwrap();
    let server = store(&mut ca, "spiffe://example.org/api");
    let acceptor = MtlsAcceptor::new(&mtls(&server), authorizer_any_in(&ca)).unwrap();
    let (addr, mut seen) = echo_server(acceptor).await;
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let cases = [
        (
            now - 3 * hour,
            now - hour,
            "CertificateExpired",
            "has expired",
        ),
        (
            now + hour,
            now + 3 * hour,
            "CertificateExpired",
            "not valid yet",
        ),
    ];
    for (from, until, alert, why) in cases {
        let (chain, key) = ca
            .leaf()
            .uri("spiffe://example.org/web")
            .validity(from, until)
            .build_raw()
            .unwrap();
        let err = raw_client(addr, chain, key).await.unwrap_err();
        assert!(format!("{err:?}").contains(alert), "{why}: {err:?}");
        let refused = seen.recv().await.unwrap().unwrap_err();
        assert!(reason(&refused.error).contains(why), "{refused}");
    }
    let mut other = TestCa::new("example.org").unwrap();
    let (chain, key) = other
        .leaf()
        .uri("spiffe://example.org/web")
        .build_raw()
        .unwrap();
    let err = raw_client(addr, chain, key).await.unwrap_err();
    assert!(format!("{err:?}").contains("CertificateUnknown"), "{err:?}");
    let refused = seen.recv().await.unwrap().unwrap_err();
    assert!(reason(&refused.error).contains("trusted root"), "{refused}");
}

/// Connections handshaken but not taken from `Incoming` count against the bound on
/// handshakes, past the 64 it buffers: a consumer that stops taking them stops accepting.
#[tokio::test]
async fn an_incoming_nobody_reads_stops_accepting() {
    let mut ca = TestCa::new("example.org").unwrap();
    let server = store(&mut ca, "spiffe://example.org/api");
    let client = store(&mut ca, "spiffe://example.org/web");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut incoming = MtlsAcceptor::new(&mtls(&server), authorizer_any_in(&ca))
        .unwrap()
        .with_max_concurrent_handshakes(2)
        .incoming(listener);
    let connector = MtlsConnector::new(&mtls(&client), Authorizer::any()).unwrap();
    let mut held = Vec::new();
    // 64 buffered, and 2 handed over as soon as there is room.
    for i in 0..66 {
        let connected = tokio::time::timeout(Duration::from_secs(5), connector.connect(addr))
            .await
            .unwrap_or_else(|_| panic!("connection {i} was not served"));
        held.push(connected.unwrap());
    }
    let blocked = tokio::time::timeout(Duration::from_millis(300), connector.connect(addr)).await;
    assert!(blocked.is_err(), "a 67th connection was handshaken");
    // Taking some lets the next in: the first frees room for the two waiting, the
    // third for the 67th (given up by its client, so refused).
    for _ in 0..3 {
        incoming.next().await.unwrap().ok();
    }
    tokio::time::timeout(Duration::from_secs(5), connector.connect(addr))
        .await
        .expect("served once one was taken")
        .unwrap();
}

#[tokio::test]
async fn plaintext_and_garbage_are_refused() {
    let mut ca = TestCa::new("example.org").unwrap();
    let server = store(&mut ca, "spiffe://example.org/api");
    let acceptor = MtlsAcceptor::new(&mtls(&server), Authorizer::any()).unwrap();
    let (addr, mut seen) = echo_server(acceptor).await;
    for bytes in [
        &b"GET / HTTP/1.1\r\nHost: api\r\n\r\n"[..],
        &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..],
        &[0x16, 0x03, 0x01, 0xff, 0xff, 0, 0, 0, 0][..],
        &[0u8; 512][..],
    ] {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(bytes).await.unwrap();
        let err = seen.recv().await.unwrap().unwrap_err();
        assert!(
            matches!(err.error, TransportError::Tls(_)),
            "{bytes:?}: {err}"
        );
        assert!(err.to_string().contains("TLS handshake failed"), "{err}");
    }
}

#[tokio::test]
async fn a_silent_client_times_out_without_stalling_others() {
    let mut ca = TestCa::new("example.org").unwrap();
    let server = store(&mut ca, "spiffe://example.org/api");
    let client = store(&mut ca, "spiffe://example.org/web");
    let acceptor = MtlsAcceptor::new(&mtls(&server), Authorizer::any())
        .unwrap()
        .with_handshake_timeout(Duration::from_millis(300));
    let (addr, mut seen) = echo_server(acceptor).await;
    let _silent = TcpStream::connect(addr).await.unwrap();
    let connector = MtlsConnector::new(&mtls(&client), Authorizer::any()).unwrap();
    let (mut stream, _) = connector.connect(addr).await.unwrap();
    ping(&mut stream, 1).await.unwrap();
    assert_eq!(
        seen.recv().await.unwrap().unwrap(),
        "spiffe://example.org/web"
    );
    let err = seen.recv().await.unwrap().unwrap_err();
    assert!(matches!(err.error, TransportError::Timeout(_)), "{err}");
}

#[tokio::test]
async fn a_server_without_an_svid_fails_closed() {
    let ca = TestCa::new("example.org").unwrap();
    let empty = std::sync::Arc::new(mesh_spiffe::CredentialStore::new());
    empty.set_bundles(ca.bundle_set().unwrap());
    let acceptor = MtlsAcceptor::new(&mtls(&empty), Authorizer::any()).unwrap();
    let (addr, mut seen) = echo_server(acceptor).await;
    let mut ca = ca;
    let client = store(&mut ca, "spiffe://example.org/web");
    let connector = MtlsConnector::new(&mtls(&client), Authorizer::any()).unwrap();
    assert!(connector.connect(addr).await.is_err());
    assert!(seen.recv().await.unwrap().is_err());
    // And no bundles at all refuses every server.
    let no_bundles = std::sync::Arc::new(mesh_spiffe::CredentialStore::with(
        ca.issue("spiffe://example.org/web").unwrap(),
        BundleSet::new(),
    ));
    let server = store(&mut ca, "spiffe://example.org/api");
    let (addr, _seen) =
        echo_server(MtlsAcceptor::new(&mtls(&server), Authorizer::any()).unwrap()).await;
    let err = MtlsConnector::new(&mtls(&no_bundles), Authorizer::any())
        .unwrap()
        .connect(addr)
        .await
        .unwrap_err();
    assert!(
        matches!(err, TransportError::Verify(VerifyError::NoBundle(_))),
        "{err}"
    );
}

#[cfg(feature = "aws-lc-rs")]
#[tokio::test]
async fn the_aws_lc_rs_provider_interoperates_with_ring() {
    let mut ca = TestCa::new("example.org").unwrap();
    let server = store(&mut ca, "spiffe://example.org/api");
    let client = store(&mut ca, "spiffe://example.org/web");
    let aws = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let acceptor = MtlsAcceptor::new(&mtls(&server).with_provider(aws), Authorizer::any()).unwrap();
    let (addr, mut seen) = echo_server(acceptor).await;
    let connector = MtlsConnector::new(&mtls(&client), Authorizer::any()).unwrap();
    let (mut stream, peer) = connector.connect(addr).await.unwrap();
    ping(&mut stream, 3).await.unwrap();
    assert_eq!(peer.to_string(), "spiffe://example.org/api");
    assert_eq!(
        seen.recv().await.unwrap().unwrap(),
        "spiffe://example.org/web"
    );
}

/// One of this host's own addresses that is not loopback (the one its default route
/// leaves from; nothing is sent), or `None` on a host without one.
fn own_address() -> Option<std::net::IpAddr> {
    let probe = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    probe.connect("192.0.2.1:9").ok()?;
    let ip = probe.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

/// The connector and the acceptor set their TCP options on connections to and from other
/// hosts. This host's own non-loopback address stands in for another host (loopback
/// peers get `TCP_NODELAY` only).
#[tokio::test]
async fn the_connector_and_the_acceptor_set_their_tcp_options() {
    use mesh_core::sock::{Keepalive, TcpOptions};
    let Some(ip) = own_address() else {
        eprintln!("skipped: this host has no address but loopback");
        return;
    };
    let mut ca = TestCa::new("example.org").unwrap();
    let server = store(&mut ca, "spiffe://example.org/api");
    let client = store(&mut ca, "spiffe://example.org/web");
    let options = |idle: u64| {
        TcpOptions::default().keepalive(Some(Keepalive {
            idle: Duration::from_secs(idle),
            ..Keepalive::default()
        }))
    };
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut incoming = MtlsAcceptor::new(&mtls(&server), authorizer_any_in(&ca))
        .unwrap()
        .with_tcp_options(options(41))
        .incoming(listener);
    let connector = MtlsConnector::new(&mtls(&client), id("spiffe://example.org/api"))
        .unwrap()
        .with_tcp_options(options(42));
    let (dialled, _) = connector.connect(addr).await.unwrap();
    let accepted = incoming.next().await.unwrap().unwrap();
    for (stream, idle) in [(dialled.get_ref().0, 42), (accepted.stream.get_ref().0, 41)] {
        let sock = socket2::SockRef::from(stream);
        assert!(stream.nodelay().unwrap());
        assert!(sock.keepalive().unwrap());
        #[cfg(any(target_os = "linux", target_os = "macos"))]
        assert_eq!(
            sock.tcp_keepalive_time().unwrap(),
            Duration::from_secs(idle)
        );
        #[cfg(target_os = "linux")]
        assert_eq!(
            sock.tcp_user_timeout().unwrap(),
            Some(mesh_core::sock::USER_TIMEOUT)
        );
    }
}
