//! The conformance suite against the in-process stack: a `MeshClient` from `MockMesh`,
//! straight to the mock endpoints over mTLS. The proxy half is
//! `mesh-proxy/tests/conformance.rs`.

mesh_conformance::conformance_tests!(mesh_conformance::Stack::InProcess);
