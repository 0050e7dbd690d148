//! Opaque TCP through two proxy processes: bytes both ways over mTLS with a half-close,
//! on an opaque port and on a port that detects the protocol,
//! a connection-level authorization deny (the connection closes, the target sees
//! nothing), a quiet connection closed at its idle timeout, and the relays' metrics.
#![cfg(unix)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{Proxy, identity};
use mesh_spiffe::test_ca::TestCa;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A TCP echo server counting its connections.
async fn echo() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            seen.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    (addr, count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tcp_crosses_both_proxies_and_a_denied_peer_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let mut ca = TestCa::new("example.org").unwrap();
    let (target, connections) = echo().await;
    let b_config = dir.path().join("b.toml");
    std::fs::write(
        &b_config,
        format!(
            "{}\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
             [[inbound]]\nname = \"tcp\"\nlisten = \"127.0.0.1:0\"\ntarget = \"{target}\"\n\
             protocol = \"opaque\"\nauthorization = \"callers\"\n\
             limits = {{ tunnel_idle_timeout = \"2s\" }}\n\n\
             [authorization.callers]\ndefault = \"deny\"\n\
             [[authorization.callers.rules]]\nname = \"caller\"\nclients = [\"spiffe://example.org/caller\"]\n",
            identity(dir.path(), &mut ca, "app")
        ),
    )
    .unwrap();
    let b = Proxy::start(&b_config, 2);
    let outbound = |name: &str, ca: &mut TestCa| {
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &path,
            format!(
                "{}\n[services.tcp]\ndiscovery = {{ kind = \"static\", endpoints = [{{ addr = \"{}\" }}] }}\n\
                 server_identity = \"spiffe://example.org/app\"\n\n\
                 [[outbound]]\nname = \"egress\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"opaque\"\n\
                 default_service = \"tcp\"\n\n\
                 [[outbound]]\nname = \"detected\"\nlisten = \"127.0.0.1:0\"\n\
                 default_service = \"tcp\"\n",
                identity(dir.path(), ca, name),
                b.addr("tcp")
            ),
        )
        .unwrap();
        Proxy::start(&path, 2)
    };

    let a = outbound("caller", &mut ca);
    let mut s = tokio::net::TcpStream::connect(a.addr("egress"))
        .await
        .unwrap();
    let payload: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
    s.write_all(&payload).await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).await.unwrap();
    assert_eq!(back.len(), payload.len());
    assert!(back == payload, "the echo came back intact");
    assert_eq!(connections.load(Ordering::Relaxed), 1);

    // The same on a port that detects the protocol: not HTTP, so opaque.
    let mut s = tokio::net::TcpStream::connect(a.addr("detected"))
        .await
        .unwrap();
    s.write_all(b"\x00\x01binary protocol").await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"\x00\x01binary protocol");
    assert_eq!(connections.load(Ordering::Relaxed), 2);

    // Another identity: B closes the connection before dialling the target.
    let stranger = outbound("stranger", &mut ca);
    let mut s = tokio::net::TcpStream::connect(stranger.addr("egress"))
        .await
        .unwrap();
    let _ = s.write_all(b"hello?").await;
    let mut back = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut back))
        .await
        .expect("the denied connection was closed");
    assert!(back.is_empty(), "{back:?}");
    assert_eq!(
        connections.load(Ordering::Relaxed),
        2,
        "the target saw no new connection"
    );

    // A reload of B's policy admits the stranger too, without a restart.
    let text = std::fs::read_to_string(&b_config).unwrap();
    std::fs::write(
        &b_config,
        text.replace(
            "clients = [\"spiffe://example.org/caller\"]",
            "clients = [\"spiffe://example.org/caller\", \"spiffe://example.org/stranger\"]",
        ),
    )
    .unwrap();
    b.signal("HUP");
    let mut admitted = false;
    for _ in 0..50 {
        let mut s = tokio::net::TcpStream::connect(stranger.addr("egress"))
            .await
            .unwrap();
        s.write_all(b"now?").await.unwrap();
        s.shutdown().await.unwrap();
        let mut back = Vec::new();
        let _ = s.read_to_end(&mut back).await;
        if back == b"now?" {
            admitted = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(admitted, "the reloaded policy admits the stranger");

    // A connection quiet for B's tunnel_idle_timeout (2 s) is closed, through A too.
    let mut s = tokio::net::TcpStream::connect(a.addr("egress"))
        .await
        .unwrap();
    s.write_all(b"idle?").await.unwrap();
    let mut back = [0u8; 5];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"idle?");
    let quiet = tokio::time::Instant::now();
    let read = tokio::time::timeout(std::time::Duration::from_secs(20), s.read(&mut [0; 8]))
        .await
        .expect("the quiet connection was closed");
    assert_eq!(read.unwrap(), 0);
    assert!(
        quiet.elapsed() >= std::time::Duration::from_secs(1),
        "closed after {:?}, before the idle timeout",
        quiet.elapsed()
    );
    // B closed cleanly (TLS `close_notify`): A passed it on as an end of what B sends,
    // and ends the relay once the application closes too, as a client does on an end.
    drop(s);

    // Its metrics (opaque connections, their authorization, the relays and their bytes)
    // parse as a scraper's would.
    let (_, metrics) = common::curl(&[&format!("http://{}/metrics", b.addr("admin"))]);
    assert!(metrics.contains("listener=\"tcp\""), "{metrics}");
    common::assert_families_once(&metrics);
    // Relayed: the 256 KiB echo, the detected one, the reloaded stranger's, the quiet one
    // (denied connections are not relayed); every byte counted, both ways.
    let bytes = 256 * 1024 + 17 + 4 + 5;
    for series in [
        "mesh_tunnels_total{listener=\"tcp\"} 4\n".to_owned(),
        "mesh_tunnels_open{listener=\"tcp\"} 0\n".to_owned(),
        format!(
            "mesh_tunnel_bytes_total{{listener=\"tcp\",direction=\"client_to_upstream\"}} {bytes}\n"
        ),
        format!(
            "mesh_tunnel_bytes_total{{listener=\"tcp\",direction=\"upstream_to_client\"}} {bytes}\n"
        ),
    ] {
        assert!(metrics.contains(&series), "{series} in {metrics}");
    }

    // A rate limit on B's opaque listener counts connections: reloaded in, one an hour
    // for each client; the caller's second is closed before B dials the target.
    let text = std::fs::read_to_string(&b_config).unwrap();
    std::fs::write(
        &b_config,
        text.replace(
            "authorization = \"callers\"\n",
            "authorization = \"callers\"\nrate_limit = \"few\"\n",
        ) + "\n[rate_limits.few]\nper_client = { requests = 1, per = \"1h\" }\n",
    )
    .unwrap();
    b.signal("HUP");
    let exchange = |addr| async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _ = s.write_all(b"limited?").await;
        let _ = s.shutdown().await;
        let mut back = Vec::new();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut back))
            .await
            .expect("answered or closed");
        back
    };
    let (limited, _) = common::metrics_until(
        &format!("http://{}/metrics", b.addr("admin")),
        &["mesh_proxy_reloads_total{result=\"applied\"} 2"],
    )
    .await;
    assert!(limited, "the rate limit was reloaded");
    let seen = connections.load(Ordering::Relaxed);
    assert_eq!(exchange(a.addr("egress")).await, b"limited?");
    assert_eq!(exchange(a.addr("egress")).await, b"");
    assert_eq!(
        connections.load(Ordering::Relaxed),
        seen + 1,
        "the target saw one"
    );
    let (_, metrics) = common::curl(&[&format!("http://{}/metrics", b.addr("admin"))]);
    assert!(
        metrics.contains("mesh_server_rate_limited_total{listener=\"tcp\",limit=\"client\"} 1\n"),
        "{metrics}"
    );

    assert!(a.terminate().success());
    assert!(stranger.terminate().success());
    assert!(b.terminate().success());
}
