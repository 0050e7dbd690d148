//! `Retry-After`: parsing never panics and never exceeds the cap.
#![no_main]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderValue;
use libfuzzer_sys::fuzz_target;
use mesh_core::classify::retry_after;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = HeaderValue::from_bytes(data) else {
        return;
    };
    let cap = Duration::from_secs(300);
    for now in [UNIX_EPOCH, SystemTime::now()] {
        if let Ok(d) = retry_after::parse(&value, now, cap) {
            assert!(d <= cap);
        }
    }
});
