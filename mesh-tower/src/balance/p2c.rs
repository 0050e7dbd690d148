//! Power of two choices (Mitzenmacher; as in Finagle, Linkerd and tower).
//!
//! Pick two distinct endpoints uniformly at random among those that are *ready* and keep
//! the one with the lower [`Load`](super::load::Load). Comparing two random endpoints
//! instead of scanning all of them costs O(1) per request, needs no global ordering, and
//! avoids the herd behaviour of always choosing the single least-loaded endpoint, while
//! still steering traffic away from slow, busy or penalized endpoints.
//!
//! Readiness (an open circuit breaker, a connection that is not up, a saturated endpoint)
//! is checked on the sampled candidates, so the common case does no scan: a few random
//! pairs are tried and, only if they keep hitting unready endpoints, the candidates are
//! scanned once for the ready ones. A single ready endpoint is returned as is; none gives
//! `None`.

/// Picks an index of `len` items by power of two choices.
///
/// `ready(i)` says whether item `i` may take a request (it may take a permit, such as a
/// breaker's probe, so it is called at most once per returned index and only on
/// candidates); `load(i)` returns a comparable load. Ties go to the first sampled.
///
/// ```
/// use mesh_tower::balance::p2c::pick;
///
/// let loads = [5, 1, 9];
/// let mut rng = fastrand::Rng::with_seed(3);
/// let mut wins = [0; 3];
/// for _ in 0..1000 {
///     let i = pick(3, &mut rng, |_| true, |i| loads[i]).unwrap();
///     wins[i] += 1;
/// }
/// assert_eq!(wins[2], 0); // the heaviest never beats either other
/// assert!(wins[1] > wins[0]);
/// ```
pub fn pick<L: Ord>(
    len: usize,
    rng: &mut fastrand::Rng,
    mut ready: impl FnMut(usize) -> bool,
    load: impl Fn(usize) -> L,
) -> Option<usize> {
    match len {
        0 => return None,
        1 => return ready(0).then_some(0),
        _ => {}
    }
    // Sample pairs; an unready candidate is skipped, not compared.
    for _ in 0..3 {
        let a = rng.usize(..len);
        let mut b = rng.usize(..len - 1);
        if b >= a {
            b += 1;
        }
        let (la, lb) = (load(a), load(b));
        let (first, second) = if lb < la { (b, a) } else { (a, b) };
        if ready(first) {
            return Some(first);
        }
        if ready(second) {
            return Some(second);
        }
    }
    // Most candidates are unready: scan once, then choose among the ready ones. `ready` is
    // called on each item here, so keep the winner's permit and no other: a probe permit
    // taken by a loser is given back by its gate's own retry.
    let mut best: Option<(usize, L)> = None;
    for i in 0..len {
        let l = load(i);
        if best.as_ref().is_some_and(|(_, b)| *b <= l) {
            continue;
        }
        if ready(i) {
            best = Some((i, l));
        }
    }
    best.map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn trivial_cases() {
        let mut rng = fastrand::Rng::with_seed(1);
        assert_eq!(pick(0, &mut rng, |_| true, |i| i), None);
        assert_eq!(pick(1, &mut rng, |_| true, |i| i), Some(0));
        assert_eq!(pick(1, &mut rng, |_| false, |i| i), None);
        assert_eq!(pick(5, &mut rng, |_| false, |i| i), None);
        assert_eq!(pick(5, &mut rng, |i| i == 3, |i| i), Some(3));
    }

    #[test]
    fn the_least_loaded_of_three_wins_two_thirds() {
        // With distinct loads, the lightest of n wins every pair it is in: 2/n of picks
        // for n = 3; the heaviest never wins.
        let mut rng = fastrand::Rng::with_seed(42);
        let mut wins = [0u32; 3];
        for _ in 0..30_000 {
            wins[pick(3, &mut rng, |_| true, |i| [10, 20, 30][i]).unwrap()] += 1;
        }
        assert!((19_500..20_500).contains(&wins[0]), "{wins:?}");
        assert!((9_500..10_500).contains(&wins[1]), "{wins:?}");
        assert_eq!(wins[2], 0);
    }

    proptest! {
        #[test]
        fn picks_only_ready_items_and_never_the_worst_of_its_pair(
            loads in prop::collection::vec(0u32..100, 1..50),
            ready in prop::collection::vec(any::<bool>(), 50),
            seed in any::<u64>(),
        ) {
            let mut rng = fastrand::Rng::with_seed(seed);
            let n = loads.len();
            let any_ready = ready[..n].iter().any(|r| *r);
            let got = pick(n, &mut rng, |i| ready[i], |i| loads[i]);
            match got {
                Some(i) => prop_assert!(ready[i]),
                None => prop_assert!(!any_ready),
            }
            // When every item is ready the pick is never the unique maximum (for n > 1).
            let all = pick(n, &mut rng, |_| true, |i| loads[i]).unwrap();
            let max = *loads.iter().max().unwrap();
            if n > 1 && loads.iter().filter(|l| **l == max).count() == 1 {
                prop_assert!(loads[all] < max);
            }
        }
    }
}
