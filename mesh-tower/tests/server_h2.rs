//! `MeshServer`'s HTTP/2 under hostile input, with its default limits: hand-written frames
//! on a raw socket (h2c prior knowledge, plaintext) — rapid reset (CVE-2023-44487), header
//! blocks over `max_header_list_size`, a CONTINUATION flood (CVE-2024-27316), garbage
//! after the preface. After each, a fresh connection must still be served.
//!
//! Real time, no sleeps: every read is bounded by [`READ_TIMEOUT`], so a server that
//! neither answers nor closes fails the test instead of hanging it.
#![cfg(feature = "server")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use mesh_core::config::Protocol;
use mesh_tower::connect::{ConnectSettings, EndpointClient};
use mesh_tower::server::{MeshServer, Server, ServerLimits, StreamTasks};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;

/// Bound on one read from the server.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

// Frame types (RFC 9113 6).
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;

// Flags.
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

// Error codes (RFC 9113 7).
const PROTOCOL_ERROR: u32 = 0x1;
const FRAME_SIZE_ERROR: u32 = 0x6;
const CANCEL: u32 = 0x8;
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// The largest frame payload a peer may send before SETTINGS say otherwise.
const MAX_FRAME: usize = 16_384;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap();
    assert!(len < 1 << 24);
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

fn rst_stream(stream: u32, code: u32) -> Vec<u8> {
    frame(RST_STREAM, 0, stream, &code.to_be_bytes())
}

/// A header block split into HEADERS and CONTINUATION frames of at most `MAX_FRAME`.
fn header_frames(stream: u32, block: &[u8], end_stream: bool) -> Vec<u8> {
    let mut chunks = block.chunks(MAX_FRAME).peekable();
    let mut out = Vec::new();
    let mut kind = HEADERS;
    let mut flags = if end_stream { END_STREAM } else { 0 };
    while let Some(chunk) = chunks.next() {
        if chunks.peek().is_none() {
            flags |= END_HEADERS;
        }
        out.extend(frame(kind, flags, stream, chunk));
        kind = CONTINUATION;
        flags = 0;
    }
    out
}

/// An HPACK integer with an `n`-bit prefix, the prefix's other bits `first` (RFC 7541 5.1).
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u32, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

/// A string literal, not Huffman-coded (RFC 7541 5.2).
fn hpack_str(out: &mut Vec<u8>, s: &[u8]) {
    hpack_int(out, 0, 7, s.len());
    out.extend_from_slice(s);
}

/// A GET request's header block: static-table indexes for `:method GET` (2) and `:scheme
/// http` (6), literals without indexing for `:path` (name 4), `:authority` (name 1) and
/// every extra field (new names), so that no dynamic-table state carries over.
fn get_block(path: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut out = vec![0x82, 0x86];
    hpack_int(&mut out, 0x00, 4, 4);
    hpack_str(&mut out, path.as_bytes());
    hpack_int(&mut out, 0x00, 4, 1);
    hpack_str(&mut out, b"x");
    for (name, value) in extra {
        out.push(0x00);
        hpack_str(&mut out, name.as_bytes());
        hpack_str(&mut out, value.as_bytes());
    }
    out
}

/// Decodes a Huffman-coded string of digits (RFC 7541 Appendix B: '0'..'2' are five bits
/// 00000..00010, '3'..'9' six bits 011001..011111; the padding is ones).
fn huffman_digits(bytes: &[u8]) -> Option<String> {
    let bits: Vec<u8> = bytes
        .iter()
        .flat_map(|b| (0..8).rev().map(move |i| (b >> i) & 1))
        .collect();
    let mut out = String::new();
    let mut at = 0;
    while bits.len() - at >= 5 {
        let five = bits[at..at + 5].iter().fold(0u8, |v, b| v << 1 | b);
        if five == 0x1f {
            break; // padding
        }
        if five <= 2 {
            out.push(char::from(b'0' + five));
            at += 5;
        } else {
            let six = five << 1 | *bits.get(at + 5)?;
            if !(0x19..=0x1f).contains(&six) {
                return None;
            }
            out.push(char::from(b'3' + six - 0x19));
            at += 6;
        }
    }
    Some(out)
}

/// The `:status` of a response header block, which the server puts first: an indexed
/// static entry (8..=14), or a literal with `:status`'s name index (8).
fn status_of(block: &[u8]) -> Option<u16> {
    const STATIC: [u16; 7] = [200, 204, 206, 304, 400, 404, 500];
    let first = *block.first()?;
    if (0x88..=0x8e).contains(&first) {
        return Some(STATIC[usize::from(first - 0x88)]);
    }
    // Literal with incremental indexing (01), without indexing (0000) or never (0001).
    if ![0x48, 0x08, 0x18].contains(&first) {
        return None;
    }
    let head = *block.get(1)?;
    let len = usize::from(head & 0x7f);
    let value = block.get(2..2 + len)?;
    let digits = if head & 0x80 != 0 {
        huffman_digits(value)?
    } else {
        String::from_utf8(value.to_vec()).ok()?
    };
    digits.parse().ok()
}

#[derive(Debug, PartialEq, Eq)]
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

impl Frame {
    /// A GOAWAY's last stream ID and error code.
    fn goaway(&self) -> Option<(u32, u32)> {
        if self.kind != GOAWAY || self.payload.len() < 8 {
            return None;
        }
        let word = |i: usize| u32::from_be_bytes(self.payload[i..i + 4].try_into().unwrap());
        Some((word(0) & 0x7fff_ffff, word(4)))
    }

    fn debug_data(&self) -> String {
        String::from_utf8_lossy(self.payload.get(8..).unwrap_or_default()).into_owned()
    }
}

/// The next frame, `None` once the server closed (or reset) the connection. Panics if the
/// server sends nothing for `READ_TIMEOUT`.
async fn read_frame(rx: &mut OwnedReadHalf) -> Option<Frame> {
    let read = async {
        let mut head = [0u8; 9];
        rx.read_exact(&mut head).await.ok()?;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0; len];
        rx.read_exact(&mut payload).await.ok()?;
        Some(Frame {
            kind: head[3],
            flags: head[4],
            stream: u32::from_be_bytes(head[5..9].try_into().unwrap()) & 0x7fff_ffff,
            payload,
        })
    };
    tokio::time::timeout(READ_TIMEOUT, read)
        .await
        .expect("the server neither answered nor closed the connection")
}

/// What the server sent until it closed: every frame, in order.
async fn read_to_close(rx: &mut OwnedReadHalf) -> Vec<Frame> {
    let mut frames = Vec::new();
    while let Some(frame) = read_frame(rx).await {
        frames.push(frame);
        assert!(frames.len() < 100_000, "the server keeps talking");
    }
    frames
}

/// A raw HTTP/2 connection past its handshake: the preface and an empty SETTINGS sent,
/// the server's SETTINGS received and acknowledged.
struct Raw {
    rx: OwnedReadHalf,
    tx: tokio::net::tcp::OwnedWriteHalf,
}

impl Raw {
    async fn connect(addr: SocketAddr) -> Self {
        let (rx, mut tx) = TcpStream::connect(addr).await.unwrap().into_split();
        tx.write_all(&[PREFACE, &frame(SETTINGS, 0, 0, &[])].concat())
            .await
            .unwrap();
        let mut raw = Self { rx, tx };
        loop {
            let f = read_frame(&mut raw.rx)
                .await
                .expect("closed before its SETTINGS");
            if f.kind == SETTINGS && f.flags & ACK == 0 {
                break;
            }
        }
        raw.tx
            .write_all(&frame(SETTINGS, ACK, 0, &[]))
            .await
            .unwrap();
        raw
    }

    /// The status the server answers `stream` with (frames of other streams skipped);
    /// `Err` with the frame that ended the stream instead (RST_STREAM, GOAWAY), or `None`
    /// on close.
    async fn status(&mut self, stream: u32) -> Result<u16, Option<Frame>> {
        loop {
            let Some(f) = read_frame(&mut self.rx).await else {
                return Err(None);
            };
            match f.kind {
                HEADERS if f.stream == stream => return Ok(status_of(&f.payload).unwrap()),
                RST_STREAM if f.stream == stream => return Err(Some(f)),
                GOAWAY => return Err(Some(f)),
                _ => {}
            }
        }
    }
}

/// Counts the requests that reach the application.
fn counting() -> (
    impl tower::Service<
        Request<Incoming>,
        Response = Response<Full<Bytes>>,
        Error = Infallible,
        Future = impl Send,
    > + Clone
    + Send
    + Sync
    + 'static,
    Arc<AtomicUsize>,
) {
    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    let app = tower::service_fn(move |_req: Request<Incoming>| {
        count.fetch_add(1, Ordering::Relaxed);
        async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok")))) }
    });
    (app, served)
}

async fn server() -> (Server, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (app, served) = counting();
    let server = MeshServer::builder()
        .plaintext()
        .limits(ServerLimits::default())
        .serve(listener, app)
        .unwrap();
    (server, served)
}

/// The server still serves: a hand-written request on a fresh connection, and one from
/// the mesh's own HTTP/2 client.
async fn assert_healthy(addr: SocketAddr) {
    let mut raw = Raw::connect(addr).await;
    raw.tx
        .write_all(&header_frames(1, &get_block("/", &[]), true))
        .await
        .unwrap();
    assert_eq!(raw.status(1).await.unwrap(), 200);
    let client: EndpointClient<Full<Bytes>> = EndpointClient::new(
        addr,
        ConnectSettings {
            protocol: Protocol::Http2,
            ..ConnectSettings::plaintext()
        },
    );
    let resp = tokio::time::timeout(
        READ_TIMEOUT,
        client.send(Request::get("http://x/").body(Full::default()).unwrap()),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "ok");
}

#[tokio::test]
async fn hand_written_frames_are_served() {
    let (server, served) = server().await;
    let mut raw = Raw::connect(server.local_addr()).await;
    raw.tx
        .write_all(&header_frames(1, &get_block("/a", &[("x-a", "b")]), true))
        .await
        .unwrap();
    assert_eq!(raw.status(1).await.unwrap(), 200);
    assert_eq!(served.load(Ordering::Relaxed), 1);
    // Closed, rather than left to the shutdown timeout for not answering its PING.
    drop(raw);
    assert_healthy(server.local_addr()).await;
    assert_eq!(server.shutdown().await.forced, 0);
}

#[tokio::test]
async fn rapid_reset_floods_end_in_goaway() {
    let (server, served) = server().await;
    let limit = ServerLimits::default().max_pending_accept_reset_streams;
    const STREAMS: u32 = 2_000;
    let Raw { mut rx, mut tx } = Raw::connect(server.local_addr()).await;
    // Write the flood while reading, so that the server's answer is read before its close.
    let writer = tokio::spawn(async move {
        let block = get_block("/", &[]);
        for batch in 0..STREAMS / 100 {
            let mut bytes = Vec::new();
            for i in 0..100 {
                let id = 2 * (batch * 100 + i) + 1;
                bytes.extend(header_frames(id, &block, true));
                bytes.extend(rst_stream(id, CANCEL));
            }
            if tx.write_all(&bytes).await.is_err() {
                return batch * 100;
            }
        }
        STREAMS
    });
    let frames = read_to_close(&mut rx).await;
    let sent = writer.await.unwrap();
    let (last, reason, data) = frames
        .iter()
        .find_map(|f| f.goaway().map(|(last, code)| (last, code, f.debug_data())))
        .unwrap_or_else(|| panic!("no GOAWAY; {} frames, {sent} streams sent", frames.len()));
    assert_eq!(
        (reason, data.as_str()),
        (ENHANCE_YOUR_CALM, "too_many_resets")
    );
    let answered = frames.iter().filter(|f| f.kind == HEADERS).count();
    let reached_app = served.load(Ordering::Relaxed);
    // The flood stopped after about `limit` resets, not after thousands: the streams the
    // server took up and the requests that reached the application are a small multiple
    // of the limit.
    assert!(
        frames.len() <= 4 * limit && answered <= 2 * limit && reached_app <= 2 * limit,
        "{} frames, {answered} answered, {reached_app} reached the app",
        frames.len()
    );
    assert!(last < 8 * limit as u32, "GOAWAY last stream {last}");
    assert_healthy(server.local_addr()).await;
    assert_eq!(server.shutdown().await.forced, 0);
}

#[tokio::test]
async fn header_blocks_over_the_limit_are_refused_and_the_connection_goes_on() {
    let (server, served) = server().await;
    let limit = ServerLimits::default().max_header_list_size as usize;
    let big = "a".repeat(limit + 8 * 1024);
    let many: Vec<(String, String)> = (0..limit / 1000 + 10)
        .map(|i| (format!("x-h{i}"), "b".repeat(1000)))
        .collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    for (shape, block) in [
        ("one big value", get_block("/", &[("x-big", &big)])),
        ("many fields", get_block("/", &many)),
    ] {
        // Over the limit, in few enough frames not to count as a CONTINUATION flood.
        assert!(block.len() > limit && block.len() < 5 * MAX_FRAME);
        let mut raw = Raw::connect(server.local_addr()).await;
        raw.tx
            .write_all(&header_frames(1, &block, true))
            .await
            .unwrap();
        // Refused with 431, as `ServerLimits` documents (h2 answers it, then resets the
        // stream so as not to read a body).
        assert_eq!(raw.status(1).await, Ok(431), "{shape}");
        // The same connection still serves the next stream.
        raw.tx
            .write_all(&header_frames(3, &get_block("/", &[]), true))
            .await
            .unwrap();
        assert_eq!(raw.status(3).await.unwrap(), 200, "{shape}");
    }
    assert_eq!(
        served.load(Ordering::Relaxed),
        2,
        "no oversized request reached the app"
    );
    assert_healthy(server.local_addr()).await;
    assert_eq!(server.shutdown().await.forced, 0);
}

#[tokio::test]
async fn header_blocks_far_over_the_limit_end_the_connection() {
    let (server, served) = server().await;
    let limit = ServerLimits::default().max_header_list_size as usize;
    // Four times the limit takes more CONTINUATION frames than a block within the limit
    // needs: h2 takes it for a flood.
    let big = "a".repeat(4 * limit);
    let mut raw = Raw::connect(server.local_addr()).await;
    let _ = raw
        .tx
        .write_all(&header_frames(1, &get_block("/", &[("x-big", &big)]), true))
        .await;
    let frames = read_to_close(&mut raw.rx).await;
    let goaway = frames.iter().find_map(Frame::goaway);
    assert!(
        matches!(goaway, Some((0, ENHANCE_YOUR_CALM))),
        "{goaway:?} in {frames:?}"
    );
    assert_eq!(served.load(Ordering::Relaxed), 0);
    assert_healthy(server.local_addr()).await;
    assert_eq!(server.shutdown().await.forced, 0);
}

#[tokio::test]
async fn continuation_floods_end_in_goaway() {
    let (server, served) = server().await;
    let mut raw = Raw::connect(server.local_addr()).await;
    // A header block that never ends: small CONTINUATIONs without END_HEADERS.
    let mut block = get_block("/", &[]);
    block.extend_from_slice(&[0x00, 0x03, b'x', b'-', b'a', 0x7f]);
    let mut bytes = frame(HEADERS, END_STREAM, 1, &block);
    for _ in 0..1_000 {
        bytes.extend(frame(CONTINUATION, 0, 1, &[b'a'; 16]));
    }
    let _ = raw.tx.write_all(&bytes).await;
    let frames = read_to_close(&mut raw.rx).await;
    let goaway = frames.iter().find_map(Frame::goaway);
    assert!(
        matches!(goaway, Some((0, ENHANCE_YOUR_CALM))),
        "{goaway:?} in {frames:?}"
    );
    assert_eq!(served.load(Ordering::Relaxed), 0);
    assert_healthy(server.local_addr()).await;
    assert_eq!(server.shutdown().await.forced, 0);
}

#[tokio::test]
async fn garbage_after_the_preface_ends_in_goaway() {
    let (server, served) = server().await;
    let cases: Vec<(&str, Vec<u8>, u32)> = vec![
        // A frame header announcing more than SETTINGS_MAX_FRAME_SIZE (RFC 9113 4.2).
        ("random bytes", vec![0xff; 64], FRAME_SIZE_ERROR),
        // HEADERS on stream 0 (RFC 9113 6.2).
        (
            "HEADERS on stream 0",
            frame(HEADERS, END_HEADERS, 0, &get_block("/", &[])),
            PROTOCOL_ERROR,
        ),
        // DATA on a stream never opened (RFC 9113 5.1, idle).
        (
            "DATA on an idle stream",
            frame(DATA, END_STREAM, 1, b"x"),
            PROTOCOL_ERROR,
        ),
        // CONTINUATION without a HEADERS before it (RFC 9113 6.10).
        (
            "a lone CONTINUATION",
            frame(CONTINUATION, END_HEADERS, 1, &[0x82]),
            PROTOCOL_ERROR,
        ),
        // An even (server-initiated) stream ID from the client (RFC 9113 5.1.1).
        (
            "an even stream ID",
            header_frames(2, &get_block("/", &[]), true),
            PROTOCOL_ERROR,
        ),
        // A header block that is not HPACK (RFC 9113 4.3: COMPRESSION_ERROR is allowed
        // too; h2 answers PROTOCOL_ERROR).
        (
            "an undecodable header block",
            frame(HEADERS, END_HEADERS | END_STREAM, 1, &[0xff; 16]),
            PROTOCOL_ERROR,
        ),
    ];
    for (shape, garbage, expected) in cases {
        let mut raw = Raw::connect(server.local_addr()).await;
        let _ = raw.tx.write_all(&garbage).await;
        let frames = read_to_close(&mut raw.rx).await;
        let goaway = frames.iter().find_map(Frame::goaway);
        assert!(
            matches!(goaway, Some((_, code)) if code == expected),
            "{shape}: {goaway:?} in {frames:?}"
        );
    }
    assert_eq!(served.load(Ordering::Relaxed), 0);
    assert_healthy(server.local_addr()).await;
    assert_eq!(server.shutdown().await.forced, 0);
}

/// Rapid reset of streams the server already accepted: each stream is reset only once its
/// request reached the application, so it never counts as "pending accept" and h2's
/// bound (`max_pending_accept_reset_streams`) does not see it. hyper cancels each handler
/// on the reset, so the work in flight stays under `max_concurrent_streams`, but one
/// connection can start requests without end: 50,000 in under 3 s here, no GOAWAY.
#[tokio::test]
async fn resets_of_accepted_streams_end_in_goaway() {
    const ROUNDS: u32 = 50;
    const PER_ROUND: u32 = 20;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (reached, mut arrivals) = tokio::sync::mpsc::unbounded_channel();
    // A handler that never answers: the client's reset is what ends each request.
    let app = tower::service_fn(move |_req: Request<Incoming>| {
        let _ = reached.send(());
        std::future::pending::<Result<Response<Full<Bytes>>, Infallible>>()
    });
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = mesh_tower::metrics::server::ServerMetrics::register(&mut registry);
    let server = MeshServer::builder()
        .plaintext()
        .metrics(metrics.listener("in"))
        .serve(listener, app)
        .unwrap();
    let limit = ServerLimits::default().max_pending_accept_reset_streams;
    let Raw { mut rx, mut tx } = Raw::connect(server.local_addr()).await;
    let reader = tokio::spawn(async move { read_to_close(&mut rx).await });
    let block = get_block("/", &[]);
    let mut started = 0;
    'flood: for round in 0..ROUNDS {
        let ids: Vec<u32> = (0..PER_ROUND)
            .map(|i| 2 * (round * PER_ROUND + i) + 1)
            .collect();
        let opens: Vec<u8> = ids
            .iter()
            .flat_map(|&id| header_frames(id, &block, true))
            .collect();
        if tx.write_all(&opens).await.is_err() {
            break;
        }
        for _ in 0..PER_ROUND {
            match tokio::time::timeout(READ_TIMEOUT, arrivals.recv()).await {
                Ok(Some(())) => started += 1,
                _ => break 'flood,
            }
        }
        let resets: Vec<u8> = ids.iter().flat_map(|&id| rst_stream(id, CANCEL)).collect();
        if tx.write_all(&resets).await.is_err() {
            break;
        }
    }
    drop(tx);
    let frames = tokio::time::timeout(READ_TIMEOUT, reader)
        .await
        .unwrap()
        .unwrap();
    let goaway = frames.iter().find_map(Frame::goaway);
    assert!(
        started < 4 * limit && goaway.is_some(),
        "{started} requests started and reset on one connection; {goaway:?}"
    );
    assert_eq!(server.shutdown().await.forced, 0);
    // Counted once, shut down and then closed alike.
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains(
            "mesh_server_connections_closed_total{listener=\"in\",reason=\"cancelled_requests\"} 1\n"
        ),
        "{text}"
    );
}

/// A client that gives up on slow requests (another proxy's timeouts, on the one HTTP/2
/// connection it shares among its callers) is no attacker: cancellations later than
/// `premature_cancel_window` after their request began do not count toward
/// `max_cancelled_requests`, however many more than the completed requests they are.
/// With a zero window every cancellation comes too late to count (the window's edge is
/// tested on `Activity` itself, in paused time).
#[tokio::test]
async fn late_cancellations_do_not_end_the_connection() {
    const ROUNDS: u32 = 3;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (reached, mut arrivals) = tokio::sync::mpsc::unbounded_channel();
    // `/slow` never answers: the client's reset ends it. Anything else is answered.
    let app = tower::service_fn(move |req: Request<Incoming>| {
        let slow = req.uri().path() == "/slow";
        let _ = reached.send(());
        async move {
            if slow {
                std::future::pending::<()>().await;
            }
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
        }
    });
    let mut limits = ServerLimits::default();
    limits.premature_cancel_window = Duration::ZERO;
    let per_round = limits.max_cancelled_requests as u32;
    let server = MeshServer::builder()
        .plaintext()
        .limits(limits)
        .serve(listener, app)
        .unwrap();
    let mut raw = Raw::connect(server.local_addr()).await;
    let block = get_block("/slow", &[]);
    // Three times the bound, each request reset once it reached the application: with
    // the default window, the connection was shut down at the first bound and closed at
    // the second (`resets_of_accepted_streams_end_in_goaway`).
    for round in 0..ROUNDS {
        let ids: Vec<u32> = (0..per_round)
            .map(|i| 2 * (round * per_round + i) + 1)
            .collect();
        let opens: Vec<u8> = ids
            .iter()
            .flat_map(|&id| header_frames(id, &block, true))
            .collect();
        raw.tx.write_all(&opens).await.unwrap();
        for _ in 0..per_round {
            tokio::time::timeout(READ_TIMEOUT, arrivals.recv())
                .await
                .unwrap()
                .unwrap();
        }
        let resets: Vec<u8> = ids.iter().flat_map(|&id| rst_stream(id, CANCEL)).collect();
        raw.tx.write_all(&resets).await.unwrap();
    }
    // The same connection still takes new streams: no GOAWAY came before the answer.
    let next = 2 * ROUNDS * per_round + 1;
    raw.tx
        .write_all(&header_frames(next, &get_block("/ok", &[]), true))
        .await
        .unwrap();
    assert_eq!(raw.status(next).await, Ok(200));
    drop(raw);
    assert_eq!(server.shutdown().await.forced, 0);
}

/// `app` served in plaintext with its HTTP/2 streams run as `streams` says, and a raw
/// connection to it.
async fn serve_streams<S>(streams: StreamTasks, app: S) -> (Server, Raw)
where
    S: tower::Service<Request<Incoming>, Response = Response<Full<Bytes>>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = MeshServer::builder()
        .plaintext()
        .h2_streams(streams)
        .serve(listener, app)
        .unwrap();
    let raw = Raw::connect(server.local_addr()).await;
    (server, raw)
}

/// Either way streams run (`StreamTasks`), a handler that panics ends its own stream,
/// reset, while the streams beside it on the same connection, one waiting since before
/// the panic and one opened with it, are answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_resets_only_its_stream_in_the_connection_task() {
    panicking_handler_resets_only_its_stream(StreamTasks::InConnection).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_resets_only_its_stream_in_a_task_of_its_own() {
    panicking_handler_resets_only_its_stream(StreamTasks::Spawned).await;
}

async fn panicking_handler_resets_only_its_stream(streams: StreamTasks) {
    let release = Arc::new(tokio::sync::Notify::new());
    let waiting = release.clone();
    let app = tower::service_fn(move |req: Request<Incoming>| {
        let waiting = waiting.clone();
        async move {
            match req.uri().path() {
                "/panic" => panic!("scripted handler panic"),
                "/wait" => waiting.notified().await,
                _ => {}
            }
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
        }
    });
    let (server, mut raw) = serve_streams(streams, app).await;
    let requests = [
        header_frames(1, &get_block("/wait", &[]), true),
        header_frames(3, &get_block("/panic", &[]), true),
        header_frames(5, &get_block("/ok", &[]), true),
    ];
    raw.tx.write_all(&requests.concat()).await.unwrap();
    // Stream 5 is answered and stream 3 reset, in either order; stream 1 still waits.
    let (mut reset, mut answered) = (None, None);
    while reset.is_none() || answered.is_none() {
        let f = read_frame(&mut raw.rx)
            .await
            .expect("the connection closed");
        match (f.kind, f.stream) {
            (RST_STREAM, 3) => reset = Some(u32::from_be_bytes(f.payload[..4].try_into().unwrap())),
            (HEADERS, 5) => answered = status_of(&f.payload),
            (HEADERS | RST_STREAM, 1) | (GOAWAY, _) => panic!("unexpected {f:?}"),
            _ => {}
        }
    }
    assert_eq!(answered, Some(200));
    assert!(
        [CANCEL, 0x2].contains(&reset.unwrap()),
        "reset with CANCEL or INTERNAL_ERROR, got {reset:?}"
    );
    release.notify_one();
    assert_eq!(raw.status(1).await.unwrap(), 200);
    // The connection still takes new streams.
    raw.tx
        .write_all(&header_frames(7, &get_block("/ok", &[]), true))
        .await
        .unwrap();
    assert_eq!(raw.status(7).await.unwrap(), 200);
    drop(raw);
    assert_eq!(server.shutdown().await.forced, 0);
}

/// A value whose `Drop` panics.
struct PanicOnDrop;

impl Drop for PanicOnDrop {
    fn drop(&mut self) {
        panic!("scripted panic in drop");
    }
}

/// Sends on its channel when dropped.
struct SignalOnDrop(tokio::sync::mpsc::UnboundedSender<()>);

impl Drop for SignalOnDrop {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

/// Either way streams run, a connection that ends drops every handler still in flight,
/// even when one of them panics as it is dropped: none is leaked, and the server goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_panicking_when_dropped_leaks_no_sibling_in_the_connection_task() {
    handler_panicking_when_dropped_leaks_no_sibling(StreamTasks::InConnection).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_panicking_when_dropped_leaks_no_sibling_in_a_task_of_its_own() {
    handler_panicking_when_dropped_leaks_no_sibling(StreamTasks::Spawned).await;
}

async fn handler_panicking_when_dropped_leaks_no_sibling(streams: StreamTasks) {
    let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel::<()>();
    let (dropped_tx, mut dropped) = tokio::sync::mpsc::unbounded_channel::<()>();
    let app = tower::service_fn(move |req: Request<Incoming>| {
        let (started, dropped) = (started_tx.clone(), dropped_tx.clone());
        async move {
            match req.uri().path() {
                "/hold" => {
                    let _signal = SignalOnDrop(dropped);
                    let _ = started.send(());
                    std::future::pending::<()>().await;
                }
                "/panic-when-dropped" => {
                    let _guard = PanicOnDrop;
                    let _ = started.send(());
                    std::future::pending::<()>().await;
                }
                _ => {}
            }
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
        }
    });
    let (server, mut raw) = serve_streams(streams, app).await;
    let requests = [
        header_frames(1, &get_block("/hold", &[]), true),
        header_frames(3, &get_block("/panic-when-dropped", &[]), true),
        header_frames(5, &get_block("/hold", &[]), true),
    ];
    raw.tx.write_all(&requests.concat()).await.unwrap();
    for _ in 0..3 {
        tokio::time::timeout(READ_TIMEOUT, started.recv())
            .await
            .expect("a handler did not start")
            .unwrap();
    }
    // The client goes away: the connection ends, and its handlers are dropped.
    drop(raw);
    for _ in 0..2 {
        tokio::time::timeout(READ_TIMEOUT, dropped.recv())
            .await
            .expect("a handler beside the panicking one was never dropped")
            .unwrap();
    }
    // The server still serves.
    let mut raw = Raw::connect(server.local_addr()).await;
    raw.tx
        .write_all(&header_frames(1, &get_block("/ok", &[]), true))
        .await
        .unwrap();
    assert_eq!(raw.status(1).await.unwrap(), 200);
    drop(raw);
    assert_eq!(server.shutdown().await.forced, 0);
}

/// The tasks that run the handlers of 8 concurrent streams on one connection.
async fn handler_tasks(streams: StreamTasks) -> std::collections::HashSet<tokio::task::Id> {
    const N: usize = 8;
    let tasks = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    // Every handler waits for all N to have started: they are in flight together.
    let barrier = Arc::new(tokio::sync::Barrier::new(N));
    let (seen, wait) = (tasks.clone(), barrier.clone());
    let app = tower::service_fn(move |_req: Request<Incoming>| {
        let (seen, wait) = (seen.clone(), wait.clone());
        async move {
            seen.lock().unwrap().insert(tokio::task::id());
            wait.wait().await;
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
        }
    });
    let (server, mut raw) = serve_streams(streams, app).await;
    let ids: Vec<u32> = (0..N as u32).map(|i| 2 * i + 1).collect();
    let requests: Vec<u8> = ids
        .iter()
        .flat_map(|&id| header_frames(id, &get_block("/", &[]), true))
        .collect();
    raw.tx.write_all(&requests).await.unwrap();
    // Answers come in any order: read until each stream has its status.
    let mut statuses = std::collections::HashMap::new();
    while statuses.len() < N {
        let f = read_frame(&mut raw.rx)
            .await
            .expect("the connection closed");
        assert!(f.kind != RST_STREAM && f.kind != GOAWAY, "{f:?}");
        if f.kind == HEADERS {
            statuses.insert(f.stream, status_of(&f.payload));
        }
    }
    for id in ids {
        assert_eq!(statuses[&id], Some(200), "stream {id}");
    }
    drop(raw);
    assert_eq!(server.shutdown().await.forced, 0);
    tasks.lock().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_connection_streams_run_in_one_task_and_spawned_ones_each_in_their_own() {
    assert_eq!(handler_tasks(StreamTasks::InConnection).await.len(), 1);
    assert_eq!(handler_tasks(StreamTasks::Spawned).await.len(), 8);
}

/// A CONNECT request's header block with a `content-length`, which hyper refuses by
/// ending the whole connection: `:method CONNECT` and `:authority` as literals with
/// indexed names (2, 1), `content-length` (28).
fn connect_block_with_length() -> Vec<u8> {
    let mut out = Vec::new();
    hpack_int(&mut out, 0x00, 4, 2);
    hpack_str(&mut out, b"CONNECT");
    hpack_int(&mut out, 0x00, 4, 1);
    hpack_str(&mut out, b"x:443");
    hpack_int(&mut out, 0x00, 4, 28);
    hpack_str(&mut out, b"1");
    out
}

/// A request accepted in the same poll that ends its connection (here: a GET, then a
/// CONNECT hyper refuses by ending the connection) is dropped with the connection, in
/// either way streams run: its future is not kept alive by the queue it waited in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_accepted_as_the_connection_ends_are_dropped() {
    for streams in [StreamTasks::InConnection, StreamTasks::Spawned] {
        struct Guard(Arc<AtomicUsize>);
        impl Drop for Guard {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let dropped = Arc::new(AtomicUsize::new(0));
        let counter = dropped.clone();
        let app = tower::service_fn(move |_req: Request<Incoming>| {
            let guard = Guard(counter.clone());
            async move {
                std::future::pending::<()>().await;
                drop(guard);
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
            }
        });
        let (server, mut raw) = serve_streams(streams, app).await;
        let requests = [
            header_frames(1, &get_block("/", &[]), true),
            header_frames(3, &connect_block_with_length(), false),
        ];
        raw.tx.write_all(&requests.concat()).await.unwrap();
        read_to_close(&mut raw.rx).await;
        // The connection's task drops its streams just after the socket.
        for _ in 0..100 {
            if dropped.load(Ordering::SeqCst) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(dropped.load(Ordering::SeqCst), 1, "{streams:?}");
        assert_eq!(server.shutdown().await.forced, 0);
    }
}

/// An application that answers `/hold` only once `release` is notified (saying on
/// `arrived` that one came), anything else at once.
#[allow(clippy::type_complexity)]
fn holding_app() -> (
    impl tower::Service<
        Request<Incoming>,
        Response = Response<Full<Bytes>>,
        Error = Infallible,
        Future = impl Send,
    > + Clone
    + Send
    + 'static,
    Arc<tokio::sync::Notify>,
    Arc<tokio::sync::Notify>,
) {
    let release = Arc::new(tokio::sync::Notify::new());
    let arrived = Arc::new(tokio::sync::Notify::new());
    let (held, reached) = (release.clone(), arrived.clone());
    let app = tower::service_fn(move |req: Request<Incoming>| {
        let (held, reached) = (held.clone(), reached.clone());
        async move {
            if req.uri().path() == "/hold" {
                reached.notify_one();
                held.notified().await;
            }
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
        }
    });
    (app, release, arrived)
}

/// A GET of `path` on the service.
fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(format!("http://svc{path}"))
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// A server that allows few concurrent streams per connection (SETTINGS_MAX_CONCURRENT_STREAMS)
/// does not hold up a mesh client's requests behind long-lived ones: past the streams one
/// connection allows, the client opens another. (Before, they waited in h2's queue for a
/// stream to end: forever, behind watches and other long-lived streams.)
#[tokio::test]
async fn requests_past_a_connections_stream_limit_go_on_another_connection() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (app, release, _arrived) = holding_app();
    let mut limits = ServerLimits::default();
    limits.max_concurrent_streams = 2;
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = mesh_tower::metrics::server::ServerMetrics::register(&mut registry);
    let server = MeshServer::builder()
        .plaintext()
        .limits(limits)
        .metrics(metrics.listener("in"))
        .serve(listener, app)
        .unwrap();
    let client: EndpointClient<Full<Bytes>> = EndpointClient::new(
        server.local_addr(),
        ConnectSettings {
            protocol: Protocol::Http2,
            ..ConnectSettings::plaintext()
        },
    );
    // A first request opens the connection and learns its limit. (Requests sent
    // before the server's SETTINGS arrive go under the limit every client assumes until
    // then, 100: a server allowing fewer refuses them with REFUSED_STREAM.)
    let first = client.send(get("/quick")).await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    first.into_body().collect().await.unwrap();
    // Five long-lived requests: more than two connections' worth.
    let holds: Vec<_> = (0..5)
        .map(|_| {
            let client = client.clone();
            let req = get("/hold");
            tokio::spawn(async move { client.send(req).await.unwrap().status() })
        })
        .collect();
    let quick = tokio::time::timeout(READ_TIMEOUT, client.send(get("/quick")))
        .await
        .expect("a request waited behind long-lived ones")
        .unwrap();
    assert_eq!(quick.status(), StatusCode::OK);
    release.notify_waiters();
    for hold in holds {
        // Those not yet at the application when released are released again below.
        let status = tokio::time::timeout(READ_TIMEOUT, async {
            loop {
                release.notify_waiters();
                tokio::task::yield_now().await;
                if hold.is_finished() {
                    return hold.await.unwrap();
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap();
        assert_eq!(status, StatusCode::OK);
    }
    // The burst is over: the next request finds the first connection idle, and the
    // further ones, carrying nothing, are closed.
    let open = || {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("mesh_server_connections{listener=\"in\"} "))
            .map(|v| v.trim().parse::<f64>().unwrap())
    };
    assert!(open().unwrap() >= 3.0, "{:?}", open());
    drop(quick);
    let quick = client.send(get("/quick")).await.unwrap();
    quick.into_body().collect().await.unwrap();
    tokio::time::timeout(READ_TIMEOUT, async {
        while open() != Some(1.0) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the further connections stayed open");
}

/// A server refuses streams past its concurrency limit that a client sent before its
/// SETTINGS arrived (REFUSED_STREAM: not processed at all, RFC 9113 8.7). The retry layer
/// sends such requests again, whatever their method: a burst of POSTs on a fresh
/// connection to a server allowing one stream at a time all succeed, each processed once.
#[tokio::test]
async fn refused_streams_are_retried_whatever_the_method() {
    use mesh_tower::retry::{ReplayBody, RetryLayer};
    use tower::{Layer as _, ServiceExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let processed = Arc::new(AtomicUsize::new(0));
    let seen = processed.clone();
    let app = tower::service_fn(move |_req: Request<Incoming>| {
        seen.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok")))) }
    });
    let mut limits = ServerLimits::default();
    limits.max_concurrent_streams = 1;
    let server = MeshServer::builder()
        .plaintext()
        .limits(limits)
        .serve(listener, app)
        .unwrap();
    let endpoint: EndpointClient<ReplayBody> = EndpointClient::new(
        server.local_addr(),
        ConnectSettings {
            protocol: Protocol::Http2,
            ..ConnectSettings::plaintext()
        },
    );
    let client = RetryLayer::default().layer(tower::service_fn(move |req| {
        let endpoint = endpoint.clone();
        async move { endpoint.send(req).await }
    }));
    const BURST: usize = 8;
    let sends = (0..BURST).map(|i| {
        let client = client.clone();
        async move {
            let req = Request::post("http://svc/orders")
                .body(Full::new(Bytes::from(format!("order {i}"))))
                .unwrap();
            client.oneshot(req).await.map(|r| r.status())
        }
    });
    let results = tokio::time::timeout(READ_TIMEOUT, futures_util::future::join_all(sends))
        .await
        .unwrap();
    for result in results {
        assert_eq!(result.unwrap(), StatusCode::OK);
    }
    assert_eq!(processed.load(Ordering::SeqCst), BURST);
}

/// When every connection is at its server's stream limit and a further one cannot be made
/// (the server accepts no more, say), requests queue on the least busy connection instead
/// of failing, and the endpoint, which still serves, is not backed off.
#[tokio::test]
async fn a_further_connection_that_fails_leaves_requests_queued_on_the_working_one() {
    use mesh_tower::connect::Dialer;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (app, release, arrived) = holding_app();
    let mut limits = ServerLimits::default();
    limits.max_concurrent_streams = 1;
    let server = MeshServer::builder()
        .plaintext()
        .limits(limits)
        .serve(listener, app)
        .unwrap();
    // The first dial reaches the server; every later one is refused.
    let dials = Arc::new(AtomicUsize::new(0));
    let count = dials.clone();
    let dialer = Dialer::new(move |addr| {
        let first = count.fetch_add(1, Ordering::SeqCst) == 0;
        async move {
            if !first {
                return Err(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
            }
            TcpStream::connect(addr).await
        }
    });
    let client: EndpointClient<Full<Bytes>> = EndpointClient::new(
        server.local_addr(),
        ConnectSettings {
            protocol: Protocol::Http2,
            dialer: Some(dialer),
            ..ConnectSettings::plaintext()
        },
    );
    let first = client.send(get("/quick")).await.unwrap();
    first.into_body().collect().await.unwrap();
    let send = |path: &str| {
        let client = client.clone();
        let req = get(path);
        tokio::spawn(async move { client.send(req).await.map(|r| r.status()) })
    };
    let hold = send("/hold");
    tokio::time::timeout(READ_TIMEOUT, arrived.notified())
        .await
        .unwrap();
    // The connection's one stream is taken: the next request dials, fails, and queues.
    let queued = send("/quick");
    tokio::time::timeout(READ_TIMEOUT, async {
        while dials.load(Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("no further dial was tried");
    release.notify_one();
    for task in [hold, queued] {
        let status = tokio::time::timeout(READ_TIMEOUT, task)
            .await
            .expect("a request never went")
            .unwrap();
        assert_eq!(status.unwrap(), StatusCode::OK);
    }
    assert!(client.conn_state().is_ready(tokio::time::Instant::now()));
}
