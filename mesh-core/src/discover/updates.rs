//! The stream side of sources that run in a background task.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_core::Stream;
use tokio::sync::mpsc;

use super::{Change, DiscoverError};

/// A stream of changes computed by a background task.
///
/// The task sends each batch of changes (one diff) over a channel of a few batches; the
/// stream yields them one by one. The sources stop their task as soon as the stream is
/// dropped (they wait on the sender's `closed()`). The
/// stream ends only if the task ends.
#[derive(Debug)]
pub struct Updates {
    rx: mpsc::Receiver<Vec<Change>>,
    buffered: VecDeque<Change>,
}

impl Updates {
    /// A stream fed by the sending half of a new channel, which is returned with it.
    pub(crate) fn channel() -> (mpsc::Sender<Vec<Change>>, Self) {
        let (tx, rx) = mpsc::channel(4);
        (
            tx,
            Self {
                rx,
                buffered: VecDeque::new(),
            },
        )
    }
}

impl Stream for Updates {
    type Item = Result<Change, DiscoverError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(change) = self.buffered.pop_front() {
                return Poll::Ready(Some(Ok(change)));
            }
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(batch)) => self.buffered = batch.into(),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
