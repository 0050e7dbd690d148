//! The mesh as tower middleware.
//!
//! This crate holds the client and server stacks of the mesh, one module per middleware,
//! each behind a feature of the same name:
//!
//! - [`balance`] (feature `balance`): per-endpoint peak-EWMA load with rate-limit
//!   penalties, for power-of-two-choices balancing;
//! - [`breaker`] (feature `breaker`): per-endpoint circuit breaking off the request path;
//! - [`connect`]: per-endpoint HTTP/1.1 and HTTP/2 connections on hyper 1, plaintext or
//!   SPIFFE mTLS, with a connect timeout and readiness that follows connection health;
//! - [`client`]: [`MeshClient`], the whole client stack for one service;
//! - [`retry`]: the retry budget;
//! - [`metrics`]: Prometheus metrics in the host's registry;
//! - [`backoff`]: exponential back-off with jitter, shared by retries and ejections;
//! - `mock` (feature `test-util`): scripted HTTP endpoints on loopback, the mock mesh.
//!
//! The server side (`MeshServer`: authorization, local rate limiting) is
//! tracked on the project's mesh-tower issue. The crate builds on `mesh-core` and
//! `mesh-spiffe` and never depends on tonic.

pub mod backoff;
#[cfg(feature = "balance")]
pub mod balance;
#[cfg(feature = "breaker")]
pub mod breaker;
pub mod client;
pub mod connect;
pub mod metrics;
#[cfg(feature = "test-util")]
pub mod mock;
pub mod retry;

pub use crate::client::{MeshClient, MeshClientBuilder};
