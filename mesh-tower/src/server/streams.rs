//! A connection's HTTP/2 streams, run inside the connection's own task
//! ([`StreamTasks::InConnection`](super::StreamTasks::InConnection)) or spawned.
//!
//! hyper hands every HTTP/2 stream (and the task that sends a successful CONNECT's tunnel
//! data) to an executor. With `tokio::spawn` each would be a task of its own: a cache-aligned
//! allocation per request, reference-counted wake-ups, and the streams of one connection
//! scattered over the worker threads, where they contend for the connection's shared
//! state. Here, as in nginx, a connection and its streams stay on one thread:
//!
//! - [`StreamExec`], the executor of one connection, queues each new stream;
//! - [`Streams`] moves queued streams into a `FuturesUnordered` and polls the ones that
//!   were woken, between polls of the connection: once before it (so that responses the
//!   streams produce are written by that poll) and once after, for the streams it has just
//!   accepted.
//!
//! A stream that panics is dropped alone, as a panicking task would be (dropping its
//! response handle resets the stream); its siblings go on. A panic while a stream is
//! dropped (its future's, or a value it holds, `Drop` panicking, once it has finished or
//! when the connection ends) is caught too, as tokio catches it for a task. When the connection ends, its
//! remaining streams, running or still queued, are dropped with it: they could no longer
//! answer. Queued ones must be dropped explicitly ([`Streams`]' `Drop`): each holds a clone
//! of the executor, and so of the queue it waits in, a cycle that would otherwise leak it.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use futures_util::stream::{FuturesUnordered, StreamExt};

/// One stream: its future (one allocation, as a task's would be), with panics caught.
///
/// A panic while polling ends the stream; so does completion. Either way the future is
/// dropped at once, inside a guard of its own, and so is a stream still held when the
/// connection ends: a `Drop` that panics unwinds into neither the connection's task nor
/// the other streams.
struct Stream {
    fut: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl Stream {
    fn new<F: Future<Output = ()> + Send + 'static>(fut: F) -> Self {
        Self {
            fut: Some(Box::pin(fut)),
        }
    }

    /// Drops the future, catching a panic of its `Drop`.
    fn release(&mut self) {
        if let Some(fut) = self.fut.take() {
            let dropped = std::panic::catch_unwind(AssertUnwindSafe(move || drop(fut)));
            if dropped.is_err() {
                tracing::error!("an HTTP/2 stream panicked while being dropped");
            }
        }
    }
}

impl Future for Stream {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let Some(fut) = this.fut.as_mut() else {
            return Poll::Ready(());
        };
        match std::panic::catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready(())) => {}
            Err(_) => tracing::error!("an HTTP/2 stream panicked: the stream is reset"),
        }
        this.release();
        Poll::Ready(())
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.release();
    }
}

/// The executor of one connection: queues each stream hyper hands it for [`Streams`], or
/// spawns it when made by [`StreamExec::spawn`].
#[derive(Clone)]
pub(super) struct StreamExec(Option<Arc<Queue>>);

/// The streams handed over since the connection's task last took them.
#[derive(Default)]
struct Queue {
    streams: Mutex<Vec<Stream>>,
    /// Whether `streams` may be non-empty: read before locking, so that the connection's
    /// task (which looks twice per wake-up) takes no lock while nothing was queued, as on
    /// every HTTP/1.1 connection.
    any: AtomicBool,
}

impl StreamExec {
    /// An executor that queues streams for the connection's task.
    pub(super) fn in_connection() -> Self {
        Self(Some(Arc::default()))
    }

    /// An executor that spawns each stream as a task of its own.
    pub(super) fn spawn() -> Self {
        Self(None)
    }
}

impl std::fmt::Debug for StreamExec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StreamExec")
    }
}

impl<F> hyper::rt::Executor<F> for StreamExec
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        match &self.0 {
            Some(queue) => {
                let stream = Stream::new(fut);
                queue
                    .streams
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(stream);
                queue.any.store(true, Ordering::Release);
            }
            None => {
                tokio::spawn(fut);
            }
        }
    }
}

/// The streams of one connection, polled by the connection's task.
pub(super) struct Streams {
    queued: StreamExec,
    running: FuturesUnordered<Stream>,
}

impl Streams {
    /// The streams `exec` will queue.
    pub(super) fn new(exec: StreamExec) -> Self {
        Self {
            queued: exec,
            running: FuturesUnordered::new(),
        }
    }

    /// Takes the queued streams; whether there were any.
    fn take_queued(&mut self) -> bool {
        let Some(queue) = &self.queued.0 else {
            return false;
        };
        // A plain load first: the usual answer is no, and a swap would write the line.
        if !queue.any.load(Ordering::Acquire) || !queue.any.swap(false, Ordering::Acquire) {
            return false;
        }
        let mut queued = queue.streams.lock().unwrap_or_else(PoisonError::into_inner);
        let any = !queued.is_empty();
        for stream in queued.drain(..) {
            self.running.push(stream);
        }
        any
    }

    /// Polls every stream that was woken or queued since the last poll.
    pub(super) fn poll(&mut self, cx: &mut Context<'_>) {
        self.take_queued();
        self.poll_running(cx);
    }

    /// Polls the streams queued since the last poll (and any woken meanwhile), if any
    /// were queued; again while polling them queues more (a CONNECT's tunnel task is
    /// queued from its stream's poll, and nothing else would wake the task for it).
    pub(super) fn poll_queued(&mut self, cx: &mut Context<'_>) {
        while self.take_queued() {
            self.poll_running(cx);
        }
    }

    fn poll_running(&mut self, cx: &mut Context<'_>) {
        // None running (always so on HTTP/1.1): nothing to poll, and no waker to register.
        // A stream pushed later is polled as it is pushed.
        if self.running.is_empty() {
            return;
        }
        // Completed streams are counted out; `Pending` leaves the woken ones to a later
        // poll (FuturesUnordered also yields, waking the task, after a long run).
        while let Poll::Ready(Some(())) = self.running.poll_next_unpin(cx) {}
    }

    /// How many streams are running or queued.
    #[cfg(test)]
    pub(super) fn len(&mut self) -> usize {
        self.take_queued();
        self.running.len()
    }
}

impl Drop for Streams {
    fn drop(&mut self) {
        // Queued streams hold the queue (through their executor clone): take them out, so
        // that the cycle breaks. The guard is a temporary, so they drop after the unlock.
        if let Some(queue) = &self.queued.0 {
            let queued =
                std::mem::take(&mut *queue.streams.lock().unwrap_or_else(PoisonError::into_inner));
            drop(queued);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use hyper::rt::Executor;

    /// Queues a stream that waits for the returned sender, then counts itself in the
    /// returned counter.
    fn waiting_stream(
        exec: &StreamExec,
    ) -> (
        tokio::sync::oneshot::Sender<()>,
        Arc<std::sync::atomic::AtomicUsize>,
    ) {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let waiting = done.clone();
        exec.execute(async move {
            let _ = rx.await;
            waiting.fetch_add(1, Ordering::SeqCst);
        });
        (tx, done)
    }

    /// One poll of `streams`, as the connection's task makes.
    async fn poll_once(streams: &mut Streams) {
        std::future::poll_fn(|cx| {
            streams.poll(cx);
            Poll::Ready(())
        })
        .await;
    }

    #[tokio::test]
    async fn queued_streams_run_in_the_polling_task_and_a_panic_ends_only_its_stream() {
        let exec = StreamExec::in_connection();
        let mut streams = Streams::new(exec.clone());
        let (tx, done) = waiting_stream(&exec);
        exec.execute(async { panic!("scripted") });
        let quick = done.clone();
        exec.execute(async move {
            quick.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(streams.len(), 3);
        // Nothing runs until the connection's task polls.
        assert_eq!(done.load(Ordering::SeqCst), 0);
        poll_once(&mut streams).await;
        // The quick stream ran, the panicking one ended alone, the waiting one waits.
        assert_eq!(done.load(Ordering::SeqCst), 1);
        assert_eq!(streams.len(), 1);
        tx.send(()).unwrap();
        std::future::poll_fn(|cx| {
            streams.poll_queued(cx);
            assert_eq!(
                streams.len(),
                1,
                "poll_queued polls only when a stream was queued"
            );
            streams.poll(cx);
            Poll::Ready(())
        })
        .await;
        assert_eq!(done.load(Ordering::SeqCst), 2);
        assert_eq!(streams.len(), 0);
    }

    /// A value whose `Drop` panics.
    struct PanicOnDrop;

    impl Drop for PanicOnDrop {
        fn drop(&mut self) {
            panic!("scripted panic in drop");
        }
    }

    /// A future that is ready at once and panics when dropped.
    struct DoneThenPanic(#[allow(dead_code)] PanicOnDrop);

    impl Future for DoneThenPanic {
        type Output = ();

        fn poll(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<()> {
            Poll::Ready(())
        }
    }

    #[tokio::test]
    async fn a_stream_panicking_when_dropped_after_it_finished_ends_alone() {
        let exec = StreamExec::in_connection();
        let mut streams = Streams::new(exec.clone());
        let (tx, done) = waiting_stream(&exec);
        exec.execute(DoneThenPanic(PanicOnDrop));
        poll_once(&mut streams).await;
        // The finished stream is gone (its drop's panic caught); the other still runs.
        assert_eq!(streams.len(), 1);
        tx.send(()).unwrap();
        poll_once(&mut streams).await;
        assert_eq!(done.load(Ordering::SeqCst), 1);
        assert_eq!(streams.len(), 0);
    }

    /// When the connection ends, every stream is dropped, running or queued, even when
    /// one of them panics as it is dropped: none is leaked and no panic escapes.
    #[test]
    fn streams_dropped_with_their_connection_are_all_dropped_despite_a_panic() {
        for polled in [true, false] {
            let exec = StreamExec::in_connection();
            let mut streams = Streams::new(exec.clone());
            let held = Arc::new(());
            let (first, last) = (held.clone(), held.clone());
            // Pending for ever, each holding a clone of `held`; the middle one panics
            // when dropped.
            exec.execute(async move {
                let _held = first;
                std::future::pending::<()>().await;
            });
            exec.execute(async move {
                let _guard = PanicOnDrop;
                std::future::pending::<()>().await;
            });
            exec.execute(async move {
                let _held = last;
                std::future::pending::<()>().await;
            });
            if polled {
                let waker = std::task::Waker::noop();
                streams.poll(&mut Context::from_waker(waker));
                assert_eq!(streams.len(), 3);
            }
            let dropped = std::panic::catch_unwind(AssertUnwindSafe(move || drop(streams)));
            assert!(dropped.is_ok(), "a panic escaped (polled: {polled})");
            assert_eq!(
                Arc::strong_count(&held),
                1,
                "a stream was leaked (polled: {polled})"
            );
            drop(exec);
        }
    }
}
