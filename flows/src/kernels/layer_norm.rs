//! LayerNorm over the last dimension (eps 1e-5) with its backward:
//! `x̂ = (x − μ)·r`, `y = x̂·w + b`; `dx = r·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂))` with `ĝ = dy·w`,
//! `dw = Σ dy·x̂`, `db = Σ dy` over rows.

use super::slice;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

const EPS: f32 = 1e-5;
/// Rows per parallel task.
const ROWS: usize = 64;

struct LayerNorm;
struct LayerNormBwd;

/// (mean, 1/σ) of one row, accumulated in f64 for rows of thousands of values.
pub(crate) fn stats(x: &[f32]) -> (f32, f32) {
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean as f32, (1.0 / (var + EPS as f64).sqrt()) as f32)
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "tarflow-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w, b) = (
            slice(s1, l1, "layer norm")?,
            slice(s2, l2, "ln w")?,
            slice(s3, l3, "ln b")?,
        );
        let c = w.len();
        let mut out = vec![0f32; x.len()];
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
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = w.elem_count();
        let rows = x.elem_count() / c;
        // One kernel returns [dx (rows·C) | dw (C) | db (C)] packed.
        let packed = x.apply_op3_no_bwd(w, &g.contiguous()?, &LayerNormBwd)?;
        let dx = packed.narrow(0, 0, rows * c)?.reshape(x.shape())?;
        let dw = packed.narrow(0, rows * c, c)?;
        let db = packed.narrow(0, rows * c + c, c)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

impl CustomOp3 for LayerNormBwd {
    fn name(&self) -> &'static str {
        "tarflow-layer-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w, g) = (
            slice(s1, l1, "ln bwd")?,
            slice(s2, l2, "ln bwd w")?,
            slice(s3, l3, "ln bwd g")?,
        );
        let c = w.len();
        let rows = x.len() / c;
        let mut out = vec![0f32; rows * c + 2 * c];
        let (dx, _) = out.split_at_mut(rows * c);
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
                        dx[i] = r * (g[i] * w[i] - m1 - xh[i] * m2);
                    }
                }
                (dw, db)
            })
            .collect();
        let (mut dw, mut db) = (vec![0f64; c], vec![0f64; c]);
        for (pw, pb) in partial {
            for i in 0..c {
                dw[i] += pw[i];
                db[i] += pb[i];
            }
        }
        for i in 0..c {
            out[rows * c + i] = dw[i] as f32;
            out[rows * c + c + i] = db[i] as f32;
        }
        Ok((CpuStorage::F32(out), Shape::from(rows * c + 2 * c)))
    }
}

/// LayerNorm of `x` (…, C) with scale `w` and shift `b` (C), f32 on the CPU, fused backward.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, LayerNorm)
}
