//! `grpc-timeout`, `grpc-retry-pushback-ms` and `grpc-status`: parsing never panics, a
//! parsed timeout encodes back to a value that parses to at least the same duration, and
//! a status is what a plain reference reads: 1 to 10 ASCII digits (no sign, no space)
//! whose value is the code from 0 to 16, else `UNKNOWN`; anything else is an error.
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
    let status = grpc::parse_status(&value).ok();
    let digits = (1..=10).contains(&data.len()) && data.iter().all(u8::is_ascii_digit);
    let expected = digits.then(|| {
        let n = data.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
        grpc::Code::ALL
            .into_iter()
            .find(|&code| code as u64 == n)
            .unwrap_or(grpc::Code::Unknown)
    });
    assert_eq!(status, expected, "{data:?}");
});
