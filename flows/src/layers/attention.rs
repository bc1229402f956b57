//! Causal multi-head self-attention with its pre-norm (`attention.{norm,qkv,proj}`): rotary
//! positions, grouped-query heads, QK-norm and a post-norm as the model's options ask, and a
//! KV cache for the sequential inverse.

use super::{Linear, Norm, RmsNorm};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::quant::QuantWeights;
use crate::rope::Rope;
use candle_core::{DType, Device, Tensor, D};
use candle_nn::kv_cache::KvCache;
use candle_nn::VarBuilder;

fn softmax_last(x: &Tensor) -> Result<Tensor> {
    Ok(if x.track_op() || x.dtype() != DType::F32 {
        candle_nn::ops::softmax(x, D::Minus1)?
    } else {
        candle_nn::ops::softmax_last_dim(x)?
    })
}

/// Multi-head self-attention with its pre-norm.
#[derive(Debug, Clone)]
pub struct Attention {
    pub(super) norm: Norm,
    pub(super) qkv: Linear,
    pub(super) proj: Linear,
    /// RMSNorms of each query and key head (`query_norm`, `key_norm`).
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    /// RMSNorm of the output (`post_norm`).
    post_norm: Option<RmsNorm>,
    pub(super) num_heads: usize,
    num_kv_heads: usize,
    pub(super) head_dim: usize,
}

impl Attention {
    /// Loads the attention of a layer of `cfg`.
    pub fn new(cfg: &ModelConfig, vb: VarBuilder, quant: Option<&QuantWeights>) -> Result<Self> {
        let (c, hd) = (cfg.channels, cfg.head_dim);
        let (h, kv) = (cfg.num_heads(), cfg.num_kv_heads());
        let bias = !cfg.no_bias;
        let qk_norm = match cfg.qk_norm {
            true => Some((
                RmsNorm::new(hd, vb.pp("query_norm"))?,
                RmsNorm::new(hd, vb.pp("key_norm"))?,
            )),
            false => None,
        };
        Ok(Self {
            norm: Norm::new(cfg.norm, c, vb.pp("norm"))?,
            qkv: Linear::load_with_bias(c, (h + 2 * kv) * hd, bias, vb.pp("qkv"), quant)?,
            proj: Linear::load_with_bias(h * hd, c, bias, vb.pp("proj"), quant)?,
            qk_norm,
            post_norm: match cfg.post_norm {
                true => Some(RmsNorm::new(c, vb.pp("post_norm"))?),
                false => None,
            },
            num_heads: h,
            num_kv_heads: kv,
            head_dim: hd,
        })
    }

    /// (N, T, C) → q (N, H, T, dh) and k, v (N, H_kv, T, dh), QK-normed where asked.
    fn qkv(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (n, t, _) = x.dims3()?;
        let (h, kv) = (self.num_heads, self.num_kv_heads);
        let qkv = self
            .qkv
            .forward(&self.norm.forward(x)?)?
            .reshape((n, t, h + 2 * kv, self.head_dim))?
            .transpose(1, 2)?; // (N, H + 2·H_kv, T, dh)
        let (q, k, v) = (
            qkv.narrow(1, 0, h)?.contiguous()?,
            qkv.narrow(1, h, kv)?.contiguous()?,
            qkv.narrow(1, h + kv, kv)?.contiguous()?,
        );
        Ok(match &self.qk_norm {
            Some((qn, kn)) => (qn.forward(&q)?, kn.forward(&k)?, v),
            None => (q, k, v),
        })
    }

    /// Keys or values of H_kv heads repeated for the H query heads (head h reads h / group).
    fn repeat_kv(&self, x: Tensor) -> Result<Tensor> {
        let r = self.num_heads / self.num_kv_heads;
        if r == 1 {
            return Ok(x);
        }
        let (n, kv, t, d) = x.dims4()?;
        Ok(x.unsqueeze(2)?
            .broadcast_as((n, kv, r, t, d))?
            .reshape((n, kv * r, t, d))?)
    }

    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
        temp: f64,
        row_scale: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (n, _, t, _) = q.dims4()?;
        let (k, v) = (self.repeat_kv(k.clone())?, self.repeat_kv(v.clone())?);
        let scale = 1.0 / ((self.head_dim as f64).sqrt() * temp);
        let mut att = (q.matmul(&k.t()?)? * scale)?; // (N, H, Tq, Tk)
        if let Some(r) = row_scale {
            att = att.broadcast_mul(&r.to_dtype(att.dtype())?)?;
        }
        if let Some(m) = mask {
            att = att.broadcast_add(m)?;
        }
        let y = softmax_last(&att)?.matmul(&v.contiguous()?)?; // (N, H, Tq, dh)
        let y = y
            .transpose(1, 2)?
            .reshape((n, t, self.num_heads * self.head_dim))?;
        let y = self.proj.forward(&y)?;
        match &self.post_norm {
            Some(p) => p.forward(&y),
            None => Ok(y),
        }
    }

    /// Attention over the whole sequence, causal with `mask` ((T, T) with 0 / −∞), every
    /// position seeing every other without; queries and keys rotated by `rope` from position 0.
    pub fn forward(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        temp: f64,
        rope: Option<&Rope>,
    ) -> Result<Tensor> {
        let (q, k, v) = self.qkv(x)?;
        let (q, k) = match rope {
            Some(r) => (r.apply(&q, 0)?, r.apply(&k, 0)?),
            None => (q, k),
        };
        self.attend(&q, &k, &v, mask, temp, None)
    }

    /// New positions (N, S, C) attending causally to the cached ones and each other (S = 1:
    /// a sampling step; more: a prefix filling the caches); `row_scale` (N, 1, 1, 1)
    /// multiplies each row's scores (1 / its attention temperature).
    pub fn step(
        &self,
        x: &Tensor,
        cache: &mut KvCache,
        row_scale: Option<&Tensor>,
        rope: Option<&Rope>,
    ) -> Result<Tensor> {
        let (q, k, v) = self.qkv(x)?;
        let from = cache.current_seq_len();
        let (q, k) = match rope {
            Some(r) => (r.apply(&q, from)?, r.apply(&k, from)?),
            None => (q, k),
        };
        let (k, v) = cache.append(&k, &v)?;
        let s = x.dim(1)?;
        let mask = match s > 1 {
            true => Some(prefix_mask(s, from, q.dtype(), q.device())?),
            false => None,
        };
        self.attend(&q, &k, &v, mask.as_ref(), 1.0, row_scale)
    }
}

/// The (S, from + S) mask of S new positions after `from` cached ones: 0 where a query may
/// look, −∞ past itself.
fn prefix_mask(s: usize, from: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let k = from + s;
    let m: Vec<f32> = (0..s * k)
        .map(|i| match i % k <= from + i / k {
            true => 0.0,
            false => f32::NEG_INFINITY,
        })
        .collect();
    Ok(Tensor::from_vec(m, (s, k), device)?.to_dtype(dtype)?)
}
