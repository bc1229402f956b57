//! The norms: LayerNorm (ml-tarflow's blocks), the RMSNorm `x·rsqrt(mean(x²) + 1e-6)·(1 + w)`
//! (STARFlow's final norm, and ml-starflow's `norm_type = "rms_norm"` blocks, QK-norm and
//! post-norm), both in at least f32, and the choice between them.

use crate::config::NormKind;
use crate::error::Result;
use candle_core::{DType, Tensor, D};
use candle_nn::VarBuilder;

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

/// RMSNorm `x·rsqrt(mean(x²) + 1e-6)·(1 + w)`, w = 0 at init, in at least f32.
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

/// A block's pre-norm: LayerNorm (`weight`, `bias`) or RMSNorm (`weight`).
#[derive(Debug, Clone)]
pub enum Norm {
    /// ml-tarflow's.
    Layer(LayerNorm),
    /// ml-starflow's `norm_type = "rms_norm"`.
    Rms(RmsNorm),
}

impl Norm {
    /// Loads a norm of `kind` over `dim` under `vb`.
    pub fn new(kind: NormKind, dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(match kind {
            NormKind::LayerNorm => Norm::Layer(LayerNorm::new(dim, vb)?),
            NormKind::RmsNorm => Norm::Rms(RmsNorm::new(dim, vb)?),
        })
    }

    /// The LayerNorm's scale and shift (the CPU engine's only norm).
    pub fn layer_parts(&self) -> Result<(&Tensor, &Tensor)> {
        match self {
            Norm::Layer(n) => Ok(n.parts()),
            Norm::Rms(_) => Err(crate::error::FlowError::Config(
                "the CPU engine's layers have LayerNorms, not RMSNorms".into(),
            )),
        }
    }

    /// Normalises `x` (…, dim).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Norm::Layer(n) => n.forward(x),
            Norm::Rms(n) => n.forward(x),
        }
    }
}
