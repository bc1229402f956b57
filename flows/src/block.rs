//! One flow block (ml-tarflow's `MetaBlock`): a causal transformer predicting an affine map
//! of each token from the tokens before it, in identity or flipped token order.

use crate::config::{ModelConfig, ScaleHead};
use crate::error::{FlowError, Result};
use crate::kernels::flow::{self, TrainParts};
use crate::kernels::step::{heads, StepKernel, StepParts, StepWeights};
use crate::layers::{AttentionBlock, Linear, RmsNorm};
use crate::quant::QuantWeights;
use candle_core::{DType, Device, Tensor};
use candle_nn::kv_cache::KvCache;
use candle_nn::VarBuilder;
use std::borrow::Cow;
use std::sync::{Arc, OnceLock};

/// Class conditioning of one pass.
#[derive(Debug, Clone, Copy)]
pub enum Cond<'a> {
    /// One label per row; negative labels (dropped) use the mean class embedding.
    Labels(&'a [i64]),
    /// No label: the mean class embedding for every row (zero for unconditional models).
    Null,
}

impl<'a> Cond<'a> {
    /// The conditioning of `labels` for a model of `num_classes` classes: the labels where the
    /// model is conditional and some row has one (≥ 0), else none (the mean embedding for all).
    pub fn of(num_classes: usize, labels: Option<&'a [i64]>) -> Self {
        match labels {
            Some(l) if num_classes > 0 && l.iter().any(|&v| v >= 0) => Cond::Labels(l),
            _ => Cond::Null,
        }
    }

    /// The conditioning of rows `a..b` of the batch (a share run on its own).
    pub fn rows(self, a: usize, b: usize) -> Self {
        match self {
            Cond::Labels(l) => Cond::Labels(&l[a..b]),
            Cond::Null => Cond::Null,
        }
    }
}

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
    pos_embed: Tensor,           // (T, C), canonical order
    class_embed: Option<Tensor>, // (classes, C)
    layers: Vec<AttentionBlock>,
    proj_out: Linear,
    flip: Option<Tensor>, // reversed token indices for odd blocks
    mask: Tensor,         // (T, T): 0 on and below the diagonal, −∞ above
    patch_dim: usize,
    nvp: bool,
    scale: ScaleHead,
    sos: Option<Tensor>,         // (1, D) learned start token (STARFlow)
    final_norm: Option<RmsNorm>, // before proj_out (STARFlow)
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
            .map(|l| {
                AttentionBlock::new(
                    c,
                    cfg.head_dim,
                    cfg.mlp_ratio,
                    vb.pp("attn_blocks").pp(l),
                    quant,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let dev = vb.device();
        let flip = if cfg.block_flipped(index) {
            let idx: Vec<u32> = (0..t as u32).rev().collect();
            Some(Tensor::from_vec(idx, t, dev)?)
        } else {
            None
        };
        let mask: Vec<f32> = (0..t * t)
            .map(|i| {
                if i % t <= i / t {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        let out_dim = if cfg.nvp { 2 * d } else { d };
        Ok(Self {
            proj_in: Linear::load(d, c, vb.pp("proj_in"), quant)?,
            pos_embed: vb.get((t, c), "pos_embed")?,
            class_embed,
            layers,
            proj_out: Linear::load(c, out_dim, vb.pp("proj_out"), quant)?,
            flip,
            mask: Tensor::from_vec(mask, (t, t), dev)?.to_dtype(vb.dtype())?,
            patch_dim: d,
            nvp: cfg.nvp,
            scale: cfg.scale,
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
            step_weights: OnceLock::new(),
        })
    }

    /// The weights the CPU training pass reads ([`crate::kernels::flow`]), when it covers this
    /// block: TarFlow's block (no start token, final norm or soft-clipped head) with dense
    /// weights and layers trained as packed variables.
    pub(crate) fn train_parts(&self) -> Option<TrainParts<'_>> {
        if self.sos.is_some() || self.final_norm.is_some() || self.scale != ScaleHead::Exp {
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
        Some(TrainParts {
            proj_in: self.proj_in.parts().ok()?,
            pos: &self.pos_embed,
            class_embed: self.class_embed.as_ref(),
            layers,
            proj_out: self.proj_out.parts().ok()?,
            flipped: self.flip.is_some(),
            nvp: self.nvp,
        })
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
        self.pos_embed.is_variable()
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
            Cond::Null => Ok(Some(mean.unsqueeze(0)?)),
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

    /// Turns raw `proj_out` outputs into (α, μ), α = ln σ; α ≡ 0 for volume-preserving blocks.
    /// STARFlow's head soft-clips `o ← 4·tanh(o/4)` and takes `σ = softplus(a + 0.5413)`.
    fn split(&self, o: &Tensor) -> Result<(Tensor, Tensor)> {
        let d = self.patch_dim;
        let o = match self.scale {
            ScaleHead::Exp => o.clone(),
            ScaleHead::Softplus => ((o / 4.0)?.tanh()? * 4.0)?,
        };
        if !self.nvp {
            return Ok((o.zeros_like()?, o));
        }
        let (a, mu) = (o.narrow(2, 0, d)?, o.narrow(2, d, d)?);
        let alpha = match self.scale {
            ScaleHead::Exp => a,
            ScaleHead::Softplus => softplus(&(a + SOFTPLUS_INV_1)?)?.log()?,
        };
        Ok((alpha, mu))
    }

    /// x → z for this block: `z = (x − μ)·exp(−α)` token-wise, parameters from earlier tokens.
    pub fn forward(&self, x: &Tensor, cond: Cond) -> Result<BlockOutput> {
        if let Some(out) = self.forward_kernels(x, cond)? {
            return Ok(out);
        }
        let x = self.permute(x, 1)?;
        let cls = self.class_cond(cond, x.device())?;
        let (alpha, mu, proj_out) = self.maps(&x, cls.as_ref(), 1.0)?;
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
        if !crate::kernels::applies(x) || x.track_op() || self.is_trainable() {
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
        if self.sos.is_some() || self.scale != ScaleHead::Exp {
            return Ok(None);
        }
        let Some(block) = self.dense_for_kernels(x)? else {
            return Ok(None);
        };
        let (n, t, d) = x.dims3()?;
        let cls = self.class_cond(cond, x.device())?;
        // `s`: the input (canonical order), then the output.
        let mut s = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let flipped = self.flip.is_some();
        let take = crate::kernels::pool::take;
        let mut xp = take(s.len());
        flow::permute(&s, &mut xp, t, d, flipped);
        let po = heads(&block.step_parts(cls.as_ref())?, &xp, (n, t), 1.0)?; // (N·T, W)
        let (mut z, mut e, mut alpha) = (take(s.len()), take(s.len()), vec![0f32; s.len()]);
        let mut sums = vec![0f64; n];
        flow::affine_head(
            &xp,
            &po,
            (t, d),
            self.nvp,
            (&mut z, &mut e, &mut alpha),
            &mut sums,
        );
        flow::permute(&z, &mut s, t, d, flipped);
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
    /// pass and the parallel (Jacobi) inverse; `attn_temp` divides the attention scores.
    pub fn params(
        &self,
        x: &Tensor,
        cls: Option<&Tensor>,
        attn_temp: f64,
    ) -> Result<(Tensor, Tensor)> {
        let (alpha, mu, _) = self.maps(x, cls, attn_temp)?;
        Ok((alpha, mu))
    }

    /// [`Self::params`] plus the raw `proj_out` (N, T, W).
    fn maps(
        &self,
        x: &Tensor,
        cls: Option<&Tensor>,
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
            let parts = block.step_parts(cls)?;
            let x = input.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
            let out = heads(&parts, &x, (n, t), attn_temp)?;
            let w = out.len() / (n * t).max(1);
            Tensor::from_vec(out, (n, t, w), input.device())?
        } else {
            let mask = self.mask.narrow(0, 0, t)?.narrow(1, 0, t)?;
            let pe = self.permute(&self.pos_embed, 0)?.narrow(0, 0, t)?;
            let mut h = self.proj_in.forward(&input)?.broadcast_add(&pe)?; // (N, T, C)
            if let Some(c) = cls {
                h = h.broadcast_add(c)?;
            }
            for layer in &self.layers {
                h = layer.forward(&h, &mask, attn_temp)?;
            }
            self.head_out(&h)? // (N, T, W)
        };
        let (alpha, mu) = self.split(&proj_out)?;
        let (alpha, mu) = if self.sos.is_some() {
            (alpha, mu)
        } else {
            (shift(&alpha)?, shift(&mu)?)
        };
        Ok((alpha, mu, proj_out))
    }

    /// The state of one sequential inverse over `rows` rows whose attention scores are divided
    /// by `temps[r]`: the trunk's CPU step kernel where the kernels apply, else candle's KV
    /// caches (the GPU path and the reference).
    pub fn stepper(&self, rows: usize, temps: &[f64], cls: Option<&Tensor>) -> Result<Stepper> {
        let t = self.pos_embed.dim(0)?;
        let device = self.pos_embed.device();
        if crate::kernels::enabled()
            && device.is_cpu()
            && self.pos_embed.dtype() == DType::F32
            && !self.is_quantised()
        {
            let parts = self.step_parts(cls)?;
            return Ok(Stepper::Cpu(Box::new(StepKernel::new(parts, rows, temps)?)));
        }
        let scale = if temps.iter().all(|&v| v == 1.0) {
            None
        } else {
            let inv: Vec<f32> = temps.iter().map(|&v| (1.0 / v) as f32).collect();
            Some(Tensor::from_vec(inv, (rows, 1, 1, 1), device)?)
        };
        Ok(Stepper::Kv {
            caches: self.layers.iter().map(|_| KvCache::new(2, t)).collect(),
            scale,
        })
    }

    /// What the CPU step engine reads around `trunk`: the weights in its layout, the embeddings,
    /// the final norm, and the class embedding of each row.
    fn step_parts<'a>(&'a self, cls: Option<&'a Tensor>) -> Result<StepParts<'a>> {
        Ok(StepParts {
            weights: self.step_weights()?,
            pos: &self.pos_embed,
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
        let w = Arc::new(StepWeights::new(
            &self.layers,
            self.proj_in.parts()?,
            self.proj_out.parts()?,
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
                let x = x_i.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
                let out = k.step(&x, i)?;
                let w = out.len() / rows.max(1);
                Tensor::from_vec(out, (rows, 1, w), x_i.device())?
            }
            Stepper::Kv { caches, scale } => {
                let t = self.pos_embed.dim(0)?;
                let pos = match &self.flip {
                    Some(_) => t - 1 - i,
                    None => i,
                };
                let mut h = self
                    .proj_in
                    .forward(x_i)?
                    .broadcast_add(&self.pos_embed.narrow(0, pos, 1)?)?;
                if let Some(c) = cls {
                    h = h.broadcast_add(c)?;
                }
                for (layer, cache) in self.layers.iter().zip(caches.iter_mut()) {
                    h = layer.step(&h, cache, scale.as_ref())?;
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

/// softplus⁻¹(1): STARFlow's offset so that σ = 1 when the head outputs 0.
const SOFTPLUS_INV_1: f64 = 0.541_324_854_612_918_1;

/// `ln(1 + eˣ)`, stable for large |x|.
fn softplus(x: &Tensor) -> Result<Tensor> {
    let pos = x.relu()?;
    Ok((pos + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?)
}

/// Shifts (N, T, D) right by one token along T, with zeros first.
fn shift(x: &Tensor) -> Result<Tensor> {
    let (n, t, d) = x.dims3()?;
    let zero = Tensor::zeros((n, 1, d), x.dtype(), x.device())?;
    Ok(Tensor::cat(&[&zero, &x.narrow(1, 0, t - 1)?], 1)?)
}

/// `x` in f32 when it is bf16/f16; f32 and f64 unchanged.
pub fn at_least_f32(x: &Tensor) -> Result<Tensor> {
    Ok(match x.dtype() {
        DType::F16 | DType::BF16 => x.to_dtype(DType::F32)?,
        _ => x.clone(),
    })
}

/// The block's map `z = (x − μ)·exp(−α)`, evaluated in at least f32 (as upstream forces for the
/// scales: a bf16 `exp(−α)` would round the scale before the product); the result has `x`'s dtype.
pub fn affine(x: &Tensor, mu: &Tensor, alpha: &Tensor) -> Result<Tensor> {
    let (xf, mf, af) = (at_least_f32(x)?, at_least_f32(mu)?, at_least_f32(alpha)?);
    Ok(((xf - mf)? * af.neg()?.exp()?)?.to_dtype(x.dtype())?)
}

/// The inverse map `x = z·exp(α) + μ`, in at least f32, in `z`'s dtype.
pub fn unaffine(z: &Tensor, alpha: &Tensor, mu: &Tensor) -> Result<Tensor> {
    let (zf, af, mf) = (at_least_f32(z)?, at_least_f32(alpha)?, at_least_f32(mu)?);
    Ok(((zf * af.exp()?)? + mf)?.to_dtype(z.dtype())?)
}
