//! Protocol detection on a client's first bytes (`mesh_tower::detect::classify`): the
//! decision is a plain reference's, on the bytes and on every prefix of them, and once
//! made it holds whatever follows. The reference: no bytes, a proper prefix of the HTTP/2
//! preface, or up to `MAX_METHOD_LEN` method characters (`A`-`Z`, `-`, `_`) without a
//! space are undecided (so at most 23 bytes are); the whole preface is HTTP/2; a space
//! after 1 to `MAX_METHOD_LEN` method characters is HTTP/1; anything else is opaque.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_tower::detect::{Detected, H2_PREFACE, MAX_METHOD_LEN, classify};

fuzz_target!(|data: &[u8]| {
    let mut decided: Option<Detected> = None;
    for end in 0..=data.len() {
        let bytes = &data[..end];
        let got = classify(bytes);
        assert_eq!(got, reference(bytes), "{bytes:?}");
        match (decided, got) {
            (Some(before), now) => assert_eq!(now, Some(before), "{bytes:?} changed it"),
            (None, Some(now)) => decided = Some(now),
            (None, None) => assert!(end < H2_PREFACE.len(), "{end} bytes undecided"),
        }
        match got {
            Some(Detected::Http2) => assert!(bytes.starts_with(H2_PREFACE)),
            Some(Detected::Http1) => {
                let space = bytes.iter().position(|&b| b == b' ');
                assert!(space.is_some_and(|i| (1..=MAX_METHOD_LEN).contains(&i)));
            }
            Some(Detected::Closed) => panic!("bytes are never closed"),
            _ => {}
        }
        // Past the decision, longer prefixes only repeat it: a few suffice.
        if decided.is_some() && end > H2_PREFACE.len() + 8 {
            assert_eq!(classify(data), decided);
            break;
        }
    }
});

fn reference(bytes: &[u8]) -> Option<Detected> {
    if bytes.is_empty() {
        return None;
    }
    if bytes.len() >= H2_PREFACE.len() && bytes.starts_with(H2_PREFACE) {
        return Some(Detected::Http2);
    }
    if bytes.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(bytes) {
        return None;
    }
    let method = |m: &[u8]| {
        m.len() <= MAX_METHOD_LEN
            && m.iter()
                .all(|&b| b.is_ascii_uppercase() || b == b'-' || b == b'_')
    };
    match bytes.iter().position(|&b| b == b' ') {
        Some(i) if i > 0 && method(&bytes[..i]) => Some(Detected::Http1),
        Some(_) => Some(Detected::Opaque),
        None if method(bytes) => None,
        None => Some(Detected::Opaque),
    }
}
