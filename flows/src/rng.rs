//! Seeded noise. Candle's CPU RNG cannot be seeded, so every random draw of the project
//! comes from here: reproducible for a seed on every device.

use crate::error::Result;
use candle_core::{Device, Shape, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

/// The project's seeded RNG type.
pub type FlowRng = StdRng;

/// A new RNG from `seed`.
pub fn seeded(seed: u64) -> FlowRng {
    StdRng::seed_from_u64(seed)
}

/// Standard-normal f32 values in `shape`, scaled by `std`.
pub fn randn(
    rng: &mut FlowRng,
    shape: impl Into<Shape>,
    std: f64,
    device: &Device,
) -> Result<Tensor> {
    let shape = shape.into();
    let v: Vec<f32> = (0..shape.elem_count())
        .map(|_| {
            let s: f64 = StandardNormal.sample(rng);
            (s * std) as f32
        })
        .collect();
    Ok(Tensor::from_vec(v, shape, device)?)
}

/// Uniform f32 values in [lo, hi) in `shape`.
pub fn uniform(
    rng: &mut FlowRng,
    shape: impl Into<Shape>,
    lo: f64,
    hi: f64,
    device: &Device,
) -> Result<Tensor> {
    let shape = shape.into();
    let v: Vec<f32> = (0..shape.elem_count())
        .map(|_| rng.random_range(lo..hi) as f32)
        .collect();
    Ok(Tensor::from_vec(v, shape, device)?)
}
