//! Fault injection: delays and aborts for a share of requests, to test how callers cope.
//!
//! The model is Envoy's HTTP fault filter (and the Gateway API and Linkerd fault
//! injection built on the same idea). For each request, [`Fault`]:
//!
//! 1. passes it through untouched unless it is targeted: with
//!    [`only_with_header`](FaultLayer::only_with_header) (or
//!    [`only_with_header_value`](FaultLayer::only_with_header_value)), only requests
//!    carrying that header (with that value) are; without, every request is;
//! 2. draws, independently, whether to delay it (`delay_ratio`) and whether to abort it
//!    (`abort_ratio`). A ratio of 0 never draws and never faults; a ratio of 1 always
//!    faults;
//! 3. takes a slot under the cap on active faults ([`max_active`](FaultLayer::max_active),
//!    default [`DEFAULT_MAX_ACTIVE`]); when all are taken, the request passes unfaulted.
//!    The slot is an atomic count and an RAII guard: it is freed when the delay ends or
//!    the abort is answered, or when the response future is dropped, so cancellation never
//!    leaks one. Envoy's `max_active_faults` is unlimited by default; a bound here keeps a
//!    mistaken ratio from holding an unbounded number of requests;
//! 4. delays it with `tokio::time::sleep` *before* calling the inner service (so paused
//!    time drives it in tests), then aborts it or calls the inner service. A request both
//!    delayed and aborted waits, then is answered, as in Envoy.
//!
//! An aborted request never reaches the inner service. It is answered with the abort
//! status and a short text body or, for a gRPC request (`content-type:
//! application/grpc…`), with a trailers-only response: HTTP 200 and `grpc-status` in the
//! only header block. The gRPC code is the one set with
//! [`abort_grpc_code`](FaultLayer::abort_grpc_code), or else the HTTP status mapped as
//! gRPC's [HTTP to gRPC status code mapping] says ([`grpc_code_for`]):
//!
//! | HTTP status | gRPC code |
//! |---|---|
//! | 400 | 13 `INTERNAL` |
//! | 401 | 16 `UNAUTHENTICATED` |
//! | 403 | 7 `PERMISSION_DENIED` |
//! | 404 | 12 `UNIMPLEMENTED` |
//! | 429, 502, 503, 504 | 14 `UNAVAILABLE` |
//! | any other | 2 `UNKNOWN` |
//!
//! Faulted responses say so in [`FAULT_HEADER`] (`x-mesh-fault`): `abort` on an abort,
//! `delay` on the inner service's response to a delayed request (both values when a
//! request was delayed, then aborted).
//!
//! The draws are `fastrand`'s thread-local generator, or with [`seed`](FaultLayer::seed)
//! a splitmix64 sequence in an atomic, shared by a service's clones, so a test sees the
//! same requests faulted every run. Neither allocates nor locks per request. A delayed
//! request moves the inner service that was polled ready into its future and leaves a
//! clone behind, hence `S: Clone`.
//!
//! ```
//! use std::time::Duration;
//! use http::{HeaderName, Request, Response, StatusCode};
//! use mesh_tower::fault::FaultLayer;
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let svc = ServiceBuilder::new()
//!     .layer(
//!         FaultLayer::new()
//!             .delay(Duration::from_millis(100), 0.1)
//!             .abort(StatusCode::SERVICE_UNAVAILABLE, 1.0)
//!             .only_with_header(HeaderName::from_static("x-chaos"))
//!             .seed(7),
//!     )
//!     .service(service_fn(|_req: Request<()>| async {
//!         Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Empty::<bytes::Bytes>::new()))
//!     }));
//!
//! let plain = svc.clone().oneshot(Request::new(())).await?;
//! assert_eq!(plain.status(), StatusCode::OK);
//!
//! let chaos = Request::builder().header("x-chaos", "1").body(())?;
//! let aborted = svc.oneshot(chaos).await?;
//! assert_eq!(aborted.status(), StatusCode::SERVICE_UNAVAILABLE);
//! assert!(aborted.headers().get_all("x-mesh-fault").iter().any(|v| v == "abort"));
//! # Ok(()) }
//! ```
//!
//! [HTTP to gRPC status code mapping]: https://github.com/grpc/grpc/blob/master/doc/http-grpc-status-mapping.md

pub mod error;
mod future;
mod layer;
mod service;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Response, StatusCode};

pub use self::error::InvalidFault;
pub use self::future::ResponseFuture;
pub use self::layer::FaultLayer;
pub use self::service::Fault;
use crate::body::ResponseBody;

/// The default cap on faults in progress at once.
pub const DEFAULT_MAX_ACTIVE: usize = 100;

/// The response header naming the faults injected: `abort`, `delay`.
pub const FAULT_HEADER: &str = "x-mesh-fault";

fn header_name() -> HeaderName {
    HeaderName::from_static(FAULT_HEADER)
}

/// The gRPC status code for an HTTP status, per gRPC's HTTP to gRPC status code mapping
/// (see the [module docs](self)).
pub fn grpc_code_for(status: StatusCode) -> u16 {
    mesh_core::classify::grpc::Code::for_http_status(status.as_u16()) as u16
}

/// The share of requests a fault applies to, as a threshold on a 64-bit draw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ratio {
    Never,
    Below(u64),
    Always,
}

impl Ratio {
    /// Clamped to 0 to 1; NaN is 0.
    fn new(ratio: f64) -> Self {
        if ratio.is_nan() || ratio <= 0.0 {
            Self::Never
        } else if ratio >= 1.0 {
            Self::Always
        } else {
            // Below 2^64: the cast cannot saturate.
            Self::Below((ratio * 18_446_744_073_709_551_616.0) as u64)
        }
    }

    /// Whether this request is faulted (drawing only for a ratio strictly between 0 and 1).
    fn hit(self, dice: &Dice) -> bool {
        match self {
            Self::Never => false,
            Self::Always => true,
            Self::Below(threshold) => dice.roll() < threshold,
        }
    }
}

/// Where the draws come from.
#[derive(Clone, Debug)]
pub(crate) enum Dice {
    /// `fastrand`'s thread-local generator.
    Thread,
    /// A splitmix64 sequence from a seed, shared by a service's clones.
    Seeded(Arc<AtomicU64>),
}

/// A seed for the `stream`-th of several independent sequences drawn from `seed`: the two
/// mixed through splitmix64's finalizer, so that nearby streams start far apart.
pub(crate) fn derive_seed(seed: u64, stream: u64) -> u64 {
    let mut z = seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Dice {
    pub(crate) fn roll(&self) -> u64 {
        const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;
        match self {
            Self::Thread => fastrand::u64(..),
            Self::Seeded(state) => {
                let mut z = state
                    .fetch_add(GAMMA, Ordering::Relaxed)
                    .wrapping_add(GAMMA);
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^ (z >> 31)
            }
        }
    }
}

/// One request's abort answer.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Abort {
    status: StatusCode,
    /// The gRPC code, for a gRPC request.
    grpc: Option<u16>,
    /// Whether the request was delayed first.
    delayed: bool,
}

impl Abort {
    fn response<B>(self) -> Response<ResponseBody<B>> {
        let mut response = match self.grpc {
            Some(code) => crate::body::grpc_answer(code, "fault injected"),
            None => crate::body::text_answer(self.status, Bytes::from_static(b"fault injected\n")),
        };
        let headers = response.headers_mut();
        if self.delayed {
            headers.append(header_name(), HeaderValue::from_static("delay"));
        }
        headers.append(header_name(), HeaderValue::from_static("abort"));
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_statuses_map_to_grpc_codes() {
        let code = |s: u16| grpc_code_for(StatusCode::from_u16(s).unwrap());
        assert_eq!(code(400), 13);
        assert_eq!(code(401), 16);
        assert_eq!(code(403), 7);
        assert_eq!(code(404), 12);
        for s in [429, 502, 503, 504] {
            assert_eq!(code(s), 14);
        }
        for s in [200, 500, 501, 418] {
            assert_eq!(code(s), 2);
        }
    }

    #[test]
    fn ratios_clamp() {
        assert_eq!(Ratio::new(f64::NAN), Ratio::Never);
        assert_eq!(Ratio::new(-1.0), Ratio::Never);
        assert_eq!(Ratio::new(0.0), Ratio::Never);
        assert_eq!(Ratio::new(1.0), Ratio::Always);
        assert_eq!(Ratio::new(2.0), Ratio::Always);
        assert_eq!(Ratio::new(0.5), Ratio::Below(1 << 63));
    }

    #[test]
    fn seeded_draws_repeat() {
        let a = Dice::Seeded(Arc::new(AtomicU64::new(42)));
        let b = Dice::Seeded(Arc::new(AtomicU64::new(42)));
        let first: Vec<u64> = (0..8).map(|_| a.roll()).collect();
        assert!((0..8).all(|i| b.roll() == first[i]));
        assert_ne!(first[0], first[1]);
    }
}
