//! One flow block (ml-tarflow's `MetaBlock`): a causal transformer predicting an affine map
//! of each token from the tokens before it, in identity or flipped token order.

use crate::config::{ModelConfig, ScaleHead};
use crate::error::{FlowError, Result};
use crate::layers::{AttentionBlock, Linear, RmsNorm};
use crate::quant::QuantWeights;
use candle_core::{DType, Device, Tensor};
use candle_nn::kv_cache::KvCache;
use candle_nn::VarBuilder;

/// Class conditioning of one pass.
#[derive(Debug, Clone, Copy)]
pub enum Cond<'a> {
    /// One label per row; negative labels (dropped) use the mean class embedding.
    Labels(&'a [i64]),
    /// No label: the mean class embedding for every row (zero for unconditional models).
    Null,
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

/// Borrowed weights of a block, for other execution paths (the fast sampler).
pub struct BlockParts<'a> {
    /// Input projection (weight, bias).
    pub proj_in: (&'a Tensor, &'a Tensor),
    /// Position embeddings (T, C), canonical order.
    pub pos_embed: &'a Tensor,
    /// Class embeddings (classes, C).
    pub class_embed: Option<&'a Tensor>,
    /// Transformer layers.
    pub layers: &'a [AttentionBlock],
    /// Output projection (weight, bias).
    pub proj_out: (&'a Tensor, &'a Tensor),
    /// D = C·p².
    pub patch_dim: usize,
    /// Affine (true) or shift-only coupling.
    pub nvp: bool,
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

    /// The block's weights (an error where a Linear layer is quantised).
    pub fn parts(&self) -> Result<BlockParts<'_>> {
        Ok(BlockParts {
            proj_in: self.proj_in.parts()?,
            pos_embed: &self.pos_embed,
            class_embed: self.class_embed.as_ref(),
            layers: &self.layers,
            proj_out: self.proj_out.parts()?,
            patch_dim: self.patch_dim,
            nvp: self.nvp,
        })
    }

    /// A copy with its quantised Linear weights expanded to dense ones, for the sequential
    /// inverse (which would otherwise expand every layer at each of its T steps); `None` when
    /// nothing is quantised. Only this block's f32 weights are alive at a time.
    pub fn expanded(&self) -> Result<Option<MetaBlock>> {
        let quantised = self.proj_in.is_quantised()
            || self.proj_out.is_quantised()
            || self.layers.iter().any(AttentionBlock::is_quantised);
        if !quantised {
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
        let pe = self.permute(&self.pos_embed, 0)?;
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
        let mask = self.mask.narrow(0, 0, t)?.narrow(1, 0, t)?;
        let pe = pe.narrow(0, 0, t)?;
        let mut h = self.proj_in.forward(&input)?.broadcast_add(&pe)?; // (N, T, C)
        if let Some(c) = cls {
            h = h.broadcast_add(c)?;
        }
        for layer in &self.layers {
            h = layer.forward(&h, &mask, attn_temp)?;
        }
        let proj_out = self.head_out(&h)?; // (N, T, 2D)
        let (alpha, mu) = self.split(&proj_out)?;
        let (alpha, mu) = if self.sos.is_some() {
            (alpha, mu)
        } else {
            (shift(&alpha)?, shift(&mu)?)
        };
        Ok((alpha, mu, proj_out))
    }

    /// Fresh KV caches, one per layer, for an inverse pass.
    pub fn new_caches(&self) -> Vec<KvCache> {
        let t = self.pos_embed.dim(0).unwrap_or(0);
        self.layers.iter().map(|_| KvCache::new(2, t)).collect()
    }

    /// Feeds sequence position `i` (N, 1, D) and returns the (α, μ) of the next token: token
    /// i+1 (TarFlow; the input is token i) or token i (with `sos`; the input is token i−1, or
    /// the start token at i = 0).
    pub fn step(
        &self,
        x_i: &Tensor,
        i: usize,
        cls: Option<&Tensor>,
        caches: &mut [KvCache],
        attn_temp: f64,
    ) -> Result<(Tensor, Tensor)> {
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
            h = layer.step(&h, cache, attn_temp)?;
        }
        self.split(&self.head_out(&h)?)
    }
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
