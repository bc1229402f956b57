//! `y = x·Wᵀ + b` over the rows of `x`, PyTorch's (out, in) weight layout, with the backward
//! `dx = dy·W`, `dW = dyᵀ·x`, `db = Σ dy` done by one kernel into one buffer (candle's composed
//! version transposes, copies and reduces the bias gradient in separate passes). The slice
//! functions serve the op here and the fused layer ([`super::layer`]).

use super::{gemm_strided, slice};
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Rows per parallel task of the bias gradient.
const ROWS: usize = 256;

/// `y (rows × out) = [residual +] x (rows × in)·Wᵀ + b` for W (out × in).
pub(crate) fn forward(x: &[f32], w: &[f32], b: &[f32], y: &mut [f32], residual: Option<&[f32]>) {
    let (out_dim, in_dim) = (b.len(), w.len() / b.len().max(1));
    let rows = x.len() / in_dim.max(1);
    assert!(
        w.len() == out_dim * in_dim
            && y.len() == rows * out_dim
            && x.len() == rows * in_dim
            && residual.is_none_or(|r| r.len() == y.len()),
        "linear::forward: buffer sizes"
    );
    // The bias (and residual) first, in one pass on every thread; the product adds onto it.
    y.par_chunks_mut(ROWS * out_dim)
        .enumerate()
        .for_each(|(i, y)| match residual {
            Some(res) => bias_plus_rows(y, &res[i * ROWS * out_dim..][..y.len()], b),
            None => y
                .chunks_exact_mut(out_dim)
                .for_each(|y| y.copy_from_slice(b)),
        });
    product(x, w, y, out_dim, true);
}

super::simd_clones! {
/// `y = r + b` for every row of `y` and `r` (rows of `b.len()`): the residual and bias a
/// product then adds onto.
fn bias_plus_rows(y: &mut [f32], r: &[f32], b: &[f32]) {
    for (y, r) in y.chunks_exact_mut(b.len()).zip(r.chunks_exact(b.len())) {
        for ((y, r), b) in y.iter_mut().zip(r).zip(b) {
            *y = r + b;
        }
    }
}
}

/// `y (rows × out) [+]= x (rows × in)·Wᵀ` for W (out × in): added onto `y` when `add`, else
/// written without reading it.
pub(crate) fn product(x: &[f32], w: &[f32], y: &mut [f32], out_dim: usize, add: bool) {
    let in_dim = w.len() / out_dim.max(1);
    let rows = x.len() / in_dim.max(1);
    assert!(
        w.len() == out_dim * in_dim && x.len() == rows * in_dim && y.len() == rows * out_dim,
        "linear::product: buffer sizes"
    );
    // SAFETY: x is rows×in, W (out×in) read as Wᵀ (in×out), y rows×out (checked above).
    unsafe {
        gemm_strided(
            (rows, out_dim, in_dim),
            y.as_mut_ptr(),
            out_dim,
            add,
            (x.as_ptr(), in_dim, 1),
            (w.as_ptr(), 1, in_dim),
            1.0,
            true,
        )
    };
}

/// The backward of [`forward`] for the output gradient `g` (rows × out): `dx = g·W` (when
/// asked), `dW = gᵀ·x`, `db = Σ g`, each overwritten.
pub(crate) fn backward(
    x: &[f32],
    w: &[f32],
    g: &[f32],
    dx: Option<&mut [f32]>,
    dw: &mut [f32],
    db: &mut [f32],
) {
    backward_products(x, w, g, dx, dw, db.len());
    column_sums(g, db);
}

/// [`backward`] without the bias's gradient (a caller that sums `g`'s columns in a pass of its
/// own): `dx = g·W` (when asked) and `dW = gᵀ·x` for W (out × in).
pub(crate) fn backward_products(
    x: &[f32],
    w: &[f32],
    g: &[f32],
    dx: Option<&mut [f32]>,
    dw: &mut [f32],
    out_dim: usize,
) {
    let in_dim = dw.len() / out_dim.max(1);
    let rows = g.len() / out_dim.max(1);
    assert!(
        w.len() == out_dim * in_dim && x.len() == rows * in_dim && g.len() == rows * out_dim,
        "linear::backward: buffer sizes"
    );
    // SAFETY: g is rows×out, W out×in, x rows×in; dx rows×in, dW out×in (checked).
    unsafe {
        if let Some(dx) = dx {
            assert_eq!(dx.len(), rows * in_dim, "linear::backward: dx size");
            gemm_strided(
                (rows, in_dim, out_dim),
                dx.as_mut_ptr(),
                in_dim,
                false,
                (g.as_ptr(), out_dim, 1),
                (w.as_ptr(), in_dim, 1),
                1.0,
                true,
            );
        }
        gemm_strided(
            (out_dim, in_dim, rows),
            dw.as_mut_ptr(),
            in_dim,
            false,
            (g.as_ptr(), 1, out_dim),
            (x.as_ptr(), in_dim, 1),
            1.0,
            true,
        );
    }
}

/// `out[j] = Σ_rows g[r, j]`, partial sums per fixed block of rows added in order (the same
/// result on any number of threads).
pub(crate) fn column_sums(g: &[f32], out: &mut [f32]) {
    let n = out.len();
    let partial: Vec<Vec<f32>> = g
        .par_chunks(ROWS * n)
        .map(|block| {
            let mut acc = vec![0f32; n];
            super::sum_rows_into(block, &mut acc);
            acc
        })
        .collect();
    super::sum_partials(partial, out);
}

struct Linear;

/// The backward; `want_dx` is false when the input carries no gradient.
struct LinearBwd {
    want_dx: bool,
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "tarflow-linear"
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
            slice(s1, l1, "linear")?,
            slice(s2, l2, "linear w")?,
            slice(s3, l3, "linear b")?,
        );
        let (out_dim, in_dim) = l2.shape().dims2()?;
        let rows = x.len() / in_dim;
        let mut y = vec![0f32; rows * out_dim];
        forward(x, w, b, &mut y, None);
        let mut dims = l1.shape().dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = out_dim;
        }
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (out_dim, in_dim) = w.dims2()?;
        let rows = x.elem_count() / in_dim;
        let want_dx = x.track_op();
        let packed = x.apply_op3_no_bwd(w, &g.contiguous()?, &LinearBwd { want_dx })?;
        let mut at = 0;
        let dx = if want_dx {
            at = rows * in_dim;
            Some(packed.narrow(0, 0, at)?.reshape(x.shape())?)
        } else {
            None
        };
        let dw = packed
            .narrow(0, at, out_dim * in_dim)?
            .reshape((out_dim, in_dim))?;
        let db = packed.narrow(0, at + out_dim * in_dim, out_dim)?;
        Ok((dx, Some(dw), Some(db)))
    }
}

impl CustomOp3 for LinearBwd {
    fn name(&self) -> &'static str {
        "tarflow-linear-bwd"
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
            slice(s1, l1, "linear bwd")?,
            slice(s2, l2, "linear bwd w")?,
            slice(s3, l3, "linear bwd g")?,
        );
        let (out_dim, in_dim) = l2.shape().dims2()?;
        let rows = x.len() / in_dim;
        let nx = if self.want_dx { rows * in_dim } else { 0 };
        let mut out = vec![0f32; nx + out_dim * in_dim + out_dim];
        let (dx, rest) = out.split_at_mut(nx);
        let (dw, db) = rest.split_at_mut(out_dim * in_dim);
        backward(x, w, g, self.want_dx.then_some(dx), dw, db);
        Ok((
            CpuStorage::F32(out),
            Shape::from(nx + out_dim * in_dim + out_dim),
        ))
    }
}

/// `x·Wᵀ + b` over the last dimension of `x`, f32 on the CPU, with a fused backward.
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, Linear)
}
