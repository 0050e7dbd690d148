//! Request bodies that can be replayed on retry.
//!
//! **Collected.** Before the first try, a request body whose size is known to be within
//! the cap (default 64 KiB) — its size hint has an upper bound that fits, as with a
//! complete body or a `Content-Length` — is collected and sent again, byte for byte, on
//! every retry. One that turns out to carry trailers is streamed once instead.
//!
//! **Teed.** A body of unknown size (a stream: chunked HTTP/1.1, every tonic call) is
//! sent as it comes, never read ahead — holding a stream back could deadlock a peer that
//! answers before the stream ends (bidirectional gRPC) — and every frame sent is kept
//! too, while they fit in the cap (their bytes, or if more, their bookkeeping: about a
//! hundred bytes a frame past the first). A retry replays the kept frames, then goes on
//! reading the stream where the last try left it. Once the frames sent exceed the cap, they are
//! dropped and the request is no longer replayable: gRPC's A6 calls this *committing*
//! the call. Each retry supersedes the try before: if that try's body is still being
//! polled (hyper may hold it in a task), it ends with an error and never reads the
//! stream again, so one stream is read by one try at a time.
//!
//! **Once.** A body known to be larger than the cap, or any body when the policy never
//! retries, is sent once as it comes.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use mesh_core::error::BoxError;

/// The body of a request as [`Retry`](super::Retry) sends it to the service below: a
/// complete (replayable) body, or the caller's body streamed once.
#[derive(Debug)]
pub struct ReplayBody(Kind);

#[derive(Debug)]
enum Kind {
    /// A complete body (replayable).
    Full(Option<Bytes>),
    /// Frames already read, then the rest of a body larger than the cap.
    Streaming {
        prefix: VecDeque<Frame<Bytes>>,
        rest: Option<UnsyncBoxBody<Bytes, BoxError>>,
    },
    /// One try's reader of a teed stream.
    Tee(TeeReader),
}

/// A stream shared by the tries of one request: the frames sent so far (within the cap)
/// and the rest of the stream.
pub(crate) struct Tee {
    /// `None` once the stream ended or failed.
    source: Option<UnsyncBoxBody<Bytes, BoxError>>,
    /// The frames read so far, while they fit in the cap.
    kept: Vec<Kept>,
    kept_len: usize,
    cap: usize,
    /// More than the cap was sent, or the stream failed: no replay.
    committed: bool,
    /// The try whose reader may read: earlier readers are superseded.
    generation: u64,
}

impl std::fmt::Debug for Tee {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tee")
            .field("kept", &self.kept_len)
            .field("committed", &self.committed)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// A kept frame (a `Frame` is not `Clone`).
#[derive(Clone, Debug)]
enum Kept {
    Data(Bytes),
    Trailers(http::HeaderMap),
}

/// What keeping a frame costs besides its bytes: without counting it, a body of one-byte
/// frames would keep about a hundred times the replay cap in memory.
const FRAME_COST: usize = std::mem::size_of::<Kept>();

/// What keeping `frames` frames of `bytes` bytes in all counts against the replay cap:
/// their bytes, or their bookkeeping past the first frame if that is more. A body of many
/// tiny frames passes the cap long before its bytes do, while one at the cap in a few
/// frames stays within it.
fn kept_cost(bytes: usize, frames: usize) -> usize {
    bytes.max(frames.saturating_sub(1).saturating_mul(FRAME_COST))
}

impl Kept {
    fn frame(&self) -> Frame<Bytes> {
        match self {
            Kept::Data(b) => Frame::data(b.clone()),
            Kept::Trailers(t) => Frame::trailers(t.clone()),
        }
    }
}

/// One try's view of a [`Tee`]: the kept frames from `pos`, then the stream.
#[derive(Debug)]
struct TeeReader {
    tee: Arc<Mutex<Tee>>,
    generation: u64,
    pos: usize,
    done: bool,
}

impl TeeReader {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let Ok(mut tee) = self.tee.lock() else {
            return Poll::Ready(Some(Err("request body lost (a try panicked)".into())));
        };
        if tee.generation != self.generation {
            self.done = true;
            return Poll::Ready(Some(Err("request body superseded by a retry".into())));
        }
        if !tee.committed
            && let Some(kept) = tee.kept.get(self.pos)
        {
            self.pos += 1;
            return Poll::Ready(Some(Ok(kept.frame())));
        }
        let Some(source) = tee.source.as_mut() else {
            self.done = true;
            return Poll::Ready(None);
        };
        match Pin::new(source).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                tee.source = None;
                self.done = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                tee.source = None;
                tee.committed = true;
                tee.kept = Vec::new();
                self.done = true;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(Some(Ok(frame))) => {
                if !tee.committed {
                    let size = frame.data_ref().map_or(0, |d| d.len());
                    if kept_cost(tee.kept_len + size, tee.kept.len() + 1) > tee.cap {
                        // Past the cap: this try is the last; free what was kept.
                        tee.committed = true;
                        tee.kept = Vec::new();
                    } else {
                        tee.kept_len += size;
                        let kept = match frame.data_ref() {
                            Some(d) => Kept::Data(d.clone()),
                            None => match frame.trailers_ref() {
                                Some(t) => Kept::Trailers(t.clone()),
                                None => Kept::Data(Bytes::new()),
                            },
                        };
                        tee.kept.push(kept);
                        self.pos += 1;
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
            || self.tee.lock().is_ok_and(|tee| {
                tee.generation == self.generation
                    && tee.source.is_none()
                    && (tee.committed || self.pos >= tee.kept.len())
            })
    }
}

impl ReplayBody {
    /// An empty body.
    pub fn empty() -> Self {
        Self(Kind::Full(None))
    }

    /// A complete body.
    pub fn full(bytes: Bytes) -> Self {
        Self(Kind::Full((!bytes.is_empty()).then_some(bytes)))
    }
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.0 {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Streaming { prefix, rest } => {
                if let Some(frame) = prefix.pop_front() {
                    return Poll::Ready(Some(Ok(frame)));
                }
                match rest {
                    Some(body) => Pin::new(body).poll_frame(cx),
                    None => Poll::Ready(None),
                }
            }
            Kind::Tee(reader) => reader.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Kind::Full(bytes) => bytes.is_none(),
            Kind::Streaming { prefix, rest } => {
                prefix.is_empty() && rest.as_ref().is_none_or(|b| b.is_end_stream())
            }
            Kind::Tee(reader) => reader.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Kind::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Streaming { .. } | Kind::Tee(_) => SizeHint::default(),
        }
    }
}

/// A request body made ready for sending: replayable, or for one try only.
#[derive(Debug)]
pub(crate) enum Prepared {
    /// Buffered within the cap: every try gets a copy.
    Replayable(Bytes),
    /// Too large (or with trailers): the first try takes it.
    Once(Option<ReplayBody>),
    /// A stream of unknown size, kept while it fits in the cap.
    Tee(Arc<Mutex<Tee>>),
}

impl Prepared {
    /// The body for the next try, or `None` if it was already sent and cannot be replayed.
    pub(crate) fn next(&mut self) -> Option<ReplayBody> {
        match self {
            Prepared::Replayable(bytes) => Some(ReplayBody::full(bytes.clone())),
            Prepared::Once(body) => body.take(),
            Prepared::Tee(tee) => {
                let mut shared = tee.lock().ok()?;
                if shared.committed {
                    return None;
                }
                shared.generation += 1;
                Some(ReplayBody(Kind::Tee(TeeReader {
                    tee: tee.clone(),
                    generation: shared.generation,
                    pos: 0,
                    done: false,
                })))
            }
        }
    }

    /// Whether further tries can get a body.
    pub(crate) fn is_replayable(&self) -> bool {
        match self {
            Prepared::Replayable(_) => true,
            Prepared::Once(_) => false,
            Prepared::Tee(tee) => tee.lock().is_ok_and(|t| !t.committed),
        }
    }
}

/// Streams `body` without buffering it: sent once, never retried.
pub(crate) fn once<B>(body: B) -> Prepared
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    Prepared::Once(Some(ReplayBody(Kind::Streaming {
        prefix: VecDeque::new(),
        rest: Some(body.map_err(Into::into).boxed_unsync()),
    })))
}

/// How a body is made ready: at once, or by collecting it.
pub(crate) enum Start {
    /// Ready as it is.
    Done(Prepared),
    /// To be collected first.
    Collect(Collect),
}

/// Decides how `body` is prepared for a request that may be retried: a body whose size is
/// known to be within `cap` bytes is collected, one of unknown size is teed, one known to
/// be larger is sent once (see the module docs).
pub(crate) fn start<B>(body: B, cap: usize) -> Start
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    if body.is_end_stream() {
        return Start::Done(Prepared::Replayable(Bytes::new()));
    }
    let hint = body.size_hint();
    match hint.upper() {
        Some(upper) if upper > cap as u64 => return Start::Done(once(body)),
        Some(_) => {}
        None if hint.lower() > cap as u64 => return Start::Done(once(body)),
        None => {
            return Start::Done(Prepared::Tee(Arc::new(Mutex::new(Tee {
                source: Some(body.map_err(Into::into).boxed_unsync()),
                kept: Vec::new(),
                kept_len: 0,
                cap,
                committed: false,
                generation: 0,
            }))));
        }
    }
    Start::Collect(Collect {
        body: Some(body.map_err(Into::into).boxed_unsync()),
        buf: BytesMut::new(),
        frames: VecDeque::new(),
        cap,
    })
}

/// A body being collected for replay.
pub(crate) struct Collect {
    body: Option<UnsyncBoxBody<Bytes, BoxError>>,
    buf: BytesMut,
    frames: VecDeque<Frame<Bytes>>,
    cap: usize,
}

impl std::fmt::Debug for Collect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Collect")
            .field("buffered", &self.buf.len())
            .finish_non_exhaustive()
    }
}

impl Collect {
    /// Reads frames until the body ends (replayable), or turns out larger than the cap or
    /// to carry trailers (streamed once: what was read, then the rest).
    pub(crate) fn poll_collect(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Prepared, BoxError>> {
        loop {
            let Some(body) = self.body.as_mut() else {
                return Poll::Ready(Err("request body already collected".into()));
            };
            match std::task::ready!(Pin::new(body).poll_frame(cx)) {
                None => {
                    let bytes = std::mem::take(&mut self.buf).freeze();
                    self.body = None;
                    return Poll::Ready(Ok(Prepared::Replayable(bytes)));
                }
                Some(Err(e)) => {
                    self.body = None;
                    return Poll::Ready(Err(e));
                }
                Some(Ok(frame)) => {
                    let trailers = frame.is_trailers();
                    if let Some(data) = frame.data_ref() {
                        self.buf.extend_from_slice(data.chunk());
                    }
                    self.frames.push_back(frame);
                    // The frames are kept too, until the body is known to fit: a body
                    // of many tiny frames is streamed once.
                    if kept_cost(self.buf.len(), self.frames.len()) > self.cap || trailers {
                        // Too large, or trailers we would not replay: stream what we have,
                        // then the rest, once.
                        return Poll::Ready(Ok(Prepared::Once(Some(ReplayBody(
                            Kind::Streaming {
                                prefix: std::mem::take(&mut self.frames),
                                rest: self.body.take(),
                            },
                        )))));
                    }
                }
            }
        }
    }
}

/// Buffers `body` if its size is known to be within `cap` bytes (see the module docs).
#[cfg(test)]
pub(crate) async fn prepare<B>(body: B, cap: usize) -> Result<Prepared, BoxError>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    match start(body, cap) {
        Start::Done(p) => Ok(p),
        Start::Collect(mut c) => std::future::poll_fn(|cx| c.poll_collect(cx)).await,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use http_body_util::{Full, StreamBody};

    async fn bytes_of(body: ReplayBody) -> Bytes {
        body.collect().await.unwrap().to_bytes()
    }

    type Frames = futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, BoxError>>>;

    fn chunked(chunks: Vec<&'static [u8]>) -> StreamBody<Frames> {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = chunks
            .into_iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c))))
            .collect();
        StreamBody::new(futures_util::stream::iter(frames))
    }

    #[tokio::test]
    async fn small_bodies_replay_byte_for_byte() {
        let mut p = prepare(Full::new(Bytes::from_static(b"hello")), 64)
            .await
            .unwrap();
        assert!(p.is_replayable());
        assert_eq!(bytes_of(p.next().unwrap()).await, "hello");
        assert_eq!(bytes_of(p.next().unwrap()).await, "hello");
    }

    #[tokio::test]
    async fn streams_of_unknown_size_are_not_read_ahead() {
        // A stream that has sent one frame and waits: preparing it must not block.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
        tx.send(Ok(Frame::data(Bytes::from_static(b"first"))))
            .await
            .unwrap();
        let stream =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|f| (f, rx)) },
            );
        let mut p = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            prepare(StreamBody::new(stream), 64 + 4 * FRAME_COST),
        )
        .await
        .expect("preparing a stream waited for it to end")
        .unwrap();
        assert!(p.is_replayable(), "teed");
        let mut body = p.next().unwrap();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "first");
        drop(tx);
        assert!(body.frame().await.is_none());
        assert!(body.is_end_stream());
        // Small chunks of unknown total size: teed, intact, and replayed intact.
        let mut p = prepare(chunked(vec![b"ab", b"cd"]), 64 + 4 * FRAME_COST)
            .await
            .unwrap();
        assert_eq!(bytes_of(p.next().unwrap()).await, "abcd");
        assert!(p.is_replayable());
        assert_eq!(bytes_of(p.next().unwrap()).await, "abcd");
    }

    /// A try that read part of a stream is superseded: the retry replays what was read,
    /// then reads on where the first left off; the first never reads again.
    #[tokio::test]
    async fn a_retry_replays_what_was_sent_then_reads_on() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
        let stream =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|f| (f, rx)) },
            );
        let mut p = prepare(StreamBody::new(stream), 64 + 4 * FRAME_COST)
            .await
            .unwrap();
        let mut first = p.next().unwrap();
        tx.send(Ok(Frame::data(Bytes::from_static(b"one "))))
            .await
            .unwrap();
        assert_eq!(
            first.frame().await.unwrap().unwrap().into_data().unwrap(),
            "one "
        );
        // The first try failed: a retry.
        assert!(p.is_replayable());
        let second = p.next().unwrap();
        tx.send(Ok(Frame::data(Bytes::from_static(b"two"))))
            .await
            .unwrap();
        drop(tx);
        let err = first.frame().await.unwrap().unwrap_err();
        assert_eq!(err.to_string(), "request body superseded by a retry");
        assert!(first.frame().await.is_none());
        assert_eq!(bytes_of(second).await, "one two");
        // Everything was sent within the cap: still replayable, whole.
        assert_eq!(bytes_of(p.next().unwrap()).await, "one two");
    }

    #[tokio::test]
    async fn a_stream_past_the_cap_commits_its_try() {
        let mut p = prepare(chunked(vec![b"abc", b"def", b"ghi"]), 5 + FRAME_COST)
            .await
            .unwrap();
        let mut body = p.next().unwrap();
        assert_eq!(
            body.frame().await.unwrap().unwrap().into_data().unwrap(),
            "abc"
        );
        assert!(p.is_replayable(), "3 bytes sent, within 5");
        assert_eq!(bytes_of(body).await, "defghi", "the rest, as it comes");
        assert!(!p.is_replayable(), "9 bytes sent: committed");
        assert!(p.next().is_none());
    }

    /// Tiny frames count their bookkeeping against the cap: a stream of one-byte frames
    /// commits long before its bytes reach the cap, and a body of known size in one-byte
    /// frames is streamed once rather than collected.
    #[tokio::test]
    async fn many_tiny_frames_count_against_the_cap() {
        let cap = 64 * 1024;
        let tiny = || {
            let frames: Vec<Result<Frame<Bytes>, BoxError>> = (0..10_000)
                .map(|_| Ok(Frame::data(Bytes::from_static(b"x"))))
                .collect();
            StreamBody::new(futures_util::stream::iter(frames))
        };
        let mut p = prepare(tiny(), cap).await.unwrap();
        assert_eq!(bytes_of(p.next().unwrap()).await.len(), 10_000);
        assert!(
            !p.is_replayable(),
            "10,000 frames kept would cost far over the cap"
        );
        let mut p = prepare(Sized(tiny(), 10_000), cap).await.unwrap();
        assert!(!p.is_replayable(), "streamed once");
        assert_eq!(bytes_of(p.next().unwrap()).await.len(), 10_000);
        // A body at the cap in a few frames is still collected.
        let halves = chunked(vec![&[1; 32 * 1024], &[2; 32 * 1024]]);
        let mut p = prepare(Sized(halves, 64 * 1024), cap).await.unwrap();
        assert!(p.is_replayable());
        assert_eq!(bytes_of(p.next().unwrap()).await.len(), 64 * 1024);
    }

    /// A body that declares its exact size.
    struct Sized<B>(B, u64);

    impl<B: Body + Unpin> Body for Sized<B> {
        type Data = B::Data;
        type Error = B::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
            Pin::new(&mut self.0).poll_frame(cx)
        }

        fn size_hint(&self) -> SizeHint {
            SizeHint::with_exact(self.1)
        }
    }

    #[tokio::test]
    async fn large_bodies_stream_once_and_intact() {
        // Known to be too large: not read at all.
        let mut p = prepare(Full::new(Bytes::from(vec![7u8; 100])), 64)
            .await
            .unwrap();
        assert!(!p.is_replayable());
        assert_eq!(bytes_of(p.next().unwrap()).await.len(), 100);
    }
}
