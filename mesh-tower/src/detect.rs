//! Protocol detection for outbound listeners: HTTP/2, HTTP/1.x, or opaque TCP.
//!
//! [`detect`] looks at the first bytes a client sends with [`TcpStream::peek`], so nothing
//! is consumed: whatever it decides, the connection is then served from its first byte
//! (by an HTTP server, or relayed as it is by [`opaque`](crate::opaque)).
//!
//! - [`Detected::Http2`]: the bytes are the HTTP/2 prior-knowledge connection preface,
//!   `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n` (RFC 9113 §3.4), all 24 of them.
//! - [`Detected::Http1`]: the bytes begin an HTTP/1.x request line: a method of 1 to
//!   [`MAX_METHOD_LEN`] characters, each an upper-case ASCII letter, `-` or `_` (every
//!   registered method, `VERSION-CONTROL` included), then a space. The token grammar of
//!   RFC 9110 allows more, but a method outside this set is vanishingly rare and a false
//!   positive costs more than a false negative: a non-HTTP stream taken for HTTP is
//!   broken by the HTTP parser, while an HTTP stream taken for opaque is still relayed
//!   intact, only without the HTTP layers.
//! - [`Detected::Opaque`]: anything else, the client closing or failing before a
//!   decision after it sent something, or **nothing within the peek timeout**.
//! - [`Detected::Closed`]: the client closed (or the connection failed) before sending
//!   a byte: a TCP health check, a port scan. There is nothing to serve, and nothing to
//!   open a connection across the mesh for.
//!
//! The bytes may arrive in pieces (a preface split across segments, a method written a
//! byte at a time): while what has arrived is still a prefix of an answer, `detect`
//! waits for more, peeking again after a short pause (1 ms, doubling up to 25 ms: a peek
//! at bytes already buffered returns at once, so it must not be repeated in a tight
//! loop), until it can decide or the peek timeout ends.
//!
//! # The peek timeout
//!
//! [`DEFAULT_PEEK_TIMEOUT`] is 1 s. In *server-speaks-first* protocols (SMTP, MySQL,
//! FTP, many databases and brokers) the client sends nothing until the server greets it,
//! and the server is only reached once detection has given up: every such connection
//! through an outbound listener with detection waits the whole timeout before its
//! greeting. The timeout is therefore a trade-off between that delay and the risk of
//! calling an HTTP client opaque because its first bytes were slow; an HTTP client writes
//! its request as soon as it has connected, so one second is ample even on a loaded host,
//! and a one-second greeting delay stays far inside these protocols' own connect
//! timeouts (MySQL's default is 10 s). Linkerd waits 10 s; we prefer the shorter delay.
//! Ports known to carry server-first protocols should skip detection altogether and be
//! configured as opaque.
//!
//! ```no_run
//! use mesh_tower::detect::{DEFAULT_PEEK_TIMEOUT, Detected, detect};
//!
//! # async fn run(listener: tokio::net::TcpListener) -> std::io::Result<()> {
//! let (stream, _) = listener.accept().await?;
//! match detect(&stream, DEFAULT_PEEK_TIMEOUT).await {
//!     Detected::Http2 | Detected::Http1 => { /* serve HTTP on `stream` */ }
//!     _ => { /* relay `stream` as opaque TCP */ }
//! }
//! # Ok(()) }
//! ```

use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

/// The default bound on waiting for a client's first bytes; see the
/// [module docs](self#the-peek-timeout) for why it is 1 s.
pub const DEFAULT_PEEK_TIMEOUT: Duration = Duration::from_secs(1);

/// The HTTP/2 prior-knowledge connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The longest HTTP/1.x method taken for one (`UPDATEREDIRECTREF`, the longest
/// registered method, has 17 characters).
pub const MAX_METHOD_LEN: usize = 20;

/// The first pause between peeks while undecided, and the longest.
const FIRST_PAUSE: Duration = Duration::from_millis(1);
const MAX_PAUSE: Duration = Duration::from_millis(25);

/// What a client speaks, as far as its first bytes tell; see the [module docs](self).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Detected {
    /// HTTP/2 with prior knowledge: the connection preface.
    Http2,
    /// An HTTP/1.x request line.
    Http1,
    /// Anything else, or nothing in time.
    Opaque,
    /// The client closed, or the connection failed, before it sent anything.
    Closed,
}

/// Decides what `stream`'s client speaks from its first bytes, waiting at most
/// `peek_timeout` for them, without consuming any; see the [module docs](self).
pub async fn detect(stream: &TcpStream, peek_timeout: Duration) -> Detected {
    let deadline = Instant::now() + peek_timeout;
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut seen = 0;
    let mut pause = FIRST_PAUSE;
    loop {
        let peeked = tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await;
        let n = match peeked {
            Err(_) => {
                tracing::debug!(
                    ?peek_timeout,
                    bytes = seen,
                    "nothing decisive within the peek timeout: opaque"
                );
                return Detected::Opaque;
            }
            Ok(Err(error)) if seen == 0 => {
                tracing::debug!(%error, "peeking failed before any byte: closed");
                return Detected::Closed;
            }
            Ok(Err(error)) => {
                tracing::debug!(%error, "peeking failed: opaque");
                return Detected::Opaque;
            }
            // The client closed its side without a word.
            Ok(Ok(0)) => return Detected::Closed,
            Ok(Ok(n)) => n,
        };
        let Some(bytes) = buf.get(..n) else {
            // `peek` never reports more than the buffer holds.
            return Detected::Opaque;
        };
        if let Some(detected) = classify(bytes) {
            return detected;
        }
        if n == buf.len() {
            // Unreachable: a full buffer always decides. Kept as a bound on the loop.
            return Detected::Opaque;
        }
        if n == seen {
            // No new bytes since the last peek: wait before looking again.
            if Instant::now() >= deadline {
                // (A peek at buffered bytes is ready at once, so the timeout around it
                // would never fire.)
                tracing::debug!(
                    ?peek_timeout,
                    bytes = seen,
                    "nothing decisive within the peek timeout: opaque"
                );
                return Detected::Opaque;
            }
            let wake = (Instant::now() + pause).min(deadline);
            tokio::time::sleep_until(wake).await;
            pause = (pause * 2).min(MAX_PAUSE);
        } else {
            seen = n;
        }
    }
}

/// The decision on the first bytes of a stream, or `None` while they are a prefix of
/// both an answer and something else (more bytes are needed).
pub fn classify(bytes: &[u8]) -> Option<Detected> {
    if bytes.is_empty() {
        return None;
    }
    if bytes.len() >= H2_PREFACE.len() {
        if bytes.starts_with(H2_PREFACE) {
            return Some(Detected::Http2);
        }
    } else if H2_PREFACE.starts_with(bytes) {
        // `PRI ` also looks like a request line: wait for the whole preface.
        return None;
    }
    for (i, &b) in bytes.iter().enumerate() {
        if b == b' ' {
            return Some(if i == 0 {
                Detected::Opaque
            } else {
                Detected::Http1
            });
        }
        if i >= MAX_METHOD_LEN || !(b.is_ascii_uppercase() || b == b'-' || b == b'_') {
            return Some(Detected::Opaque);
        }
    }
    None
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    #[test]
    fn classify_decides_on_as_few_bytes_as_it_can() {
        assert_eq!(classify(H2_PREFACE), Some(Detected::Http2));
        let mut more = H2_PREFACE.to_vec();
        more.extend_from_slice(b"\0\0\x12\x04");
        assert_eq!(classify(&more), Some(Detected::Http2));
        for n in 1..H2_PREFACE.len() {
            assert_eq!(classify(&H2_PREFACE[..n]), None, "{n} bytes of the preface");
        }
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(classify(b"GET "), Some(Detected::Http1));
        assert_eq!(classify(b"VERSION-CONTROL /"), Some(Detected::Http1));
        assert_eq!(classify(b"M-SEARCH * HTTP/1.1"), Some(Detected::Http1));
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b""), None);
        // Diverges from the preface: a request line with method PRI.
        assert_eq!(classify(b"PRI * HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(classify(b"PRX"), None);
        // TLS, lower case, a leading space, an overlong method, binary.
        assert_eq!(classify(b"\x16\x03\x01\x02\x00"), Some(Detected::Opaque));
        assert_eq!(classify(b"get / HTTP/1.1"), Some(Detected::Opaque));
        assert_eq!(classify(b" GET"), Some(Detected::Opaque));
        assert_eq!(
            classify(&[b'A'; MAX_METHOD_LEN + 1]),
            Some(Detected::Opaque)
        );
        assert_eq!(classify(&[b'A'; MAX_METHOD_LEN]), None);
        let mut longest = vec![b'A'; MAX_METHOD_LEN];
        longest.push(b' ');
        assert_eq!(classify(&longest), Some(Detected::Http1));
        assert_eq!(classify(b"EHLO\r\n"), Some(Detected::Opaque));
        assert_eq!(classify(b"\0\0\0\x01"), Some(Detected::Opaque));
    }

    /// A connected pair: the client's stream and the accepted one.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    /// Writes `pieces` with a pause before each but the first, then keeps the stream
    /// open until the test ends.
    fn send_in_pieces(mut client: TcpStream, pieces: Vec<&'static [u8]>, pause: Duration) {
        tokio::spawn(async move {
            for (i, piece) in pieces.into_iter().enumerate() {
                if i > 0 {
                    tokio::time::sleep(pause).await;
                }
                client.write_all(piece).await.unwrap();
            }
            std::future::pending::<()>().await;
        });
    }

    async fn nothing_consumed(server: &TcpStream, want: &[u8]) {
        let mut buf = vec![0u8; want.len()];
        let mut got = 0;
        while got < want.len() {
            got = server.peek(&mut buf).await.unwrap();
        }
        assert_eq!(buf, want, "the detected bytes are still there to read");
    }

    #[tokio::test]
    async fn http2_preface_and_http1_request_lines() {
        let (client, server) = pair().await;
        send_in_pieces(client, vec![H2_PREFACE], Duration::ZERO);
        assert_eq!(detect(&server, DEFAULT_PEEK_TIMEOUT).await, Detected::Http2);
        nothing_consumed(&server, H2_PREFACE).await;

        let (client, server) = pair().await;
        send_in_pieces(client, vec![b"POST /users HTTP/1.1\r\n"], Duration::ZERO);
        assert_eq!(detect(&server, DEFAULT_PEEK_TIMEOUT).await, Detected::Http1);
        nothing_consumed(&server, b"POST /users HTTP/1.1\r\n").await;
    }

    #[tokio::test]
    async fn a_preface_in_pieces_is_waited_for() {
        let (client, server) = pair().await;
        send_in_pieces(
            client,
            vec![&H2_PREFACE[..3], &H2_PREFACE[3..10], &H2_PREFACE[10..]],
            Duration::from_millis(30),
        );
        assert_eq!(detect(&server, DEFAULT_PEEK_TIMEOUT).await, Detected::Http2);

        let (client, server) = pair().await;
        send_in_pieces(client, vec![b"DEL", b"ETE /x"], Duration::from_millis(30));
        assert_eq!(detect(&server, DEFAULT_PEEK_TIMEOUT).await, Detected::Http1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_preface_in_pieces_with_paused_time() {
        let (client, server) = pair().await;
        send_in_pieces(
            client,
            vec![&H2_PREFACE[..16], &H2_PREFACE[16..]],
            Duration::from_millis(300),
        );
        assert_eq!(detect(&server, DEFAULT_PEEK_TIMEOUT).await, Detected::Http2);
    }

    #[tokio::test]
    async fn anything_else_is_opaque() {
        for first in [
            &b"\x16\x03\x01\x00\xa5\x01"[..],
            b"get / HTTP/1.1\r\n",
            b"\0\0\0\x08",
        ] {
            let (client, server) = pair().await;
            send_in_pieces(client, vec![first], Duration::ZERO);
            assert_eq!(
                detect(&server, DEFAULT_PEEK_TIMEOUT).await,
                Detected::Opaque,
                "{first:?}"
            );
            nothing_consumed(&server, first).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_opaque_at_the_peek_timeout() {
        let (_client, server) = pair().await;
        let start = Instant::now();
        assert_eq!(
            detect(&server, DEFAULT_PEEK_TIMEOUT).await,
            Detected::Opaque
        );
        assert_eq!(start.elapsed(), DEFAULT_PEEK_TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_partial_preface_then_silence_is_opaque_at_the_peek_timeout() {
        let (client, server) = pair().await;
        send_in_pieces(client, vec![&H2_PREFACE[..5]], Duration::ZERO);
        let start = Instant::now();
        assert_eq!(
            detect(&server, DEFAULT_PEEK_TIMEOUT).await,
            Detected::Opaque
        );
        assert!(start.elapsed() <= DEFAULT_PEEK_TIMEOUT + Duration::from_millis(1));
    }

    /// A client that closes without a word is `Closed`, at once; one that said something
    /// undecided first is opaque, its bytes relayed (at the peek timeout: a peek cannot
    /// see the close behind buffered bytes).
    #[tokio::test]
    async fn a_client_that_closes_first_is_closed_or_opaque() {
        let (mut client, server) = pair().await;
        client.shutdown().await.unwrap();
        let start = Instant::now();
        assert_eq!(
            detect(&server, DEFAULT_PEEK_TIMEOUT).await,
            Detected::Closed
        );
        assert!(start.elapsed() < DEFAULT_PEEK_TIMEOUT, "at once");
        let (mut client, server) = pair().await;
        client.write_all(b"GE").await.unwrap();
        client.shutdown().await.unwrap();
        assert_eq!(
            detect(&server, Duration::from_millis(100)).await,
            Detected::Opaque
        );
    }
}
