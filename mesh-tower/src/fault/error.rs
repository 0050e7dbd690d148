//! The fault layer's configuration errors.

/// A [`FaultConfig`](mesh_core::config::FaultConfig) that cannot be injected.
#[derive(Clone, Copy, Debug, PartialEq, thiserror::Error)]
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
}
