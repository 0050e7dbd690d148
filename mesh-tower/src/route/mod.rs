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
//! precedence order: the first hit is the answer. A bucket of 16 or more matches is
//! also indexed by the first path segment its matches need (`users` for `/users/42`, a
//! prefix `/users` or the gRPC service `users`): a lookup walks only the matches for the
//! request's first segment and those that take any (regexes, `/`, no path), merged in
//! precedence order, so a thousand path routes on one hostname cost about what ten do.
//!
//! # The `Router`
//!
//! A [`Router`] sends each request to a backend of its route. Its [`Routes`] are built
//! once from `RouteConfig`s and named backends — any `Service` that is `Clone`, typically
//! a [`MeshClient`](crate::MeshClient) per `[services.NAME]` — and every reference is
//! checked then: an unknown backend, all-zero weights, a bad regex, fault or retry
//! setting is an error naming the route. Per request:
//!
//! 1. **Select** the route ([`RouteTable::select`]). No route: the default backend
//!    ([`RoutesBuilder::default_backend`]) if set, else 404 with a short text body, or,
//!    for a gRPC request, a trailers-only `UNIMPLEMENTED` (12), as the Gateway API and
//!    gRPC expect. Nothing reaches a backend.
//! 2. **Pick** a backend by weight ([`WeightedSplit`]): one draw from the thread's
//!    generator, or from a splitmix64 sequence with [`RoutesBuilder::seed`].
//! 3. **Policy**: a route's `retry` and `timeout` replace the backend's own for this
//!    request, carried as the [`RetryOverride`](crate::retry::RetryOverride) and
//!    [`TimeoutOverride`](crate::timeout::TimeoutOverride) request extensions, which this
//!    crate's [`Retry`](crate::retry::Retry) and [`Timeout`](crate::timeout::Timeout)
//!    layers (so every `MeshClient`) honour. A route's retry budget is its own, shared by
//!    its requests; what counts as a failure stays the backend's classification. A
//!    timeout field the route leaves unset keeps the backend's.
//! 4. **Faults**: a route's `fault` ([`crate::fault`]) wraps that route's backends only:
//!    delays and aborts for a share of its requests, optionally only those carrying a
//!    header, under the fault layer's cap on active faults.
//! 5. **Send** on a clone of the backend, awaiting its readiness in the response future,
//!    inside a `route` span naming the route and backend. With [`RouteMetrics`], requests
//!    are counted by route and backend and answers by route and status class.
//!
//! [`Router::replace`] swaps in a new route set atomically (`arc-swap`): requests are
//! routed by the set current when they are called and finish on the backend they were
//! sent to, so a reload drops nothing. [`RouterLayer`] is the same router with the
//! wrapped service as its default backend.
//!
//! The request path reads the current set without a lock, selects without allocating,
//! and clones one backend; a route with a retry or timeout override adds its
//! extensions to the request.
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
mod metrics;
mod router;
#[cfg(test)]
mod router_tests;
mod table;
#[cfg(test)]
mod tests;
mod weighted;

pub use self::error::{RouteError, RouterError};
pub use self::metrics::RouteMetrics;
pub use self::router::{ResponseFuture, Router, RouterLayer, Routes, RoutesBuilder};
pub use self::table::{RouteTable, Selected};
pub use self::weighted::{SplitError, WeightedSplit};
