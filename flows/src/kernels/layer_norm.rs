//! LayerNorm over the rows of a matrix (eps 1e-5) and its backward, for the fused layer
//! ([`super::layer`]) and the trunk: `x̂ = (x − μ)·r`, `y = x̂·w + b`;
//! `dx = r·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂))` with `ĝ = dy·w`, `dw = Σ dy·x̂`, `db = Σ dy` over rows.

use rayon::prelude::*;

const EPS: f32 = 1e-5;
/// Rows per parallel task.
const ROWS: usize = 64;

/// Σ f(v) over `x` in eight interleaved f64 partial sums: a fixed order that vectorises.
#[inline(always)]
fn sum_f64(x: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    let mut acc = [0f64; 8];
    let mut it = x.chunks_exact(8);
    for ch in &mut it {
        for l in 0..8 {
            acc[l] += f(ch[l]);
        }
    }
    let tail: f64 = it.remainder().iter().map(|&v| f(v)).sum();
    acc.iter().sum::<f64>() + tail
}

/// Σ a·b in f64, ordered as [`sum_f64`].
#[inline(always)]
fn dot_f64(a: &[f32], b: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let (mut ia, mut ib) = (a.chunks_exact(8), b.chunks_exact(8));
    for (ca, cb) in (&mut ia).zip(&mut ib) {
        for l in 0..8 {
            acc[l] += ca[l] as f64 * cb[l] as f64;
        }
    }
    let tail: f64 = ia
        .remainder()
        .iter()
        .zip(ib.remainder())
        .map(|(&x, &y)| x as f64 * y as f64)
        .sum();
    acc.iter().sum::<f64>() + tail
}

/// (mean, 1/σ) of one row, accumulated in f64 for rows of thousands of values.
#[inline(always)]
pub(crate) fn stats(x: &[f32]) -> (f32, f32) {
    let n = x.len() as f64;
    let mean = sum_f64(x, |v| v as f64) / n;
    let var = sum_f64(x, |v| (v as f64 - mean) * (v as f64 - mean)) / n;
    (mean as f32, (1.0 / (var + EPS as f64).sqrt()) as f32)
}

/// LayerNorm of each row of `x` (rows of `w.len()`) into `out`.
pub(crate) fn forward(x: &[f32], w: &[f32], b: &[f32], out: &mut [f32]) {
    forward_strided(x, w, b, out, w.len())
}

/// [`forward`] into rows of `stride` ≥ C values, each ending in ones past its C: the input of a
/// product whose weights carry the bias as one more row ([`super::trunk`]).
pub(crate) fn forward_strided(x: &[f32], w: &[f32], b: &[f32], out: &mut [f32], stride: usize) {
    let c = w.len();
    out.par_chunks_mut(ROWS * stride)
        .zip(x.par_chunks(ROWS * c))
        .for_each(|(o, x)| forward_rows(x, w, b, o, stride));
}

crate::kernels::simd_clones! {
fn forward_rows(x: &[f32], w: &[f32], b: &[f32], out: &mut [f32], stride: usize) {
    let c = w.len();
    for (o, x) in out.chunks_exact_mut(stride).zip(x.chunks_exact(c)) {
        let (m, r) = stats(x);
        let (o, ones) = o.split_at_mut(c);
        for i in 0..c {
            o[i] = (x[i] - m) * r * w[i] + b[i];
        }
        ones.fill(1.0);
    }
}
}

/// The backward of [`forward`] for the output gradient `g`: `dx` is added to (so a residual's
/// gradient can already be there), `dw` and `db` are overwritten.
pub(crate) fn backward(
    x: &[f32],
    w: &[f32],
    g: &[f32],
    dx: &mut [f32],
    dw: &mut [f32],
    db: &mut [f32],
) {
    let c = w.len();
    // Per-task partial sums of dw, db; added up afterwards in a fixed order.
    let partial: Vec<(Vec<f64>, Vec<f64>)> = dx
        .par_chunks_mut(ROWS * c)
        .zip(x.par_chunks(ROWS * c).zip(g.par_chunks(ROWS * c)))
        .map(|(dx, (x, g))| {
            let (mut dw, mut db) = (vec![0f64; c], vec![0f64; c]);
            backward_rows(x, w, g, dx, &mut dw, &mut db);
            (dw, db)
        })
        .collect();
    let (mut sw, mut sb) = (vec![0f64; c], vec![0f64; c]);
    for (pw, pb) in partial {
        for i in 0..c {
            sw[i] += pw[i];
            sb[i] += pb[i];
        }
    }
    for i in 0..c {
        dw[i] = sw[i] as f32;
        db[i] = sb[i] as f32;
    }
}

crate::kernels::simd_clones! {
/// [`backward`] of a run of rows, adding their `dw`, `db` into f64 sums.
fn backward_rows(x: &[f32], w: &[f32], g: &[f32], dx: &mut [f32], dw: &mut [f64], db: &mut [f64]) {
    let c = w.len();
    let (mut xh, mut gh) = (vec![0f32; c], vec![0f32; c]);
    for ((dx, x), g) in dx
        .chunks_exact_mut(c)
        .zip(x.chunks_exact(c))
        .zip(g.chunks_exact(c))
    {
        let (m, r) = stats(x);
        for i in 0..c {
            xh[i] = (x[i] - m) * r;
            gh[i] = g[i] * w[i];
            dw[i] += (g[i] * xh[i]) as f64;
            db[i] += g[i] as f64;
        }
        let s1 = sum_f64(&gh, |v| v as f64);
        let s2 = dot_f64(&gh, &xh);
        let (m1, m2) = ((s1 / c as f64) as f32, (s2 / c as f64) as f32);
        for i in 0..c {
            dx[i] += r * (gh[i] - m1 - xh[i] * m2);
        }
    }
}
}
