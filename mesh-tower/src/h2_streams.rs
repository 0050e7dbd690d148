//! How many streams an HTTP/2 server lets a connection open at once, and the streams a
//! pool has open on each of its connections.
//!
//! A server says how many concurrent streams it allows in its `SETTINGS`
//! (`SETTINGS_MAX_CONCURRENT_STREAMS`, RFC 9113 6.5.2). hyper keeps that value to itself:
//! a client past it sees its requests queued behind the open ones (forever, behind
//! long-lived streams such as gRPC watches), or refused with `REFUSED_STREAM` when they
//! were sent before the server's `SETTINGS` arrived. So [`Sniff`] reads the server's
//! first frame, which RFC 9113 3.4 requires to be its `SETTINGS`, as the bytes pass (no
//! copy, no buffering: a byte at a time through a small state machine, only until that
//! frame ends; after it, reads pass straight through), and [`StreamLimit`] counts the
//! streams a pool opened on the connection against it. Until the frame arrives the limit
//! is the one the endpoint's other connections learned, or else 100, the least RFC 9113
//! recommends servers allow (and what h2 assumes); a `SETTINGS` without the setting means
//! no limit, and a first frame that is not the server's `SETTINGS` (another frame, an
//! acknowledgement, one h2 refuses as malformed) teaches nothing. Later `SETTINGS` that change the value are left to h2 (it queues, as
//! before).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The limit assumed until the server's `SETTINGS` say otherwise: the least RFC 9113
/// recommends a server allow.
pub(crate) const ASSUMED_MAX_STREAMS: usize = 100;

/// `SETTINGS` (RFC 9113 6.5).
const SETTINGS: u8 = 0x4;
/// The `ACK` flag of a `SETTINGS` frame (RFC 9113 6.5).
const ACK: u8 = 0x1;
/// `SETTINGS_MAX_CONCURRENT_STREAMS` (RFC 9113 6.5.2).
const MAX_CONCURRENT_STREAMS: u16 = 0x3;

/// The streams open on one HTTP/2 connection, and how many its server allows.
#[derive(Debug)]
pub(crate) struct StreamLimit {
    open: AtomicUsize,
    max: AtomicUsize,
    /// The server's certificate expired: no new stream goes on the connection.
    expired: std::sync::atomic::AtomicBool,
}

impl Default for StreamLimit {
    fn default() -> Self {
        Self::assuming(ASSUMED_MAX_STREAMS)
    }
}

impl StreamLimit {
    /// A limit of `max` until the server's `SETTINGS` say otherwise: what its other
    /// connections learned, say (a burst sent on a new connection before its `SETTINGS`
    /// came would otherwise be refused past a limit under 100).
    pub(crate) fn assuming(max: usize) -> Self {
        Self {
            open: AtomicUsize::new(0),
            max: AtomicUsize::new(max),
            expired: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Takes no new stream from now on.
    pub(crate) fn expire(&self) {
        self.expired.store(true, Ordering::Relaxed);
    }

    /// Whether [`expire`](Self::expire) was called.
    pub(crate) fn expired(&self) -> bool {
        self.expired.load(Ordering::Relaxed)
    }

    /// A stream, when the connection has room for one more.
    pub(crate) fn try_open(self: &Arc<Self>) -> Option<OpenStream> {
        let max = self.max.load(Ordering::Relaxed);
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |open| {
                (open < max).then_some(open + 1)
            })
            .ok()
            .map(|_| OpenStream(self.clone()))
    }

    /// A stream past the limit (every connection the pool may open is full: h2 queues it).
    pub(crate) fn open_anyway(self: &Arc<Self>) -> OpenStream {
        self.open.fetch_add(1, Ordering::AcqRel);
        OpenStream(self.clone())
    }

    /// Streams open now.
    pub(crate) fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// The server's limit (or the assumed one, until its `SETTINGS` came).
    pub(crate) fn max(&self) -> usize {
        self.max.load(Ordering::Relaxed)
    }
}

/// One stream counted against its connection's [`StreamLimit`] until dropped.
#[derive(Debug)]
pub(crate) struct OpenStream(Arc<StreamLimit>);

impl OpenStream {
    /// Its connection's limit.
    pub(crate) fn limit(&self) -> &Arc<StreamLimit> {
        &self.0
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Where [`Sniff`] is in the server's first frame.
#[derive(Debug)]
struct Parser {
    /// The frame header (9 bytes), then one setting (6 bytes) at a time.
    buf: [u8; 9],
    filled: usize,
    /// The payload's bytes still to come, once the header is read.
    payload: Option<usize>,
    /// `SETTINGS_MAX_CONCURRENT_STREAMS`, when the frame held it.
    max: Option<u32>,
}

/// What one byte did to the [`Parser`].
enum Step {
    More,
    /// The frame ended: the limit it sets (`None`: none).
    Done(Option<u32>),
    /// Not the server's `SETTINGS`: another frame, an acknowledgement, one on a stream, or
    /// one whose length is not a multiple of 6. h2 fails the connection for any but the
    /// acknowledgement (a server that acknowledges before it sends its own `SETTINGS`
    /// sends them next, unread here); the assumed limit stays.
    NotSettings,
}

impl Parser {
    fn new() -> Self {
        Self {
            buf: [0; 9],
            filled: 0,
            payload: None,
            max: None,
        }
    }

    fn byte(&mut self, b: u8) -> Step {
        self.buf[self.filled] = b;
        self.filled += 1;
        match self.payload {
            None => {
                if self.filled < 9 {
                    return Step::More;
                }
                let [l0, l1, l2, kind, flags, s0, s1, s2, s3] = self.buf;
                let len = usize::from(l0) << 16 | usize::from(l1) << 8 | usize::from(l2);
                // The stream identifier without its reserved bit (RFC 9113 4.1).
                let stream = u32::from_be_bytes([s0, s1, s2, s3]) & 0x7fff_ffff;
                if kind != SETTINGS || flags & ACK != 0 || stream != 0 || len % 6 != 0 {
                    return Step::NotSettings;
                }
                self.filled = 0;
                if len == 0 {
                    return Step::Done(None);
                }
                self.payload = Some(len);
                Step::More
            }
            Some(left) => {
                let left = left - 1;
                self.payload = Some(left);
                if self.filled == 6 {
                    self.filled = 0;
                    let [i0, i1, v0, v1, v2, v3, ..] = self.buf;
                    if u16::from_be_bytes([i0, i1]) == MAX_CONCURRENT_STREAMS {
                        self.max = Some(u32::from_be_bytes([v0, v1, v2, v3]));
                    }
                }
                if left == 0 {
                    return Step::Done(self.max);
                }
                Step::More
            }
        }
    }
}

/// A client's byte stream to an HTTP/2 server that reads the limit in the server's first
/// `SETTINGS` into its [`StreamLimit`] (see the [module docs](self)). Without a limit to
/// learn (HTTP/1.1) it only passes bytes through.
#[derive(Debug)]
pub(crate) struct Sniff<T> {
    inner: T,
    learning: Option<(Box<Parser>, Arc<StreamLimit>)>,
}

impl<T> Sniff<T> {
    /// `inner`, passed through.
    pub(crate) fn plain(inner: T) -> Self {
        Self {
            inner,
            learning: None,
        }
    }

    /// `inner`, whose server's first `SETTINGS` set `limit`.
    pub(crate) fn learning(inner: T, limit: Arc<StreamLimit>) -> Self {
        Self {
            inner,
            learning: Some((Box::new(Parser::new()), limit)),
        }
    }

    /// Feeds the bytes just read to the parser.
    #[cold]
    fn learn(&mut self, read: &[u8]) {
        let Some((parser, limit)) = &mut self.learning else {
            return;
        };
        for &b in read {
            match parser.byte(b) {
                Step::More => continue,
                Step::Done(max) => {
                    // Zero (no stream for now) counts as one: a pool that took it at its
                    // word would dial a connection per request.
                    let max = max.map_or(usize::MAX, |m| {
                        usize::try_from(m).unwrap_or(usize::MAX).max(1)
                    });
                    limit.max.store(max, Ordering::Relaxed);
                    tracing::trace!(max, "the server's SETTINGS_MAX_CONCURRENT_STREAMS");
                }
                Step::NotSettings => {}
            }
            self.learning = None;
            return;
        }
    }
}

/// The limit a [`StreamLimit`] assuming `assumed` holds once its connection's server sent
/// `reads`, read in those pieces as [`Sniff`] reads them.
///
/// Exposed for the fuzz targets in `fuzz/`; not a stable API.
#[doc(hidden)]
pub fn sniffed_max_streams<'a>(assumed: usize, reads: impl IntoIterator<Item = &'a [u8]>) -> usize {
    let limit = Arc::new(StreamLimit::assuming(assumed));
    let mut sniff = Sniff::learning((), limit.clone());
    for read in reads {
        sniff.learn(read);
    }
    limit.max()
}

impl<T: AsyncRead + Unpin> AsyncRead for Sniff<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // Passed straight through once learned (and on HTTP/1.1, which learns nothing).
        if self.learning.is_none() {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(read, Poll::Ready(Ok(()))) {
            self.learn(&buf.filled()[before..]);
        }
        read
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Sniff<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(entries: &[(u16, u32)]) -> Vec<u8> {
        let len = entries.len() * 6;
        let mut out = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            SETTINGS,
            0,
            0,
            0,
            0,
            0,
        ];
        for (id, value) in entries {
            out.extend_from_slice(&id.to_be_bytes());
            out.extend_from_slice(&value.to_be_bytes());
        }
        out
    }

    /// Feeds `bytes` in pieces of `step` and returns the limit learned.
    async fn learned(bytes: &[u8], step: usize) -> usize {
        let limit = Arc::new(StreamLimit::default());
        let (mut near, far) = tokio::io::duplex(1 << 16);
        let mut sniff = Sniff::learning(far, limit.clone());
        for piece in bytes.chunks(step) {
            tokio::io::AsyncWriteExt::write_all(&mut near, piece)
                .await
                .unwrap();
            let mut buf = vec![0; piece.len()];
            tokio::io::AsyncReadExt::read_exact(&mut sniff, &mut buf)
                .await
                .unwrap();
            // Passed through untouched.
            assert_eq!(buf, piece);
        }
        limit.max()
    }

    #[tokio::test]
    async fn the_first_settings_frame_sets_the_limit_in_any_split() {
        let mut bytes = settings(&[(0x4, 65_535), (MAX_CONCURRENT_STREAMS, 7), (0x6, 16_384)]);
        // What follows the frame is not read for the limit.
        bytes.extend(settings(&[(MAX_CONCURRENT_STREAMS, 1)]));
        for step in [1, 2, 5, 9, 10, bytes.len()] {
            assert_eq!(learned(&bytes, step).await, 7, "step {step}");
        }
        // The last value a frame gives wins.
        let bytes = settings(&[(MAX_CONCURRENT_STREAMS, 3), (MAX_CONCURRENT_STREAMS, 9)]);
        assert_eq!(learned(&bytes, 4).await, 9);
    }

    #[tokio::test]
    async fn without_the_setting_there_is_no_limit_and_other_frames_teach_nothing() {
        assert_eq!(learned(&settings(&[]), 3).await, usize::MAX);
        assert_eq!(learned(&settings(&[(0x4, 1)]), 3).await, usize::MAX);
        // Not SETTINGS (a GOAWAY): the assumed limit stays.
        let goaway = [0, 0, 8, 0x7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        assert_eq!(learned(&goaway, 4).await, ASSUMED_MAX_STREAMS);
        // Zero counts as one.
        assert_eq!(
            learned(&settings(&[(MAX_CONCURRENT_STREAMS, 0)]), 6).await,
            1
        );
        // Nothing at all, or a cut header: the assumed limit stays.
        assert_eq!(learned(&[0, 0], 1).await, ASSUMED_MAX_STREAMS);
    }

    /// Only the server's own `SETTINGS` teach a limit: not an acknowledgement (which says
    /// nothing of the server's settings), nor a frame h2 refuses (on a stream, or of a
    /// length that is no whole number of settings).
    #[tokio::test]
    async fn acknowledgements_and_malformed_settings_teach_nothing() {
        let good = settings(&[(MAX_CONCURRENT_STREAMS, 7)]);
        assert_eq!(learned(&good, 5).await, 7);
        // The reserved bit of the stream identifier is not the stream's.
        let mut reserved = good.clone();
        reserved[5] = 0x80;
        assert_eq!(learned(&reserved, 5).await, 7);

        let mut ack = settings(&[]);
        ack[4] = ACK;
        ack.extend(&good);
        assert_eq!(learned(&ack, 5).await, ASSUMED_MAX_STREAMS);
        let mut on_a_stream = good.clone();
        on_a_stream[8] = 1;
        assert_eq!(learned(&on_a_stream, 5).await, ASSUMED_MAX_STREAMS);
        let mut ragged = good.clone();
        ragged[2] += 1;
        ragged.push(0);
        assert_eq!(learned(&ragged, 5).await, ASSUMED_MAX_STREAMS);
        assert_eq!(
            sniffed_max_streams(3, [&ragged[..4], &ragged[4..]]),
            3,
            "the assumed limit stays"
        );
        assert_eq!(sniffed_max_streams(3, [&good[..4], &[][..], &good[4..]]), 7);
    }

    #[test]
    fn streams_count_against_the_limit_until_dropped() {
        let limit = Arc::new(StreamLimit::default());
        limit.max.store(2, Ordering::Relaxed);
        let a = limit.try_open().unwrap();
        let _b = limit.try_open().unwrap();
        assert!(limit.try_open().is_none());
        let c = limit.open_anyway();
        assert_eq!(limit.open(), 3);
        drop((a, c));
        assert_eq!(limit.open(), 1);
        assert!(limit.try_open().is_some());
    }
}
