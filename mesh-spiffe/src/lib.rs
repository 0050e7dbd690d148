//! SPIFFE workload identity and mutual TLS for the mesh.
//!
//! This crate will own everything about *who* a peer is: credential sources (the SPIRE
//! Workload API through the `spiffe` crate, PEM files with hot reload, and an in-memory
//! test CA behind `test-util`), rustls client and server configurations that verify peers
//! by SPIFFE ID rather than by DNS name, certificate and trust-anchor rotation without
//! restarts, the `PeerIdentity` request extension, and a TLS connector and acceptor.
//!
//! It depends only on `mesh-core` among the mesh crates and knows nothing of balancing,
//! retries or HTTP routing. Its work is tracked on the project's "mesh-spiffe" issue; the
//! crate holds no code yet.
