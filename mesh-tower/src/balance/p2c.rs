//! Power of two choices (Mitzenmacher; as in Finagle, Linkerd and tower).
//!
//! Sample two distinct endpoints uniformly at random among those that are *ready* and keep
//! the one with the lower [`Cost`](crate::load::Cost). Comparing two random endpoints
//! instead of scanning all of them costs O(1) per request, needs no global ordering, and
//! avoids the herd behaviour of always choosing the single least-loaded endpoint, while
//! still steering traffic away from slow, busy or penalized endpoints.
//!
//! Both candidates are sampled among ready endpoints, so an unready endpoint never hands
//! its pair to the other candidate unopposed. Sampling tries a few random indices and,
//! only if they keep hitting unready endpoints, scans once from a random offset. A single
//! ready endpoint is returned as is; none gives `None`. Readiness is checked without side
//! effects: the caller takes any permit (a breaker's probe) for the endpoint it keeps.

/// Random draws before falling back to a scan.
const DRAWS: usize = 4;

/// One item sampled uniformly among the eligible ones, with its load.
fn sample<L>(
    len: usize,
    rng: &mut fastrand::Rng,
    eligible: &impl Fn(usize) -> Option<L>,
    exclude: Option<usize>,
) -> Option<(usize, L)> {
    for _ in 0..DRAWS {
        let i = rng.usize(..len);
        if Some(i) != exclude
            && let Some(load) = eligible(i)
        {
            return Some((i, load));
        }
    }
    let start = rng.usize(..len);
    (0..len)
        .map(|k| (start + k) % len)
        .filter(|&i| Some(i) != exclude)
        .find_map(|i| eligible(i).map(|load| (i, load)))
}

/// Picks an index of `len` items by power of two choices among the eligible ones:
/// `eligible(i)` gives item `i`'s load, or `None` when it may not take a request. Each
/// sampled item's load is computed once. Returns the winner and its load; ties go to the
/// first sampled.
pub fn pick_by<L: PartialOrd>(
    len: usize,
    rng: &mut fastrand::Rng,
    eligible: impl Fn(usize) -> Option<L>,
) -> Option<(usize, L)> {
    pick_pair_by(len, rng, eligible).map(|(winner, _)| winner)
}

/// What [`pick_pair_by`] returns: the winner and the pair's other candidate, each an
/// index with its load.
pub type Pair<L> = ((usize, L), Option<(usize, L)>);

/// [`pick_by`], returning the other candidate of the pair too (the loser, `None` when
/// only one item was eligible): the winner is the same, for the same random draws.
pub fn pick_pair_by<L: PartialOrd>(
    len: usize,
    rng: &mut fastrand::Rng,
    eligible: impl Fn(usize) -> Option<L>,
) -> Option<Pair<L>> {
    if len == 0 {
        return None;
    }
    let a = sample(len, rng, &eligible, None)?;
    let b = match len {
        // No second candidate to draw, or only one: no random draws spent on finding it.
        1 => return Some((a, None)),
        2 => eligible(1 - a.0).map(|load| (1 - a.0, load)),
        _ => sample(len, rng, &eligible, Some(a.0)),
    };
    match b {
        Some(b) if b.1 < a.1 => Some((b, Some(a))),
        b => Some((a, b)),
    }
}

/// Picks an index of `len` items by power of two choices among the ready ones.
///
/// `ready(i)` says whether item `i` may take a request; `load(i)` returns a comparable
/// load. Ties go to the first sampled.
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
    ready: impl Fn(usize) -> bool,
    load: impl Fn(usize) -> L,
) -> Option<usize> {
    pick_by(len, rng, |i| ready(i).then(|| load(i))).map(|(i, _)| i)
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
    fn unready_items_never_give_their_pair_away() {
        // Item 0 is unready; 1 and 2 are compared with each other every time.
        let mut rng = fastrand::Rng::with_seed(9);
        for _ in 0..1000 {
            assert_eq!(pick(3, &mut rng, |i| i != 0, |i| [0, 5, 1][i]), Some(2));
        }
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
