//! The fault layer's configuration errors.

/// A [`FaultConfig`](mesh_core::config::FaultConfig) that cannot be injected.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidFault {
    /// `abort_status` is not a final HTTP status (200 to 599, as Envoy requires).
    #[error("fault abort_status {0} is not an HTTP status from 200 to 599")]
    AbortStatus(u16),
    /// A ratio is not a number from 0 to 1.
    #[error("fault {field} {value} is not a ratio from 0 to 1")]
    Ratio {
        /// `delay_ratio` or `abort_ratio`.
        field: &'static str,
        /// The value given.
        value: f64,
    },
    /// `abort_grpc_code` is not a gRPC error code (1 to 16).
    #[error("fault abort_grpc_code {0} is not a gRPC error code from 1 to 16")]
    AbortGrpcCode(u16),
    /// The `header` that selects faulted requests is not a header name and value.
    #[error("fault header `{0}` is not a header name (and value)")]
    Header(String),
}
