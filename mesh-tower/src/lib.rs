//! The mesh as tower middleware.
//!
//! This crate will hold one module per middleware (balance, breaker, retry, timeout,
//! ratelimit, authz, route, metrics, fault), the per-endpoint connection stack on hyper 1,
//! the `MeshClient` and `MeshServer` builders, and the mock mesh behind `test-util`. It
//! builds on `mesh-core` and `mesh-spiffe` and never depends on tonic. Its work is tracked
//! on the project's "mesh-tower client" issue; the crate holds no code yet.
