//! Bad input at real proxy processes: garbage, TLS on the plaintext port and plaintext on
//! the mTLS port, a smuggling attempt, oversized headers, a peer with the wrong identity,
//! slow clients.
//! Each gets an error status or a closed connection, and the proxy goes on serving.
#![cfg(unix)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::{Proxy, app, curl, inbound_config, outbound_config};
use mesh_spiffe::test_ca::TestCa;

/// Writes `bytes`, then reads until the peer closes or 5 s pass.
fn exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // The peer may close before taking everything: that is an answer too.
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn status_of(answer: &str) -> Option<u16> {
    answer
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_an_error_and_disturbs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut ca = TestCa::new("example.org").unwrap();
    let app = app().await;
    let b = Proxy::start(
        &inbound_config(dir.path(), &mut ca, "app", "b.toml", app),
        2,
    );
    let a = Proxy::start(
        &outbound_config(dir.path(), &mut ca, "caller", &[b.addr("app")], ""),
        2,
    );
    let egress = a.addr("egress");
    let inbound = b.addr("app");
    let works = || {
        let (code, body) = curl(&[&format!("http://{egress}/still-fine")]);
        assert_eq!(code, 200, "{body}");
    };
    works();

    // Garbage on the plaintext port: 400, or a closed connection.
    let answer = exchange(egress, b"\x00\x01\x02 not http at all\r\n\r\n");
    assert!(matches!(status_of(&answer), Some(400) | None), "{answer}");
    works();

    // A TLS ClientHello on the plaintext port.
    let hello = b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03";
    let answer = exchange(egress, hello);
    assert!(matches!(status_of(&answer), Some(400) | None), "{answer}");
    works();

    // Plaintext HTTP on the mTLS port: the handshake fails and nothing reaches the app.
    let answer = exchange(inbound, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(!answer.contains("200"), "{answer}");
    works();

    // Content-Length and Transfer-Encoding together (request smuggling): refused, or
    // framed by Transfer-Encoding alone; either way the app never sees a request the
    // client's framing hides.
    let smuggle = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\
                    Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /hidden HTTP/1.1\r\nHost: x\r\n\r\n";
    let answer = exchange(egress, smuggle);
    let first = status_of(&answer);
    assert!(matches!(first, Some(400) | Some(200) | None), "{answer}");
    if first == Some(200) {
        // Framed by Transfer-Encoding: the second request is the client's own,
        // answered on the same connection like any pipelined one.
        assert!(answer.matches("HTTP/1.1 ").count() == 2, "{answer}");
    }
    works();

    // Oversized headers: 431 (or a closed connection), the proxy unharmed.
    let big = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(200 * 1024)
    );
    let answer = exchange(egress, big.as_bytes());
    assert!(
        matches!(status_of(&answer), Some(431) | Some(400) | None),
        "{}",
        &answer[..answer.len().min(200)]
    );
    works();

    assert!(a.terminate().success());

    // A peer with the wrong identity: refused by the caller's proxy, answered at once.
    let wrong = outbound_config(dir.path(), &mut ca, "caller", &[inbound], "")
        .to_string_lossy()
        .into_owned();
    let text = std::fs::read_to_string(&wrong).unwrap().replace(
        "spiffe://example.org/app",
        "spiffe://example.org/someone-else",
    );
    std::fs::write(&wrong, text).unwrap();
    let a = Proxy::start(std::path::Path::new(&wrong), 2);
    let started = tokio::time::Instant::now();
    let (code, body) = curl(&[&format!("http://{}/x", a.addr("egress"))]);
    assert!(code == 502 || code == 503, "{code}: {body}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "answered, not hung"
    );
    assert!(a.terminate().success());
    assert!(b.terminate().success());
}

/// A slow client dribbling its headers a byte at a time (slowloris) is closed at the
/// listener's `header_read_timeout`, while requests on other connections are answered
/// meanwhile. (A client that says nothing at all is, on an `auto` listener with a default
/// service, a server-first protocol: relayed as opaque TCP after the 1 s peek.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_closed_at_the_header_timeout_and_disturb_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut ca = TestCa::new("example.org").unwrap();
    let app = app().await;
    let b = Proxy::start(
        &inbound_config(dir.path(), &mut ca, "app", "b.toml", app),
        2,
    );
    let config = outbound_config(dir.path(), &mut ca, "caller", &[b.addr("app")], "");
    // The outbound listener is the file's last section: its limits follow it.
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("limits = { header_read_timeout = \"1s\" }\n");
    std::fs::write(&config, text).unwrap();
    let a = Proxy::start(&config, 2);
    let egress = a.addr("egress");

    let dribble = std::thread::spawn(move || {
        let mut s = TcpStream::connect(egress).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
        let started = tokio::time::Instant::now();
        let request = b"GET /slow HTTP/1.1\r\nHost: x\r\nx-padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
        for byte in request {
            if s.write_all(&[*byte]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        // Closed before the headers were done; at most a 408 came back, never the app's
        // answer.
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        (
            started.elapsed(),
            String::from_utf8_lossy(&out).into_owned(),
        )
    });
    // Meanwhile, other clients are served.
    for i in 0..10 {
        let (code, body) = curl(&[&format!("http://{egress}/fine/{i}")]);
        assert_eq!(code, 200, "{body}");
    }

    let (took, answer) = dribble.join().unwrap();
    assert!(!answer.contains("200 OK"), "{answer}");
    assert!(matches!(status_of(&answer), Some(408) | None), "{answer}");
    // The request takes ~16 s to dribble out: the proxy cut it short.
    assert!(took < Duration::from_secs(12), "closed after {took:?}");
    assert!(a.terminate().success());
    assert!(b.terminate().success());
}

/// A burst past the application's pool: with one HTTP/1.1 connection allowed and nobody
/// allowed to wait, a second request while the first is at the application is answered
/// 503 with the reason, the first is answered, and the next finds the connection free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_past_the_applications_pool_is_answered_503_and_disturbs_nothing() {
    // The application says when a request arrives, and answers when the test lets it.
    let (arrived_tx, mut arrived) = tokio::sync::mpsc::unbounded_channel::<()>();
    let answer = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = listener.local_addr().unwrap();
    let permits = answer.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (arrived, answer) = (arrived_tx.clone(), permits.clone());
            let service = hyper::service::service_fn(move |_req| {
                let (arrived, answer) = (arrived.clone(), answer.clone());
                async move {
                    let _ = arrived.send(());
                    answer.acquire().await.unwrap().forget();
                    let body = http_body_util::Full::new(bytes::Bytes::from_static(b"done"));
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(body))
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service),
            );
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pool.toml");
    std::fs::write(
        &config,
        format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n\n\
             [[inbound]]\nname = \"app\"\nlisten = \"127.0.0.1:0\"\ntarget = \"{app}\"\n\
             tls = \"plaintext\"\npool = {{ max_connections = 1, max_pending = 0 }}\n"
        ),
    )
    .unwrap();
    let proxy = Proxy::start(&config, 2);
    let url = format!("http://{}/slow", proxy.addr("app"));
    let metrics = format!("http://{}/metrics", proxy.addr("admin"));
    let first = {
        let url = url.clone();
        std::thread::spawn(move || curl(&[&url]))
    };
    // The first request holds the one connection until it is answered.
    tokio::time::timeout(Duration::from_secs(10), arrived.recv())
        .await
        .unwrap()
        .unwrap();
    let (code, body) = curl(&[&url]);
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("all 1 HTTP/1.1 connections") && body.contains("not sent to the application"),
        "{body}"
    );
    // The pool's state is in the metrics: the one connection, and the refusal.
    let (_, scraped) = curl(&[&metrics]);
    for series in [
        "mesh_proxy_app_connections{listener=\"app\"} 1\n",
        "mesh_proxy_app_requests_waiting{listener=\"app\"} 0\n",
        "mesh_proxy_app_pool_overflows_total{listener=\"app\"} 1\n",
    ] {
        assert!(scraped.contains(series), "{series} not in\n{scraped}");
    }
    answer.add_permits(2);
    let (code, body) = first.join().unwrap();
    assert_eq!((code, body.as_str()), (200, "done"));
    let (code, body) = curl(&[&url]);
    assert_eq!((code, body.as_str()), (200, "done"));
    assert!(
        arrived.try_recv().is_ok(),
        "the third reached the application"
    );
    assert!(arrived.try_recv().is_err(), "the second never did");
    assert!(proxy.terminate().success());
}
