//! The transparent listener on loopback, with the original destination given by a test
//! resolver (the kernel's, read through iptables, is tested end to end by mesh-proxy in a
//! network namespace).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::server::{MeshServer, handoff};

/// A destination nobody listens on: only the table or the resolver gives it meaning.
const MESHED: &str = "10.96.0.10:80";

fn resolver_to(addr: SocketAddr) -> Resolver {
    Arc::new(move |_tcp: &TcpStream| Ok(addr))
}

/// A TCP server answering every connection with `greeting`, then echoing.
async fn echo(greeting: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = tcp.write_all(greeting).await;
                let mut buf = [0u8; 1024];
                while let Ok(n) = tcp.read(&mut buf).await {
                    if n == 0 || tcp.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// A plaintext server answering `hello from NAME` over HTTP/1.1, fed by the returned
/// handoff.
fn http_server(name: &'static str, addr: SocketAddr) -> (Handoff, crate::server::Server) {
    let (handoff, connections) = handoff(addr);
    let app = tower::service_fn(move |_req: Request<hyper::body::Incoming>| async move {
        Ok::<_, std::convert::Infallible>(Response::new(format!("hello from {name}")))
    });
    let server = MeshServer::builder()
        .plaintext()
        .serve_handed(connections, app)
        .unwrap();
    (handoff, server)
}

async fn get(addr: SocketAddr) -> String {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nhost: users\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    tcp.read_to_string(&mut out).await.unwrap();
    out
}

/// Reads until the peer closes; what it sent.
async fn closed_without_data(addr: SocketAddr) -> bool {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let _ = tcp.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let mut out = Vec::new();
    let _ = tcp.read_to_end(&mut out).await;
    out.is_empty()
}

fn metrics_text(registry: &Registry) -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    text
}

#[tokio::test]
async fn a_meshed_destination_is_handed_to_its_server_and_the_table_can_change() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (users, users_server) = http_server("users", addr);
    let (billing, billing_server) = http_server("billing", addr);
    let table = DestinationTable::new(HashMap::from([(MESHED.parse().unwrap(), users)]));
    let mut registry = Registry::default();
    let metrics = TransparentMetrics::register(&mut registry);
    let serving = TransparentListener::builder()
        .name("t")
        .metrics(&metrics)
        .resolver(resolver_to(MESHED.parse().unwrap()))
        .serve(listener, table.clone())
        .unwrap();
    let answer = get(addr).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("hello from users"), "{answer}");

    // A reload: the same destination now means another service.
    table.replace(HashMap::from([(MESHED.parse().unwrap(), billing)]));
    assert_eq!(table.len(), 1);
    assert!(get(addr).await.ends_with("hello from billing"));
    let text = metrics_text(&registry);
    assert!(
        text.contains(r#"mesh_transparent_connections_total{listener="t",outcome="meshed"} 2"#),
        "{text}"
    );

    // The service's server gone: its connections are closed, and counted.
    users_server.shutdown().await;
    billing_server.shutdown().await;
    assert!(closed_without_data(addr).await);
    let text = metrics_text(&registry);
    assert!(
        text.contains(r#"mesh_transparent_connections_total{listener="t",outcome="failed"} 1"#),
        "{text}"
    );
    let report = serving.shutdown().await;
    assert_eq!(report.forced, 0);
}

#[tokio::test]
async fn unmatched_destinations_pass_through_or_are_refused() {
    let upstream = echo(b"upstream\n").await;
    let mut registry = Registry::default();
    let metrics = TransparentMetrics::register(&mut registry);
    let tunnels = crate::relay::TunnelMetrics::register(&mut registry);

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = TransparentListener::builder()
        .name("pass")
        .metrics(&metrics)
        .tunnels(tunnels.listener("pass"))
        .resolver(resolver_to(upstream))
        .serve(listener, DestinationTable::default())
        .unwrap();
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let mut greeting = [0u8; 9];
    tcp.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting, b"upstream\n");
    tcp.write_all(b"ping").await.unwrap();
    let mut pong = [0u8; 4];
    tcp.read_exact(&mut pong).await.unwrap();
    assert_eq!(&pong, b"ping");
    drop(tcp);

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let refusing = listener.local_addr().unwrap();
    let _refuse = TransparentListener::builder()
        .name("refuse")
        .unmatched(Unmatched::Refuse)
        .metrics(&metrics)
        .resolver(resolver_to(upstream))
        .serve(listener, DestinationTable::default())
        .unwrap();
    assert!(closed_without_data(refusing).await);

    // A destination nobody listens on: the dial fails and the client is closed.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = listener.local_addr().unwrap();
    let gone = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let nowhere = gone.local_addr().unwrap();
    drop(gone);
    let _dead = TransparentListener::builder()
        .name("dead")
        .metrics(&metrics)
        .resolver(resolver_to(nowhere))
        .serve(listener, DestinationTable::default())
        .unwrap();
    assert!(closed_without_data(dead).await);

    let text = metrics_text(&registry);
    for line in [
        r#"{listener="pass",outcome="passthrough"} 1"#,
        r#"{listener="refuse",outcome="refused"} 1"#,
        r#"{listener="dead",outcome="failed"} 1"#,
        // The passthrough relay's bytes, counted as they moved.
        r#"mesh_tunnels_total{listener="pass"} 1"#,
        r#"mesh_tunnel_bytes_total{listener="pass",direction="client_to_upstream"} 4"#,
        r#"mesh_tunnel_bytes_total{listener="pass",direction="upstream_to_client"} 13"#,
    ] {
        assert!(text.contains(line), "{line} in {text}");
    }
    assert_eq!(serving.shutdown().await.forced, 0);
}

#[tokio::test]
async fn connections_not_redirected_or_dialled_directly_are_closed() {
    let mut registry = Registry::default();
    let metrics = TransparentMetrics::register(&mut registry);
    // The kernel's resolver: a plain loopback connection was never redirected.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let plain = listener.local_addr().unwrap();
    let _plain = TransparentListener::builder()
        .name("kernel")
        .metrics(&metrics)
        .serve(listener, DestinationTable::default())
        .unwrap();
    assert!(closed_without_data(plain).await);

    // Its own address as the destination: proxying would loop.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let own = listener.local_addr().unwrap();
    let _own = TransparentListener::builder()
        .name("self")
        .metrics(&metrics)
        .resolver(resolver_to(own))
        .serve(listener, DestinationTable::default())
        .unwrap();
    assert!(closed_without_data(own).await);

    let text = metrics_text(&registry);
    for line in [
        r#"{listener="kernel",outcome="no_destination"} 1"#,
        r#"{listener="self",outcome="refused"} 1"#,
    ] {
        assert!(text.contains(line), "{line} in {text}");
    }
}

/// A listener bound to every address proxies a connection redirected from another host's
/// address at the listener's own port: only where the connection landed tells a direct
/// dial. Before, any destination at that port was taken for the listener itself.
#[tokio::test]
async fn a_wildcard_listener_proxies_other_hosts_at_its_own_port() {
    let listener = TcpListener::bind("0.0.0.0:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let local = SocketAddr::from(([127, 0, 0, 1], port));
    let elsewhere = SocketAddr::from(([10, 96, 0, 10], port));
    let (users, _server) = http_server("users", local);
    let table = DestinationTable::new(HashMap::from([(elsewhere, users.clone())]));
    let serving = TransparentListener::builder()
        .resolver(resolver_to(elsewhere))
        .serve(listener, table)
        .unwrap();
    let answer = get(local).await;
    assert!(answer.ends_with("hello from users"), "{answer}");
    serving.shutdown().await;

    // The same listener's address as the destination, through an IPv4-mapped address (a
    // dual-stack socket): still itself.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let own = listener.local_addr().unwrap();
    let mapped = SocketAddr::new(
        match own.ip() {
            std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().into(),
            other => other,
        },
        own.port(),
    );
    let table = DestinationTable::new(HashMap::from([(mapped, users)]));
    let _serving = TransparentListener::builder()
        .resolver(resolver_to(mapped))
        .serve(listener, table)
        .unwrap();
    assert!(closed_without_data(own).await);
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn the_kernel_has_no_original_destination_for_a_plain_connection() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _client = TcpStream::connect(addr).await.unwrap();
    let (accepted, _) = listener.accept().await.unwrap();
    assert!(original_dst(&accepted).is_err());
}

/// A listener `loop` on `addr` whose every connection's original destination is
/// `upstream`, passed through when unmatched.
fn looping(addr: SocketAddr, upstream: SocketAddr, metrics: TransparentMetrics) -> Shared {
    Shared {
        addr,
        name: "loop".into(),
        unmatched: Unmatched::Passthrough,
        connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        metrics: Some(metrics),
        resolver: resolver_to(upstream),
        relay: crate::relay::Relay::new(),
        tcp: TcpOptions::default(),
        table: DestinationTable::default(),
        outgoing: Mutex::new(HashSet::new()),
    }
}

#[tokio::test]
async fn a_passthrough_redirected_back_to_the_listener_is_refused() {
    // A missing exemption rule: a connection arrives from the local address of one of
    // the listener's own passthrough sockets.
    let upstream = echo(b"never\n").await;
    let mut registry = Registry::default();
    let shared = looping(
        "127.0.0.1:4140".parse().unwrap(),
        upstream,
        TransparentMetrics::register(&mut registry),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut client = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (accepted, remote) = listener.accept().await.unwrap();
    {
        // Registered while open, forgotten once closed.
        let own = Outgoing::new(&shared, TcpStream::connect(upstream).await.unwrap());
        assert!(shared.outgoing().contains(&own.local.unwrap()));
    }
    assert!(shared.outgoing().is_empty());
    shared.outgoing().insert(remote);
    shared.connection(accepted, remote).await;
    let mut out = Vec::new();
    client.read_to_end(&mut out).await.unwrap();
    assert!(out.is_empty(), "nothing relayed");
    let text = metrics_text(&registry);
    assert!(
        text.contains(r#"{listener="loop",outcome="refused"} 1"#),
        "{text}"
    );
}

/// The same on a dual-stack listener: it sees the IPv4 passthrough socket's address as
/// `::ffff:127.0.0.1`, and still knows it for its own.
#[tokio::test]
async fn a_passthrough_redirected_back_to_a_dual_stack_listener_is_refused() {
    let Ok(listener) = TcpListener::bind("[::]:0").await else {
        eprintln!("skipped: no IPv6 here");
        return;
    };
    let upstream = echo(b"never\n").await;
    let mut registry = Registry::default();
    let shared = looping(
        listener.local_addr().unwrap(),
        upstream,
        TransparentMetrics::register(&mut registry),
    );
    let port = listener.local_addr().unwrap().port();
    // The passthrough socket, IPv4, as the proxy dials out: its own address registered.
    let own = Outgoing::new(
        &shared,
        TcpStream::connect(("127.0.0.1", port)).await.unwrap(),
    );
    let (accepted, remote) = listener.accept().await.unwrap();
    assert!(remote.is_ipv6(), "{remote}");
    // Refused at once; not relayed (which would last as long as the peers).
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        shared.connection(accepted, remote),
    )
    .await
    .expect("refused at once, not relayed");
    drop(own);
    let text = metrics_text(&registry);
    assert!(
        text.contains(r#"{listener="loop",outcome="refused"} 1"#),
        "{text}"
    );
}

/// Networks: an exact address wins, then the longest prefix holding the destination at
/// its port; a destination outside every network, or at another port, is unmatched.
#[tokio::test]
async fn networks_take_what_no_exact_address_does_longest_prefix_first() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let local = listener.local_addr().unwrap();
    drop(listener);
    let (exact, _exact_server) = http_server("exact", local);
    let (narrow, _narrow_server) = http_server("narrow", local);
    let (wide, _wide_server) = http_server("wide", local);
    let (any, _any_server) = http_server("any", local);
    let (v6, _v6_server) = http_server("v6", local);
    let dst = |s: &str| s.parse::<Destination>().unwrap();
    // Inserted widest first: the table orders them. The same network inserted again
    // replaces its handoff.
    let table = DestinationTable::new(Destinations::from_iter([
        (dst("0.0.0.0/0:443"), wide.clone()),
        (dst("10.1.0.0/16:80"), wide),
        (dst("10.1.2.0/24:80"), narrow),
        (dst("10.1.2.3:80"), exact),
        (dst("[fd00::/64]:80"), v6),
        (dst("0.0.0.0/0:443"), any),
    ]));
    assert_eq!(table.len(), 5);
    let metrics = TransparentMetrics::default();
    for (original, answer) in [
        ("10.1.2.3:80", Some("exact")),
        ("10.1.2.4:80", Some("narrow")),
        ("10.1.9.9:80", Some("wide")),
        ("10.2.0.1:80", None),
        ("10.1.2.4:81", None),
        ("192.0.2.1:443", Some("any")),
        ("[fd00::5]:80", Some("v6")),
        ("[fd00:0:0:1::5]:80", None),
        ("[::ffff:10.1.2.3]:443", None),
    ] {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _serving = TransparentListener::builder()
            .name("nets")
            .unmatched(Unmatched::Refuse)
            .metrics(&metrics)
            .resolver(resolver_to(original.parse().unwrap()))
            .serve(listener, table.clone())
            .unwrap();
        match answer {
            Some(name) => {
                let got = get(addr).await;
                assert!(
                    got.ends_with(&format!("hello from {name}")),
                    "{original}: {got}"
                );
            }
            None => assert!(closed_without_data(addr).await, "{original}"),
        }
    }
}
