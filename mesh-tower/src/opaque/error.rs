//! Why an opaque listener could not start, or a connection could not be relayed.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use crate::connect::ConnectError;

/// Why an [`OpaqueServer`](super::OpaqueServer) or [`OpaqueClient`](super::OpaqueClient)
/// cannot be built or start serving.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// Neither `mtls` nor `plaintext` was chosen.
    #[error("choose the transport: `mtls(..)`, or `plaintext()` explicitly")]
    NoTransport,
    /// The listener's address could not be read.
    #[error("reading the listener's address: {0}")]
    Listener(#[source] io::Error),
}

/// Why an outbound opaque connection failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpaqueError {
    /// Discovery gave no endpoint within the fail-fast timeout (or ended with none).
    #[error("service `{service}` has no endpoints")]
    NoEndpoints {
        /// The service.
        service: String,
    },
    /// Every endpoint stayed in connect back-off for the fail-fast timeout.
    #[non_exhaustive]
    #[error(
        "service `{service}` has no endpoint out of connect back-off after {waited:.1?}{}",
        crate::balance::error::Causes(causes)
    )]
    NoReadyEndpoints {
        /// The service.
        service: String,
        /// How long the connection waited.
        waited: Duration,
        /// Each endpoint's failed connects and the last one's error (`address: reason`;
        /// at most [`MAX_CAUSES`](crate::balance::error::MAX_CAUSES), then how many more).
        causes: Vec<String>,
    },
    /// Connecting failed on every endpoint tried.
    #[error("service `{service}`: connecting failed on {attempts} endpoint(s), last: {last}")]
    Connect {
        /// The service.
        service: String,
        /// Endpoints tried.
        attempts: usize,
        /// The last failure.
        #[source]
        last: ConnectError,
    },
    /// The relay failed after connecting (a reset, a TLS error), or stayed idle for its
    /// idle timeout.
    #[error("relaying with {addr}: {source}")]
    Relay {
        /// The endpoint.
        addr: SocketAddr,
        /// The error, with the bytes moved before it.
        #[source]
        source: crate::relay::RelayError,
    },
}
