//! Outbound routing: which route, and so which backends and policies, a request takes.
//!
//! A [`RouteTable`] compiles [`mesh_core::config::RouteConfig`]s once (HTTPRoute /
//! GRPCRoute semantics of the Gateway API) and selects a request's route without
//! allocating:
//!
//! - **Hostnames** (`Host` or `:authority`, port ignored, case-insensitive): a route
//!   lists exact names and `*.suffix` wildcards, which match one or more leading labels
//!   but never the bare suffix (`*.example.org` takes `a.example.org` and
//!   `a.b.example.org`, not `example.org`); a route without hostnames takes any.
//! - **Matches** are [`RequestMatch`](crate::matcher::RequestMatch)es: path exact /
//!   prefix on segment boundaries / anchored regex, methods, headers (names
//!   case-insensitive), query parameters (names case-sensitive), gRPC service and method.
//!   Conditions of one match are ANDed; the matches of a route are ORed; a route without
//!   matches takes every request of its hostnames.
//!
//! **Precedence** across all routes, as the Gateway API specifies it:
//! 1. the most specific matching hostname: an exact name, then the wildcard with the
//!    longest suffix, then routes for any host;
//! 2. then the most specific match: an exact path (a gRPC service and method), then the
//!    longest path prefix (a gRPC service alone), then a regex (implementation-specific
//!    in the Gateway API: here above the `/` prefix and no path), then no path;
//! 3. then a match that names methods; then the most header matches; then the most
//!    query matches;
//! 4. then route order, then match order within the route.
//!
//! **Weighted backends**: a [`WeightedSplit`] picks a route's backend by weight with one
//! random draw (weights of 0 allowed, all 0 refused).
//!
//! Selection looks up the request's exact host and its wildcard suffixes (longest
//! first), then the any-host routes, and takes the first match in each bucket's
//! precedence order: the first hit is the answer.
//!
//! ```
//! use mesh_core::config::{BackendRef, PathMatch, RouteConfig, RouteMatch};
//! use mesh_tower::route::RouteTable;
//!
//! let route = |name: &str, prefix: &str| RouteConfig {
//!     name: name.into(),
//!     hosts: vec!["users.example.org".into()],
//!     matches: vec![RouteMatch { path: Some(PathMatch::Prefix(prefix.into())), ..Default::default() }],
//!     backends: vec![BackendRef { service: name.into(), weight: 1 }],
//!     retry: None,
//!     timeout: None,
//!     fault: None,
//! };
//! let table = RouteTable::new(&[route("api", "/api"), route("api-v2", "/api/v2")])?;
//! let req = http::Request::get("http://users.example.org:8080/api/v2/x").body(())?;
//! assert_eq!(table.select(&req).map(|s| s.name), Some("api-v2")); // the longer prefix
//! let other = http::Request::get("http://billing.example.org/api").body(())?;
//! assert_eq!(table.select(&other), None);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod error;
mod table;
#[cfg(test)]
mod tests;
mod weighted;

pub use self::error::RouteError;
pub use self::table::{RouteTable, Selected};
pub use self::weighted::{SplitError, WeightedSplit};
