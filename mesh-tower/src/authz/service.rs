use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use mesh_spiffe::PeerIdentity;
use tower_service::Service;

use arc_swap::ArcSwap;

use super::layer::Compiled;
use super::{Policy, ResponseFuture};
use crate::body::{ResponseBody, grpc_answer, text_answer};
use crate::decision::{AuthzRecord, AuthzVerdict, Event, Recorder};

/// Authorizes each request by its peer's identity and its route; see the
/// [module docs](super).
#[derive(Clone, Debug)]
pub struct Authorize<S> {
    inner: S,
    current: Arc<ArcSwap<Compiled>>,
    decisions: Option<Recorder>,
}

impl<S> Authorize<S> {
    pub(super) fn new(inner: S, current: Arc<ArcSwap<Compiled>>) -> Self {
        Self {
            inner,
            current,
            decisions: None,
        }
    }

    /// Records every decision in `decisions`, when set.
    pub(super) fn recording(mut self, decisions: Option<Recorder>) -> Self {
        self.decisions = decisions;
        self
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.current.load().policy.clone()
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

impl<S, B, RB> Service<Request<B>> for Authorize<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
{
    type Response = Response<ResponseBody<RB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, RB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let client = req.extensions().get::<PeerIdentity>().map(PeerIdentity::id);
        let current = self.current.load();
        match current.policy.decide(client, &req) {
            Ok(decision) => {
                if let Some(recorder) = &self.decisions
                    && recorder.is_enabled()
                {
                    let (policy, rule) = decision.names();
                    let verdict = if decision.is_audit() {
                        AuthzVerdict::Audit
                    } else {
                        AuthzVerdict::Allow
                    };
                    recorder.record(record(client, &req, policy, rule, verdict));
                }
                if let Some(c) = &current.counters {
                    match decision.index {
                        Some(i) => {
                            if let Some(counter) = c.rules.get(i) {
                                counter.inc();
                            }
                        }
                        None if decision.is_audit() => {
                            c.audit.inc();
                        }
                        None => {
                            c.allow.inc();
                        }
                    }
                }
                // Every one, at info: audit mode is there to show what a policy would
                // deny (an operator's choice, for a while).
                if decision.is_audit() {
                    tracing::info!(
                        client = %Client(client),
                        method = %req.method(),
                        path = req.uri().path(),
                        policy = current.policy.name(),
                        "authorization audit: no rule allows this request; allowed by the audit default"
                    );
                }
                let decision = decision.clone();
                req.extensions_mut().insert(decision);
                ResponseFuture::inner(self.inner.call(req))
            }
            Err(denied) => {
                if let Some(c) = &current.counters {
                    c.deny.inc();
                }
                if let Some(recorder) = &self.decisions
                    && recorder.is_enabled()
                {
                    recorder.record(record(
                        client,
                        &req,
                        denied.policy_name(),
                        None,
                        AuthzVerdict::Deny,
                    ));
                }
                log_denied(
                    Client(client),
                    req.method(),
                    req.uri().path(),
                    denied.policy(),
                );
                ResponseFuture::local(refusal(mesh_core::classify::is_grpc(req.headers())))
            }
        }
    }
}

/// The decision record's entry for a request.
fn record<B>(
    client: Option<&mesh_core::SpiffeId>,
    req: &Request<B>,
    policy: Arc<str>,
    rule: Option<Arc<str>>,
    verdict: AuthzVerdict,
) -> Event {
    Event::Authz(AuthzRecord {
        client: client.cloned(),
        method: req.method().clone(),
        path: req
            .uri()
            .path_and_query()
            .map(crate::decision::DecisionPath::from),
        policy,
        rule,
        verdict,
    })
}

/// The answer to a refused request: 403, or for gRPC a trailers-only `PERMISSION_DENIED`
/// (HTTP 200, `grpc-status: 7` in the only header block). Names no rule: what the
/// policy allows is not the client's to learn.
pub(super) fn refusal<B>(grpc: bool) -> Response<ResponseBody<B>> {
    if grpc {
        grpc_answer(7, "permission denied")
    } else {
        text_answer(StatusCode::FORBIDDEN, Bytes::from_static(b"forbidden\n"))
    }
}

/// A client identity for logs, written only when a line is: `unauthenticated` for none.
pub(crate) struct Client<'a>(pub(crate) Option<&'a mesh_core::SpiffeId>);

impl std::fmt::Display for Client<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(id) => std::fmt::Display::fmt(id, f),
            None => f.write_str("unauthenticated"),
        }
    }
}

/// Logs a denied request. A client may send denied requests without end: one line a
/// second at info, the rest at debug (counted in the metrics either way). Out of line, and
/// cold: the allowed request's path stays as small as it was.
#[cold]
#[inline(never)]
fn log_denied(client: Client<'_>, method: &http::Method, path: &str, policy: &str) {
    static DENIED: crate::throttle::Throttle = crate::throttle::Throttle::new();
    let message = "request denied: no rule of the authorization policy allows it";
    match DENIED.due() {
        Some(held) => {
            tracing::info!(%client, %method, path, policy, more_at_debug = held, "{message}");
        }
        None => tracing::debug!(%client, %method, path, policy, "{message}"),
    }
}
