//! The flow's per-token map, written once for both engines: the head's (α, μ), the shift that
//! makes token t's map depend on tokens before it, `z = (x − μ)·exp(−α)` and its inverse, and
//! the block's token order. As tensors for the composed path (every device), and as rows of f32
//! for the CPU engine's gradient-free forward and its tape-free training pass, whose backward
//! of the map is here too; tests hold the two forms equal.

use crate::config::ScaleHead;
use crate::error::Result;
use candle_core::{DType, Tensor};
use rayon::prelude::*;

/// Turns raw `proj_out` outputs (N, T, W) into (α, μ), α = ln σ; α ≡ 0 for volume-preserving
/// blocks (`nvp` off, W = D). With `clip` > 0 the outputs are first soft-clipped,
/// `o ← clip·tanh(o/clip)`; STARFlow's head takes `σ = softplus(a + 0.5413)`.
pub fn head(
    o: &Tensor,
    d: usize,
    nvp: bool,
    scale: ScaleHead,
    clip: f64,
) -> Result<(Tensor, Tensor)> {
    let o = match clip > 0.0 {
        true => ((o / clip)?.tanh()? * clip)?,
        false => o.clone(),
    };
    if !nvp {
        return Ok((o.zeros_like()?, o));
    }
    let (a, mu) = (o.narrow(2, 0, d)?, o.narrow(2, d, d)?);
    let alpha = match scale {
        ScaleHead::Exp => a,
        ScaleHead::Softplus => softplus(&(a + SOFTPLUS_INV_1)?)?.log()?,
    };
    Ok((alpha, mu))
}

/// softplus⁻¹(1): STARFlow's offset so that σ = 1 when the head outputs 0.
const SOFTPLUS_INV_1: f64 = 0.541_324_854_612_918_1;

/// `ln(1 + eˣ)`, stable for large |x|.
fn softplus(x: &Tensor) -> Result<Tensor> {
    let pos = x.relu()?;
    Ok((pos + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?)
}

/// Shifts (N, T, D) right by one token along T, with zeros first: token t's map comes from the
/// head output at t − 1, and token 0 passes through.
pub fn shift(x: &Tensor) -> Result<Tensor> {
    let (n, t, d) = x.dims3()?;
    let zero = Tensor::zeros((n, 1, d), x.dtype(), x.device())?;
    Ok(Tensor::cat(&[&zero, &x.narrow(1, 0, t - 1)?], 1)?)
}

/// `x` in f32 when it is bf16/f16; f32 and f64 unchanged.
pub fn at_least_f32(x: &Tensor) -> Result<Tensor> {
    Ok(match x.dtype() {
        DType::F16 | DType::BF16 => x.to_dtype(DType::F32)?,
        _ => x.clone(),
    })
}

/// The block's map `z = (x − μ)·exp(−α)`, evaluated in at least f32 (as upstream forces for the
/// scales: a bf16 `exp(−α)` would round the scale before the product); the result has `x`'s dtype.
pub fn affine(x: &Tensor, mu: &Tensor, alpha: &Tensor) -> Result<Tensor> {
    let (xf, mf, af) = (at_least_f32(x)?, at_least_f32(mu)?, at_least_f32(alpha)?);
    Ok(((xf - mf)? * af.neg()?.exp()?)?.to_dtype(x.dtype())?)
}

/// The inverse map `x = z·exp(α) + μ`, in at least f32, in `z`'s dtype.
pub fn unaffine(z: &Tensor, alpha: &Tensor, mu: &Tensor) -> Result<Tensor> {
    let (zf, af, mf) = (at_least_f32(z)?, at_least_f32(alpha)?, at_least_f32(mu)?);
    Ok(((zf * af.exp()?)? + mf)?.to_dtype(z.dtype())?)
}

/// `dst` = `src` (samples of `t` rows of `w` values) in a block's token order: reversed when
/// `flipped` (its own inverse), else copied.
pub fn permute_rows(src: &[f32], dst: &mut [f32], t: usize, w: usize, flipped: bool) {
    if !flipped {
        dst.copy_from_slice(src);
        return;
    }
    for (ds, ss) in dst.chunks_exact_mut(t * w).zip(src.chunks_exact(t * w)) {
        for (i, row) in ds.chunks_exact_mut(w).enumerate() {
            row.copy_from_slice(&ss[(t - 1 - i) * w..][..w]);
        }
    }
}

/// [`shift`], [`head`] (exp form) and [`affine`] on rows: over tokens `xp` (samples of T rows
/// of D, block order), token t's (α, μ) is token t − 1's head output `po` (rows of α then μ, or
/// μ alone without `nvp`), and token 0 passes through. Writes `z = (x − μ)·exp(−α)`,
/// `e = exp(−α)` (the backward's) and the shifted α, and adds each sample's Σα to `alpha_sum`.
pub fn affine_rows(
    xp: &[f32],
    po: &[f32],
    (t, d): (usize, usize),
    nvp: bool,
    (z, e, alpha): (&mut [f32], &mut [f32], &mut [f32]),
    alpha_sum: &mut [f64],
) {
    let w = if nvp { 2 * d } else { d };
    z.par_chunks_mut(t * d)
        .zip(e.par_chunks_mut(t * d))
        .zip(alpha.par_chunks_mut(t * d))
        .zip(xp.par_chunks(t * d))
        .zip(po.par_chunks(t * w))
        .zip(alpha_sum.par_iter_mut())
        .for_each(|(((((z, e), a), x), po), sum)| {
            *sum += affine_sample(x, po, d, nvp, z, e, a);
        });
}

crate::kernels::simd_clones! {
/// [`affine_rows`] of one sample; returns its Σα.
fn affine_sample(x: &[f32], po: &[f32], d: usize, nvp: bool, z: &mut [f32], e: &mut [f32], a: &mut [f32]) -> f64 {
    let w = if nvp { 2 * d } else { d };
    z[..d].copy_from_slice(&x[..d]);
    e[..d].fill(1.0);
    a[..d].fill(0.0);
    let mut sum = 0f64;
    let rows = z.chunks_exact_mut(d).zip(e.chunks_exact_mut(d)).zip(a.chunks_exact_mut(d)).zip(x.chunks_exact(d));
    for ((((zr, er), ar), xr), head) in rows.skip(1).zip(po.chunks_exact(w)) {
        let mu = &head[w - d..];
        if nvp {
            ar.copy_from_slice(&head[..d]);
        } else {
            ar.fill(0.0);
        }
        for j in 0..d {
            er[j] = crate::kernels::exp_f32(-ar[j]);
            zr[j] = (xr[j] - mu[j]) * er[j];
        }
        // A loop of its own: the f64 sum's order is fixed, and inside the loop above it kept
        // that loop (and its exp) scalar.
        sum += ar.iter().map(|&a| a as f64).sum::<f64>();
    }
    sum
}
}

/// The backward of [`affine_rows`] from `dz` (the loss gradient at z, block order): the
/// gradient at the head output into `dpo` and the map's own share of the input gradient into
/// `dx`; `dlogdet` is each α's gradient through the log-det term.
pub fn affine_rows_backward(
    dz: &[f32],
    (z, e): (&[f32], &[f32]),
    (t, d): (usize, usize),
    nvp: bool,
    dlogdet: f32,
    dpo: &mut [f32],
    dx: &mut [f32],
) {
    let w = if nvp { 2 * d } else { d };
    // z = (x − μ)·e^{−α}: dx = dz·e^{−α}, dμ = −dz·e^{−α}, dα = −dz·z (+ the log-det term).
    for (r, (dpr, dxr)) in dpo
        .chunks_exact_mut(w)
        .zip(dx.chunks_exact_mut(d))
        .enumerate()
    {
        let (dzr, er) = (&dz[r * d..][..d], &e[r * d..][..d]);
        for j in 0..d {
            dxr[j] = dzr[j] * er[j];
        }
        // Row r's head predicts token r + 1; the last token's head predicts nothing.
        if r % t == t - 1 {
            dpr.fill(0.0);
            continue;
        }
        let next = r + 1;
        let (dzn, en, zn) = (
            &dz[next * d..][..d],
            &e[next * d..][..d],
            &z[next * d..][..d],
        );
        let (da, dmu) = if nvp {
            dpr.split_at_mut(d)
        } else {
            (&mut [][..], &mut dpr[..])
        };
        for j in 0..d {
            dmu[j] = -dzn[j] * en[j];
        }
        for j in 0..da.len() {
            da[j] = -dzn[j] * zn[j] + dlogdet;
        }
    }
}
