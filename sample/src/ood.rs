//! Out-of-distribution detection by likelihood: the AUROC of bits/dim, and of the typicality
//! test of Nalisnick et al. (2019), which flags a batch whose mean NLL is far from the
//! training set's entropy estimate in either direction.

use rand::seq::SliceRandom;
use tarflow_flows::rng::seeded;

/// Area under the ROC curve of separating `outlier` from `inlier` scores where a higher score
/// means more outlying: P(s_out > s_in) + ½·P(s_out = s_in), by the Mann–Whitney U statistic
/// (average ranks for ties). Non-finite scores must be filtered out first.
pub fn auroc(inlier: &[f64], outlier: &[f64]) -> f64 {
    let (n, m) = (inlier.len(), outlier.len());
    if n == 0 || m == 0 {
        return f64::NAN;
    }
    let mut all: Vec<(f64, bool)> = inlier
        .iter()
        .map(|&v| (v, false))
        .chain(outlier.iter().map(|&v| (v, true)))
        .collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < all.len() {
        let mut j = i;
        while j + 1 < all.len() && all[j + 1].0 == all[i].0 {
            j += 1;
        }
        // Ranks i+1 ..= j+1 share their mean.
        let r = (i + j + 2) as f64 / 2.0;
        rank_sum += r * all[i..=j].iter().filter(|e| e.1).count() as f64;
        i = j + 1;
    }
    let u = rank_sum - (m * (m + 1)) as f64 / 2.0;
    u / (n as f64 * m as f64)
}

/// The typicality statistic `|mean(batch) − reference|` of disjoint batches of `m` scores,
/// taken in an order shuffled by `seed` (batch size 1: each image's own distance).
pub fn typicality(scores: &[f64], m: usize, reference: f64, seed: u64) -> Vec<f64> {
    let mut v: Vec<f64> = scores.to_vec();
    v.shuffle(&mut seeded(seed));
    v.chunks_exact(m.max(1))
        .map(|c| (c.iter().sum::<f64>() / c.len() as f64 - reference).abs())
        .collect()
}

/// `255 − x`: the inverted images (white digits become black on white).
pub fn invert(pixels: &[u8]) -> Vec<u8> {
    pixels.iter().map(|&p| 255 - p).collect()
}

/// `n` images of `len` uniformly random bytes from `seed`.
pub fn uniform_noise(n: usize, len: usize, seed: u64) -> Vec<Vec<u8>> {
    use rand::Rng;
    let mut rng = seeded(seed);
    (0..n)
        .map(|_| (0..len).map(|_| rng.random::<u8>()).collect())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auroc_of_separated_tied_and_reversed_scores() {
        assert_eq!(auroc(&[1.0, 2.0], &[3.0, 4.0]), 1.0);
        assert_eq!(auroc(&[3.0, 4.0], &[1.0, 2.0]), 0.0);
        assert_eq!(auroc(&[1.0, 1.0], &[1.0, 1.0]), 0.5);
        // One of the four pairs is ordered the wrong way: 3/4.
        assert!((auroc(&[1.0, 3.0], &[2.0, 4.0]) - 0.75).abs() < 1e-12);
        // Brute force over all pairs on a small random set with ties.
        let a = [0.3, 1.2, 1.2, 0.7, 2.0, 0.1];
        let b = [1.2, 0.9, 2.5, 0.3];
        let mut s = 0.0;
        for x in a {
            for y in b {
                s += if y > x {
                    1.0
                } else if y == x {
                    0.5
                } else {
                    0.0
                };
            }
        }
        assert!((auroc(&a, &b) - s / 24.0).abs() < 1e-12);
    }

    #[test]
    fn typicality_batches_are_disjoint_means() {
        let t = typicality(&[1.0, 1.0, 3.0, 3.0], 4, 1.0, 0);
        assert_eq!(t, vec![1.0]);
        assert_eq!(typicality(&[5.0; 10], 3, 2.0, 1), vec![3.0; 3]);
    }
}
