//! Learning-rate schedule of ml-tarflow: linear warm-up from `start_lr` to `lr`, then cosine
//! decay to `min_lr` at the last step.

/// Warm-up + cosine schedule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WarmupCosine {
    /// Peak learning rate.
    pub lr: f64,
    /// Learning rate at step 0 (ml-tarflow: 1e-6).
    pub start_lr: f64,
    /// Final learning rate (ml-tarflow: 1e-6).
    pub min_lr: f64,
    /// Warm-up steps (ml-tarflow: one epoch).
    pub warmup_steps: u64,
    /// Total steps of the run.
    pub total_steps: u64,
}

impl WarmupCosine {
    /// Learning rate at optimizer step `step` (0-based).
    pub fn at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.start_lr
                + (self.lr - self.start_lr) * step as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let t = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + (std::f64::consts::PI * t).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warms_up_linearly_then_decays_by_cosine() {
        let s = WarmupCosine {
            lr: 1e-3,
            start_lr: 1e-6,
            min_lr: 1e-6,
            warmup_steps: 10,
            total_steps: 110,
        };
        assert!((s.at(0) - 1e-6).abs() < 1e-15);
        assert!((s.at(5) - (1e-6 + 0.5 * (1e-3 - 1e-6))).abs() < 1e-15);
        assert!((s.at(10) - 1e-3).abs() < 1e-15);
        assert!(
            (s.at(60) - (1e-6 + 0.5 * (1e-3 - 1e-6))).abs() < 1e-12,
            "half-way through the cosine"
        );
        assert!((s.at(110) - 1e-6).abs() < 1e-15);
        assert!(
            (s.at(500) - 1e-6).abs() < 1e-15,
            "stays at min_lr past the end"
        );
        assert!(
            (1..110).all(|i| s.at(i + 10) <= s.at(i + 9)),
            "monotone decay"
        );
    }
}
