//! The exact GELU `x·Φ(x)` on the CPU, with its derivative `Φ(x) + x·φ(x)`.
//!
//! candle's `gelu_erf` calls scalar libm `erff` per element; this is a branch-free rational
//! approximation of erf (accurate to ~1 ulp on [-4, 4], saturated beyond) that the compiler
//! vectorises, in clones for the CPU's widest SIMD (`simd_clones!`). The fused layer
//! ([`super::layer`]) and the trunk use it, and so does the model's MLP where the CPU kernels
//! apply to a tensor that needs no gradient (f32 on the CPU); everywhere else (GPUs, bf16,
//! training on the composed ops) the MLP runs candle's op.
//!
//! The polynomials' Horner steps are fused multiply-adds (`mul_add`), which round once on every
//! target, so the clones agree bit for bit. Outside the clones, and on an x86-64 CPU without FMA
//! (before 2013), each step is a call to libm's `fmaf`: correct but slow, so callers go through
//! the clones (the step engine's GELU too).

use rayon::prelude::*;

/// Values per parallel task.
const CHUNK: usize = 16 * 1024;

const ALPHA: [f32; 7] = [
    -2.726_142_3e-10,
    2.770_681_4e-8,
    -2.101_024e-6,
    -5.692_506_4e-5,
    -7.349_906_3e-4,
    -2.954_600_1e-3,
    -1.609_603_3e-2,
];
const BETA: [f32; 5] = [
    -1.456_607_2e-5,
    -2.133_740_6e-4,
    -1.682_827e-3,
    -7.373_329e-3,
    -1.426_474e-2,
];

/// erf(x) for f32, branch-free.
#[inline(always)]
pub fn erf_f32(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = ALPHA[0];
    for a in &ALPHA[1..] {
        p = p.mul_add(x2, *a);
    }
    let mut q = BETA[0];
    for b in &BETA[1..] {
        q = q.mul_add(x2, *b);
    }
    x * p / q
}

/// Exact GELU `x·Φ(x)` of one value.
#[inline(always)]
pub fn gelu_f32(x: f32) -> f32 {
    0.5 * x * (1.0 + erf_f32(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// GELU of every value of `x` in place.
pub fn in_place(x: &mut [f32]) {
    x.par_chunks_mut(CHUNK).for_each(in_place_chunk);
}

super::simd_clones! {
/// [`in_place`] on one thread (the sequential inverse's few rows).
pub(crate) fn in_place_chunk(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v = gelu_f32(*v);
    }
}
}

/// Rows per parallel task of the training passes (the column sums' fixed blocks).
const ROWS: usize = 256;

/// The training forward of the MLP's activation: for `x` a product without its bias `b` (rows
/// of `b.len()`), `out` = GELU(x + b) and `x` replaced by GELU'(x + b). The bias rides in this
/// pass (the product leaves no fill to do and no output to read), and the backward is left one
/// product ([`backward_in_place`]).
pub(crate) fn forward_keeping_slope(x: &mut [f32], b: &[f32], out: &mut [f32]) {
    let n = b.len();
    out.par_chunks_mut(ROWS * n)
        .zip(x.par_chunks_mut(ROWS * n))
        .for_each(|(o, x)| forward_slope_rows(x, b, o));
}

super::simd_clones! {
fn forward_slope_rows(x: &mut [f32], b: &[f32], out: &mut [f32]) {
    let inv_sqrt_2pi = 0.398_942_3_f32;
    let n = b.len();
    for (xr, or) in x.chunks_exact_mut(n).zip(out.chunks_exact_mut(n)) {
        for ((o, v), bias) in or.iter_mut().zip(xr.iter_mut()).zip(b) {
            let u = *v + bias;
            let erf = erf_f32(u * std::f32::consts::FRAC_1_SQRT_2);
            let pdf = super::exp_f32(-0.5 * u * u) * inv_sqrt_2pi;
            // The value exactly as `gelu_f32` rounds it.
            *o = 0.5 * u * (1.0 + erf);
            *v = 0.5 * (1.0 + erf) + u * pdf;
        }
    }
}
}

/// `g ← g·slope` in place (the backward of [`forward_keeping_slope`]), and `db` = the column
/// sums of the result (the bias's gradient), per fixed block of rows added in order.
pub(crate) fn backward_in_place(slope: &[f32], g: &mut [f32], db: &mut [f32]) {
    let n = db.len();
    let partial: Vec<Vec<f32>> = g
        .par_chunks_mut(ROWS * n)
        .zip(slope.par_chunks(ROWS * n))
        .map(|(g, s)| {
            let mut acc = vec![0f32; n];
            backward_rows(s, g, &mut acc);
            acc
        })
        .collect();
    super::sum_partials(partial, db);
}

super::simd_clones! {
fn backward_rows(slope: &[f32], g: &mut [f32], acc: &mut [f32]) {
    let n = acc.len();
    for (gr, sr) in g.chunks_exact_mut(n).zip(slope.chunks_exact(n)) {
        for ((g, s), a) in gr.iter_mut().zip(sr).zip(acc.iter_mut()) {
            *g *= s;
            *a += *g;
        }
    }
}
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor};

    #[test]
    fn fast_gelu_matches_candle_exact_gelu() {
        let v: Vec<f32> = (-4000..=4000).map(|i| i as f32 * 0.0025).collect();
        let x = Tensor::from_vec(v.clone(), 8001, &Device::Cpu).unwrap();
        let mut fast = v;
        in_place(&mut fast);
        let exact = x
            .to_dtype(DType::F64)
            .unwrap()
            .gelu_erf()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let worst = fast
            .iter()
            .zip(&exact)
            .map(|(a, b)| (*a as f64 - b).abs())
            .fold(0.0, f64::max);
        assert!(worst < 2e-6, "max |fast − exact| = {worst}");
        for (z, e) in [
            (0.5f32, 0.520_499_9f64),
            (-1.0, -0.842_700_8),
            (3.0, 0.999_977_9),
        ] {
            assert!(
                (erf_f32(z) as f64 - e).abs() < 1e-6,
                "erf({z}) = {}",
                erf_f32(z)
            );
        }
    }
}
