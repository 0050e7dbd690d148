use std::sync::Arc;

use arc_swap::ArcSwap;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use mesh_spiffe::PeerIdentity;
use prometheus_client::metrics::counter::Counter;
use tower_service::Service;

use super::Limits;
use super::limits::Refusal;
use crate::body::{ResponseBody, ResponseFuture, grpc_answer, text_answer};

/// Admits requests within their client's and the total limit; see the
/// [module docs](super).
#[derive(Clone, Debug)]
pub struct RateLimit<S> {
    inner: S,
    limits: Arc<ArcSwap<Limits>>,
    /// Refusals by the client limits and by the total.
    counters: Option<Arc<[Counter; 2]>>,
}

impl<S> RateLimit<S> {
    pub(super) fn new(
        inner: S,
        limits: Arc<ArcSwap<Limits>>,
        counters: Option<Arc<[Counter; 2]>>,
    ) -> Self {
        Self {
            inner,
            limits,
            counters,
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> Arc<Limits> {
        self.limits.load_full()
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

impl<S, B, RB> Service<Request<B>> for RateLimit<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
{
    type Response = Response<ResponseBody<RB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, RB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let peer = req.extensions().get::<PeerIdentity>();
        let client = peer.map(PeerIdentity::id);
        let limits = self.limits.load();
        match limits.check_peer(peer) {
            Ok(()) => ResponseFuture::inner(self.inner.call(req)),
            Err(refusal) => {
                if let Some(counters) = &self.counters {
                    counters[usize::from(refusal.limit.id == "total")].inc();
                }
                tracing::debug!(
                    client = %client.map_or("unauthenticated".into(), ToString::to_string),
                    limit = refusal.limit.id,
                    wait = ?refusal.wait,
                    "request refused by the rate limit"
                );
                ResponseFuture::local(refusal_response(
                    &refusal,
                    mesh_core::classify::is_grpc(req.headers()),
                ))
            }
        }
    }
}

/// Whole seconds, rounded up, and at least one (a `Retry-After: 0` invites a storm).
fn whole_seconds(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

/// 429 with `Retry-After` and the `RateLimit` / `RateLimit-Policy` fields, or for gRPC a
/// trailers-only `RESOURCE_EXHAUSTED` with `grpc-retry-pushback-ms`.
fn refusal_response<B>(refusal: &Refusal<'_>, grpc: bool) -> Response<ResponseBody<B>> {
    let secs = whole_seconds(refusal.wait);
    let limit = refusal.limit;
    let value = |s: String| HeaderValue::try_from(s).unwrap_or(HeaderValue::from_static("1"));
    let mut response = if grpc {
        let mut response = grpc_answer(8, "rate limited");
        let ms = refusal.wait.as_millis().max(1);
        response
            .headers_mut()
            .insert("grpc-retry-pushback-ms", value(ms.to_string()));
        response
    } else {
        let mut response = text_answer(
            StatusCode::TOO_MANY_REQUESTS,
            Bytes::from_static(b"rate limited\n"),
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        response
    };
    let headers = response.headers_mut();
    headers.insert(
        "ratelimit-policy",
        value(format!(
            "\"{}\";q={};w={}",
            limit.id, limit.quota, limit.window_secs
        )),
    );
    headers.insert("ratelimit", value(format!("\"{}\";r=0;t={secs}", limit.id)));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_round_up_to_whole_seconds_of_at_least_one() {
        assert_eq!(whole_seconds(Duration::ZERO), 1);
        assert_eq!(whole_seconds(Duration::from_millis(1)), 1);
        assert_eq!(whole_seconds(Duration::from_secs(1)), 1);
        assert_eq!(whole_seconds(Duration::from_millis(1001)), 2);
        assert_eq!(whole_seconds(Duration::from_secs(30)), 30);
    }
}
