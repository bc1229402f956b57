//! Transformer building blocks, in the order a layer uses them: [`Linear`], the norms
//! ([`Norm`]), [`Attention`] (causal, rotary positions and grouped-query heads optional, a KV
//! cache) and the [`Mlp`], then the layer itself ([`AttentionBlock`]).
//!
//! Each op picks candle's fused kernels when no gradient is being tracked, and plain
//! differentiable ops otherwise (candle's fused LayerNorm/softmax have no backward; see
//! ARCHITECTURE.md).

mod attention;
mod linear;
mod mlp;
mod norm;

pub use attention::Attention;
pub use linear::Linear;
pub use mlp::Mlp;
pub use norm::{LayerNorm, Norm, RmsNorm};

use crate::config::ModelConfig;
use crate::engine::Engine;
use crate::error::Result;
use crate::kernels::LayerParts;
use crate::quant::QuantWeights;
use crate::rope::Rope;
use candle_core::Tensor;
use candle_nn::kv_cache::KvCache;
use candle_nn::VarBuilder;

/// One transformer layer: `x + Attn(LN(x))`, then `x + MLP(LN(x))`.
#[derive(Debug, Clone)]
pub struct AttentionBlock {
    attention: Attention,
    mlp: Mlp,
    packed: Option<Tensor>,
}

impl AttentionBlock {
    /// Loads `attention.*` and `mlp.*` of a layer of `cfg` under `vb`.
    pub fn new(cfg: &ModelConfig, vb: VarBuilder, quant: Option<&QuantWeights>) -> Result<Self> {
        let packed = match vb.contains_tensor(crate::packing::PACKED) {
            true => Some(vb.get_unchecked(crate::packing::PACKED)?),
            false => None,
        };
        Ok(Self {
            attention: Attention::new(cfg, vb.pp("attention"), quant)?,
            mlp: Mlp::new(cfg, vb.pp("mlp"), quant)?,
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
            || m.gate.as_ref().is_some_and(Linear::is_quantised)
    }

    /// The layer with its quantised weights expanded ([`Linear::expanded`]).
    pub fn expanded(&self) -> Result<Self> {
        let mut e = self.clone();
        e.attention.qkv = self.attention.qkv.expanded()?;
        e.attention.proj = self.attention.proj.expanded()?;
        for l in e.mlp.linears_mut() {
            *l = l.expanded()?;
        }
        Ok(e)
    }

    /// The layer's weights in the CPU engine's terms (an error where one is quantised, or the
    /// layer is not ml-tarflow's: [`ModelConfig::plain_layers`]).
    pub fn parts(&self) -> Result<LayerParts<'_>> {
        if self.mlp.gate.is_some() {
            return Err(crate::error::FlowError::Config(
                "the CPU engine's layers have a GELU MLP, not SwiGLU".into(),
            ));
        }
        Ok(LayerParts {
            ln1: self.attention.norm.layer_parts()?,
            qkv: self.attention.qkv.parts()?,
            proj: self.attention.proj.parts()?,
            ln2: self.mlp.norm.layer_parts()?,
            fc1: self.mlp.fc1.parts()?,
            fc2: self.mlp.fc2.parts()?,
            head_dim: self.attention.head_dim,
            packed: self.packed.as_ref(),
        })
    }

    /// A pass over (N, T, C) on the block's `engine`, causal with `mask` (the fused layer is
    /// causal), every position seeing every other without; `attn_temp` divides the attention
    /// scores, `rope` rotates queries and keys.
    pub fn forward(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        attn_temp: f64,
        engine: Engine,
        rope: Option<&Rope>,
    ) -> Result<Tensor> {
        let fused = engine == Engine::Cpu && mask.is_some();
        if fused && crate::kernels::applies(x) && !self.is_quantised() {
            let rot = rope.map(Rope::shared_rotation).transpose()?;
            return Ok(crate::kernels::layer::layer(
                x,
                &self.parts()?,
                attn_temp,
                rot,
            )?);
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
pub(super) fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if crate::kernels::applies(x) && !x.track_op() {
        let mut v = x.flatten_all()?.to_vec1::<f32>()?;
        crate::kernels::gelu::in_place(&mut v);
        return Ok(Tensor::from_vec(v, x.shape(), x.device())?);
    }
    Ok(x.gelu_erf()?)
}
