use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use http::{Request, Response, StatusCode};
use tower_service::Service;

use super::layer::Config;
use super::{Abort, Dice, ResponseFuture, grpc_code_for};

/// Injects delays and aborts into a share of requests; see the [module docs](super).
#[derive(Clone, Debug)]
pub struct Fault<S> {
    inner: S,
    config: Arc<Config>,
    active: Arc<AtomicUsize>,
    dice: Dice,
}

impl<S> Fault<S> {
    pub(super) fn new(inner: S, config: Arc<Config>, active: Arc<AtomicUsize>, dice: Dice) -> Self {
        Self {
            inner,
            config,
            active,
            dice,
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B, RB> Service<Request<B>> for Fault<S>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone,
{
    type Response = Response<crate::body::ResponseBody<RB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let config = &*self.config;
        let targeted = config
            .header
            .as_ref()
            .is_none_or(|(name, value)| match value {
                None => req.headers().contains_key(name),
                Some(value) => req.headers().get_all(name).iter().any(|v| v == value),
            });
        if !targeted {
            return ResponseFuture::inner(self.inner.call(req));
        }
        let delay = config
            .delay
            .filter(|(_, ratio)| ratio.hit(&self.dice))
            .map(|(delay, _)| delay);
        let aborts = config.abort_status.is_some() || config.abort_grpc_code.is_some();
        let abort = (aborts && config.abort_ratio.hit(&self.dice)).then(|| {
            let grpc = mesh_core::classify::is_grpc(req.headers()).then(|| {
                config
                    .abort_grpc_code
                    .unwrap_or_else(|| grpc_code_for(config.abort_status.unwrap_or(DEFAULT_STATUS)))
            });
            Abort {
                status: config.abort_status.unwrap_or(DEFAULT_STATUS),
                grpc,
                delayed: delay.is_some(),
            }
        });
        let faulted = delay.is_some() || abort.is_some();
        let Some(guard) = faulted
            .then(|| Guard::acquire(&self.active, config.max_active))
            .flatten()
        else {
            // No fault drawn, or `max_active` faults in progress.
            return ResponseFuture::inner(self.inner.call(req));
        };
        match (delay, abort) {
            (Some(delay), abort) => {
                // Only an abort-free delay calls the inner service: move the service that
                // was polled ready into the future, and keep a fresh clone to poll next.
                let call = abort.is_none().then(|| {
                    let clone = self.inner.clone();
                    (std::mem::replace(&mut self.inner, clone), req)
                });
                ResponseFuture::delayed(delay, call, abort, guard)
            }
            // Answered at once: the slot is taken and freed here.
            (None, Some(abort)) => {
                drop(guard);
                ResponseFuture::local(abort)
            }
            // Not reached: there is no guard without a fault.
            (None, None) => ResponseFuture::inner(self.inner.call(req)),
        }
    }
}

/// The HTTP status of an abort with only a gRPC code, for non-gRPC requests.
const DEFAULT_STATUS: StatusCode = StatusCode::SERVICE_UNAVAILABLE;

/// One fault's slot under the cap, freed on drop (whether the fault ran to its end or
/// its future was dropped).
#[derive(Debug)]
pub(super) struct Guard(Arc<AtomicUsize>);

impl Guard {
    /// A slot, if fewer than `max` are taken. `fetch_add` hands each racer a distinct
    /// count, so at most `max` ever see one below `max`.
    fn acquire(active: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        if active.fetch_add(1, Ordering::AcqRel) < max {
            Some(Self(active.clone()))
        } else {
            active.fetch_sub(1, Ordering::AcqRel);
            None
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
