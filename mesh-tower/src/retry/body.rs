//! Request bodies that can be replayed on retry.
//!
//! **Replay.** Before the first try, a request body whose size is known to be within the
//! cap (default 64 KiB) — its size hint has an upper bound that fits, as with a complete
//! body or a `Content-Length` — is collected and sent again, byte for byte, on every
//! retry. Any other body (larger, or of unknown size such as a stream) is sent once,
//! as it comes, and the request is not retried. Reading a stream ahead before sending it
//! could deadlock a peer that waits for the response before producing more (streaming
//! gRPC), so streams are never held back. A body that turns out to carry trailers is
//! streamed once too.

use std::collections::VecDeque;
use std::pin::Pin;
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
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Kind::Full(bytes) => bytes.is_none(),
            Kind::Streaming { prefix, rest } => {
                prefix.is_empty() && rest.as_ref().is_none_or(|b| b.is_end_stream())
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Kind::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Streaming { .. } => SizeHint::default(),
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
}

impl Prepared {
    /// The body for the next try, or `None` if it was already sent and cannot be replayed.
    pub(crate) fn next(&mut self) -> Option<ReplayBody> {
        match self {
            Prepared::Replayable(bytes) => Some(ReplayBody::full(bytes.clone())),
            Prepared::Once(body) => body.take(),
        }
    }

    /// Whether further tries can get a body.
    pub(crate) fn is_replayable(&self) -> bool {
        matches!(self, Prepared::Replayable(_))
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
/// known to be within `cap` bytes is collected (see the module docs); any other is sent
/// once.
pub(crate) fn start<B>(body: B, cap: usize) -> Start
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    if body.is_end_stream() {
        return Start::Done(Prepared::Replayable(Bytes::new()));
    }
    let hint = body.size_hint();
    if hint.upper().is_none_or(|upper| upper > cap as u64) {
        return Start::Done(once(body));
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
                    if self.buf.len() > self.cap || trailers {
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
            prepare(StreamBody::new(stream), 64),
        )
        .await
        .expect("preparing a stream waited for it to end")
        .unwrap();
        assert!(!p.is_replayable());
        let mut body = p.next().unwrap();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "first");
        drop(tx);
        assert!(body.frame().await.is_none());
        // Small chunks of unknown total size: streamed once, intact.
        let mut p = prepare(chunked(vec![b"ab", b"cd"]), 64).await.unwrap();
        assert!(!p.is_replayable());
        assert_eq!(bytes_of(p.next().unwrap()).await, "abcd");
    }

    #[tokio::test]
    async fn large_bodies_stream_once_and_intact() {
        let mut p = prepare(chunked(vec![b"abc", b"def", b"ghi"]), 4)
            .await
            .unwrap();
        assert!(!p.is_replayable());
        assert_eq!(bytes_of(p.next().unwrap()).await, "abcdefghi");
        assert!(p.next().is_none());
        // Known to be too large: not read at all.
        let mut p = prepare(Full::new(Bytes::from(vec![7u8; 100])), 64)
            .await
            .unwrap();
        assert!(!p.is_replayable());
        assert_eq!(bytes_of(p.next().unwrap()).await.len(), 100);
    }
}
