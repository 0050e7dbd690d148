use std::time::Duration;

use tower::Layer;

use super::{Kind, Timeout};

/// Applies a request or per-try timeout; see the [module docs](super).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeoutLayer {
    timeout: Option<Duration>,
    kind: Kind,
}

impl TimeoutLayer {
    /// Bounds whole requests (`None`: no bound), failing them with
    /// [`RequestTimeout`](super::RequestTimeout), and sets their
    /// [`Deadline`](super::Deadline).
    pub fn request(timeout: Option<Duration>) -> Self {
        Self {
            timeout,
            kind: Kind::Request,
        }
    }

    /// Bounds single tries (`None`: no bound), failing them with
    /// [`TryTimeout`](super::TryTimeout).
    pub fn per_try(timeout: Option<Duration>) -> Self {
        Self {
            timeout,
            kind: Kind::Try,
        }
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;

    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout::new(inner, self.timeout, self.kind)
    }
}
