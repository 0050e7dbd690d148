//! A split of traffic over backends by weight.

/// Picks one of `n` backends by weight: backend `i` gets `weight[i] / total` of the picks.
/// Weights of 0 are allowed (a canary turned off); at least one must be positive. A pick
/// is one random draw and a binary search over cumulative weights: no allocation, no
/// lock.
///
/// ```
/// use mesh_tower::route::WeightedSplit;
///
/// let split = WeightedSplit::new(&[95, 5, 0])?;
/// let mut rng = fastrand::Rng::with_seed(7);
/// let picks: Vec<usize> = (0..1000).map(|_| split.pick(&mut rng)).collect();
/// assert!(picks.iter().all(|&i| i < 2)); // weight 0: never
/// # Ok::<(), mesh_tower::route::SplitError>(())
/// ```
#[derive(Clone, Debug)]
pub struct WeightedSplit {
    /// Running sums of the weights; the last is the total.
    cumulative: Box<[u64]>,
}

/// Why weights cannot split traffic.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SplitError {
    /// No backends.
    #[error("no backends to split traffic over")]
    Empty,
    /// Every weight is 0.
    #[error("every backend has weight 0: nothing would be sent")]
    AllZero,
}

impl WeightedSplit {
    /// A split by `weights`.
    pub fn new(weights: &[u32]) -> Result<Self, SplitError> {
        if weights.is_empty() {
            return Err(SplitError::Empty);
        }
        let cumulative: Box<[u64]> = weights
            .iter()
            .scan(0u64, |sum, &w| {
                *sum += u64::from(w);
                Some(*sum)
            })
            .collect();
        if cumulative.last() == Some(&0) {
            return Err(SplitError::AllZero);
        }
        Ok(Self { cumulative })
    }

    /// The number of backends.
    pub fn len(&self) -> usize {
        self.cumulative.len()
    }

    /// Whether there are no backends (never: construction refuses it).
    pub fn is_empty(&self) -> bool {
        self.cumulative.is_empty()
    }

    /// One backend's index, drawn by weight.
    pub fn pick(&self, rng: &mut fastrand::Rng) -> usize {
        if self.cumulative.len() == 1 {
            return 0;
        }
        self.pick_from(rng.u64(..))
    }

    /// One backend's index for `draw`, a uniformly random `u64`: the draw is scaled to
    /// the total weight (a multiply and a shift, with a bias below total / 2^64).
    pub fn pick_from(&self, draw: u64) -> usize {
        let total = self.cumulative.last().copied().unwrap_or(0);
        if self.cumulative.len() == 1 || total == 0 {
            return 0;
        }
        // total < 2^64 and draw < 2^64, so the product's high word is below total.
        let x = ((u128::from(draw) * u128::from(total)) >> 64) as u64;
        // The first backend whose running sum exceeds the draw: zero-weight backends
        // share their predecessor's sum and are never it.
        self.cumulative.partition_point(|&c| c <= x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_split_within_chi_square_bounds() {
        let weights = [70, 20, 0, 9, 1];
        let split = WeightedSplit::new(&weights).unwrap();
        let mut rng = fastrand::Rng::with_seed(42);
        let n = 100_000;
        let mut counts = [0u64; 5];
        for _ in 0..n {
            counts[split.pick(&mut rng)] += 1;
        }
        assert_eq!(counts[2], 0, "weight 0 is never picked");
        let total: u32 = weights.iter().sum();
        let chi2: f64 = weights
            .iter()
            .zip(counts)
            .filter(|(w, _)| **w > 0)
            .map(|(&w, c)| {
                let expected = n as f64 * f64::from(w) / f64::from(total);
                (c as f64 - expected).powi(2) / expected
            })
            .sum();
        // 3 degrees of freedom: the 99.9th percentile is 16.27.
        assert!(chi2 < 16.27, "chi-square {chi2} for {counts:?}");
    }

    #[test]
    fn bad_weights_are_refused_and_a_single_backend_needs_no_draw() {
        assert_eq!(WeightedSplit::new(&[]).unwrap_err(), SplitError::Empty);
        assert_eq!(
            WeightedSplit::new(&[0, 0]).unwrap_err(),
            SplitError::AllZero
        );
        let one = WeightedSplit::new(&[0, 3]).unwrap();
        let mut rng = fastrand::Rng::with_seed(1);
        assert!((0..100).all(|_| one.pick(&mut rng) == 1));
        assert_eq!(WeightedSplit::new(&[5]).unwrap().pick(&mut rng), 0);
    }
}
