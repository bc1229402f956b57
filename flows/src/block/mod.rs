//! One flow block (ml-tarflow's `MetaBlock`): a causal transformer predicting an affine map
//! of each token from the tokens before it, in identity or flipped token order.

use crate::affine::{affine, affine_rows, at_least_f32, head, permute_rows, shift};
pub use crate::cond::Cond;
use crate::config::{ModelConfig, ScaleHead};
use crate::engine::{self, Engine};
use crate::error::{FlowError, Result};
use crate::kernels::step::{heads, StepWeights};
use crate::kernels::train::TrunkParts;
use crate::layers::{AttentionBlock, Linear, RmsNorm};
use crate::quant::QuantWeights;
use crate::rope::Rope;
mod step;

pub use step::Stepper;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use std::borrow::Cow;
use std::sync::{Arc, OnceLock};

/// What one block's forward pass produced.
#[derive(Debug, Clone)]
pub struct BlockOutput {
    /// Output tokens (N, T, D), canonical token order.
    pub out: Tensor,
    /// `−mean(α)` per sample (N).
    pub logdet: Tensor,
    /// Raw `proj_out` output before the shift (N, T, 2D), block's own token order.
    pub proj_out: Tensor,
    /// Log-scales α after the shift (N, T, D), block's own token order.
    pub alpha: Tensor,
}

/// A TarFlow block with its parameters `blocks.{k}.*`.
#[derive(Debug, Clone)]
pub struct MetaBlock {
    proj_in: Linear,
    pos_embed: Option<Tensor>, // (T, C), canonical order; none with rotary positions
    class_embed: Option<Tensor>, // (classes, C)
    proj_txt: Option<Linear>,  // txt_dim → C, where the block reads the text prefix
    rope: Option<Rope>,        // rotary tables for the L + T positions
    layers: Vec<AttentionBlock>,
    proj_out: Linear,
    flip: Option<Tensor>, // reversed token indices for odd blocks
    mask: Tensor,         // (L + T, L + T): 0 on and below the diagonal, −∞ above
    tokens: usize,        // T
    text_len: usize,      // L, the text rows before the tokens (0 without text)
    patch_dim: usize,
    nvp: bool,
    scale: ScaleHead,
    clip: f64,
    sos: Option<Tensor>,         // (1, D) learned start token (STARFlow)
    final_norm: Option<RmsNorm>, // before proj_out (STARFlow)
    /// Whether the CPU engine may run this block ([`engine::cpu_may_run`], decided at load).
    cpu_may_run: bool,
    /// The first option the engine's training pass does not cover (`kernels::TRAIN_COVERS`).
    train_uncovered: Option<String>,
    /// The step engine's Wᵀ copies, made on the first CPU inverse (frozen weights only).
    step_weights: OnceLock<Arc<StepWeights>>,
}

impl MetaBlock {
    /// Loads block `index` of `cfg` (odd blocks flip the token order).
    pub fn new(cfg: &ModelConfig, index: usize, vb: VarBuilder) -> Result<Self> {
        Self::load(cfg, index, vb, None)
    }

    /// [`Self::new`] with Linear weights taken from `quant` where it holds them.
    pub fn load(
        cfg: &ModelConfig,
        index: usize,
        vb: VarBuilder,
        quant: Option<&QuantWeights>,
    ) -> Result<Self> {
        let (t, c, d) = (cfg.num_tokens(), cfg.channels, cfg.patch_dim());
        let class_embed = if cfg.block_conditional(index) {
            Some(
                vb.get((cfg.num_classes, 1, c), "class_embed")?
                    .reshape((cfg.num_classes, c))?,
            )
        } else {
            None
        };
        let layers = (0..cfg.block_layers(index))
            .map(|l| AttentionBlock::new(cfg, vb.pp("attn_blocks").pp(l), quant))
            .collect::<Result<Vec<_>>>()?;
        let dev = vb.device();
        let flip = if cfg.block_flipped(index) {
            let idx: Vec<u32> = (0..t as u32).rev().collect();
            Some(Tensor::from_vec(idx, t, dev)?)
        } else {
            None
        };
        let text_len = if cfg.block_text(index) {
            cfg.txt_size
        } else {
            0
        };
        let s = text_len + t;
        let mask: Vec<f32> = (0..s * s)
            .map(|i| {
                if i % s <= i / s {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        let out_dim = if cfg.nvp { 2 * d } else { d };
        Ok(Self {
            proj_in: Linear::load(d, c, vb.pp("proj_in"), quant)?,
            pos_embed: match cfg.rope {
                true => None,
                false => Some(vb.get((t, c), "pos_embed")?),
            },
            class_embed,
            proj_txt: match text_len > 0 {
                true => Some(Linear::load(cfg.txt_dim, c, vb.pp("proj_txt"), quant)?),
                false => None,
            },
            rope: match cfg.rope {
                true => Some(Rope::new(cfg, text_len, dev, vb.dtype())?),
                false => None,
            },
            layers,
            proj_out: Linear::load(c, out_dim, vb.pp("proj_out"), quant)?,
            flip,
            mask: Tensor::from_vec(mask, (s, s), dev)?.to_dtype(vb.dtype())?,
            tokens: t,
            text_len,
            patch_dim: d,
            nvp: cfg.nvp,
            scale: cfg.scale,
            clip: cfg.soft_clip(),
            sos: if cfg.sos {
                Some(vb.get((1, 1, d), "sos_embed")?.reshape((1, d))?)
            } else {
                None
            },
            final_norm: if cfg.final_norm {
                Some(RmsNorm::new(c, vb.pp("final_norm"))?)
            } else {
                None
            },
            cpu_may_run: engine::cpu_may_run(cfg, index, dev, vb.dtype()),
            train_uncovered: engine::uncovered(cfg, crate::kernels::TRAIN_COVERS),
            step_weights: OnceLock::new(),
        })
    }

    /// The engine that runs this block's passes now: the CPU engine where it may run the block
    /// and the process's switch is on ([`crate::kernels::enabled`]), else the composed ops.
    /// A quantised block runs on the CPU engine with its layers expanded to f32, except under
    /// `--native-qmatmul`, where candle's integer matmul (composed) runs it.
    pub fn engine(&self) -> Engine {
        let native = self.is_quantised() && crate::quant::native_matmul();
        match self.cpu_may_run && crate::kernels::enabled() && !native {
            true => Engine::Cpu,
            false => Engine::Composed,
        }
    }

    /// The transformer weights the CPU engine's training pass reads, where the engine runs this
    /// block with dense weights and layers trained as packed variables (the model checks the
    /// options: [`Self::train_uncovered`]).
    pub(crate) fn trunk_parts(&self) -> Option<TrunkParts<'_>> {
        if self.engine() != Engine::Cpu {
            return None;
        }
        let layers = self
            .layers
            .iter()
            .map(|l| {
                let p = l.parts().ok()?;
                Some((p.packed?, p.head_dim, p.fc1.1.elem_count()))
            })
            .collect::<Option<Vec<_>>>()?;
        Some(TrunkParts {
            proj_in: self.proj_in.parts().ok()?,
            pos: self.pos_embed.as_ref()?,
            class_embed: self.class_embed.as_ref(),
            layers,
            proj_out: self.proj_out.parts().ok()?,
            reversed: self.flip.is_some(),
        })
    }

    /// The first model option the CPU engine's training pass does not cover, if any.
    pub fn train_uncovered(&self) -> Option<&str> {
        self.train_uncovered.as_deref()
    }

    /// The learned start token (1, D), when the block has one.
    pub fn sos(&self) -> Option<&Tensor> {
        self.sos.as_ref()
    }

    /// `proj_out` of the transformer output, after the optional final norm.
    fn head_out(&self, h: &Tensor) -> Result<Tensor> {
        match &self.final_norm {
            Some(n) => self.proj_out.forward(&n.forward(h)?),
            None => self.proj_out.forward(h),
        }
    }

    /// Applies this block's token permutation along `dim` (its own inverse).
    pub fn permute(&self, x: &Tensor, dim: usize) -> Result<Tensor> {
        Ok(match &self.flip {
            Some(idx) => x.index_select(idx, dim)?,
            None => x.clone(),
        })
    }

    /// A copy with its quantised Linear weights expanded to dense ones, for the sequential
    /// inverse (which would otherwise expand every layer at each of its T steps); `None` when
    /// nothing is quantised. Only this block's f32 weights are alive at a time.
    /// Under `--native-qmatmul` nothing is expanded: candle's integer matmul runs the layers.
    pub fn expanded(&self) -> Result<Option<MetaBlock>> {
        if !self.is_quantised() || crate::quant::native_matmul() {
            return Ok(None);
        }
        let mut e = self.clone();
        e.proj_in = self.proj_in.expanded()?;
        e.proj_out = self.proj_out.expanded()?;
        e.layers = self
            .layers
            .iter()
            .map(AttentionBlock::expanded)
            .collect::<Result<_>>()?;
        Ok(Some(e))
    }

    /// Whether a Linear weight of the block is stored in reduced precision.
    pub fn is_quantised(&self) -> bool {
        self.proj_in.is_quantised()
            || self.proj_out.is_quantised()
            || self.layers.iter().any(AttentionBlock::is_quantised)
    }

    /// Whether the weights are trainable variables (a model being trained).
    pub fn is_trainable(&self) -> bool {
        self.proj_out.parts().is_ok_and(|(w, _)| w.is_variable())
    }

    /// Whether this block reverses the token order.
    pub fn is_flipped(&self) -> bool {
        self.flip.is_some()
    }

    /// Class embedding to add to every token: (N, 1, C), (1, 1, C) or none.
    pub fn class_cond(&self, cond: Cond, device: &Device) -> Result<Option<Tensor>> {
        let Some(table) = &self.class_embed else {
            return Ok(None);
        };
        let classes = table.dim(0)?;
        let mean = table.mean_keepdim(0)?; // (1, C)
        match cond {
            Cond::Null | Cond::Text(_) => Ok(Some(mean.unsqueeze(0)?)),
            Cond::Labels(y) => {
                let mut idx = Vec::with_capacity(y.len());
                for (i, &l) in y.iter().enumerate() {
                    if l >= classes as i64 {
                        return Err(FlowError::Input(format!(
                            "label {l} of row {i} is out of range: the model has {classes} classes (use -1 for no label)"
                        )));
                    }
                    idx.push(if l < 0 { classes as u32 } else { l as u32 });
                }
                let ext = Tensor::cat(&[table, &mean], 0)?; // (classes + 1, C)
                let idx = Tensor::from_vec(idx, y.len(), device)?;
                Ok(Some(ext.index_select(&idx, 0)?.unsqueeze(1)?))
            }
        }
    }

    /// The class embeddings of an inverse's rows: `cond`'s for the N conditional rows, then
    /// (with guidance) the mean embedding for N unconditional ones; (rows, 1, C) or none.
    pub fn class_rows(
        &self,
        cond: Cond,
        guided: bool,
        n: usize,
        device: &Device,
    ) -> Result<Option<Tensor>> {
        let Some(c) = self.class_cond(cond, device)? else {
            return Ok(None);
        };
        let width = c.dim(2)?;
        let c = c.broadcast_as((n, 1, width))?;
        if !guided {
            return Ok(Some(c.contiguous()?));
        }
        let u = self
            .class_cond(Cond::Null, device)?
            .ok_or_else(|| FlowError::Config("class embedding vanished".into()))?
            .broadcast_as((n, 1, width))?;
        Ok(Some(Tensor::cat(&[&c, &u], 0)?))
    }

    /// The projected text prefix (rows, L, C) where this block reads text: `cond`'s prompts
    /// for the N rows, then (with guidance) the unconditional prompt for N more.
    pub fn text_rows(&self, cond: Cond, guided: bool, n: usize) -> Result<Option<Tensor>> {
        let Some(proj) = &self.proj_txt else {
            return Ok(None);
        };
        let Cond::Text(text) = cond else {
            return Err(FlowError::Input(format!(
                "the model reads a text prefix of {} embeddings per image: give them (--text FILE.safetensors with `y`)",
                self.text_len
            )));
        };
        let dt = self.mask.dtype();
        let y = text.prompts(n)?.to_dtype(dt)?;
        let y = match guided {
            true => Tensor::cat(&[&y, &text.nulls(n)?.to_dtype(dt)?], 0)?,
            false => y,
        };
        Ok(Some(proj.forward(&y)?))
    }

    /// (α, μ) of raw `proj_out` outputs ([`crate::affine::head`]).
    fn split(&self, o: &Tensor) -> Result<(Tensor, Tensor)> {
        head(o, self.patch_dim, self.nvp, self.scale, self.clip)
    }

    /// x → z for this block: `z = (x − μ)·exp(−α)` token-wise, parameters from earlier tokens.
    pub fn forward(&self, x: &Tensor, cond: Cond) -> Result<BlockOutput> {
        if let Some(out) = self.forward_kernels(x, cond)? {
            return Ok(out);
        }
        let x = self.permute(x, 1)?;
        let cls = self.class_cond(cond, x.device())?;
        let txt = self.text_rows(cond, false, x.dim(0)?)?;
        let (alpha, mu, proj_out) = self.maps(&x, cls.as_ref(), txt.as_ref(), 1.0)?;
        let z = affine(&x, &mu, &alpha)?;
        // The log-det is a mean of α over T·D terms: in f32 whatever the model's dtype.
        let logdet = at_least_f32(&alpha)?
            .mean_keepdim(2)?
            .mean_keepdim(1)?
            .flatten_all()?
            .neg()?;
        Ok(BlockOutput {
            out: self.permute(&z, 1)?,
            logdet,
            proj_out,
            alpha,
        })
    }

    /// The block whose dense weights a gradient-free CPU pass over `x` reads in the step
    /// engine's layout (this one, or a quantised one expanded), or `None` where the kernels do
    /// not apply. Under --native-qmatmul nothing is expanded, so a quantised block stays on the
    /// composed path, where candle's integer matmul runs it.
    fn dense_for_kernels(&self, x: &Tensor) -> Result<Option<Cow<'_, MetaBlock>>> {
        let f32_input = x.dtype() == DType::F32;
        if self.engine() != Engine::Cpu || !f32_input || x.track_op() || self.is_trainable() {
            return Ok(None);
        }
        let block = match self.expanded()? {
            Some(e) => Cow::Owned(e),
            None => Cow::Borrowed(self),
        };
        Ok((!block.is_quantised()).then_some(block))
    }

    /// [`Self::forward`] on slices, where the CPU kernels cover it (gradient-free, f32, TarFlow's
    /// exp head without a start token): the token order, the trunk and the affine map run with
    /// no candle op between them, where the composed ops took a pass and a buffer each.
    fn forward_kernels(&self, x: &Tensor, cond: Cond) -> Result<Option<BlockOutput>> {
        let plain_head = self.sos.is_none() && self.scale == ScaleHead::Exp && self.clip == 0.0;
        if !plain_head || self.text_len > 0 {
            return Ok(None);
        }
        let Some(block) = self.dense_for_kernels(x)? else {
            return Ok(None);
        };
        let (n, t, d) = x.dims3()?;
        let cls = self.class_cond(cond, x.device())?;
        let flipped = self.flip.is_some();
        let take = crate::kernels::pool::take;
        let len = n * t * d;
        let mut xp = take(len);
        crate::kernels::with_values(x, |s| permute_rows(s, &mut xp, t, d, flipped))?;
        let po = heads(&block.step_parts(cls.as_ref(), None)?, &xp, (n, t), 1.0)?; // (N·T, W)
        let (mut z, mut e, mut alpha) = (take(len), take(len), vec![0f32; len]);
        let mut sums = vec![0f64; n];
        affine_rows(
            &xp,
            &po,
            (t, d),
            self.nvp,
            (&mut z, &mut e, &mut alpha),
            &mut sums,
        );
        let mut s = vec![0f32; len]; // the output, canonical order
        permute_rows(&z, &mut s, t, d, flipped);
        let dims = (t * d) as f64;
        let logdet: Vec<f32> = sums.iter().map(|s| (-s / dims) as f32).collect();
        let dev = x.device();
        let w = po.len() / (n * t).max(1);
        Ok(Some(BlockOutput {
            out: Tensor::from_vec(s, (n, t, d), dev)?,
            logdet: Tensor::from_vec(logdet, n, dev)?,
            proj_out: Tensor::from_vec(po, (n, t, w), dev)?,
            alpha: Tensor::from_vec(alpha, (n, t, d), dev)?,
        }))
    }

    /// The (α, μ) of every token given all tokens `x` (N, T, D) in this block's own order, in
    /// one causal pass: token t's map depends only on tokens before it. Used by the forward
    /// pass and the parallel (Jacobi) inverse; `txt` is the projected text prefix
    /// ([`Self::text_rows`]), `attn_temp` divides the attention scores.
    pub fn params(
        &self,
        x: &Tensor,
        cls: Option<&Tensor>,
        txt: Option<&Tensor>,
        attn_temp: f64,
    ) -> Result<(Tensor, Tensor)> {
        let (alpha, mu, _) = self.maps(x, cls, txt, attn_temp)?;
        Ok((alpha, mu))
    }

    /// [`Self::params`] plus the raw `proj_out` (N, T, W).
    fn maps(
        &self,
        x: &Tensor,
        cls: Option<&Tensor>,
        txt: Option<&Tensor>,
        attn_temp: f64,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (n, t, _) = x.dims3()?;
        // STARFlow feeds [sos, x₀ … x_{T−2}] and reads token t's map at t; TarFlow feeds x and
        // shifts the maps right by one, so token 0 passes through.
        let input = match &self.sos {
            Some(sos) => Tensor::cat(
                &[
                    &sos.unsqueeze(0)?
                        .broadcast_as((n, 1, self.patch_dim))?
                        .to_dtype(x.dtype())?,
                    &x.narrow(1, 0, t - 1)?,
                ],
                1,
            )?,
            None => x.clone(),
        };
        let proj_out = if let Some(block) = self.dense_for_kernels(&input)? {
            let parts = block.step_parts(cls, txt)?;
            let out =
                crate::kernels::with_values(&input, |x| heads(&parts, x, (n, t), attn_temp))??;
            let w = out.len() / (n * t).max(1);
            Tensor::from_vec(out, (n, t, w), input.device())?
        } else {
            let mut h = self.proj_in.forward(&input)?; // (N, T, C)
            if let Some(pe) = &self.pos_embed {
                h = h.broadcast_add(&self.permute(pe, 0)?.narrow(0, 0, t)?)?;
            }
            if let Some(c) = cls {
                h = h.broadcast_add(c)?;
            }
            // The text rows go first; every layer updates them, only the tokens are read out.
            let l = match txt {
                Some(y) => {
                    h = Tensor::cat(&[y, &h], 1)?; // (N, L + T, C)
                    y.dim(1)?
                }
                None => 0,
            };
            let s = l + t;
            let mask = self.mask.narrow(0, 0, s)?.narrow(1, 0, s)?;
            let engine = self.engine();
            for layer in &self.layers {
                h = layer.forward(&h, Some(&mask), attn_temp, engine, self.rope.as_ref())?;
            }
            self.head_out(&h.narrow(1, l, t)?)? // (N, T, W)
        };
        let (alpha, mu) = self.split(&proj_out)?;
        let (alpha, mu) = if self.sos.is_some() {
            (alpha, mu)
        } else {
            (shift(&alpha)?, shift(&mu)?)
        };
        Ok((alpha, mu, proj_out))
    }
}
