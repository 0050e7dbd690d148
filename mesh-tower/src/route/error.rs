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

/// Why a [`Routes`](super::Routes) set cannot be built.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RouterError {
    /// The route table (a match or a hostname).
    #[error(transparent)]
    Table(#[from] RouteError),
    /// A route's backends, weights, retry or fault settings.
    #[error("route `{route}`: {reason}")]
    Route {
        /// The route.
        route: String,
        /// What is wrong.
        reason: String,
    },
    /// The default backend is not one of the backends.
    #[error("default backend: no backend named `{0}`")]
    DefaultBackend(String),
}
