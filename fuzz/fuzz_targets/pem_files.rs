//! The PEM file source's parsers on any file content: a trust bundle file, and an SVID
//! whose chain and key are the same file (which the source allows). Never a panic; what
//! is accepted is well-formed.
#![no_main]

use std::path::Path;
use std::sync::{Arc, LazyLock};

use libfuzzer_sys::fuzz_target;
use mesh_spiffe::files::{parse_bundle, parse_svid};
use rustls::crypto::CryptoProvider;

static PROVIDER: LazyLock<Arc<CryptoProvider>> = LazyLock::new(mesh_spiffe::tls::default_provider);

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.pem");
    if let Ok(bundle) = parse_bundle(path, data) {
        assert!(!bundle.certs().is_empty());
        assert_eq!(bundle.certs().len(), bundle.anchors().len());
    }
    if let Ok(svid) = parse_svid(path, data, path, data, &PROVIDER) {
        assert!(!svid.chain().is_empty());
        assert!(!svid.id().path().is_empty());
        assert!(svid.check_key(&PROVIDER).is_ok());
    }
});
