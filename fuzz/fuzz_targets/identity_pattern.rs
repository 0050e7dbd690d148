//! Identity patterns: parsing never panics, and whatever parses displays back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_core::identity::{IdentityPattern, SpiffeId};

fuzz_target!(|data: &str| {
    let Ok(pattern) = data.parse::<IdentityPattern>() else {
        return;
    };
    let again: IdentityPattern = pattern.to_string().parse().expect("display round-trips");
    assert_eq!(again, pattern);
    // An exact pattern matches its own ID.
    if let Ok(id) = SpiffeId::new(data)
        && let IdentityPattern::Exact(_) = pattern
    {
        assert!(pattern.matches(&id));
    }
});
