//! A thin tonic adapter over the `mesh-tower` stack.
//!
//! This crate will provide a tonic-compatible channel over the mesh client stack, gRPC
//! classification and retry policy, deadline (`grpc-timeout`) propagation, serving tonic
//! services over `mesh-spiffe` mutual TLS, and per-method authorization. All mesh logic
//! stays in `mesh-tower`'s layers; this crate only adapts. It holds no code yet.
