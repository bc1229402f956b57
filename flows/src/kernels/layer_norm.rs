//! LayerNorm over the rows of a matrix (eps 1e-5) and its backward, for the fused layer
//! ([`super::layer`]) and the trunk: `x̂ = (x − μ)·r`, `y = x̂·w + b`;
//! `dx = r·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂))` with `ĝ = dy·w`, `dw = Σ dy·x̂`, `db = Σ dy` over rows.

use rayon::prelude::*;

const EPS: f32 = 1e-5;
/// Rows per parallel task.
const ROWS: usize = 64;

/// (mean, 1/σ) of one row, accumulated in f64 for rows of thousands of values.
pub(crate) fn stats(x: &[f32]) -> (f32, f32) {
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean as f32, (1.0 / (var + EPS as f64).sqrt()) as f32)
}

/// LayerNorm of each row of `x` (rows of `w.len()`) into `out`.
pub(crate) fn forward(x: &[f32], w: &[f32], b: &[f32], out: &mut [f32]) {
    let c = w.len();
    out.par_chunks_mut(ROWS * c)
        .zip(x.par_chunks(ROWS * c))
        .for_each(|(o, x)| {
            for (o, x) in o.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
                let (m, r) = stats(x);
                for i in 0..c {
                    o[i] = (x[i] - m) * r * w[i] + b[i];
                }
            }
        });
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
            let mut xh = vec![0f32; c];
            for ((dx, x), g) in dx
                .chunks_exact_mut(c)
                .zip(x.chunks_exact(c))
                .zip(g.chunks_exact(c))
            {
                let (m, r) = stats(x);
                let (mut s1, mut s2) = (0f64, 0f64);
                for i in 0..c {
                    xh[i] = (x[i] - m) * r;
                    let gh = (g[i] * w[i]) as f64;
                    s1 += gh;
                    s2 += gh * xh[i] as f64;
                    dw[i] += (g[i] * xh[i]) as f64;
                    db[i] += g[i] as f64;
                }
                let (m1, m2) = ((s1 / c as f64) as f32, (s2 / c as f64) as f32);
                for i in 0..c {
                    dx[i] += r * (g[i] * w[i] - m1 - xh[i] * m2);
                }
            }
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
