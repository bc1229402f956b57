//! One token at a time: the state of a block's sequential (KV-cached) inverse, on the CPU
//! engine's step kernel or candle's KV caches.

use super::MetaBlock;
use crate::engine::Engine;
use crate::error::Result;
use crate::kernels::step::{StepKernel, StepParts, StepWeights};
use crate::layers::{AttentionBlock, RmsNorm};
use crate::rope::Rope;
use candle_core::Tensor;
use candle_nn::kv_cache::KvCache;
use std::sync::Arc;

impl MetaBlock {
    /// The state of one sequential inverse over `rows` rows whose attention scores are divided
    /// by `temps[r]`: the trunk's CPU step kernel where the kernels apply, else candle's KV
    /// caches (the GPU path and the reference), filled first with the text prefix `txt`
    /// (rows, L, C; [`MetaBlock::text_rows`]) where the block reads one.
    pub fn stepper(
        &self,
        rows: usize,
        temps: &[f64],
        cls: Option<&Tensor>,
        txt: Option<&Tensor>,
    ) -> Result<Stepper> {
        let t = self.tokens;
        let device = self.mask.device();
        if self.engine() == Engine::Cpu && !self.is_quantised() {
            let parts = self.step_parts(cls, txt)?;
            return Ok(Stepper::Cpu(Box::new(StepKernel::new(
                parts, rows, t, temps,
            )?)));
        }
        let scale = if temps.iter().all(|&v| v == 1.0) {
            None
        } else {
            let inv: Vec<f32> = temps.iter().map(|&v| (1.0 / v) as f32).collect();
            Some(Tensor::from_vec(inv, (rows, 1, 1, 1), device)?)
        };
        let mut caches: Vec<KvCache> = self
            .layers
            .iter()
            .map(|_| KvCache::new(2, self.text_len + t))
            .collect();
        if let Some(y) = txt {
            let mut h = y.clone();
            for (layer, cache) in self.layers.iter().zip(caches.iter_mut()) {
                h = layer.step(&h, cache, scale.as_ref(), self.rope.as_ref())?;
            }
        }
        Ok(Stepper::Kv { caches, scale })
    }

    /// What the CPU step engine reads around `trunk`: the weights in its layout, the embeddings,
    /// the final norm, the class embedding of each row and the projected text rows.
    pub(super) fn step_parts<'a>(
        &'a self,
        cls: Option<&'a Tensor>,
        txt: Option<&'a Tensor>,
    ) -> Result<StepParts<'a>> {
        Ok(StepParts {
            weights: self.step_weights()?,
            pos: self.pos_embed.as_ref(),
            text: txt,
            flipped: self.flip.is_some(),
            cls,
            final_norm: self.final_norm.as_ref().map(RmsNorm::weight),
        })
    }

    /// The step engine's layout of the weights: kept for frozen weights (a model being trained
    /// changes its own), made per inverse otherwise.
    fn step_weights(&self) -> Result<Arc<StepWeights>> {
        if let Some(w) = self.step_weights.get() {
            return Ok(w.clone());
        }
        let layers = self
            .layers
            .iter()
            .map(AttentionBlock::parts)
            .collect::<Result<Vec<_>>>()?;
        let w = Arc::new(StepWeights::new(
            &layers,
            self.proj_in.parts()?,
            self.proj_out.parts()?,
            self.rope.as_ref().map(Rope::rotation).transpose()?,
        )?);
        if !self.is_trainable() {
            let _ = self.step_weights.set(w.clone());
        }
        Ok(w)
    }

    /// Feeds sequence position `i` of every row, `x_i` (rows, 1, D), with `cls` (rows or 1, 1, C;
    /// the CPU engine took them at [`Self::stepper`]), and returns the (α, μ) of the next token:
    /// token i+1 (TarFlow; the input is token i) or token i (with `sos`; the input is token i−1,
    /// or the start token at i = 0).
    pub fn step(
        &self,
        x_i: &Tensor,
        i: usize,
        cls: Option<&Tensor>,
        st: &mut Stepper,
    ) -> Result<(Tensor, Tensor)> {
        let head = match st {
            Stepper::Cpu(k) => {
                let rows = x_i.dim(0)?;
                let out = crate::kernels::with_values(x_i, |x| k.step(x, i))??;
                let w = out.len() / rows.max(1);
                Tensor::from_vec(out, (rows, 1, w), x_i.device())?
            }
            Stepper::Kv { caches, scale } => {
                let mut h = self.proj_in.forward(x_i)?;
                if let Some(pe) = &self.pos_embed {
                    let t = self.tokens;
                    let pos = match &self.flip {
                        Some(_) => t - 1 - i,
                        None => i,
                    };
                    h = h.broadcast_add(&pe.narrow(0, pos, 1)?)?;
                }
                if let Some(c) = cls {
                    h = h.broadcast_add(c)?;
                }
                for (layer, cache) in self.layers.iter().zip(caches.iter_mut()) {
                    h = layer.step(&h, cache, scale.as_ref(), self.rope.as_ref())?;
                }
                self.head_out(&h)?
            }
        };
        self.split(&head)
    }
}

/// The per-inverse state of [`MetaBlock::step`].
pub enum Stepper {
    /// The CPU step engine.
    Cpu(Box<StepKernel>),
    /// candle's KV caches, one per layer, and the per-row score multipliers.
    Kv {
        /// One per layer.
        caches: Vec<KvCache>,
        /// (rows, 1, 1, 1) `1 / temperature`, when not all 1.
        scale: Option<Tensor>,
    },
}
