use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::{Request, Response};
use tokio::sync::futures::OwnedNotified;
use tokio::time::Instant;
use tower_service::Service;

use super::gate::Permit;
use super::handle::Member;
use super::{BreakerHandle, ResponseBody, ResponseFuture};
use crate::load::{Cost, Load};

/// One endpoint's circuit breaker; see the [module docs](super).
///
/// `poll_ready` is pending while the endpoint is ejected, and in probation until this
/// service takes the single probe permit; it wakes when the gate changes. Clones share
/// the breaker. Without a handle (breaking disabled) it passes everything through.
pub struct Breaker<S> {
    inner: S,
    handle: Option<Member>,
    permit: Option<Permit>,
    wait: Option<Pin<Box<OwnedNotified>>>,
}

impl<S: Clone> Clone for Breaker<S> {
    fn clone(&self) -> Self {
        // Readiness (a probe permit, a wait) belongs to the original.
        Self {
            inner: self.inner.clone(),
            handle: self.handle.clone(),
            permit: None,
            wait: None,
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for Breaker<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Breaker")
            .field("inner", &self.inner)
            .field("handle", &self.handle)
            .field("probe", &self.permit.is_some())
            .finish()
    }
}

impl<S> Breaker<S> {
    /// Wraps `inner` with `handle`'s breaker (none: pass through). The endpoint counts in
    /// the ejection budget while a service built with the handle (this one or a clone) is
    /// alive; see [`BreakerHandle`].
    pub fn new(inner: S, handle: Option<BreakerHandle>) -> Self {
        Self {
            inner,
            handle: handle.map(Member::new),
            permit: None,
            wait: None,
        }
    }

    /// The breaker's handle, when breaking is enabled.
    pub fn handle(&self) -> Option<&BreakerHandle> {
        self.handle.as_deref()
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

    /// Whether the gate admits this service's next request, taking the probe permit in
    /// probation; otherwise registers `cx` to be woken when the gate changes.
    fn poll_gate(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(handle) = &self.handle else {
            return Poll::Ready(());
        };
        loop {
            let gate = handle.gate();
            if self.permit.is_some() || gate.is_open() {
                self.wait = None;
                return Poll::Ready(());
            }
            if let Some(round) = gate.try_probe() {
                self.permit = Some(Permit::new(BreakerHandle::clone(handle), round));
                continue;
            }
            let wait = self.wait.get_or_insert_with(|| {
                let mut notified = Box::pin(gate.changed().notified_owned());
                // Registered before the re-check below, so no change slips in between.
                notified.as_mut().enable();
                notified
            });
            if gate.may_admit() {
                self.wait = None;
                continue;
            }
            ready!(wait.as_mut().poll(cx));
            self.wait = None;
        }
    }
}

impl<S: Load> Load for Breaker<S> {
    fn load(&self, now: Instant) -> Cost {
        let mut cost = self.inner.load(now);
        if self.permit.is_none() && self.handle.as_ref().is_some_and(|h| !h.gate().may_admit()) {
            cost.unready = true;
        }
        cost
    }
}

impl<S, B, RB> Service<Request<B>> for Breaker<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Error: 'static,
{
    type Response = Response<ResponseBody<RB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        ready!(self.poll_gate(cx));
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        ResponseFuture::new(
            self.inner.call(req),
            self.handle.as_deref().cloned(),
            self.permit.take(),
        )
    }
}
