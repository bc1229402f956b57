//! In-place element-wise updates of f32 tensors on the CPU, for the optimizer and the EMA:
//! one pass over memory and no new buffer, where candle's ops allocate a tensor per operation.
//! Other devices and dtypes keep candle's ops.

use candle_core::{CpuStorage, InplaceOp2, Layout, Result, Tensor};
use rayon::prelude::*;
use std::cell::RefCell;

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

/// `dst ← a·dst + (1 − a)·src`: an average.
struct Lerp {
    a: f32,
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
        let (a, b) = (self.a, 1.0 - self.a);
        d.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(d, x)| d.iter_mut().zip(x).for_each(|(d, x)| *d = a * *d + b * x));
        Ok(())
    }
}

/// `dst ← a·dst + (1 − a)·src`.
pub(crate) fn lerp(dst: &Tensor, src: &Tensor, a: f64) -> Result<()> {
    dst.inplace_op2(src, &Lerp { a: a as f32 })
}

/// One AdamW step of an f32 variable in a single pass over memory: with `sg` = scale·g,
/// `m ← β₁m + (1 − β₁)·sg`, `v ← β₂v + (1 − β₂)·(sg)²`, then `p ← p·decay − lr·(m/bc₁) /
/// (√(v/bc₂) + ε)`. One pass reads four values per parameter and writes three, where separate
/// passes for the moments and the step would move ten.
pub(crate) struct AdamStep<'a> {
    /// The first moment, updated in place.
    pub m: RefCell<&'a mut [f32]>,
    /// The second moment, updated in place.
    pub v: RefCell<&'a mut [f32]>,
    /// β₁, β₂.
    pub betas: (f64, f64),
    /// The factor on the gradient (clipping).
    pub scale: f64,
    /// 1 − lr·weight_decay.
    pub decay: f64,
    /// The learning rate.
    pub lr: f64,
    /// 1 − β₁ᵗ, 1 − β₂ᵗ.
    pub bias_corrections: (f64, f64),
    /// ε.
    pub eps: f64,
}

impl InplaceOp2 for AdamStep<'_> {
    fn name(&self) -> &'static str {
        "tarflow-adamw-step"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> Result<()> {
        let (p, g) = (f32s_mut(dst, dst_l)?, f32s(g, gl)?);
        let busy = || candle_core::Error::Msg("AdamW step: moments in use".into());
        let mut m = self.m.try_borrow_mut().map_err(|_| busy())?;
        let mut v = self.v.try_borrow_mut().map_err(|_| busy())?;
        if [g.len(), m.len(), v.len()] != [p.len(); 3] {
            return Err(candle_core::Error::Msg(format!(
                "AdamW step: {} parameters, {} gradients, moments of {} and {}",
                p.len(),
                g.len(),
                m.len(),
                v.len()
            )));
        }
        // The same expressions, in f32, as the separate moment and update passes were.
        let (b1, b2) = (self.betas.0 as f32, self.betas.1 as f32);
        let (c1, c2) = (1.0 - b1, 1.0 - b2);
        let (s, decay, lr, eps) = (
            self.scale as f32,
            self.decay as f32,
            self.lr as f32,
            self.eps as f32,
        );
        let ibc1 = (1.0 / self.bias_corrections.0) as f32;
        let ibc2 = (1.0 / self.bias_corrections.1) as f32;
        p.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
            .for_each(|((p, g), (m, v))| {
                for (((p, g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                    let sg = s * g;
                    *m = b1 * *m + c1 * sg;
                    *v = b2 * *v + c2 * sg * sg;
                    *p = *p * decay - lr * (*m * ibc1) / ((*v * ibc2).sqrt() + eps);
                }
            });
        Ok(())
    }
}
