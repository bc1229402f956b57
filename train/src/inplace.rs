//! In-place element-wise updates of f32 tensors on the CPU, for the optimizer and the EMA:
//! one pass over memory and no new buffer, where candle's ops allocate a tensor per operation
//! (AdamW cost 7 % of a training step that way). Other devices and dtypes keep candle's ops.

use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Result, Tensor};
use rayon::prelude::*;

/// Values per parallel task (small tensors run on one thread).
const CHUNK: usize = 64 * 1024;

/// Whether every tensor is f32, contiguous and on the CPU.
pub(crate) fn applies(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.dtype() == candle_core::DType::F32 && t.device().is_cpu() && t.is_contiguous())
}

fn f32s<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("in-place update: not contiguous".into()))?;
    Ok(&s.as_slice::<f32>()?[a..b])
}

fn f32s_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> Result<&'a mut [f32]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("in-place update: not contiguous".into()))?;
    match s {
        CpuStorage::F32(v) => Ok(&mut v[a..b]),
        _ => Err(candle_core::Error::Msg("in-place update: not f32".into())),
    }
}

/// `dst ← a·dst + (1 − a)·(s·src)` (or `(s·src)²` with `square`): a moment or an average.
struct Lerp {
    a: f32,
    s: f32,
    square: bool,
}

impl InplaceOp2 for Lerp {
    fn name(&self) -> &'static str {
        "tarflow-lerp"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        src: &CpuStorage,
        src_l: &Layout,
    ) -> Result<()> {
        let (d, x) = (f32s_mut(dst, dst_l)?, f32s(src, src_l)?);
        let (a, b, s) = (self.a, 1.0 - self.a, self.s);
        let square = self.square;
        d.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(d, x)| {
                if square {
                    d.iter_mut()
                        .zip(x)
                        .for_each(|(d, x)| *d = a * *d + b * (s * x) * (s * x));
                } else {
                    d.iter_mut()
                        .zip(x)
                        .for_each(|(d, x)| *d = a * *d + b * (s * x));
                }
            });
        Ok(())
    }
}

/// `dst ← a·dst + (1 − a)·src`.
pub(crate) fn lerp(dst: &Tensor, src: &Tensor, a: f64) -> Result<()> {
    dst.inplace_op2(
        src,
        &Lerp {
            a: a as f32,
            s: 1.0,
            square: false,
        },
    )
}

/// Adam's moments: `m ← β₁m + (1 − β₁)·sg`, `v ← β₂v + (1 − β₂)·(sg)²`.
pub(crate) fn moments(
    m: &Tensor,
    v: &Tensor,
    g: &Tensor,
    (b1, b2): (f64, f64),
    s: f64,
) -> Result<()> {
    let s = s as f32;
    m.inplace_op2(
        g,
        &Lerp {
            a: b1 as f32,
            s,
            square: false,
        },
    )?;
    v.inplace_op2(
        g,
        &Lerp {
            a: b2 as f32,
            s,
            square: true,
        },
    )
}

/// `p ← p·decay − lr·(m/bc₁) / (√(v/bc₂) + ε)`: AdamW's step from its moments.
pub(crate) struct AdamUpdate {
    /// 1 − lr·weight_decay.
    pub decay: f64,
    /// The learning rate.
    pub lr: f64,
    /// 1 − β₁ᵗ.
    pub bc1: f64,
    /// 1 − β₂ᵗ.
    pub bc2: f64,
    /// ε.
    pub eps: f64,
}

impl InplaceOp3 for AdamUpdate {
    fn name(&self) -> &'static str {
        "tarflow-adamw-update"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        m: &CpuStorage,
        ml: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> Result<()> {
        let (p, m, v) = (f32s_mut(dst, dst_l)?, f32s(m, ml)?, f32s(v, vl)?);
        let (decay, lr) = (self.decay as f32, self.lr as f32);
        let (ibc1, ibc2, eps) = (
            (1.0 / self.bc1) as f32,
            (1.0 / self.bc2) as f32,
            self.eps as f32,
        );
        p.par_chunks_mut(CHUNK)
            .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
            .for_each(|(p, (m, v))| {
                for ((p, m), v) in p.iter_mut().zip(m).zip(v) {
                    *p = *p * decay - lr * (m * ibc1) / ((v * ibc2).sqrt() + eps);
                }
            });
        Ok(())
    }
}
