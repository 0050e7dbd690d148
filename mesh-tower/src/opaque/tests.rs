//! Opaque TCP on loopback: plaintext and SPIFFE mTLS from the test CA, authorization per
//! connection, half-close, balancing and failover, a large transfer, shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use mesh_core::config::{AuthorizationPolicy, AuthorizationRule, DefaultAction};
use mesh_core::discover::StaticDiscovery;
use mesh_core::{Endpoint, SpiffeId};
use mesh_spiffe::test_ca::TestCa;
use mesh_spiffe::{Authorizer, CredentialStore, Mtls, MtlsAcceptor, MtlsConnector};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::authz::Policy;
use crate::backoff::Backoff;
use crate::metrics::server::{ListenerMetrics, ServerMetrics};

const SERVER_ID: &str = "spiffe://example.org/ns/prod/sa/db";
const WEB: &str = "spiffe://example.org/ns/prod/sa/web";
const BATCH: &str = "spiffe://example.org/ns/batch/sa/jobs";

/// What a target saw: connections accepted and bytes read.
#[derive(Debug, Default)]
struct Seen {
    connections: AtomicUsize,
    bytes: AtomicU64,
}

#[derive(Clone, Copy)]
enum Mode {
    /// Writes back what it reads, as it reads it; shuts its write side at EOF.
    Echo,
    /// Reads to EOF, then writes it all back, then closes: only works if the client's
    /// half-close reaches it and the other direction stays open.
    AfterEof,
}

async fn target(mode: Mode) -> (SocketAddr, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let counts = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            counts.connections.fetch_add(1, Ordering::SeqCst);
            let counts = counts.clone();
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.into_split();
                match mode {
                    Mode::Echo => {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match r.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            counts.bytes.fetch_add(n as u64, Ordering::SeqCst);
                            if w.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                        let _ = w.shutdown().await;
                    }
                    Mode::AfterEof => {
                        let mut all = Vec::new();
                        if r.read_to_end(&mut all).await.is_err() {
                            return;
                        }
                        counts.bytes.fetch_add(all.len() as u64, Ordering::SeqCst);
                        let _ = w.write_all(b"got: ").await;
                        let _ = w.write_all(&all).await;
                        let _ = w.shutdown().await;
                    }
                }
            });
        }
    });
    (addr, seen)
}

async fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.unwrap()
}

/// Writes `msg`, shuts the write side, reads to the end: what came back before the
/// connection ended (by a close or a reset: a refused connection gives nothing).
async fn half_close_exchange(addr: SocketAddr, msg: &[u8]) -> Vec<u8> {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let _ = tcp.write_all(msg).await;
    let _ = tcp.shutdown().await;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let read = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
            .await
            .expect("the answer in time");
        match read {
            Ok(0) | Err(_) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

fn static_discovery(addrs: &[SocketAddr]) -> mesh_core::discover::BoxDiscover {
    Box::pin(StaticDiscovery::new(
        addrs.iter().map(|a| Endpoint::new(*a)),
    ))
}

struct Pki {
    ca: TestCa,
}

impl Pki {
    fn new() -> Self {
        Self {
            ca: TestCa::new("example.org").unwrap(),
        }
    }

    fn mtls(&mut self, id: &str) -> Mtls {
        let svid = self.ca.issue(id).unwrap();
        Mtls::new(CredentialStore::with(svid, self.ca.bundle_set().unwrap()))
    }

    /// The inbound server in front of `target`: any identity of the trust domain passes
    /// TLS; the policy admits only WEB.
    async fn server(&mut self, target: SocketAddr, metrics: Option<ListenerMetrics>) -> Serving {
        let acceptor = MtlsAcceptor::new(
            &self.mtls(SERVER_ID),
            Authorizer::trust_domain(self.ca.trust_domain().clone()),
        )
        .unwrap();
        let policy = Policy::new(
            "db",
            &AuthorizationPolicy {
                default: DefaultAction::Deny,
                rules: vec![AuthorizationRule {
                    name: "web".into(),
                    clients: vec![WEB.parse().unwrap()],
                    unauthenticated: false,
                    routes: vec![],
                }],
            },
        )
        .unwrap();
        let mut builder = OpaqueServer::builder().mtls(acceptor).authorization(policy);
        if let Some(metrics) = metrics {
            builder = builder.metrics(metrics);
        }
        builder.serve(listener().await, target).unwrap()
    }

    /// An outbound client as `id`, expecting the server's identity.
    fn client(&mut self, id: &str, endpoints: &[SocketAddr]) -> OpaqueClient {
        OpaqueClient::builder(static_discovery(endpoints))
            .mtls(self.mtls(id))
            .server_identity(SERVER_ID.parse().unwrap())
            .build()
            .unwrap()
    }
}

#[tokio::test]
async fn plaintext_relays_both_ways_and_half_closes() {
    let (target_addr, seen) = target(Mode::AfterEof).await;
    let server = OpaqueServer::builder()
        .plaintext()
        .serve(listener().await, target_addr)
        .unwrap();
    assert_eq!(
        half_close_exchange(server.local_addr(), b"hello").await,
        b"got: hello"
    );
    let client = OpaqueClient::builder(static_discovery(&[server.local_addr()]))
        .plaintext()
        .build()
        .unwrap();
    let outbound = client.serve(listener().await).unwrap();
    assert_eq!(
        half_close_exchange(outbound.local_addr(), b"through two relays").await,
        b"got: through two relays"
    );
    assert_eq!(seen.connections.load(Ordering::SeqCst), 2);
    let report = outbound.shutdown().await;
    assert_eq!(report.forced, 0);
    assert_eq!(server.shutdown().await.forced, 0);
}

#[tokio::test]
async fn a_transport_must_be_chosen() {
    assert!(matches!(
        OpaqueServer::builder().serve(listener().await, "127.0.0.1:1".parse().unwrap()),
        Err(BuildError::NoTransport)
    ));
    assert!(matches!(
        OpaqueClient::builder(static_discovery(&[])).build(),
        Err(BuildError::NoTransport)
    ));
}

#[tokio::test]
async fn mtls_end_to_end_with_half_close_and_the_identities_on_both_sides() {
    let mut pki = Pki::new();
    let (target_addr, seen) = target(Mode::AfterEof).await;
    let server = pki.server(target_addr, None).await;
    let client = pki.client(WEB, &[server.local_addr()]);

    // relay() alone, on a local connection accepted here.
    let local = listener().await;
    let app = TcpStream::connect(local.local_addr().unwrap());
    let (app, accepted) = tokio::join!(app, local.accept());
    let (mut app, (accepted, _)) = (app.unwrap(), accepted.unwrap());
    let relay = tokio::spawn({
        let client = client.clone();
        async move { client.relay(accepted).await }
    });
    app.write_all(b"select 1").await.unwrap();
    app.shutdown().await.unwrap();
    let mut got = Vec::new();
    app.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"got: select 1");
    let stats = relay.await.unwrap().unwrap();
    assert_eq!(stats.endpoint, server.local_addr());
    assert_eq!(
        stats.peer.as_ref().map(|p| p.id().to_string()).as_deref(),
        Some(SERVER_ID)
    );
    assert_eq!((stats.sent, stats.received, stats.attempts), (8, 13, 1));
    assert_eq!(seen.bytes.load(Ordering::SeqCst), 8);
    assert_eq!(server.shutdown().await.forced, 0);
}

#[tokio::test]
async fn a_denied_identity_is_closed_before_the_target_sees_anything() {
    let mut pki = Pki::new();
    let (target_addr, seen) = target(Mode::Echo).await;
    let mut registry = Registry::default();
    let metrics = ServerMetrics::register(&mut registry).listener("db-in");
    let server = pki.server(target_addr, Some(metrics)).await;

    // Straight over mTLS as BATCH: TLS passes (same trust domain), the policy does not.
    let connector =
        MtlsConnector::new(&pki.mtls(BATCH), SpiffeId::new(SERVER_ID).unwrap()).unwrap();
    let (mut tls, peer) = connector.connect(server.local_addr()).await.unwrap();
    assert_eq!(peer.id().to_string(), SERVER_ID);
    let _ = tls.write_all(b"DROP TABLE users").await;
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf))
        .await
        .expect("closed, not left hanging");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");

    // Through an outbound client as BATCH: the local connection ends with nothing.
    let batch = pki.client(BATCH, &[server.local_addr()]);
    let outbound = batch.serve(listener().await).unwrap();
    assert_eq!(half_close_exchange(outbound.local_addr(), b"x").await, b"");

    assert_eq!(
        seen.connections.load(Ordering::SeqCst),
        0,
        "target never dialled"
    );
    assert_eq!(seen.bytes.load(Ordering::SeqCst), 0);

    // WEB is allowed.
    let web = pki.client(WEB, &[server.local_addr()]);
    let outbound_web = web.serve(listener().await).unwrap();
    assert_eq!(
        half_close_exchange(outbound_web.local_addr(), b"ok").await,
        b"ok"
    );
    assert_eq!(seen.connections.load(Ordering::SeqCst), 1);

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains(r#"mesh_server_authz_total{listener="db-in",policy="db",rule="default",outcome="deny"} 2"#),
        "{text}"
    );
    assert!(
        text.contains(
            r#"mesh_server_authz_total{listener="db-in",policy="db",rule="web",outcome="allow"} 1"#
        ),
        "{text}"
    );
    drop((outbound, outbound_web));
    assert_eq!(server.shutdown().await.forced, 0);
}

/// A full opaque listener closes a connection stalled in its handshake for a real peer,
/// and counts it; a verified peer is never shed, however quiet.
#[tokio::test]
async fn a_full_listener_sheds_a_stalled_handshake_for_a_peer() {
    let mut pki = Pki::new();
    let (target_addr, _seen) = target(Mode::Echo).await;
    let mut registry = Registry::default();
    let metrics = ServerMetrics::register(&mut registry).listener("db-in");
    let acceptor = MtlsAcceptor::new(
        &pki.mtls(SERVER_ID),
        Authorizer::trust_domain(pki.ca.trust_domain().clone()),
    )
    .unwrap();
    let server = OpaqueServer::builder()
        .mtls(acceptor)
        .metrics(metrics)
        .max_connections(1)
        .serve(listener().await, target_addr)
        .unwrap();
    let mut stalled = TcpStream::connect(server.local_addr()).await.unwrap();
    let connector = MtlsConnector::new(&pki.mtls(WEB), SpiffeId::new(SERVER_ID).unwrap()).unwrap();
    let (mut tls, _) = tokio::time::timeout(
        Duration::from_secs(20),
        connector.connect(server.local_addr()),
    )
    .await
    .expect("the stalled handshake held the listener")
    .unwrap();
    tls.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tls.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    let mut rest = Vec::new();
    assert_eq!(stalled.read_to_end(&mut rest).await.unwrap(), 0);
    // The peer holds the only slot: the next connection waits, and the peer stays.
    let mut next = TcpStream::connect(server.local_addr()).await.unwrap();
    next.write_all(&[0x16]).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), next.read(&mut buf))
            .await
            .is_err()
    );
    tls.write_all(b"pong").await.unwrap();
    tls.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains(r#"mesh_server_connections_closed_total{listener="db-in",reason="shed"} 1"#),
        "{text}"
    );
}

#[tokio::test]
async fn plaintext_and_untrusted_clients_fail_the_handshake_and_are_counted() {
    let mut pki = Pki::new();
    let (target_addr, seen) = target(Mode::Echo).await;
    let mut registry = Registry::default();
    let metrics = ServerMetrics::register(&mut registry).listener("db-in");
    let server = pki.server(target_addr, Some(metrics)).await;
    // Plaintext on the mTLS port: at most a TLS alert comes back (content type 21).
    let got = half_close_exchange(server.local_addr(), b"hello").await;
    assert!(got.is_empty() || got[0] == 21, "{got:?}");
    // A client of another trust domain.
    let mut other = TestCa::new("evil.example").unwrap();
    let evil = Mtls::new(CredentialStore::with(
        other.issue("spiffe://evil.example/web").unwrap(),
        pki.ca.bundle_set().unwrap(),
    ));
    let client = OpaqueClient::builder(static_discovery(&[server.local_addr()]))
        .mtls(evil)
        .server_identity(SERVER_ID.parse().unwrap())
        .build()
        .unwrap();
    let outbound = client.serve(listener().await).unwrap();
    assert_eq!(half_close_exchange(outbound.local_addr(), b"x").await, b"");
    assert_eq!(seen.connections.load(Ordering::SeqCst), 0);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains("mesh_server_tls_handshake_failures_total{listener=\"db-in\""),
        "{text}"
    );
    drop(outbound);
    drop(server);
}

#[tokio::test]
async fn an_unexpected_server_identity_is_refused_by_the_client() {
    let mut pki = Pki::new();
    let (target_addr, seen) = target(Mode::Echo).await;
    let server = pki.server(target_addr, None).await;
    let client = OpaqueClient::builder(static_discovery(&[server.local_addr()]))
        .mtls(pki.mtls(WEB))
        .server_identity("spiffe://example.org/ns/prod/sa/other".parse().unwrap())
        .max_connect_attempts(1)
        .build()
        .unwrap();
    let local = listener().await;
    let (app, accepted) = tokio::join!(
        TcpStream::connect(local.local_addr().unwrap()),
        local.accept()
    );
    let _app = app.unwrap();
    let err = client.relay(accepted.unwrap().0).await.unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(err, OpaqueError::Connect { attempts: 1, .. }),
        "{message}"
    );
    assert!(message.contains("TLS with"), "{message}");
    assert_eq!(seen.connections.load(Ordering::SeqCst), 0);
}

/// A local connection relayed by `client`, once the echo through it works; held open.
async fn held_connection(
    client: &OpaqueClient,
) -> (
    TcpStream,
    tokio::task::JoinHandle<Result<RelayStats, OpaqueError>>,
) {
    let local = listener().await;
    let (app, accepted) = tokio::join!(
        TcpStream::connect(local.local_addr().unwrap()),
        local.accept()
    );
    let mut app = app.unwrap();
    let accepted = accepted.unwrap().0;
    let client = client.clone();
    let relay = tokio::spawn(async move { client.relay(accepted).await });
    app.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    app.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    (app, relay)
}

#[tokio::test]
async fn open_connections_balance_across_endpoints() {
    let (a, seen_a) = target(Mode::Echo).await;
    let (b, seen_b) = target(Mode::Echo).await;
    let client = OpaqueClient::builder(static_discovery(&[a, b]))
        .plaintext()
        .seed(7)
        .build()
        .unwrap();
    let mut held = Vec::new();
    for _ in 0..10 {
        held.push(held_connection(&client).await);
    }
    // Each pick compares both endpoints' open connections: they stay level.
    assert_eq!(seen_a.connections.load(Ordering::SeqCst), 5);
    assert_eq!(seen_b.connections.load(Ordering::SeqCst), 5);
    let mut to_b = Vec::new();
    for (app, relay) in held {
        drop(app);
        let stats = relay.await.unwrap().unwrap();
        if stats.endpoint == b {
            to_b.push(stats);
        }
    }
    assert_eq!(to_b.len(), 5);
    assert!(to_b.iter().all(|s| s.sent == 4 && s.received == 4));
}

#[tokio::test]
async fn a_refusing_endpoint_fails_over_and_backs_off() {
    let (good, seen) = target(Mode::Echo).await;
    let refusing = {
        let l = listener().await;
        let addr = l.local_addr().unwrap();
        drop(l);
        addr
    };
    // The refusing endpoint weighs most: whenever it is out of back-off it wins the pick.
    let heavy = Endpoint::new(refusing).with_weight(std::num::NonZeroU32::new(100).unwrap());
    let discovery = Box::pin(StaticDiscovery::new([heavy, Endpoint::new(good)]));
    let client = OpaqueClient::builder(discovery)
        .plaintext()
        .build()
        .unwrap();
    let mut attempts = Vec::new();
    for _ in 0..10 {
        let (app, relay) = held_connection(&client).await;
        drop(app);
        let stats = relay.await.unwrap().unwrap();
        assert_eq!(stats.endpoint, good);
        attempts.push(stats.attempts);
    }
    assert_eq!(seen.connections.load(Ordering::SeqCst), 10);
    // Tried first, failed over at once, then skipped while it backs off (at least 50 ms,
    // doubling: a few retries at most within this loop).
    assert_eq!(attempts[0], 2, "{attempts:?}");
    let total: usize = attempts.iter().sum();
    assert!((11..=13).contains(&total), "{attempts:?}");

    // Only refusing endpoints: the connect error after each was tried once.
    let client = OpaqueClient::builder(static_discovery(&[refusing]))
        .plaintext()
        .build()
        .unwrap();
    let local = listener().await;
    let (app, accepted) = tokio::join!(
        TcpStream::connect(local.local_addr().unwrap()),
        local.accept()
    );
    let _app = app.unwrap();
    let err = client.relay(accepted.unwrap().0).await.unwrap_err();
    assert!(
        matches!(err, OpaqueError::Connect { attempts: 1, .. }),
        "{err}"
    );
    assert!(err.to_string().contains(&refusing.to_string()), "{err}");
}

#[tokio::test(start_paused = true)]
async fn with_every_endpoint_backing_off_a_connection_waits_then_fails_fast() {
    let refusing = {
        let l = listener().await;
        let addr = l.local_addr().unwrap();
        drop(l);
        addr
    };
    let client = OpaqueClient::builder(static_discovery(&[refusing]))
        .plaintext()
        .connect_backoff(Backoff::constant(
            Duration::from_secs(60),
            Duration::from_secs(60),
            0.0,
        ))
        .fail_fast(Duration::from_secs(2))
        .build()
        .unwrap();
    let local = listener().await;
    for want_backing_off in [false, true] {
        let (app, accepted) = tokio::join!(
            TcpStream::connect(local.local_addr().unwrap()),
            local.accept()
        );
        let _app = app.unwrap();
        let start = tokio::time::Instant::now();
        let err = client.relay(accepted.unwrap().0).await.unwrap_err();
        if want_backing_off {
            assert!(matches!(err, OpaqueError::NoReadyEndpoints { .. }), "{err}");
            assert_eq!(start.elapsed(), Duration::from_secs(2));
            // Why: the endpoint's failed connect, the socket's error, the next attempt.
            let text = err.to_string();
            assert!(
                text.contains(&format!(
                    "({refusing}: 1 failed connect (the last: connecting to {refusing}: "
                )),
                "{text}"
            );
            assert!(text.contains("the next in 58.0s)"), "{text}");
        } else {
            assert!(matches!(err, OpaqueError::Connect { .. }), "{err}");
        }
    }

    // No endpoints at all, discovery ended: at once.
    let empty = OpaqueClient::builder(static_discovery(&[]))
        .plaintext()
        .build()
        .unwrap();
    let (app, accepted) = tokio::join!(
        TcpStream::connect(local.local_addr().unwrap()),
        local.accept()
    );
    let _app = app.unwrap();
    let err = empty.relay(accepted.unwrap().0).await.unwrap_err();
    assert!(matches!(err, OpaqueError::NoEndpoints { .. }), "{err}");
}

#[tokio::test]
async fn eight_mib_both_ways_intact_over_mtls() {
    let mut pki = Pki::new();
    let (target_addr, seen) = target(Mode::Echo).await;
    let server = pki.server(target_addr, None).await;
    let client = pki.client(WEB, &[server.local_addr()]);
    let outbound = client.serve(listener().await).unwrap();

    const LEN: usize = 8 << 20;
    let data: Arc<Vec<u8>> = Arc::new({
        let mut rng = fastrand::Rng::with_seed(11);
        (0..LEN).map(|_| rng.u8(..)).collect()
    });
    let tcp = TcpStream::connect(outbound.local_addr()).await.unwrap();
    let (mut r, mut w) = tcp.into_split();
    let writer = tokio::spawn({
        let data = data.clone();
        async move {
            for chunk in data.chunks(100_003) {
                w.write_all(chunk).await.unwrap();
            }
            w.shutdown().await.unwrap();
        }
    });
    let mut got = Vec::with_capacity(LEN);
    tokio::time::timeout(Duration::from_secs(30), r.read_to_end(&mut got))
        .await
        .expect("in time")
        .unwrap();
    writer.await.unwrap();
    assert_eq!(got.len(), LEN);
    assert!(got == *data, "the bytes came back intact");
    assert_eq!(seen.bytes.load(Ordering::SeqCst), LEN as u64);
    assert_eq!(outbound.shutdown().await.forced, 0);
    assert_eq!(server.shutdown().await.forced, 0);
}

#[tokio::test]
async fn shutdown_stops_accepting_and_forces_what_outlives_the_timeout() {
    let (target_addr, _) = target(Mode::Echo).await;
    let server = OpaqueServer::builder()
        .plaintext()
        .shutdown_timeout(Duration::from_millis(200))
        .serve(listener().await, target_addr)
        .unwrap();
    let addr = server.local_addr();
    // One connection that ends within the timeout, one that does not.
    let mut ends = TcpStream::connect(addr).await.unwrap();
    let mut stays = TcpStream::connect(addr).await.unwrap();
    for tcp in [&mut ends, &mut stays] {
        tcp.write_all(b"hi").await.unwrap();
        let mut buf = [0u8; 2];
        tcp.read_exact(&mut buf).await.unwrap();
    }
    let shutdown = tokio::spawn(server.shutdown());
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "no longer accepting"
    );
    // The open one still relays during the drain.
    ends.write_all(b"yo").await.unwrap();
    let mut buf = [0u8; 2];
    ends.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"yo");
    ends.shutdown().await.unwrap();
    let mut rest = Vec::new();
    ends.read_to_end(&mut rest).await.unwrap();
    let report = shutdown.await.unwrap();
    assert_eq!(
        report,
        ShutdownReport {
            open_at_shutdown: 2,
            forced: 1
        }
    );
    // The forced one is closed.
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stays.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "closed by the shutdown");
}

/// A dialer that opens TCP to `to` for `reachable`, refuses every other address, and
/// counts its dials per address.
fn redirecting_dialer(
    reachable: SocketAddr,
    to: SocketAddr,
    dials: Arc<std::sync::Mutex<Vec<SocketAddr>>>,
) -> crate::connect::Dialer {
    crate::connect::Dialer::new(move |addr| {
        dials.lock().unwrap().push(addr);
        async move {
            if addr == reachable {
                TcpStream::connect(to).await
            } else {
                Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionRefused,
                    "scripted refusal",
                ))
            }
        }
    })
}

/// Through a [`Dialer`](crate::connect::Dialer), endpoints whose addresses are not
/// reachable over TCP are reached all the same: mTLS with the server's identity checked,
/// failover from an endpoint the dialer refuses, and the local side an in-memory pipe
/// (`relay_io`).
#[tokio::test]
async fn a_dialer_opens_the_streams_with_mtls_and_failover() {
    let mut pki = Pki::new();
    let (target_addr, seen) = target(Mode::AfterEof).await;
    let server = pki.server(target_addr, None).await;
    // Documentation addresses (RFC 5737): nothing answers there over TCP.
    let refused: SocketAddr = "192.0.2.1:7000".parse().unwrap();
    let reached: SocketAddr = "192.0.2.2:7000".parse().unwrap();
    let dials = Arc::new(std::sync::Mutex::new(Vec::new()));
    // The refused endpoint weighs most: out of back-off, it wins the pick.
    let heavy = Endpoint::new(refused).with_weight(std::num::NonZeroU32::new(100).unwrap());
    let discovery = Box::pin(StaticDiscovery::new([heavy, Endpoint::new(reached)]));
    let client = OpaqueClient::builder(discovery)
        .mtls(pki.mtls(WEB))
        .server_identity(SERVER_ID.parse().unwrap())
        .dialer(redirecting_dialer(
            reached,
            server.local_addr(),
            dials.clone(),
        ))
        .build()
        .unwrap();
    let mut attempts = 0;
    for i in 0..6 {
        let (mut app, local) = tokio::io::duplex(1024);
        let relay = tokio::spawn({
            let client = client.clone();
            async move { client.relay_io(local).await }
        });
        let msg = format!("query {i}");
        app.write_all(msg.as_bytes()).await.unwrap();
        app.shutdown().await.unwrap();
        let mut got = Vec::new();
        app.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, format!("got: {msg}").as_bytes());
        let stats = relay.await.unwrap().unwrap();
        assert_eq!(stats.endpoint, reached);
        assert_eq!(
            stats.peer.as_ref().map(|p| p.id().to_string()).as_deref(),
            Some(SERVER_ID)
        );
        if i == 0 {
            assert_eq!(
                stats.attempts, 2,
                "the refused endpoint first, then failover"
            );
        }
        attempts += stats.attempts;
    }
    // Every attempt was a dial, and only the reachable endpoint's reached the server.
    let dials = dials.lock().unwrap().clone();
    assert_eq!(dials.len(), attempts, "{dials:?}");
    assert_eq!(
        dials.iter().filter(|a| **a == reached).count(),
        6,
        "{dials:?}"
    );
    assert_eq!(seen.connections.load(Ordering::SeqCst), 6);

    // Refused by the dialer, the only endpoint fails the connection with the dial's
    // error; one that presents the wrong identity is refused as over TCP.
    // One try, by the redirecting dialer, of `endpoint` expecting `identity`.
    let one_try = |endpoint: SocketAddr, identity: &str, pki: &mut Pki| {
        OpaqueClient::builder(static_discovery(&[endpoint]))
            .mtls(pki.mtls(WEB))
            .server_identity(identity.parse().unwrap())
            .dialer(redirecting_dialer(
                reached,
                server.local_addr(),
                Arc::default(),
            ))
            .max_connect_attempts(1)
            .build()
            .unwrap()
    };
    let (_app, local) = tokio::io::duplex(64);
    let err = one_try(refused, SERVER_ID, &mut pki)
        .relay_io(local)
        .await
        .unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(err, OpaqueError::Connect { attempts: 1, .. }),
        "{message}"
    );
    assert!(message.contains("scripted refusal"), "{message}");

    let (_app, local) = tokio::io::duplex(64);
    let err = one_try(reached, "spiffe://example.org/ns/prod/sa/other", &mut pki)
        .relay_io(local)
        .await
        .unwrap_err();
    let message = err.to_string();
    assert!(message.contains("TLS with"), "{message}");
    assert_eq!(seen.connections.load(Ordering::SeqCst), 6);
    assert_eq!(server.shutdown().await.forced, 0);
}

/// Plaintext through a dialer, both sides in memory: no socket at all.
#[tokio::test]
async fn a_dialer_relays_plaintext_wholly_in_memory() {
    let dialer = crate::connect::Dialer::new(|_addr| async {
        let (near, mut far) = tokio::io::duplex(4096);
        // The endpoint: echoes, then closes its side at EOF.
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            loop {
                match far.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if far.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = far.shutdown().await;
        });
        Ok::<_, std::io::Error>(near)
    });
    let endpoint: SocketAddr = "192.0.2.3:5432".parse().unwrap();
    let client = OpaqueClient::builder(static_discovery(&[endpoint]))
        .plaintext()
        .dialer(dialer)
        .build()
        .unwrap();
    let (mut app, local) = tokio::io::duplex(4096);
    let relay = tokio::spawn(async move { client.relay_io(local).await });
    app.write_all(b"ping").await.unwrap();
    let mut echoed = [0u8; 4];
    app.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"ping");
    app.shutdown().await.unwrap();
    let mut rest = Vec::new();
    app.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    let stats = relay.await.unwrap().unwrap();
    assert_eq!(
        (stats.endpoint, stats.peer, stats.sent, stats.received),
        (endpoint, None, 4, 4)
    );
}

/// The opaque fallback peeks at a TCP connection's first bytes: a server serving byte
/// streams of other kinds is refused with it, naming it.
#[cfg(feature = "server")]
#[tokio::test]
async fn the_opaque_fallback_needs_tcp() {
    let client = OpaqueClient::builder(static_discovery(&[]))
        .plaintext()
        .build()
        .unwrap();
    let incoming =
        futures_util::stream::empty::<std::io::Result<(tokio::io::DuplexStream, SocketAddr)>>();
    let app = tower::service_fn(|_req: http::Request<hyper::body::Incoming>| async {
        Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
    });
    let err = crate::server::MeshServer::builder()
        .plaintext()
        .opaque_fallback(client)
        .serve_incoming("127.0.0.1:1".parse().unwrap(), incoming, app)
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("opaque_fallback: the opaque fallback needs TCP"),
        "{err}"
    );
}

/// A target that resets its connection mid-transfer: the application at the far end of
/// the mesh (outbound relay, inbound relay) reads a reset, not a clean end that would
/// make the truncated transfer look complete.
#[tokio::test]
async fn a_reset_crosses_the_mesh_as_a_reset() {
    let target = listener().await;
    let target_addr = target.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = target.accept().await {
            let mut go = [0; 2];
            let _ = tcp.read_exact(&mut go).await;
            let _ = tcp.write_all(b"partial").await;
            crate::relay::Abort::abort_on_drop(&tcp);
        }
    });
    let server = OpaqueServer::builder()
        .plaintext()
        .serve(listener().await, target_addr)
        .unwrap();
    let client = OpaqueClient::builder(static_discovery(&[server.local_addr()]))
        .plaintext()
        .build()
        .unwrap();
    let outbound = client.serve(listener().await).unwrap();
    let mut app = TcpStream::connect(outbound.local_addr()).await.unwrap();
    app.write_all(b"go").await.unwrap();
    let mut got = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(5), app.read_to_end(&mut got))
        .await
        .expect("the relay ends");
    assert!(b"partial".starts_with(&got), "{got:?}");
    assert_eq!(
        ended.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset),
        "read {got:?}"
    );
}

/// An endpoint whose proxy takes connections and then cannot reach its application
/// (it resets them at once) is backed off like one refusing connects: it has no open
/// connection, and would otherwise win every pick it is drawn into.
#[tokio::test]
async fn an_endpoint_that_takes_connections_and_fails_them_is_backed_off() {
    let (target_addr, _) = target(Mode::Echo).await;
    let closed = listener().await.local_addr().unwrap();
    let healthy = OpaqueServer::builder()
        .plaintext()
        .serve(listener().await, target_addr)
        .unwrap();
    // Its application is down: every connection reset after the handshake.
    let broken = OpaqueServer::builder()
        .plaintext()
        .serve(listener().await, closed)
        .unwrap();
    let client = OpaqueClient::builder(static_discovery(&[
        healthy.local_addr(),
        broken.local_addr(),
    ]))
    .plaintext()
    .connect_backoff(Backoff::constant(
        Duration::from_secs(5),
        Duration::from_secs(10),
        0.0,
    ))
    .build()
    .unwrap();
    let outbound = client.serve(listener().await).unwrap();
    let mut reset = 0;
    for _ in 0..20 {
        let mut app = TcpStream::connect(outbound.local_addr()).await.unwrap();
        app.write_all(b"x").await.unwrap();
        let mut back = [0u8; 1];
        match tokio::time::timeout(Duration::from_secs(5), app.read_exact(&mut back))
            .await
            .unwrap()
        {
            Ok(_) => assert_eq!(&back, b"x"),
            Err(_) => reset += 1,
        }
    }
    assert!(
        reset <= 1,
        "{reset} of 20 connections went to the broken endpoint"
    );
}

/// A replaced policy judges open connections again: one that still allows them leaves
/// them open; one that denies them closes them at once, counted as a deny.
#[tokio::test]
async fn a_replaced_policy_closes_the_open_connections_it_denies() {
    let (target_addr, _) = target(Mode::Echo).await;
    let mut registry = Registry::default();
    let metrics = ServerMetrics::register(&mut registry);
    let server = OpaqueServer::builder()
        .plaintext()
        .metrics(metrics.listener("db-in"))
        .serve(listener().await, target_addr)
        .unwrap();
    let mut tcp = TcpStream::connect(server.local_addr()).await.unwrap();
    let echo = async |tcp: &mut TcpStream, bytes: &[u8]| {
        tcp.write_all(bytes).await.unwrap();
        let mut back = vec![0; bytes.len()];
        tcp.read_exact(&mut back).await.unwrap();
        assert_eq!(back, bytes);
    };
    echo(&mut tcp, b"one").await;
    let policy = |default| {
        Policy::new(
            "db",
            &AuthorizationPolicy {
                default,
                rules: vec![],
            },
        )
        .unwrap()
    };
    let handle = server.policy().unwrap();
    handle.replace(policy(DefaultAction::Allow));
    echo(&mut tcp, b"two").await;
    handle.replace(policy(DefaultAction::Deny));
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut rest))
        .await
        .expect("closed at once");
    assert!(read.is_ok() || read.is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset));
    assert!(rest.is_empty());
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains(r#"mesh_server_authz_total{listener="db-in",policy="db",rule="default",outcome="deny"} 1"#),
        "{text}"
    );
}

/// What a plaintext server relays as opaque TCP is judged by its authorization policy,
/// as an opaque inbound port judges it (a client without identity): a deny-by-default
/// policy closes it unrelayed; the default policy lets it through.
#[cfg(feature = "server")]
#[tokio::test]
async fn the_opaque_fallback_answers_to_the_servers_policy() {
    let (target_addr, _) = target(Mode::Echo).await;
    let app = tower::service_fn(|_req: http::Request<hyper::body::Incoming>| async {
        Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
    });
    let deny = Policy::new(
        "closed",
        &AuthorizationPolicy {
            default: DefaultAction::Deny,
            rules: vec![],
        },
    )
    .unwrap();
    for (policy, relayed) in [(None, true), (Some(deny), false)] {
        let client = OpaqueClient::builder(static_discovery(&[target_addr]))
            .plaintext()
            .build()
            .unwrap();
        let mut builder = crate::server::MeshServer::builder()
            .plaintext()
            .opaque_fallback(client);
        if let Some(policy) = policy {
            builder = builder.authorization(policy);
        }
        let server = builder.serve(listener().await, app).unwrap();
        let mut tcp = TcpStream::connect(server.local_addr()).await.unwrap();
        // Not HTTP: relayed, or closed.
        tcp.write_all(b"\x16\x03\x01ping").await.unwrap();
        let mut back = Vec::new();
        if relayed {
            back.resize(7, 0);
            tcp.read_exact(&mut back).await.unwrap();
            assert_eq!(back, b"\x16\x03\x01ping");
        } else {
            // Closed with our bytes unread: a reset, or an end.
            let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut back))
                .await
                .unwrap();
            assert!(
                read.is_ok()
                    || read.is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset)
            );
            assert!(back.is_empty(), "{back:?}");
        }
        drop(tcp);
        server.shutdown().await;
    }
}

/// The opaque fallback's decisions are counted as an opaque inbound port counts its own,
/// and a policy that replaces the server's closes the open relays it denies, with a
/// reset.
#[cfg(feature = "server")]
#[tokio::test]
async fn the_opaque_fallback_counts_its_decisions_and_answers_to_a_replaced_policy() {
    // An echo that says how its connection ended.
    let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target_addr = echo.local_addr().unwrap();
    let (ended_tx, ended) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut tcp, _) = echo.accept().await.unwrap();
        let mut buf = [0u8; 64];
        let end = loop {
            match tcp.read(&mut buf).await {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    if tcp.write_all(&buf[..n]).await.is_err() {
                        break Err(std::io::ErrorKind::BrokenPipe);
                    }
                }
                Err(e) => break Err(e.kind()),
            }
        };
        let _ = ended_tx.send(end);
    });
    let app = tower::service_fn(|_req: http::Request<hyper::body::Incoming>| async {
        Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
    });
    let mut registry = Registry::default();
    let metrics = ServerMetrics::register(&mut registry);
    let client = OpaqueClient::builder(static_discovery(&[target_addr]))
        .plaintext()
        .build()
        .unwrap();
    let server = crate::server::MeshServer::builder()
        .plaintext()
        .opaque_fallback(client)
        .metrics(metrics.listener("edge"))
        .serve(listener().await, app)
        .unwrap();
    let mut tcp = TcpStream::connect(server.local_addr()).await.unwrap();
    tcp.write_all(b"\x16\x03\x01ping").await.unwrap();
    let mut back = [0u8; 7];
    tcp.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"\x16\x03\x01ping");
    let deny = Policy::new(
        "closed",
        &AuthorizationPolicy {
            default: DefaultAction::Deny,
            rules: vec![],
        },
    )
    .unwrap();
    server.policy().replace(deny);
    // The open relay is cut with a reset, not ended.
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut rest))
        .await
        .expect("the denied relay stays open");
    assert!(
        read.is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "{rest:?}"
    );
    // And so is the endpoint's side: its application does not read an end.
    let end = tokio::time::timeout(Duration::from_secs(5), ended)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(end, Err(std::io::ErrorKind::ConnectionReset));
    // A new connection is denied at once.
    let mut tcp = TcpStream::connect(server.local_addr()).await.unwrap();
    tcp.write_all(b"\x16\x03\x01ping").await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut rest))
        .await
        .unwrap();
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    for series in [
        r#"mesh_server_authz_total{listener="edge",policy="default",rule="default",outcome="allow"} 1"#,
        r#"mesh_server_authz_total{listener="edge",policy="closed",rule="default",outcome="deny"} 2"#,
    ] {
        assert!(text.contains(series), "{series} in\n{text}");
    }
    server.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn quiet_connections_close_at_the_idle_timeout_and_bytes_count_as_they_move() {
    let (target_addr, _) = target(Mode::Echo).await;
    let mut registry = Registry::default();
    let tunnels = crate::relay::TunnelMetrics::register(&mut registry);
    // The inbound relay allows 40 s of silence, the outbound one 25 s.
    let server = OpaqueServer::builder()
        .plaintext()
        .idle_timeout(Some(Duration::from_secs(40)))
        .tunnels(tunnels.listener("db-in"))
        .serve(listener().await, target_addr)
        .unwrap();
    let client = OpaqueClient::builder(static_discovery(&[server.local_addr()]))
        .plaintext()
        .idle_timeout(Some(Duration::from_secs(25)))
        .tunnels(tunnels.listener("db-out"))
        .build()
        .unwrap();
    let outbound = client.serve(listener().await).unwrap();
    let mut tcp = TcpStream::connect(outbound.local_addr()).await.unwrap();
    // A byte every 20 s keeps both open well past their timeouts.
    for round in 0..5u8 {
        tcp.write_all(&[round; 100]).await.unwrap();
        let mut back = [0u8; 100];
        tcp.read_exact(&mut back).await.unwrap();
        assert_eq!(back, [round; 100]);
        tokio::time::sleep(Duration::from_secs(20)).await;
    }
    let encoded = |registry: &Registry| {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
        text
    };
    // Counted while open, on both listeners.
    let text = encoded(&registry);
    for listener in ["db-out", "db-in"] {
        for series in [
            format!("mesh_tunnels_open{{listener=\"{listener}\"}} 1\n"),
            format!("mesh_tunnels_total{{listener=\"{listener}\"}} 1\n"),
            format!(
                "mesh_tunnel_bytes_total{{listener=\"{listener}\",direction=\"client_to_upstream\"}} 500\n"
            ),
            format!(
                "mesh_tunnel_bytes_total{{listener=\"{listener}\",direction=\"upstream_to_client\"}} 500\n"
            ),
        ] {
            assert!(text.contains(&series), "{series} in {text}");
        }
    }
    // Quiet since the last echo, 20 s ago: the outbound relay closes 25 s after it (within
    // an eighth).
    let waited = tokio::time::Instant::now();
    assert_eq!(tcp.read(&mut [0; 8]).await.unwrap(), 0);
    let waited = tokio::time::Instant::now() - waited;
    assert!(
        waited >= Duration::from_secs(5) && waited <= Duration::from_millis(5_000 + 25_000 / 8),
        "{waited:?}"
    );
    // Its close ended the inbound one too (its client went away), long before its own
    // timeout.
    tokio::time::sleep(Duration::from_millis(10)).await;
    let text = encoded(&registry);
    for listener in ["db-out", "db-in"] {
        let series = format!("mesh_tunnels_open{{listener=\"{listener}\"}} 0\n");
        assert!(text.contains(&series), "{series} in {text}");
    }
    assert_eq!(outbound.shutdown().await.forced, 0);
    assert_eq!(server.shutdown().await.forced, 0);
}

#[tokio::test]
async fn connections_over_the_rate_limit_are_closed_before_the_target_is_dialled() {
    use mesh_core::config::{Rate, RateLimitConfig};
    let (target_addr, seen) = target(Mode::AfterEof).await;
    let mut registry = Registry::default();
    let metrics = ServerMetrics::register(&mut registry).listener("db-in");
    // One connection an hour for each client (all plaintext callers are one client), and
    // three in all.
    let per_hour = |requests| Rate {
        requests,
        per: Duration::from_secs(3600),
        burst: None,
    };
    let config = RateLimitConfig {
        per_client: Some(per_hour(1)),
        total: Some(per_hour(3)),
        ..RateLimitConfig::default()
    };
    let server = OpaqueServer::builder()
        .plaintext()
        .metrics(metrics)
        .rate_limit(crate::ratelimit::Limits::new(&config))
        .serve(listener().await, target_addr)
        .unwrap();
    assert_eq!(
        half_close_exchange(server.local_addr(), b"first").await,
        b"got: first"
    );
    assert_eq!(
        half_close_exchange(server.local_addr(), b"second").await,
        b""
    );
    assert_eq!(seen.connections.load(Ordering::SeqCst), 1, "never dialled");
    // A reload's new limits start full.
    server
        .rate_limit()
        .unwrap()
        .replace(crate::ratelimit::Limits::new(&config));
    assert_eq!(
        half_close_exchange(server.local_addr(), b"third").await,
        b"got: third"
    );
    assert_eq!(seen.connections.load(Ordering::SeqCst), 2);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains(r#"mesh_server_rate_limited_total{listener="db-in",limit="client"} 1"#),
        "{text}"
    );
    assert_eq!(server.shutdown().await.forced, 0);
}

/// A reload's new client takes the connections that come after it, through the same
/// listener; an open relay goes on to the endpoint it had.
#[tokio::test]
async fn a_replaced_client_relays_new_connections_its_way() {
    let (first, first_seen) = target(Mode::Echo).await;
    let (second, second_seen) = target(Mode::AfterEof).await;
    let client = OpaqueClient::builder(static_discovery(&[first]))
        .plaintext()
        .build()
        .unwrap();
    let outbound = client.serve(listener().await).unwrap();
    // Open before the swap, and still relayed to the first endpoint after it.
    let mut open = TcpStream::connect(outbound.local_addr()).await.unwrap();
    open.write_all(b"before").await.unwrap();
    let mut buf = [0u8; 6];
    open.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"before");
    let next = OpaqueClient::builder(static_discovery(&[second]))
        .plaintext()
        .build()
        .unwrap();
    client.replace(&next);
    drop(next);
    assert_eq!(
        half_close_exchange(outbound.local_addr(), b"after").await,
        b"got: after"
    );
    assert_eq!(second_seen.connections.load(Ordering::SeqCst), 1);
    open.write_all(b"still").await.unwrap();
    let mut buf = [0u8; 5];
    open.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"still");
    assert_eq!(first_seen.connections.load(Ordering::SeqCst), 1);
    drop(open);
    assert_eq!(outbound.shutdown().await.forced, 0);
}
