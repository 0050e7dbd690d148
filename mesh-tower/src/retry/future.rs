use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::request::Parts;
use http::{Extensions, Request, Response};
use mesh_core::classify::grpc::Code;
use mesh_core::classify::{Backoff as Pushback, Class};
use mesh_core::error::{BoxError, find_cause, is_caused_by};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use super::body::{Collect, Prepared, Start};
use super::error::{BudgetExhausted, NoElsewhere};
use super::layer::Shared;
use super::{Elsewhere, ReplayBody, Retried, RetryBudget, RetryOverride, RetryPolicy};
use crate::decision::{Event, RetryDecision, RetryVerdict, TryOutcome};
use crate::timeout::{Deadline, DeadlineExceeded, TimeoutOverride, TryTimeout};

/// gRPC's cap on attempts (A6): at most 4 retries, whatever the policy says.
const GRPC_MAX_RETRIES: u32 = 4;

/// The request header on gRPC retries: how many attempts came before (A6).
const GRPC_PREVIOUS_RPC_ATTEMPTS: &str = "grpc-previous-rpc-attempts";

pin_project! {
    #[project = StateProj]
    enum State<F> {
        // Collecting the body for replay.
        Collecting,
        // Waiting for the service to be ready for the next try.
        Ready,
        Calling { #[pin] fut: F },
        Waiting { #[pin] sleep: Sleep },
    }
}

pin_project! {
    /// The response future of a [`Retry`](super::Retry): the tries of one request.
    #[project = Proj]
    pub struct ResponseFuture<S, F, RB> {
        #[pin]
        state: State<F>,
        service: S,
        shared: Arc<Shared>,
        // A route's policy and budget, in place of the service's.
        route: Option<RetryOverride>,
        // A route's timeouts, carried to every try (the first takes the extensions).
        timeouts: Option<TimeoutOverride>,
        // An extended CONNECT's protocol (RFC 8441), carried to every try too; boxed, as
        // it is rare.
        protocol: Option<Box<hyper::ext::Protocol>>,
        head: Parts,
        extensions: Option<Extensions>,
        // Boxed: only bodies that are collected need it.
        collect: Option<Box<Collect>>,
        body: Prepared,
        retries: u32,
        // The policy's retries, capped for gRPC.
        max_retries: u32,
        idempotent: bool,
        // A gRPC request: retried by code whatever its method, A6's rules.
        grpc: bool,
        deadline: Option<Instant>,
        // A rate-limited answer kept while its request is retried elsewhere.
        kept: Option<Box<Response<RB>>>,
        elsewhere: bool,
    }
}

impl<S, F, RB> std::fmt::Debug for ResponseFuture<S, F, RB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("retries", &self.retries)
            .finish_non_exhaustive()
    }
}

impl<S, F, RB> ResponseFuture<S, F, RB> {
    pub(super) fn new<B>(
        service: S,
        shared: Arc<Shared>,
        req: Request<B>,
        deadline: Option<Instant>,
    ) -> Self
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let (mut head, body) = req.into_parts();
        let extensions = std::mem::take(&mut head.extensions);
        let grpc = mesh_core::classify::is_grpc(&head.headers);
        let carried = extensions.get::<Deadline>().map(|d| d.0);
        // A gRPC caller's deadline, from its `grpc-timeout`.
        let header = grpc
            .then(|| head.headers.get(&crate::timeout::GRPC_TIMEOUT))
            .flatten()
            .and_then(|v| mesh_core::classify::grpc::parse_timeout(v).ok())
            .and_then(|t| Instant::now().checked_add(t));
        let route = extensions.get::<RetryOverride>().cloned();
        let timeouts = extensions.get::<TimeoutOverride>().copied();
        let protocol = (head.method == http::Method::CONNECT)
            .then(|| {
                extensions
                    .get::<hyper::ext::Protocol>()
                    .cloned()
                    .map(Box::new)
            })
            .flatten();
        let extensions = Some(extensions);
        let policy = policy_of(&shared, &route);
        let deadline = [carried, header, deadline].into_iter().flatten().min();
        let max_retries = if grpc {
            policy.max_retries.min(GRPC_MAX_RETRIES)
        } else {
            policy.max_retries
        };
        let (state, collect, body) = if max_retries == 0 {
            (State::Ready, None, super::body::once(body))
        } else {
            budget_of(&shared, &route).deposit();
            match super::body::start(body, policy.max_replay_body) {
                Start::Done(prepared) => (State::Ready, None, prepared),
                Start::Collect(c) => (State::Collecting, Some(Box::new(c)), Prepared::Once(None)),
            }
        };
        Self {
            // A6: a gRPC policy's codes say what is safe to retry; every call is a POST.
            idempotent: grpc || policy.is_idempotent(&head.method),
            grpc,
            max_retries,
            state,
            service,
            shared,
            route,
            timeouts,
            protocol,
            head,
            extensions,
            collect,
            body,
            retries: 0,
            deadline,
            kept: None,
            elsewhere: false,
        }
    }
}

/// What to do after a try.
enum Next<T> {
    Done(Result<T, BoxError>),
    RetryAfter(Duration),
}

/// Whether no connection could be made, or none was free: the request never left, so
/// any method may be retried.
pub(crate) fn is_connect_error(e: &(dyn std::error::Error + 'static)) -> bool {
    find_cause::<crate::connect::SendError>(e).is_some_and(|e| e.is_connect())
        || crate::connect::is_pool_overflow(e)
        || find_cause::<hyper_util::client::legacy::Error>(e).is_some_and(|e| e.is_connect())
}

/// Whether the server refused the request's HTTP/2 stream (`RST_STREAM` with
/// `REFUSED_STREAM`): it closed the stream "prior to any processing" (RFC 9113 8.7), as a
/// server does with streams past its concurrency limit that a client sent before its
/// `SETTINGS` arrived, so any method may be retried, gRPC calls whatever their policy's
/// codes (gRFC A6's transparent retry).
pub(crate) fn is_refused_stream(e: &(dyn std::error::Error + 'static)) -> bool {
    find_cause::<h2::Error>(e).is_some_and(|e| {
        e.is_reset() && e.is_remote() && e.reason() == Some(h2::Reason::REFUSED_STREAM)
    })
}

/// Whether a try failed without an answer in a way worth another try (for idempotent
/// requests): it timed out, or its connection broke.
fn is_retryable_error(e: &(dyn std::error::Error + 'static)) -> bool {
    // A try the request failed itself (a stalled body) would fail the same way again.
    !crate::connect::is_request_error(e)
        && (is_caused_by::<TryTimeout>(e)
            || is_caused_by::<crate::connect::SendError>(e)
            || is_caused_by::<hyper::Error>(e))
}

impl<S, F, RB> Future for ResponseFuture<S, F, RB>
where
    S: Service<Request<ReplayBody>, Response = Response<RB>, Future = F>,
    S::Error: Into<BoxError>,
    F: Future<Output = Result<Response<RB>, S::Error>>,
{
    type Output = Result<Response<RB>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Collecting => {
                    let Some(collect) = this.collect.as_mut() else {
                        return Poll::Ready(Err("request body lost".into()));
                    };
                    *this.body = ready!(collect.poll_collect(cx))?;
                    *this.collect = None;
                    this.state.set(State::Ready);
                }
                StateProj::Ready => {
                    if let Err(e) = ready!(this.service.poll_ready(cx)) {
                        let e = e.into();
                        // The try elsewhere could not go (no endpoint that is not
                        // rate limiting, or none ready): the caller gets the answer kept.
                        if *this.elsewhere
                            && let Some(kept) = this.kept.take()
                        {
                            return Poll::Ready(Ok(*kept));
                        }
                        return Poll::Ready(Err(e));
                    }
                    if this.deadline.is_some_and(|at| at <= Instant::now()) {
                        // Nothing is sent past the deadline; an answer kept while its
                        // request was retried elsewhere is still the caller's.
                        if let Some(kept) = this.kept.take() {
                            return Poll::Ready(Ok(*kept));
                        }
                        return Poll::Ready(Err(DeadlineExceeded.into()));
                    }
                    let Some(body) = this.body.next() else {
                        return Poll::Ready(Err("request body already sent".into()));
                    };
                    let mut req = Request::new(body);
                    *req.method_mut() = this.head.method.clone();
                    *req.uri_mut() = this.head.uri.clone();
                    *req.version_mut() = this.head.version;
                    let last = !this.body.is_replayable() || *this.retries >= *this.max_retries;
                    // A try that cannot be followed by another takes the headers. Any
                    // other try takes them too, and a copy stays for the next: the map
                    // sent is the one the server parsed, with room to spare, which the
                    // HTTP/1.1 connection reuses for its response's headers (a clone
                    // has exactly its length, so the response's headers would grow it).
                    *req.headers_mut() = if last {
                        std::mem::take(&mut this.head.headers)
                    } else {
                        let kept = this.head.headers.clone();
                        std::mem::replace(&mut this.head.headers, kept)
                    };
                    match this.extensions.take() {
                        Some(ext) => *req.extensions_mut() = ext,
                        None => {
                            // Retries carry the route's timeouts and the deadline too.
                            if let Some(timeouts) = *this.timeouts {
                                req.extensions_mut().insert(timeouts);
                            }
                            if let Some(at) = *this.deadline {
                                req.extensions_mut().insert(Deadline(at));
                            }
                            if let Some(protocol) = this.protocol.as_deref() {
                                req.extensions_mut().insert(protocol.clone());
                            }
                        }
                    }
                    if *this.grpc {
                        let headers = req.headers_mut();
                        if let Some(at) = *this.deadline {
                            // The time left, re-encoded for each try (and so each hop).
                            let left = at.saturating_duration_since(Instant::now());
                            headers.insert(
                                crate::timeout::GRPC_TIMEOUT,
                                mesh_core::classify::grpc::encode_timeout(left),
                            );
                        }
                        if *this.retries > 0 {
                            headers.insert(
                                GRPC_PREVIOUS_RPC_ATTEMPTS,
                                http::HeaderValue::from(*this.retries),
                            );
                        }
                    }
                    if *this.retries > 0 {
                        req.extensions_mut().insert(Retried);
                    }
                    if *this.elsewhere {
                        req.extensions_mut().insert(Elsewhere);
                    }
                    let fut = this.service.call(req);
                    this.state.set(State::Calling { fut });
                }
                StateProj::Calling { fut } => {
                    let outcome = ready!(fut.poll(cx)).map_err(Into::into);
                    match decide(&mut this, outcome) {
                        Next::Done(result) => return Poll::Ready(result),
                        Next::RetryAfter(delay) if delay.is_zero() => {
                            this.state.set(State::Ready);
                        }
                        Next::RetryAfter(delay) => {
                            let sleep = tokio::time::sleep(delay);
                            this.state.set(State::Waiting { sleep });
                        }
                    }
                }
                StateProj::Waiting { sleep } => {
                    ready!(sleep.poll(cx));
                    this.state.set(State::Ready);
                }
            }
        }
    }
}

/// The gRPC code an answer to a gRPC call carries, when it carries one in its head: a
/// trailers-only answer's `grpc-status`, or an answer that is not gRPC's, by its HTTP
/// status as gRPC clients map it (a proxy's 503, say) unless it has a `grpc-status`. `None` for a 200 whose status is
/// still to come, in trailers: the call is committed.
fn answer_code<B>(resp: &Response<B>) -> Option<Code> {
    let status = resp.headers().get(mesh_core::classify::GRPC_STATUS);
    if resp.status() == http::StatusCode::OK && mesh_core::classify::is_grpc(resp.headers()) {
        // A malformed status is an unknown one.
        return Some(mesh_core::classify::grpc::parse_status(status?).unwrap_or(Code::Unknown));
    }
    // The HTTP status maps only when no `grpc-status` says more.
    Some(match status.map(mesh_core::classify::grpc::parse_status) {
        Some(Ok(code)) => code,
        _ => Code::for_http_status(resp.status().as_u16()),
    })
}

/// Decides, after a try, whether to answer or to try again (and after how long); records
/// the decision after a failed try when the layer has a decision record.
fn decide<S, F, RB>(
    this: &mut Proj<'_, S, F, RB>,
    outcome: Result<Response<RB>, BoxError>,
) -> Next<Response<RB>> {
    let shared: &Shared = this.shared;
    // The service's classification; the route's policy, if it has one.
    let classifier = &shared.policy.classifier;
    let policy = policy_of(shared, this.route);
    let was_elsewhere = std::mem::replace(this.elsewhere, false);
    // What the decision record says the try was (`None`: it succeeded, nothing to say).
    let mut failed: Option<TryOutcome> = None;
    let (retryable, pushback) = match &outcome {
        Ok(resp) => {
            let class = classifier.classify_response(resp.status(), resp.headers());
            let pushback =
                || mesh_core::classify::pushback(resp.headers(), SystemTime::now(), Duration::MAX);
            // A6: a gRPC call is retried for the codes its policy names, whatever their
            // class (the class is the endpoint's health, not the call's safety); an HTTP
            // request for the policy's statuses when its method allows.
            // (Worked out only when asked: a success, most answers, asks nothing of HTTP.)
            let grpc = *this.grpc;
            let idempotent = *this.idempotent;
            let retryable_answer = || {
                if grpc {
                    answer_code(resp).is_some_and(|code| policy.grpc_codes.contains(code))
                } else {
                    idempotent && policy.is_retryable_answer(resp)
                }
            };
            match class {
                Some(Class::Failure) => {
                    failed = Some(TryOutcome::Failed(resp.status().as_u16()));
                    (retryable_answer(), pushback())
                }
                Some(Class::RateLimited) => {
                    failed = Some(TryOutcome::RateLimited(resp.status().as_u16()));
                    let pushback = pushback();
                    // Elsewhere, at once: a request whose method allows it (a gRPC call
                    // whose policy names the code), or any that a mesh proxy's limiter
                    // refused (marked as the mesh's own answer): no application saw it.
                    let refused_unseen = resp.headers().contains_key(crate::body::MESH_ERROR)
                        && (resp.status() == http::StatusCode::TOO_MANY_REQUESTS
                            || answer_code(resp) == Some(Code::ResourceExhausted));
                    let safe = refused_unseen || if grpc { retryable_answer() } else { idempotent };
                    if policy.retry_rate_limited_elsewhere
                        && safe
                        && !was_elsewhere
                        && this.kept.is_none()
                        && pushback != Pushback::DoNotRetry
                        && may_retry(this)
                        && withdraw(shared, this.route, this.retries)
                    {
                        // Try once, at once, on an endpoint that is not rate limiting.
                        tracing::debug!("rate limited: retrying on another endpoint");
                        note(this, failed, RetryVerdict::RetriedElsewhere, 1);
                        *this.kept = outcome.ok().map(Box::new);
                        *this.elsewhere = true;
                        return Next::RetryAfter(Duration::ZERO);
                    }
                    let retryable = if grpc {
                        retryable_answer()
                    } else {
                        idempotent && policy.statuses.contains(resp.status())
                    };
                    (retryable, pushback)
                }
                Some(Class::Success) | None if grpc && retryable_answer() => {
                    failed = Some(TryOutcome::Failed(resp.status().as_u16()));
                    (true, pushback())
                }
                Some(Class::Success) | None => (false, Pushback::Unspecified),
            }
        }
        Err(e) => {
            // The try elsewhere reached no application (none to go to, its connection
            // failed, its stream was refused): the rate-limited answer kept is the
            // caller's, with its `Retry-After`, rather than an error in its place. A try
            // that may have run goes on to the usual decision: answering the kept 429
            // (marked as unseen by any application) would invite running it twice.
            if was_elsewhere
                && (is_caused_by::<NoElsewhere>(e.as_ref())
                    || is_connect_error(e.as_ref())
                    || is_refused_stream(e.as_ref()))
                && let Some(kept) = this.kept.take()
            {
                if shared.decisions.is_some() {
                    let status = kept.status().as_u16();
                    note(
                        this,
                        Some(TryOutcome::RateLimited(status)),
                        RetryVerdict::NoneElsewhere,
                        0,
                    );
                }
                return Next::Done(Ok(*kept));
            }
            if shared.decisions.is_some() {
                failed = Some(error_outcome(e.as_ref()));
            }
            // A gRPC try that broke without an answer ended UNAVAILABLE, as a gRPC
            // client reports it, and A6 retries a status the client made itself as one
            // the server sent: retried when the policy names that code. (The server may
            // have run the call: a policy for calls that must not run twice names no
            // code, and only refused streams and failed connections are retried.)
            let retryable_error = if *this.grpc {
                policy.grpc_codes.contains(Code::Unavailable)
            } else {
                *this.idempotent
            };
            (
                is_connect_error(e.as_ref())
                    || is_refused_stream(e.as_ref())
                    || retryable_error && is_retryable_error(e.as_ref()),
                Pushback::Unspecified,
            )
        }
    };
    // A newer answer supersedes a kept one.
    *this.kept = None;
    if !retryable {
        let verdict = if *this.idempotent {
            RetryVerdict::NotRetryable
        } else {
            RetryVerdict::NotIdempotent
        };
        note(this, failed, verdict, 0);
        return Next::Done(outcome);
    }
    // A negative gRPC pushback forbids a retry; a wait longer than we hold a request is
    // left to the caller.
    let too_long = matches!(pushback, Pushback::After(d) if d > super::MAX_PUSHBACK);
    if pushback == Pushback::DoNotRetry || too_long {
        note(this, failed, RetryVerdict::PushbackForbids, 0);
        return Next::Done(outcome);
    }
    if !may_retry(this) {
        let verdict = if this.body.is_replayable() {
            RetryVerdict::AttemptsExhausted
        } else {
            RetryVerdict::Committed
        };
        note(this, failed, verdict, 0);
        return Next::Done(outcome);
    }
    let mut delay = policy
        .backoff
        .delay(*this.retries, &mut fastrand::Rng::new());
    if let Pushback::After(d) = pushback {
        // A6: a gRPC server's pushback is the delay; elsewhere, a floor under ours.
        delay = if *this.grpc { d } else { delay.max(d) };
    }
    if this.deadline.is_some_and(|at| {
        Instant::now()
            .checked_add(delay)
            .is_none_or(|end| end >= at)
    }) {
        note(this, failed, RetryVerdict::Deadline, 0);
        return Next::Done(outcome);
    }
    if !withdraw(shared, this.route, this.retries) {
        tracing::debug!("retry budget exhausted");
        note(this, failed, RetryVerdict::BudgetExhausted, 0);
        return Next::Done(outcome.map_err(|e| BudgetExhausted(e).into()));
    }
    tracing::debug!(retries = *this.retries, ?delay, "retrying");
    note(this, failed, RetryVerdict::Retried { delay }, 1);
    Next::RetryAfter(delay)
}

/// What the decision record says of a try that failed without an answer.
fn error_outcome(e: &(dyn std::error::Error + 'static)) -> TryOutcome {
    if crate::connect::is_pool_overflow(e) {
        TryOutcome::NotSent
    } else if is_connect_error(e) {
        TryOutcome::ConnectError
    } else if is_caused_by::<TryTimeout>(e) {
        TryOutcome::Timeout
    } else {
        TryOutcome::Error
    }
}

/// Records a decision after the failed try `outcome` (`None`: it did not fail, nothing
/// is recorded), when the layer has a decision record. `counted` is 1 when the retry
/// was already counted in `retries`, so that the attempt recorded is the try that ended.
#[inline]
fn note<S, F, RB>(
    this: &Proj<'_, S, F, RB>,
    outcome: Option<TryOutcome>,
    verdict: RetryVerdict,
    counted: u32,
) {
    if let (Some(recorder), Some(outcome)) = (&this.shared.decisions, outcome)
        && recorder.is_enabled()
    {
        recorder.record(Event::Retry(RetryDecision {
            method: this.head.method.clone(),
            path: this
                .head
                .uri
                .path_and_query()
                .map(crate::decision::DecisionPath::from),
            attempt: (*this.retries + 1).saturating_sub(counted),
            outcome,
            verdict,
        }));
    }
}

/// Whether the request may have another try at all.
fn may_retry<S, F, RB>(this: &Proj<'_, S, F, RB>) -> bool {
    this.body.is_replayable() && *this.retries < *this.max_retries
}

/// The route's policy, or else the service's.
fn policy_of<'a>(shared: &'a Shared, route: &'a Option<RetryOverride>) -> &'a RetryPolicy {
    route.as_ref().map_or(&shared.policy, RetryOverride::policy)
}

/// The route's budget, or else the service's.
fn budget_of<'a>(shared: &'a Shared, route: &'a Option<RetryOverride>) -> &'a RetryBudget {
    route
        .as_ref()
        .map_or(&*shared.budget, RetryOverride::budget)
}

/// Takes a retry from the budget, counting it (in the service's counters).
fn withdraw(shared: &Shared, route: &Option<RetryOverride>, retries: &mut u32) -> bool {
    if !budget_of(shared, route).withdraw() {
        if let Some(c) = &shared.exhausted {
            c.inc();
        }
        return false;
    }
    *retries += 1;
    if let Some(c) = &shared.retries {
        c.inc();
    }
    true
}
