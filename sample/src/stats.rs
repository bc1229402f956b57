//! Summaries of a set of scores: mean, standard error, spread, and what was left out.

/// Mean, standard error and range of the finite values of a set of scores, and how many
/// were left out as not finite.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// Finite values summarised.
    pub count: usize,
    /// Values left out (overflow: not a finite number).
    pub excluded: usize,
    /// Mean.
    pub mean: f64,
    /// Sample standard deviation.
    pub std: f64,
    /// Standard error of the mean, `std / √count`.
    pub stderr: f64,
    /// Least value.
    pub min: f64,
    /// Greatest value.
    pub max: f64,
}

/// The summable form of a [`Summary`]: the finite values' sum and count and the values left
/// out, which shares of a set (ranks of a data-parallel validation) add up.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sums {
    /// Sum of the finite values.
    pub sum: f64,
    /// Finite values.
    pub count: usize,
    /// Values left out (not a finite number).
    pub excluded: usize,
}

impl Sums {
    /// Adds `x`, or counts it as left out where it is not finite.
    pub fn add(&mut self, x: f64) {
        if x.is_finite() {
            self.sum += x;
            self.count += 1;
        } else {
            self.excluded += 1;
        }
    }

    /// The mean of the finite values and how many were left out; `None` when there were none.
    pub fn mean(&self) -> Option<(f64, usize)> {
        (self.count + self.excluded > 0)
            .then(|| (self.sum / self.count.max(1) as f64, self.excluded))
    }
}

impl Summary {
    /// Summarises the finite entries of `v`.
    pub fn of(v: &[f64]) -> Summary {
        let finite: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
        let (mean, std) = mean_std(&finite);
        Summary {
            count: finite.len(),
            excluded: v.len() - finite.len(),
            mean,
            std,
            stderr: std / (finite.len().max(1) as f64).sqrt(),
            // 0 rather than ±∞ for an empty set: a summary never holds a non-number.
            min: finite.iter().copied().reduce(f64::min).unwrap_or(0.0),
            max: finite.iter().copied().reduce(f64::max).unwrap_or(0.0),
        }
    }

    /// One line: `N images: bits/dim mean M ± SE (std S, min A, max B)`, and the exclusions.
    pub fn line(&self, what: &str) -> String {
        let mut s = format!(
            "{} images: {what} mean {:.4} ± {:.4} (std {:.4}, min {:.4}, max {:.4})",
            self.count, self.mean, self.stderr, self.std, self.min, self.max
        );
        if self.excluded > 0 {
            s += &format!(
                "; {} image(s) excluded: their likelihood overflows even in f64",
                self.excluded
            );
        }
        s
    }
}

/// Mean and sample standard deviation, scaled by the largest magnitude first so that values
/// near f64's range (the scores of images far from the data reach 1e289 bits/dim) do not
/// overflow in the squares.
pub fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let scale = v.iter().fold(0f64, |a, x| a.max(x.abs()));
    if scale == 0.0 || !scale.is_finite() {
        let m = v.iter().sum::<f64>() / n;
        return (m, if scale == 0.0 { 0.0 } else { f64::NAN });
    }
    let m = v.iter().map(|x| x / scale).sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x / scale - m).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (m * scale, var.sqrt() * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_leaves_out_and_counts_non_finite_values() {
        let s = Summary::of(&[1.0, f64::INFINITY, 3.0, f64::NAN]);
        assert_eq!((s.count, s.excluded), (2, 2));
        assert_eq!((s.mean, s.min, s.max), (2.0, 1.0, 3.0));
        assert!((s.std - 2f64.sqrt()).abs() < 1e-12);
        assert!((s.stderr - 1.0).abs() < 1e-12);
        assert!(s.line("bits/dim").contains("2 image(s) excluded"));
        // Values near f64's range keep a finite spread.
        let big = Summary::of(&[1e300, 3e300]);
        assert!((big.mean - 2e300).abs() < 1e286 && (big.std - 2f64.sqrt() * 1e300).abs() < 1e287);
    }
}
