//! The SPIFFE verifier on an untrusted peer certificate, for both sides of a connection:
//! the SAN rules, the bundle lookup by trust domain and webpki's parsing all run on any
//! bytes without a panic, and nothing is accepted that is not a workload ID of the one
//! trust domain with a bundle, issued by that bundle's CA.
//!
//! The bundle is a fixed CA for `example.org` (`fuzz/fixtures/`); the seeds are leaves it
//! issued, valid until 2126, so the chain check passes for them at the fixed `NOW`.
#![no_main]

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use mesh_core::identity::TrustDomain;
use mesh_spiffe::Authorizer;
use mesh_spiffe::credentials::{Bundle, BundleSet, CredentialSource, CredentialStore};
use mesh_spiffe::verify::verify_peer;
use rustls::crypto::CryptoProvider;
use rustls_pki_types::{CertificateDer, UnixTime};

/// 2027-01-01T00:00:00Z, within the seeds' validity.
const NOW: Duration = Duration::from_secs(1_798_761_600);

struct Fixture {
    source: Arc<dyn CredentialSource>,
    provider: Arc<CryptoProvider>,
    ca: CertificateDer<'static>,
}

static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
    let ca = CertificateDer::from(&include_bytes!("../fixtures/example.org-ca.der")[..]);
    let bundle = Bundle::new(vec![ca.clone()]).expect("the fixture CA is a trust anchor");
    let td = TrustDomain::new("example.org").expect("a valid trust domain");
    let store = CredentialStore::new();
    store.set_bundles(BundleSet::new().with(td, bundle));
    Fixture {
        source: Arc::new(store),
        provider: mesh_spiffe::tls::default_provider(),
        ca,
    }
});

fuzz_target!(|data: &[u8]| {
    let f = &*FIXTURE;
    let leaf = CertificateDer::from(data);
    // The CA itself as an intermediate too, as a peer may send it.
    for intermediates in [&[][..], std::slice::from_ref(&f.ca)] {
        for server in [true, false] {
            let Ok(id) = verify_peer(
                f.source.clone(),
                Authorizer::any(),
                &f.provider,
                &leaf,
                intermediates,
                UnixTime::since_unix_epoch(NOW),
                server,
            ) else {
                continue;
            };
            assert_eq!(id.trust_domain().to_string(), "example.org");
            assert!(!id.path().is_empty());
            assert_ne!(data, f.ca.as_ref(), "the CA is not a leaf");
        }
    }
});
