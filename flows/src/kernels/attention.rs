//! Causal multi-head attention straight from the packed qkv projection (N, T, 3C) to the
//! heads-concatenated output (N, T, C): `softmax(QKᵀ·s + causal)V` per sample and head, with no
//! mask tensor and no transposed copies. The backward recomputes the probabilities P:
//! `dV = Pᵀ dO`, `dS = P ⊙ (dO Vᵀ − rowsum(P ⊙ dO Vᵀ))`, `dQ = s·dS K`, `dK = s·dSᵀ Q`.

use super::{gemm_strided, slice};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Shape parameters of the op.
#[derive(Debug, Clone, Copy)]
struct Attn {
    heads: usize,
    hd: usize,
    scale: f32,
}

impl Attn {
    /// Causal softmax probabilities P (T×T) of one sample's head `h` into `p`.
    fn probs(&self, qkv: &[f32], t: usize, h: usize, p: &mut [f32]) {
        let c = self.heads * self.hd;
        let (q, k) = (h * self.hd, c + h * self.hd);
        // SAFETY: T rows of `hd` values at offsets q/k inside rows of 3C; P is T×T.
        unsafe {
            gemm_strided(
                (t, t, self.hd),
                p.as_mut_ptr(),
                t,
                false,
                (qkv.as_ptr().add(q), (3 * c), 1),
                (qkv.as_ptr().add(k), 1, (3 * c)),
                self.scale,
                false,
            );
        }
        for i in 0..t {
            super::softmax_prefix(&mut p[i * t..(i + 1) * t], i + 1);
        }
    }
}

impl CustomOp1 for Attn {
    fn name(&self) -> &'static str {
        "tarflow-causal-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let qkv = slice(s, l, "attention")?;
        let (n, t, c3) = l.shape().dims3()?;
        let c = c3 / 3;
        let mut out = vec![0f32; n * t * c];
        out.par_chunks_mut(t * c)
            .zip(qkv.par_chunks(t * c3))
            .for_each(|(o, qkv)| {
                let mut p = vec![0f32; t * t];
                for h in 0..self.heads {
                    self.probs(qkv, t, h, &mut p);
                    let v = 2 * c + h * self.hd;
                    // SAFETY: O rows of C at head offset; V rows of 3C at offset v.
                    unsafe {
                        gemm_strided(
                            (t, self.hd, t),
                            o.as_mut_ptr().add(h * self.hd),
                            c,
                            false,
                            (p.as_ptr(), t, 1),
                            (qkv.as_ptr().add(v), (3 * c), 1),
                            1.0,
                            false,
                        );
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((n, t, c))))
    }

    fn bwd(&self, qkv: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(
            qkv.apply_op2_no_bwd(&g.contiguous()?, &AttnBwd(*self))?,
        ))
    }
}

struct AttnBwd(Attn);

impl CustomOp2 for AttnBwd {
    fn name(&self) -> &'static str {
        "tarflow-causal-attention-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let a = self.0;
        let (qkv, g) = (
            slice(s1, l1, "attention bwd")?,
            slice(s2, l2, "attention bwd")?,
        );
        let (n, t, c3) = l1.shape().dims3()?;
        let c = c3 / 3;
        let hd = a.hd;
        let mut out = vec![0f32; n * t * c3];
        out.par_chunks_mut(t * c3)
            .zip(qkv.par_chunks(t * c3).zip(g.par_chunks(t * c)))
            .for_each(|(d, (qkv, g))| {
                let (mut p, mut dp) = (vec![0f32; t * t], vec![0f32; t * t]);
                for h in 0..a.heads {
                    a.probs(qkv, t, h, &mut p);
                    let (qo, ko, vo, go) = (h * hd, c + h * hd, 2 * c + h * hd, h * hd);
                    let (c3i, ci) = (c3, c);
                    // SAFETY (all products): T rows of hd values at the given offsets of rows of
                    // 3C (qkv, d) or C (g); P and dP are T×T.
                    unsafe {
                        // dP = dO Vᵀ
                        gemm_strided(
                            (t, t, hd),
                            dp.as_mut_ptr(),
                            t,
                            false,
                            (g.as_ptr().add(go), ci, 1),
                            (qkv.as_ptr().add(vo), 1, c3i),
                            1.0,
                            false,
                        );
                        // dV = Pᵀ dO
                        gemm_strided(
                            (t, hd, t),
                            d.as_mut_ptr().add(vo),
                            c3,
                            false,
                            (p.as_ptr(), 1, t),
                            (g.as_ptr().add(go), ci, 1),
                            1.0,
                            false,
                        );
                    }
                    // dS = P ⊙ (dP − rowsum(P ⊙ dP)); zero above the diagonal since P is.
                    for i in 0..t {
                        let (pr, dr) = (&p[i * t..(i + 1) * t], &mut dp[i * t..(i + 1) * t]);
                        let dot: f32 = pr[..=i].iter().zip(&dr[..=i]).map(|(a, b)| a * b).sum();
                        for j in 0..t {
                            dr[j] = pr[j] * (dr[j] - dot);
                        }
                    }
                    unsafe {
                        // dQ = s·dS K
                        gemm_strided(
                            (t, hd, t),
                            d.as_mut_ptr().add(qo),
                            c3,
                            false,
                            (dp.as_ptr(), t, 1),
                            (qkv.as_ptr().add(ko), c3i, 1),
                            a.scale,
                            false,
                        );
                        // dK = s·dSᵀ Q
                        gemm_strided(
                            (t, hd, t),
                            d.as_mut_ptr().add(ko),
                            c3,
                            false,
                            (dp.as_ptr(), 1, t),
                            (qkv.as_ptr().add(qo), c3i, 1),
                            a.scale,
                            false,
                        );
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Causal attention of the packed projection `qkv` (N, T, 3C) with `heads` heads of `hd`,
/// scores scaled by `scale`; returns (N, T, C) with the heads concatenated.
pub fn causal_attention(
    qkv: &Tensor,
    heads: usize,
    hd: usize,
    scale: f64,
) -> candle_core::Result<Tensor> {
    qkv.contiguous()?.apply_op1(Attn {
        heads,
        hd,
        scale: scale as f32,
    })
}
