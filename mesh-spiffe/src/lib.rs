//! SPIFFE workload identity and mutual TLS for the mesh.
//!
//! Every connection in the mesh is authenticated by SPIFFE ID on both ends, never by IP
//! address or DNS name. This crate owns *who* a peer is:
//!
//! - [`credentials`]: this workload's SVID and the trust bundles it verifies peers with,
//!   behind one [`CredentialSource`] trait, published through a lock-free
//!   [`CredentialStore`]. Sources: the SPIFFE Workload API of a SPIRE agent ([`spire`],
//!   feature `spire`); PEM files reloaded when they change ([`files::PemFiles`], feature
//!   `files`, on by default); the in-memory [`test_ca`] (feature `test-util`).
//! - [`fake_workload_api`] (feature `test-util`): a fake SPIFFE Workload API server that
//!   serves the test CA's SVIDs over a Unix socket and pushes rotations, for testing
//!   Workload API clients hermetically.
//! - [`verify`]: the SPIFFE verifier — exactly one `spiffe://` URI SAN, the chain checked
//!   against the bundle of the peer's own trust domain, then an [`Authorizer`].
//! - [`tls`]: [`Mtls`] builds rustls client and server configurations with an explicit
//!   crypto provider (`ring` by default, `aws-lc-rs` as a feature), ALPN `h2` and
//!   `http/1.1`, TLS 1.3 preferred, and certificates and bundles read at every handshake so
//!   rotation needs no restart.
//! - [`transport`]: [`MtlsConnector`] and [`MtlsAcceptor`] yield connections with the
//!   peer's verified [`PeerIdentity`]; accepting runs handshakes concurrently, each with a
//!   timeout.
//!
//! ```
//! # #[cfg(feature = "test-util")] {
//! use mesh_spiffe::{Authorizer, Mtls, MtlsAcceptor, MtlsConnector};
//! use mesh_spiffe::credentials::CredentialStore;
//! use mesh_spiffe::test_ca::TestCa;
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let mut ca = TestCa::new("example.org").unwrap();
//! let server = Mtls::new(CredentialStore::with(ca.issue("spiffe://example.org/api").unwrap(), ca.bundle_set().unwrap()));
//! let client = Mtls::new(CredentialStore::with(ca.issue("spiffe://example.org/web").unwrap(), ca.bundle_set().unwrap()));
//!
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
//! let addr = listener.local_addr().unwrap();
//! let mut incoming = MtlsAcceptor::new(&server, Authorizer::trust_domain(ca.trust_domain().clone()))
//!     .unwrap()
//!     .incoming(listener);
//! let connector = MtlsConnector::new(&client, mesh_core::SpiffeId::new("spiffe://example.org/api").unwrap()).unwrap();
//! let (_stream, server_id) = connector.connect(addr).await.unwrap();
//! let accepted = incoming.next().await.unwrap().unwrap();
//! assert_eq!(server_id.to_string(), "spiffe://example.org/api");
//! assert_eq!(accepted.peer.to_string(), "spiffe://example.org/web");
//! # });
//! # }
//! ```
//!
//! What is verified, trusted and refused, and how rotation works:
//! [`docs::threat_model`].
//!
//! It depends only on `mesh-core` among the mesh crates and knows nothing of balancing,
//! retries or HTTP routing.

pub mod authorize;

/// Longer documentation.
pub mod docs {
    #[doc = include_str!("docs/threat_model.md")]
    pub mod threat_model {}
}

pub mod credentials;
pub mod error;
#[cfg(feature = "test-util")]
pub mod fake_workload_api;
#[cfg(feature = "files")]
pub mod files;
pub mod server_tls;
#[cfg(feature = "spire")]
pub mod spire;
#[cfg(feature = "test-util")]
pub mod test_ca;
pub mod tls;
pub mod transport;
pub mod verify;

pub use crate::authorize::Authorizer;
pub use crate::credentials::{Bundle, BundleSet, CredentialSource, CredentialStore, Svid};
pub use crate::error::{CredentialError, VerifyError};
#[cfg(feature = "files")]
pub use crate::files::{FilesError, PemFiles};
pub use crate::server_tls::ServerTlsAcceptor;
pub use crate::tls::Mtls;
pub use crate::transport::{
    MtlsAcceptor, MtlsConnector, PeerIdentity, TransportError, peer_not_after,
};
