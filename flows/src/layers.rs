//! Transformer building blocks: Linear, LayerNorm, causal attention (rotary positions optional) with a KV cache, MLP.
//!
//! Each op picks candle's fused kernels when no gradient is being tracked, and plain
//! differentiable ops otherwise (candle's fused LayerNorm/softmax have no backward; see ARCHITECTURE.md).

use crate::engine::Engine;
use crate::error::Result;
use crate::kernels::LayerParts;
use crate::quant::QuantWeights;
use crate::rope::Rope;
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::kv_cache::KvCache;
use candle_nn::VarBuilder;

/// A Linear layer's (out, in) weight: dense, or in reduced precision (a `tarflow quantize` file).
#[derive(Debug, Clone)]
enum Weight {
    Dense(Tensor),
    Quantised(std::sync::Arc<QTensor>),
}

/// `y = x Wᵀ + b` with PyTorch's (out, in) weight layout.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Tensor,
}

impl Linear {
    /// Loads `weight` (out, in) and `bias` (out) under `vb`.
    pub fn new(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        Self::load(in_dim, out_dim, vb, None)
    }

    /// [`Self::new`], taking the weight from `quant` where it holds `{prefix}.weight`.
    pub fn load(
        in_dim: usize,
        out_dim: usize,
        vb: VarBuilder,
        quant: Option<&QuantWeights>,
    ) -> Result<Self> {
        let key = format!("{}.weight", vb.prefix());
        let bias = vb.get(out_dim, "bias")?;
        let weight = match quant.and_then(|q| q.tensors.get(&key)) {
            None => Weight::Dense(vb.get((out_dim, in_dim), "weight")?),
            Some(qt) if qt.shape().dims() != [out_dim, in_dim] => {
                return Err(crate::error::FlowError::Config(format!(
                    "quantised `{key}` has shape {:?}, expected [{out_dim}, {in_dim}]",
                    qt.shape().dims()
                )))
            }
            Some(qt) => Weight::Quantised(crate::quant::to_device(qt, vb.device())?),
        };
        Ok(Self { weight, bias })
    }

    /// The (out, in) weight and the bias; an error for a quantised layer (no dense weight).
    pub fn parts(&self) -> Result<(&Tensor, &Tensor)> {
        match &self.weight {
            Weight::Dense(w) => Ok((w, &self.bias)),
            Weight::Quantised(_) => Err(crate::error::FlowError::Config(
                "a quantised layer has no dense weight".into(),
            )),
        }
    }

    /// Whether the weight is stored in reduced precision (expanded for each call).
    pub fn is_quantised(&self) -> bool {
        matches!(self.weight, Weight::Quantised(_))
    }

    /// The layer with its quantised weight expanded to a dense one (the same values the
    /// weights-only path computes with).
    pub fn expanded(&self) -> Result<Self> {
        Ok(match &self.weight {
            Weight::Quantised(q) => Self {
                weight: Weight::Dense(
                    q.dequantize(self.bias.device())?
                        .to_dtype(self.bias.dtype())?,
                ),
                bias: self.bias.clone(),
            },
            Weight::Dense(_) => self.clone(),
        })
    }

    /// Applies the layer to the last dimension of `x` (any rank ≥ 2).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let q = match &self.weight {
            Weight::Dense(w) => return dense(x, w, &self.bias),
            Weight::Quantised(q) => q,
        };
        if crate::quant::native_matmul() {
            // candle's integer matmul quantises the activations too (f32 in, its dot type inside).
            let dtype = x.dtype();
            let m = QMatMul::from_arc(q.clone())?;
            let y = m.forward(&x.to_dtype(DType::F32)?.contiguous()?)?;
            return Ok(y.to_dtype(dtype)?.broadcast_add(&self.bias)?);
        }
        // Weights-only: the layer's blocks are expanded for this call and dropped after it, so the
        // model stays small in memory, the map stays continuous in x (exactly invertible), and
        // the GEMM is the dense one.
        let w = q.dequantize(x.device())?.to_dtype(x.dtype())?;
        dense(x, &w, &self.bias)
    }
}

/// `x Wᵀ + b` over the last dimension of `x` with a dense (out, in) weight.
fn dense(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if crate::kernels::applies(x) && weight.dtype() == candle_core::DType::F32 {
        return Ok(crate::kernels::linear::linear(x, weight, bias)?);
    }
    let dims = x.dims().to_vec();
    let in_dim = dims[dims.len() - 1];
    let rows = x.elem_count() / in_dim.max(1);
    // One large GEMM over all tokens is much faster than a batched one.
    let y = x
        .reshape((rows, in_dim))?
        .matmul(&weight.t()?)?
        .broadcast_add(bias)?;
    let mut out_dims = dims;
    let last = out_dims.len() - 1;
    out_dims[last] = bias.dim(0)?;
    Ok(y.reshape(out_dims)?)
}

/// LayerNorm over the last dimension, eps 1e-5, evaluated in at least f32.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

const LN_EPS: f64 = 1e-5;

impl LayerNorm {
    /// Loads `weight` and `bias` (dim) under `vb`.
    pub fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
        })
    }

    /// The scale and shift.
    pub fn parts(&self) -> (&Tensor, &Tensor) {
        (&self.weight, &self.bias)
    }

    /// Normalises `x` (…, dim).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x = match dtype {
            DType::F16 | DType::BF16 => x.to_dtype(DType::F32)?,
            _ => x.clone(),
        };
        let (w, b) = (
            self.weight.to_dtype(x.dtype())?,
            self.bias.to_dtype(x.dtype())?,
        );
        // candle's fused kernel has no backward and no f64 path (the CPU kernels' LayerNorm is
        // inside the fused layer).
        let tracked = x.track_op() || w.track_op();
        let y = if tracked || x.dtype() != DType::F32 {
            let mean = x.mean_keepdim(D::Minus1)?;
            let xc = x.broadcast_sub(&mean)?;
            let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
            xc.broadcast_div(&(var + LN_EPS)?.sqrt()?)?
                .broadcast_mul(&w)?
                .broadcast_add(&b)?
        } else {
            candle_nn::ops::layer_norm(&x.contiguous()?, &w, &b, LN_EPS as f32)?
        };
        Ok(y.to_dtype(dtype)?)
    }
}

/// STARFlow's final RMSNorm `x·rsqrt(mean(x²) + 1e-6)·(1 + w)`, w = 0 at init, in f32.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
}

impl RmsNorm {
    /// Loads `weight` (dim) under `vb`.
    pub fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
        })
    }

    /// The learned w of the scale 1 + w.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Normalises `x` (…, dim).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        // At least f32 (bf16/f16 are upcast); f64 stays f64.
        let x = match dtype {
            DType::F16 | DType::BF16 => x.to_dtype(DType::F32)?,
            _ => x.clone(),
        };
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        let y = x.broadcast_div(&(ms + 1e-6)?.sqrt()?)?;
        let w = (self.weight.to_dtype(x.dtype())? + 1.0)?;
        Ok(y.broadcast_mul(&w)?.to_dtype(dtype)?)
    }
}

fn softmax_last(x: &Tensor) -> Result<Tensor> {
    Ok(if x.track_op() || x.dtype() != DType::F32 {
        candle_nn::ops::softmax(x, D::Minus1)?
    } else {
        candle_nn::ops::softmax_last_dim(x)?
    })
}

/// Multi-head self-attention with its pre-norm (`attention.{norm,qkv,proj}`).
#[derive(Debug, Clone)]
pub struct Attention {
    norm: LayerNorm,
    qkv: Linear,
    proj: Linear,
    num_heads: usize,
    head_dim: usize,
}

impl Attention {
    /// Loads the layer for width `channels` and heads of `head_dim`.
    pub fn new(
        channels: usize,
        head_dim: usize,
        vb: VarBuilder,
        quant: Option<&QuantWeights>,
    ) -> Result<Self> {
        Ok(Self {
            norm: LayerNorm::new(channels, vb.pp("norm"))?,
            qkv: Linear::load(channels, 3 * channels, vb.pp("qkv"), quant)?,
            proj: Linear::load(channels, channels, vb.pp("proj"), quant)?,
            num_heads: channels / head_dim,
            head_dim,
        })
    }

    /// (N, T, C) → three (N, H, T, dh) tensors.
    fn qkv(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (n, t, _) = x.dims3()?;
        let qkv = self
            .qkv
            .forward(&self.norm.forward(x)?)?
            .reshape((n, t, 3 * self.num_heads, self.head_dim))?
            .transpose(1, 2)?; // (N, 3H, T, dh)
        let h = self.num_heads;
        Ok((
            qkv.narrow(1, 0, h)?.contiguous()?,
            qkv.narrow(1, h, h)?.contiguous()?,
            qkv.narrow(1, 2 * h, h)?.contiguous()?,
        ))
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
        let scale = 1.0 / ((self.head_dim as f64).sqrt() * temp);
        let mut att = (q.matmul(&k.t()?)? * scale)?; // (N, H, Tq, Tk)
        if let Some(r) = row_scale {
            att = att.broadcast_mul(&r.to_dtype(att.dtype())?)?;
        }
        if let Some(m) = mask {
            att = att.broadcast_add(m)?;
        }
        let y = softmax_last(&att)?.matmul(v)?; // (N, H, Tq, dh)
        let y = y
            .transpose(1, 2)?
            .reshape((n, t, self.num_heads * self.head_dim))?;
        self.proj.forward(&y)
    }

    /// Causal attention over the whole sequence; `mask` is (T, T) with 0 / −∞; queries and
    /// keys rotated by `rope` from position 0.
    pub fn forward(
        &self,
        x: &Tensor,
        mask: &Tensor,
        temp: f64,
        rope: Option<&Rope>,
    ) -> Result<Tensor> {
        let (q, k, v) = self.qkv(x)?;
        let (q, k) = match rope {
            Some(r) => (r.apply(&q, 0)?, r.apply(&k, 0)?),
            None => (q, k),
        };
        self.attend(&q, &k, &v, Some(mask), temp, None)
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

/// Pre-norm MLP `mlp.{norm, main.0, main.2}` with the exact (erf) GELU.
#[derive(Debug, Clone)]
pub struct Mlp {
    norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    /// Loads the MLP of width `channels` and hidden width `hidden`.
    pub fn new(
        channels: usize,
        hidden: usize,
        vb: VarBuilder,
        quant: Option<&QuantWeights>,
    ) -> Result<Self> {
        Ok(Self {
            norm: LayerNorm::new(channels, vb.pp("norm"))?,
            fc1: Linear::load(channels, hidden, vb.pp("main").pp("0"), quant)?,
            fc2: Linear::load(hidden, channels, vb.pp("main").pp("2"), quant)?,
        })
    }

    /// (…, C) → (…, C).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = gelu_erf(&self.fc1.forward(&self.norm.forward(x)?)?)?;
        self.fc2.forward(&h)
    }
}

/// One transformer layer: `x + Attn(LN(x))`, then `x + MLP(LN(x))`.
#[derive(Debug, Clone)]
pub struct AttentionBlock {
    attention: Attention,
    mlp: Mlp,
    packed: Option<Tensor>,
}

impl AttentionBlock {
    /// Loads `attention.*` and `mlp.*` under `vb`.
    pub fn new(
        channels: usize,
        head_dim: usize,
        mlp_ratio: usize,
        vb: VarBuilder,
        quant: Option<&QuantWeights>,
    ) -> Result<Self> {
        let packed = match vb.contains_tensor(crate::packing::PACKED) {
            true => Some(vb.get_unchecked(crate::packing::PACKED)?),
            false => None,
        };
        Ok(Self {
            attention: Attention::new(channels, head_dim, vb.pp("attention"), quant)?,
            mlp: Mlp::new(channels, channels * mlp_ratio, vb.pp("mlp"), quant)?,
            packed,
        })
    }

    /// Whether a Linear weight of the layer is block-quantised.
    pub fn is_quantised(&self) -> bool {
        let (a, m) = (&self.attention, &self.mlp);
        a.qkv.is_quantised()
            || a.proj.is_quantised()
            || m.fc1.is_quantised()
            || m.fc2.is_quantised()
    }

    /// The layer with its quantised weights expanded ([`Linear::expanded`]).
    pub fn expanded(&self) -> Result<Self> {
        let mut e = self.clone();
        e.attention.qkv = self.attention.qkv.expanded()?;
        e.attention.proj = self.attention.proj.expanded()?;
        e.mlp.fc1 = self.mlp.fc1.expanded()?;
        e.mlp.fc2 = self.mlp.fc2.expanded()?;
        Ok(e)
    }

    /// The layer's weights (an error where one is quantised).
    pub fn parts(&self) -> Result<LayerParts<'_>> {
        Ok(LayerParts {
            ln1: self.attention.norm.parts(),
            qkv: self.attention.qkv.parts()?,
            proj: self.attention.proj.parts()?,
            ln2: self.mlp.norm.parts(),
            fc1: self.mlp.fc1.parts()?,
            fc2: self.mlp.fc2.parts()?,
            head_dim: self.attention.head_dim,
            packed: self.packed.as_ref(),
        })
    }

    /// Causal pass over (N, T, C) on the block's `engine`; `attn_temp` divides the attention
    /// scores, `rope` rotates queries and keys.
    pub fn forward(
        &self,
        x: &Tensor,
        mask: &Tensor,
        attn_temp: f64,
        engine: Engine,
        rope: Option<&Rope>,
    ) -> Result<Tensor> {
        let fused = engine == Engine::Cpu && rope.is_none();
        if fused && crate::kernels::applies(x) && !self.is_quantised() {
            return Ok(crate::kernels::layer::layer(x, &self.parts()?, attn_temp)?);
        }
        let x = (x + self.attention.forward(x, mask, attn_temp, rope)?)?;
        Ok((&x + self.mlp.forward(&x)?)?)
    }

    /// A pass over new positions with a KV cache (sampling); as [`Attention::step`].
    pub fn step(
        &self,
        x: &Tensor,
        cache: &mut KvCache,
        row_scale: Option<&Tensor>,
        rope: Option<&Rope>,
    ) -> Result<Tensor> {
        let x = (x + self.attention.step(x, cache, row_scale, rope)?)?;
        Ok((&x + self.mlp.forward(&x)?)?)
    }
}

/// GELU with the exact erf form: the CPU engine's approximation ([`crate::kernels::gelu`]) on
/// an f32 CPU tensor that needs no gradient (the fused layer covers training), candle's op
/// elsewhere.
fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if crate::kernels::applies(x) && !x.track_op() {
        let mut v = x.flatten_all()?.to_vec1::<f32>()?;
        crate::kernels::gelu::in_place(&mut v);
        return Ok(Tensor::from_vec(v, x.shape(), x.device())?);
    }
    Ok(x.gelu_erf()?)
}
