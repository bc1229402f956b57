//! The pre-norm MLP: ml-tarflow's `mlp.{norm, main.0, main.2}` with the exact (erf) GELU, or
//! ml-starflow's SwiGLU `mlp.{gate_proj, up_proj, down_proj}` with the tanh GELU; a post-norm
//! where the model asks for one.

use super::{gelu_erf, Linear, Norm, RmsNorm};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::quant::QuantWeights;
use candle_core::Tensor;
use candle_nn::VarBuilder;

/// The MLP of one transformer layer.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub(super) norm: Norm,
    /// `main.0`, or SwiGLU's `up_proj`.
    pub(super) fc1: Linear,
    /// `main.2`, or SwiGLU's `down_proj`.
    pub(super) fc2: Linear,
    /// SwiGLU's `gate_proj`.
    pub(super) gate: Option<Linear>,
    post_norm: Option<RmsNorm>,
}

impl Mlp {
    /// Loads the MLP of a layer of `cfg`.
    pub fn new(cfg: &ModelConfig, vb: VarBuilder, quant: Option<&QuantWeights>) -> Result<Self> {
        let (c, hidden, bias) = (cfg.channels, cfg.channels * cfg.mlp_ratio, !cfg.no_bias);
        let lin = |i, o, name: &str, vb: VarBuilder| {
            Linear::load_with_bias(i, o, bias, vb.pp(name), quant)
        };
        let (fc1, fc2, gate) = match cfg.swiglu {
            true => (
                lin(c, hidden, "up_proj", vb.clone())?,
                lin(hidden, c, "down_proj", vb.clone())?,
                Some(lin(c, hidden, "gate_proj", vb.clone())?),
            ),
            false => (
                lin(c, hidden, "0", vb.pp("main"))?,
                lin(hidden, c, "2", vb.pp("main"))?,
                None,
            ),
        };
        Ok(Self {
            norm: Norm::new(cfg.norm, c, vb.pp("norm"))?,
            fc1,
            fc2,
            gate,
            post_norm: match cfg.post_norm {
                true => Some(RmsNorm::new(c, vb.pp("post_norm"))?),
                false => None,
            },
        })
    }

    /// (…, C) → (…, C).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.norm.forward(x)?;
        let y = match &self.gate {
            Some(g) => self
                .fc2
                .forward(&(g.forward(&h)?.gelu()? * self.fc1.forward(&h)?)?)?,
            None => self.fc2.forward(&gelu_erf(&self.fc1.forward(&h)?)?)?,
        };
        match &self.post_norm {
            Some(p) => p.forward(&y),
            None => Ok(y),
        }
    }

    /// Its Linear layers, mutably (to expand quantised weights).
    pub(super) fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut v = vec![&mut self.fc1, &mut self.fc2];
        v.extend(self.gate.as_mut());
        v
    }
}
