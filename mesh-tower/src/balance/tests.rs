#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;

#[test]
fn spill_rules() {
    let c = |penalized, cost| Cost {
        unready: false,
        penalized,
        cost,
    };
    assert!(!spill(c(false, 10.0), c(false, 10.0), 1.5));
    assert!(!spill(c(false, 15.0), c(false, 10.0), 1.5));
    assert!(spill(c(false, 15.1), c(false, 10.0), 1.5));
    assert!(spill(c(true, 1.0), c(false, 100.0), 1.5));
    assert!(!spill(c(false, 100.0), c(true, 1.0), 1.5));
}
