//! Why the mock mesh could not do what a test asked.

/// Why the mock mesh could not do what a test asked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MockMeshError {
    /// The test CA refused to issue a certificate.
    #[error("test CA: {0}")]
    Ca(#[from] mesh_spiffe::test_ca::TestCaError),
    /// A workload name did not make a valid SPIFFE ID.
    #[error("`{0}` is not a valid SPIFFE ID: {1}")]
    Id(String, String),
    /// A socket could not be bound, or a file written.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// A TLS configuration could not be built.
    #[error("TLS: {0}")]
    Tls(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A client or channel could not be built.
    #[error("building a client: {0}")]
    Client(#[from] mesh_tower::client::BuildError),
    /// A server could not start.
    #[error("starting a server: {0}")]
    Server(#[from] mesh_tower::server::ServerError),
    /// An authorization policy did not compile.
    #[error("authorization policy: {0}")]
    Policy(#[from] mesh_tower::authz::PolicyError),
    /// A lock was poisoned by a panic in another thread.
    #[error("a mock mesh lock was poisoned by a panic elsewhere")]
    Poisoned,
}
