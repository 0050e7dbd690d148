//! gRPC deadlines: `grpc-timeout` and the [`Deadline`] request extension.
//!
//! A call's deadline is the earlier of its `grpc-timeout` header (what tonic's
//! `Request::set_timeout` sets, or what a server received and forwards) and a
//! [`Deadline`] extension. [`MeshChannel`](crate::MeshChannel) reads it on every call:
//! past it, the call fails with `DEADLINE_EXCEEDED` without being sent; before it, the
//! call carries `Deadline` for the mesh-tower layers (so retries never back off past it)
//! and `grpc-timeout` with the time left, and the whole call, streaming bodies included,
//! ends with `DEADLINE_EXCEEDED` when it passes.
//!
//! mesh-tower's retry layer carries the deadline to every try and re-encodes
//! `grpc-timeout` as the time left on each. On the serving side,
//! [`GrpcServer`](crate::server::GrpcServer) turns the caller's `grpc-timeout` into the
//! handler's [`Deadline`] extension (and answers `DEADLINE_EXCEEDED` when it passes
//! first). Propagation across hops is explicit: a handler that calls another service
//! hands its own deadline on with [`propagate`], and the next hop sees a smaller
//! `grpc-timeout`.
//!
//! ```
//! use mesh_tonic::deadline;
//!
//! fn forward(incoming: &tonic::Request<String>) -> tonic::Request<String> {
//!     let mut outgoing = tonic::Request::new(incoming.get_ref().clone());
//!     deadline::propagate(incoming, &mut outgoing);
//!     outgoing
//! }
//! # let mut req = tonic::Request::new(String::new());
//! # req.set_timeout(std::time::Duration::from_secs(1));
//! # let out = forward(&req);
//! # assert!(deadline::of_request(&out).is_some());
//! ```

use http::HeaderMap;
use mesh_core::classify::grpc::parse_timeout;
use tokio::time::Instant;

pub use mesh_tower::timeout::Deadline;

/// The `grpc-timeout` header.
pub const GRPC_TIMEOUT: &str = "grpc-timeout";

/// The deadline `headers`' `grpc-timeout` sets, counted from `now`. A malformed value is
/// ignored (logged): it sets no deadline.
pub fn from_headers(headers: &HeaderMap, now: Instant) -> Option<Instant> {
    let value = headers.get(GRPC_TIMEOUT)?;
    match parse_timeout(value) {
        Ok(timeout) => Some(now.checked_add(timeout).unwrap_or_else(far_future)),
        Err(error) => {
            tracing::debug!(%error, "malformed grpc-timeout ignored");
            None
        }
    }
}

/// The deadline of an HTTP request: the earlier of its `grpc-timeout` and its
/// [`Deadline`] extension.
pub fn of_http<B>(req: &http::Request<B>, now: Instant) -> Option<Instant> {
    let carried = req.extensions().get::<Deadline>().map(|d| d.0);
    earliest(carried, from_headers(req.headers(), now))
}

/// The deadline of a tonic request, as a handler or a caller sees it: the earlier of its
/// [`Deadline`] extension and its `grpc-timeout` metadata (counted from now).
pub fn of_request<T>(req: &tonic::Request<T>) -> Option<Instant> {
    let carried = req.extensions().get::<Deadline>().map(|d| d.0);
    let header = req
        .metadata()
        .get(GRPC_TIMEOUT)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| http::HeaderValue::from_str(v).ok())
        .and_then(|v| parse_timeout(&v).ok())
        .map(|t| Instant::now().checked_add(t).unwrap_or_else(far_future));
    earliest(carried, header)
}

/// Gives `to` the deadline of `from` (the request a handler is serving), unless `to`
/// already has an earlier one. The outgoing call then carries the time left.
pub fn propagate<T, U>(from: &tonic::Request<T>, to: &mut tonic::Request<U>) {
    let Some(deadline) = of_request(from) else {
        return;
    };
    let own = to.extensions().get::<Deadline>().map(|d| d.0);
    if own.is_none_or(|own| own > deadline) {
        to.extensions_mut().insert(Deadline(deadline));
    }
}

/// The earlier of two optional deadlines.
pub(crate) fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// About 30 years from now: a timeout too long to add is as good as none.
fn far_future() -> Instant {
    Instant::now() + std::time::Duration::from_secs(86_400 * 365 * 30)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_earlier_of_header_and_extension_wins() {
        let now = Instant::now();
        let mut req = http::Request::new(());
        assert_eq!(of_http(&req, now), None);
        req.headers_mut()
            .insert(GRPC_TIMEOUT, http::HeaderValue::from_static("2S"));
        assert_eq!(of_http(&req, now), Some(now + Duration::from_secs(2)));
        req.extensions_mut()
            .insert(Deadline(now + Duration::from_secs(1)));
        assert_eq!(of_http(&req, now), Some(now + Duration::from_secs(1)));
        req.headers_mut()
            .insert(GRPC_TIMEOUT, http::HeaderValue::from_static("bogus"));
        assert_eq!(of_http(&req, now), Some(now + Duration::from_secs(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn propagate_keeps_the_earlier_deadline() {
        let mut incoming = tonic::Request::new(());
        incoming.set_timeout(Duration::from_secs(5));
        let mut outgoing = tonic::Request::new(());
        propagate(&incoming, &mut outgoing);
        let at = outgoing.extensions().get::<Deadline>().unwrap().0;
        assert_eq!(at, Instant::now() + Duration::from_secs(5));
        let mut shorter = tonic::Request::new(());
        shorter
            .extensions_mut()
            .insert(Deadline(Instant::now() + Duration::from_secs(1)));
        propagate(&incoming, &mut shorter);
        let at = shorter.extensions().get::<Deadline>().unwrap().0;
        assert_eq!(at, Instant::now() + Duration::from_secs(1));
    }
}
