//! SPIFFE ID extraction from a certificate's DER: any bytes are refused or give a workload
//! ID (`spiffe://` with a path) that parses back to itself; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_core::identity::SpiffeId;
use mesh_spiffe::verify::spiffe_id_of;
use rustls_pki_types::CertificateDer;

fuzz_target!(|data: &[u8]| {
    let Ok(id) = spiffe_id_of(&CertificateDer::from(data)) else {
        return;
    };
    assert!(!id.path().is_empty(), "a workload ID has a path: {id}");
    let text = id.to_string();
    assert!(text.starts_with("spiffe://"), "{text}");
    assert_eq!(SpiffeId::new(&text).ok(), Some(id));
});
