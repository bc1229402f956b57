//! Per-image transforms with the reference semantics: 8-bit → [-1, 1] (ToTensor + Normalize
//! 0.5/0.5), random horizontal flip, Gaussian noise σ or uniform dequantisation, label drop (→ −1).

use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

/// An 8-bit value as the model reads it, in [−1, 1]: `k/127.5 − 1` in f64 (training adds its
/// noise there). Every path that feeds the model pixels (training, scoring, FD, quantisation
/// checks) goes through this function or [`to_unit`], so all round alike.
pub fn unit(k: u8) -> f64 {
    k as f64 / 127.5 - 1.0
}

/// [`unit()`] rounded once to f32.
pub fn to_unit(k: u8) -> f32 {
    unit(k) as f32
}

/// An 8-bit value dequantised by `u` ∈ [0, 1) of a bin: `(k + u)/128 − 1`, exact in f64 and
/// rounded once to f32.
pub fn dequantised(k: u8, u: f64) -> f32 {
    ((k as f64 + u) / 128.0 - 1.0) as f32
}

/// Calls `f(destination, source)` for every value of a C×H×W image in order, the source
/// mirrored horizontally when `flip`: the one place a flip is written.
fn mirrored(c: usize, h: usize, w: usize, flip: bool, mut f: impl FnMut(usize, usize)) {
    for ch in 0..c {
        for y in 0..h {
            let row = (ch * h + y) * w;
            for x in 0..w {
                f(row + x, row + if flip { w - 1 - x } else { x });
            }
        }
    }
}

/// Noise added to the [-1, 1] image.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Noise {
    /// None (evaluation of clean images).
    #[default]
    None,
    /// `x + σ·ε`, ε ~ N(0, 1) (TarFlow's "gaussian", σ = 0.05 for ImageNet64).
    Gaussian(f64),
    /// `(k + u)/128 − 1`, u ~ U[0, 1): uniform dequantisation for likelihood training/eval.
    Uniform,
}

/// The augmentation and noise applied to every training image.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Transform {
    /// Flip horizontally with probability ½.
    pub flip: bool,
    /// Noise model.
    pub noise: Noise,
    /// Probability that a label is replaced by −1 (classifier-free guidance training).
    pub label_drop: f64,
}

impl Transform {
    /// Writes image `src` (C×H×W u8) into `dst` as f32 in [-1, 1] with flip and noise.
    pub fn apply(
        &self,
        src: &[u8],
        c: usize,
        h: usize,
        w: usize,
        dst: &mut [f32],
        rng: &mut impl Rng,
    ) {
        let flip = self.flip && rng.random_bool(0.5);
        mirrored(c, h, w, flip, |d, i| {
            let k = src[i];
            dst[d] = match self.noise {
                Noise::None => to_unit(k),
                Noise::Gaussian(s) => {
                    let e: f64 = StandardNormal.sample(rng);
                    (unit(k) + s * e) as f32
                }
                Noise::Uniform => dequantised(k, rng.random::<f64>()),
            };
        });
    }

    /// Writes a latent drawn from an autoencoder's posterior, `(mean + std·ε)·scale`, into
    /// `dst` with flip and Gaussian noise (σ in the scaled latent's units, STARFlow's 0.3);
    /// uniform dequantisation is an 8-bit notion and adds nothing here (configs refuse it).
    #[allow(clippy::too_many_arguments)]
    pub fn apply_latent(
        &self,
        (mean, std): (&[f32], &[f32]),
        scale: f64,
        c: usize,
        h: usize,
        w: usize,
        dst: &mut [f32],
        rng: &mut impl Rng,
    ) {
        let flip = self.flip && rng.random_bool(0.5);
        mirrored(c, h, w, flip, |d, i| {
            let e: f64 = StandardNormal.sample(rng);
            let mut v = (mean[i] as f64 + std[i] as f64 * e) * scale;
            if let Noise::Gaussian(s) = self.noise {
                let e: f64 = StandardNormal.sample(rng);
                v += s * e;
            }
            dst[d] = v as f32;
        });
    }

    /// The label after label drop: −1 with probability `label_drop`.
    pub fn label(&self, label: i64, rng: &mut impl Rng) -> i64 {
        if self.label_drop > 0.0 && rng.random_bool(self.label_drop.clamp(0.0, 1.0)) {
            -1
        } else {
            label
        }
    }
}
