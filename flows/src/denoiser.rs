//! ml-starflow's learnable self-denoiser (`learnable_self_denoiser.*`): a non-causal
//! transformer over the image's tokens that predicts the score of the flow's NLL scaled by the
//! training noise, `σ·∇ₓ NLL(x)`, so that a sample is cleaned in one pass,
//! `x ← x − 0.3·pred·(σ − σ')/σ`, instead of a backward pass through the flow.

use crate::config::ModelConfig;
use crate::engine::Engine;
use crate::error::Result;
use crate::layers::{AttentionBlock, Linear, RmsNorm};
use crate::rope::Rope;
use candle_core::Tensor;
use candle_nn::VarBuilder;

/// The denoiser's constant noise scale (upstream's `noise_std_const`).
pub const NOISE_CONST: f64 = 0.3;

/// The self-denoiser: `proj_in`, `denoiser_layers` non-causal layers, the final norm where the
/// model has one, `proj_out` back to the token width.
#[derive(Debug, Clone)]
pub struct Denoiser {
    proj_in: Linear,
    layers: Vec<AttentionBlock>,
    final_norm: Option<RmsNorm>,
    proj_out: Linear,
    rope: Option<Rope>,
}

impl Denoiser {
    /// Loads the denoiser of `cfg` under `vb` (`learnable_self_denoiser`).
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let (c, d) = (cfg.channels, cfg.patch_dim());
        let layers = (0..cfg.denoiser_layers)
            .map(|l| AttentionBlock::new(cfg, vb.pp("attn_blocks").pp(l), None))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            proj_in: Linear::new(d, c, vb.pp("proj_in"))?,
            layers,
            final_norm: match cfg.final_norm {
                true => Some(RmsNorm::new(c, vb.pp("final_norm"))?),
                false => None,
            },
            proj_out: Linear::new(c, d, vb.pp("proj_out"))?,
            rope: match cfg.rope {
                true => Some(Rope::new(cfg, 0, vb.device(), vb.dtype())?),
                false => None,
            },
        })
    }

    /// The prediction (N, T, D) for tokens `x` (N, T, D) in raster order.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.proj_in.forward(x)?; // (N, T, C)
        for layer in &self.layers {
            // No mask: every token sees every other.
            h = layer.forward(&h, None, 1.0, Engine::Composed, self.rope.as_ref())?;
        }
        if let Some(n) = &self.final_norm {
            h = n.forward(&h)?;
        }
        self.proj_out.forward(&h)
    }
}
