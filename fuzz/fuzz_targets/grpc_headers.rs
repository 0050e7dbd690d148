//! `grpc-timeout`, `grpc-retry-pushback-ms` and `grpc-status`: parsing never panics, and a
//! parsed timeout encodes back to a value that parses to at least the same duration.
#![no_main]

use std::time::Duration;

use http::HeaderValue;
use libfuzzer_sys::fuzz_target;
use mesh_core::classify::grpc;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = HeaderValue::from_bytes(data) else {
        return;
    };
    if let Ok(timeout) = grpc::parse_timeout(&value) {
        let back =
            grpc::parse_timeout(&grpc::encode_timeout(timeout)).expect("encoded timeouts parse");
        assert!(back >= timeout);
    }
    if let Ok(grpc::Pushback::After(d)) = grpc::parse_pushback(&value, Duration::from_secs(30)) {
        assert!(d <= Duration::from_secs(30));
    }
    let _ = grpc::parse_status(&value);
});
