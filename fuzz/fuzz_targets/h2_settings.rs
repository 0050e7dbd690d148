//! The stream limit an HTTP/2 connection learns from its server's first frame
//! (`mesh_tower::sniffed_max_streams`, the parser `Sniff` runs on each read): it does not
//! depend on how the bytes were split into reads, and it is what a plain reference reads
//! from the whole buffer. The reference: the first frame must be `SETTINGS` (type 0x4)
//! on stream 0 (the reserved bit aside), without `ACK`, with a length that is a multiple
//! of 6, and all there; then the last `SETTINGS_MAX_CONCURRENT_STREAMS` (0x3) in it is the
//! limit (0 counts as 1), none is no limit (`usize::MAX`). Anything else leaves the
//! assumed limit, and nothing after the first frame changes it.
//!
//! The input: a byte `n`, then `n % 8` read lengths (cycled; 0 is an empty read), then
//! the server's bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_tower::sniffed_max_streams;

const ASSUMED: usize = 100;

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let cuts = usize::from(n % 8).min(rest.len());
    let (lengths, bytes) = rest.split_at(cuts);
    let expected = reference(bytes);

    assert_eq!(sniffed_max_streams(ASSUMED, [bytes]), expected, "whole");
    assert_eq!(
        sniffed_max_streams(ASSUMED, bytes.chunks(1)),
        expected,
        "a byte at a time"
    );
    let mut reads = Vec::new();
    if lengths.iter().any(|&len| len > 0) {
        let mut at = 0;
        for &len in lengths.iter().cycle() {
            if at >= bytes.len() {
                break;
            }
            let end = (at + usize::from(len)).min(bytes.len());
            reads.push(&bytes[at..end]);
            at = end;
        }
    } else {
        // Only empty reads (or none) before the whole.
        reads.extend(lengths.iter().map(|_| &bytes[..0]));
        reads.push(bytes);
    }
    assert_eq!(
        sniffed_max_streams(ASSUMED, reads.iter().copied()),
        expected,
        "reads of {lengths:?}"
    );
});

fn reference(bytes: &[u8]) -> usize {
    let Some(header) = bytes.get(..9) else {
        return ASSUMED;
    };
    let len = usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
    let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
    if header[3] != 0x4 || header[4] & 0x1 != 0 || stream != 0 || len % 6 != 0 {
        return ASSUMED;
    }
    let Some(payload) = bytes.get(9..9 + len) else {
        return ASSUMED;
    };
    let mut max = None;
    for setting in payload.chunks_exact(6) {
        if setting[..2] == [0, 3] {
            max = Some(u32::from_be_bytes([
                setting[2], setting[3], setting[4], setting[5],
            ]));
        }
    }
    match max {
        None => usize::MAX,
        Some(m) => usize::try_from(m).unwrap_or(usize::MAX).max(1),
    }
}
