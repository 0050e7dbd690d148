//! Writes the demo-only identities of `scripts/proxy-demo` (`examples/config/demo/`) with
//! the test CA. They are committed, so the demo runs on a machine without SPIRE; this
//! test regenerates them (ten years of validity) and is ignored in normal runs:
//!
//! ```text
//! cargo test -p mesh-proxy --test demo_certs -- --ignored
//! ```
//!
//! The keys are public, so the identities prove nothing: never trust `ca.pem` anywhere.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, SystemTime};

use mesh_spiffe::test_ca::TestCa;

/// The workloads of the demo, by file name and SPIFFE ID.
const WORKLOADS: [(&str, &str); 2] = [
    ("web", "spiffe://example.org/demo/web"),
    ("users", "spiffe://example.org/demo/users"),
];

const DAY: Duration = Duration::from_secs(24 * 3600);

#[test]
#[ignore = "rewrites the committed demo identities in examples/config/demo"]
fn write_demo_certs() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/config/demo");
    let mut ca = TestCa::new("example.org").unwrap();
    std::fs::write(dir.join("ca.pem"), ca.bundle().unwrap().to_pem()).unwrap();
    let now = SystemTime::now();
    for (name, id) in WORKLOADS {
        // The test CA's root is valid for ten years from now; the leaves end a day sooner.
        let svid = ca
            .leaf()
            .uri(id)
            .validity(now - DAY, now + 3650 * DAY - DAY)
            .build()
            .unwrap();
        let (chain, key) = svid.to_pem();
        std::fs::write(dir.join(format!("{name}.crt")), chain).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key).unwrap();
    }
}
