//! The types every mesh crate agrees on.
//!
//! `mesh-core` is the small, slow-to-change base of the mesh, in the spirit of
//! `tower-service` or `tracing-core`: it defines what an identity, an endpoint, a discovery
//! change, a response class and a configuration *are*, and leaves TLS, HTTP stacks and
//! balancing to the crates above it (`mesh-spiffe`, `mesh-tower`, `mesh-tonic`,
//! `mesh-proxy`). It depends on no HTTP server or TLS stack.
//!
//! - [`identity`]: SPIFFE IDs and trust domains (re-exported from the `spiffe` crate) and
//!   [`IdentityPattern`]s for authorization rules.
//! - [`endpoint`]: [`Endpoint`] (address, expected identity, zone,
//!   weight, metadata) and its discovery key.
//! - [`discover`]: streams of `Insert`/`Remove` changes for tower's balancers, from a
//!   static list, a watched file or DNS (each behind a feature).
//! - [`classify`]: success / failure / rate-limited classification of HTTP responses and
//!   gRPC statuses, and bounded parsers for `Retry-After`, `grpc-retry-pushback-ms` and
//!   `grpc-timeout`.
//! - [`config`]: serde types for the whole mesh with documented defaults and validation
//!   that reports every error with its key path.
//! - [`error`]: the per-concern error enums and helpers to find a cause in an error chain.
//! - `watch` (feature `file-watch`): `FileWatch`, the robust watch of a set of files
//!   (directory events, debounce, a safety-net poll, atomic replace and symlink swaps) that
//!   file discovery and `mesh-spiffe`'s PEM credential files share.
//! - `sock` (feature `sock`): the TCP options every mesh connection gets (keepalive,
//!   `TCP_USER_TIMEOUT`, `TCP_NODELAY`), which `mesh-spiffe`'s connector and `mesh-tower`'s
//!   clients and servers set.
//!
//! # Features
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `discover-static` | yes | [`discover::StaticDiscovery`] |
//! | `discover-file` | no | `discover::FileDiscovery` (tokio, notify) |
//! | `discover-dns` | no | `discover::DnsDiscovery` (tokio, hickory-resolver) |
//! | `file-watch` | no (on with `discover-file`) | `watch::FileWatch` (tokio, notify) |
//! | `sock` | no | `sock::TcpOptions`, `sock::tune` (tokio, socket2) |
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod classify;
pub mod config;
pub mod discover;
pub mod endpoint;
pub mod error;
pub mod identity;
mod serde_str;
#[cfg(feature = "sock")]
pub mod sock;
#[cfg(feature = "file-watch")]
pub mod watch;

pub use crate::endpoint::{Endpoint, EndpointKey};
pub use crate::identity::{IdentityPattern, SpiffeId, TrustDomain};
