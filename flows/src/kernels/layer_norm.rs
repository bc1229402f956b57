//! LayerNorm over the rows of a matrix (eps 1e-5) and its backward, for the fused layer
//! ([`super::layer`]) and the trunk: `x̂ = (x − μ)·r`, `y = x̂·w + b`;
//! `dx = r·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂))` with `ĝ = dy·w`, `dw = Σ dy·x̂`, `db = Σ dy` over rows.

use rayon::prelude::*;

const EPS: f32 = 1e-5;
/// Rows per parallel task.
const ROWS: usize = 64;

/// Σ f(v) over `x` in sixteen interleaved f32 partial sums: a fixed order that vectorises
/// (rows are a few hundred to a few thousand values; the partial sums hold a few dozen each).
#[inline(always)]
fn sum16(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 16];
    let (chunks, rest) = x.as_chunks::<16>();
    for ch in chunks {
        for l in 0..16 {
            acc[l] += f(ch[l]);
        }
    }
    let tail: f32 = rest.iter().map(|&v| f(v)).sum();
    super::hsum16(acc) + tail
}

/// (mean, 1/σ) of one row.
#[inline(always)]
pub(crate) fn stats(x: &[f32]) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = sum16(x, |v| v) / n;
    let var = sum16(x, |v| (v - mean) * (v - mean)) / n;
    (mean, 1.0 / (var + EPS).sqrt())
}

/// LayerNorm of each row of `x` (rows of `w.len()`) into `out`, keeping each row's (mean, 1/σ)
/// in `kept` (2 per row) for [`backward`], which would otherwise pass over the row twice more
/// to find them again.
pub(crate) fn forward_keeping_stats(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    out: &mut [f32],
    kept: &mut [f32],
) {
    let c = w.len();
    out.par_chunks_mut(ROWS * c)
        .zip(x.par_chunks(ROWS * c))
        .zip(kept.par_chunks_mut(ROWS * 2))
        .for_each(|((o, x), st)| forward_rows(x, w, b, o, c, st));
}

/// LayerNorm of each row of `x` into rows of `stride` ≥ C values, each ending in ones past its
/// C: the input of a product whose weights carry the bias as one more row ([`super::trunk`]).
pub(crate) fn forward_strided(x: &[f32], w: &[f32], b: &[f32], out: &mut [f32], stride: usize) {
    let c = w.len();
    out.par_chunks_mut(ROWS * stride)
        .zip(x.par_chunks(ROWS * c))
        .for_each(|(o, x)| forward_rows(x, w, b, o, stride, &mut []));
}

crate::kernels::simd_clones! {
/// The rows' LayerNorm; their (mean, 1/σ) into `kept` (2 per row) unless it is empty.
fn forward_rows(x: &[f32], w: &[f32], b: &[f32], out: &mut [f32], stride: usize, kept: &mut [f32]) {
    let c = w.len();
    for (row, (o, x)) in out.chunks_exact_mut(stride).zip(x.chunks_exact(c)).enumerate() {
        let (m, r) = stats(x);
        if let Some(k) = kept.get_mut(2 * row..2 * row + 2) {
            k[0] = m;
            k[1] = r;
        }
        let (o, ones) = o.split_at_mut(c);
        for (((o, x), w), b) in o.iter_mut().zip(x).zip(w).zip(b) {
            *o = ((x - m) * r).mul_add(*w, *b);
        }
        ones.fill(1.0);
    }
}
}

/// The backward of [`forward_keeping_stats`] for the output gradient `g`, from the rows'
/// `kept` statistics: `dx` is added to (so a residual's gradient can already be there), `dw` and
/// `db` are overwritten.
pub(crate) fn backward(
    x: &[f32],
    kept: &[f32],
    w: &[f32],
    g: &[f32],
    dx: &mut [f32],
    dw: &mut [f32],
    db: &mut [f32],
) {
    let c = w.len();
    // Per-task partial sums of dw, db (f32 over a task's rows); added up in f64 in a fixed order.
    let partial: Vec<(Vec<f32>, Vec<f32>)> = dx
        .par_chunks_mut(ROWS * c)
        .zip(x.par_chunks(ROWS * c).zip(g.par_chunks(ROWS * c)))
        .zip(kept.par_chunks(ROWS * 2))
        .map(|((dx, (x, g)), st)| {
            let (mut dw, mut db) = (vec![0f32; c], vec![0f32; c]);
            backward_rows((x, st), w, g, dx, &mut dw, &mut db);
            (dw, db)
        })
        .collect();
    let (mut sw, mut sb) = (vec![0f64; c], vec![0f64; c]);
    for (pw, pb) in partial {
        for i in 0..c {
            sw[i] += pw[i] as f64;
            sb[i] += pb[i] as f64;
        }
    }
    for i in 0..c {
        dw[i] = sw[i] as f32;
        db[i] = sb[i] as f32;
    }
}

crate::kernels::simd_clones! {
/// [`backward`] of a run of rows, adding their `dw`, `db` into `dw`, `db`.
fn backward_rows(
    (x, kept): (&[f32], &[f32]),
    w: &[f32],
    g: &[f32],
    dx: &mut [f32],
    dw: &mut [f32],
    db: &mut [f32],
) {
    let c = w.len();
    let (mut xh, mut gh) = (vec![0f32; c], vec![0f32; c]);
    for (((dx, x), g), st) in dx
        .chunks_exact_mut(c)
        .zip(x.chunks_exact(c))
        .zip(g.chunks_exact(c))
        .zip(kept.chunks_exact(2))
    {
        let (m, r) = (st[0], st[1]);
        for i in 0..c {
            xh[i] = (x[i] - m) * r;
            gh[i] = g[i] * w[i];
            dw[i] = g[i].mul_add(xh[i], dw[i]);
            db[i] += g[i];
        }
        let m1 = sum16(&gh, |v| v) / c as f32;
        let m2 = super::dot16(&gh, &xh) / c as f32;
        for i in 0..c {
            dx[i] = r.mul_add((-xh[i]).mul_add(m2, gh[i] - m1), dx[i]);
        }
    }
}
}
