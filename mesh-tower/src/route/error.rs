//! Errors of route tables.

use crate::matcher::MatchError;

/// Why routes cannot be compiled.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RouteError {
    /// One of a route's matches.
    #[error("route `{route}`, matches[{index}]: {source}")]
    Match {
        /// The route.
        route: String,
        /// Which match.
        index: usize,
        /// What is wrong with it.
        #[source]
        source: MatchError,
    },
    /// A hostname that is neither a name nor `*.` and a name.
    #[error("route `{route}`: `{host}` is not a hostname (or `*.` and one)")]
    Host {
        /// The route.
        route: String,
        /// The hostname.
        host: String,
    },
}
