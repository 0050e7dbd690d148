use std::fmt;
use std::marker::PhantomData;
use std::time::Duration;

use tower::Layer;

use super::{EachTry, Kind, Timeout, WholeRequest};

/// Applies a request timeout ([`TimeoutLayer::request`], `K` = [`WholeRequest`]) or a
/// per-try one ([`TimeoutLayer::per_try`], `K` = [`EachTry`]); see the
/// [module docs](super).
pub struct TimeoutLayer<K = WholeRequest> {
    timeout: Option<Duration>,
    kind: Kind,
    marker: PhantomData<fn() -> K>,
}

impl<K> Clone for TimeoutLayer<K> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<K> Copy for TimeoutLayer<K> {}

impl<K> fmt::Debug for TimeoutLayer<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TimeoutLayer")
            .field("timeout", &self.timeout)
            .field("kind", &self.kind)
            .finish()
    }
}

impl TimeoutLayer<WholeRequest> {
    /// Bounds whole requests (`None`: no bound), failing them with
    /// [`RequestTimeout`](super::RequestTimeout), and sets their
    /// [`Deadline`](super::Deadline).
    pub fn request(timeout: Option<Duration>) -> Self {
        Self {
            timeout,
            kind: Kind::Request,
            marker: PhantomData,
        }
    }
}

impl TimeoutLayer<EachTry> {
    /// Bounds single tries (`None`: no bound), failing them with
    /// [`TryTimeout`](super::TryTimeout).
    pub fn per_try(timeout: Option<Duration>) -> Self {
        Self {
            timeout,
            kind: Kind::Try,
            marker: PhantomData,
        }
    }
}

impl<S, K> Layer<S> for TimeoutLayer<K> {
    type Service = Timeout<S, K>;

    fn layer(&self, inner: S) -> Timeout<S, K> {
        Timeout::new(inner, self.timeout, self.kind)
    }
}
