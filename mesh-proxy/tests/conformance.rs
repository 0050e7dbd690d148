//! The conformance suite (`mesh-conformance`) against the proxy stack: the test's HTTP
//! client → an outbound `mesh-proxy` → mTLS → an inbound `mesh-proxy` per endpoint → the
//! mock endpoint in plaintext. It lives here because only this package's tests get the
//! freshly built binary (`CARGO_BIN_EXE_mesh-proxy`); the in-process half is
//! `conformance/tests/in_process.rs`, and the scenarios are the same list.

mesh_conformance::conformance_tests!(mesh_conformance::Stack::proxy(env!(
    "CARGO_BIN_EXE_mesh-proxy"
)));
