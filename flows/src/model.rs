//! The TarFlow model: patchify, K flow blocks, exact likelihood, the KV-cached inverse
//! with classifier-free guidance, and score-based denoising.

use crate::block::{unaffine, BlockOutput, Cond, MetaBlock};
use crate::config::ModelConfig;
use crate::device::host_f64;
use crate::error::{FlowError, Result};
use crate::patch::{patchify, unpatchify};
use crate::quant::QuantWeights;
use crate::rng::{randn, FlowRng};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;

/// Which of (α, μ) classifier-free guidance extrapolates (ml-tarflow's `guide_what`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GuideWhat {
    /// The log-scale α only (`"a"`).
    Alpha,
    /// The shift μ only (`"b"`).
    Mu,
    /// Both (`"ab"`, the default).
    #[default]
    Both,
}

impl std::str::FromStr for GuideWhat {
    type Err = FlowError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "a" | "alpha" => Ok(GuideWhat::Alpha),
            "b" | "mu" => Ok(GuideWhat::Mu),
            "ab" | "both" => Ok(GuideWhat::Both),
            _ => Err(FlowError::Input(format!(
                "guide_what must be one of a, b, ab; got {s:?}"
            ))),
        }
    }
}

/// How the conditional and unconditional predictions are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GuidanceRule {
    /// TarFlow: extrapolate α and μ linearly, `p + w·(p_c − p_u)`.
    #[default]
    Linear,
    /// STARFlow's closed form for Gaussians: `s = min(σc/σu, 1)²`, `σ̃ = σc/√(1+w−ws)`,
    /// `μ̃ = ((1+w)μc − wsμu)/(1+w−ws)` (ignores `annealed` and `guide_what`).
    Gaussian,
}

impl std::str::FromStr for GuidanceRule {
    type Err = FlowError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "linear" | "tarflow" => Ok(GuidanceRule::Linear),
            "gaussian" | "starflow" => Ok(GuidanceRule::Gaussian),
            _ => Err(FlowError::Input(format!(
                "guidance rule must be linear or gaussian; got {s:?}"
            ))),
        }
    }
}

/// STARFlow's guided (α̃, μ̃) from the conditional (α, μ) and unconditional ones, α = ln σ.
pub fn gaussian_guidance(
    a_c: &Tensor,
    mu_c: &Tensor,
    a_u: &Tensor,
    mu_u: &Tensor,
    w: f64,
) -> Result<(Tensor, Tensor)> {
    // s = min(σc/σu, 1)² = exp(2·min(αc − αu, 0)).
    let s = ((a_c - a_u)?.minimum(0f32)? * 2.0)?.exp()?;
    let denom = ((s.clone() * (-w))? + (1.0 + w))?;
    let a = (a_c - (denom.log()? * 0.5)?)?;
    let mu = (((mu_c * (1.0 + w))? - (mu_u * s)? * w)? / denom)?;
    Ok((a, mu))
}

/// Initial guess of a block's input for the Jacobi solver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum JacobiInit {
    /// Zeros.
    Zeros,
    /// The block's output (its z), a good guess where the block changes little.
    #[default]
    Input,
}

impl std::str::FromStr for JacobiInit {
    type Err = FlowError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "zeros" => Ok(JacobiInit::Zeros),
            "input" => Ok(JacobiInit::Input),
            _ => Err(FlowError::Input(format!(
                "jacobi init must be zeros or input; got {s:?}"
            ))),
        }
    }
}

/// Options of the parallel (GS-Jacobi) inverse.
#[derive(Debug, Clone, PartialEq)]
pub struct JacobiOptions {
    /// Stop a chunk when `mean((new − old)²) / mean(new²)` falls below this.
    pub tol: f64,
    /// At most this many iterations per chunk (a chunk of L tokens is exact after L).
    pub max_iters: usize,
    /// Tokens per Gauss-Seidel chunk, solved one after another; 0 = the whole sequence.
    pub chunk: usize,
    /// Per-block chunk sizes in sampling order (first = the block sampled first); overrides
    /// `chunk` where given.
    pub block_chunks: Vec<usize>,
    /// Initial guess.
    pub init: JacobiInit,
}

impl Default for JacobiOptions {
    fn default() -> Self {
        Self {
            tol: 1e-8,
            max_iters: 64,
            chunk: 0,
            block_chunks: Vec::new(),
            init: JacobiInit::Input,
        }
    }
}

/// How one block's Jacobi solve went.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockSolve {
    /// Block index in x→z order.
    pub block: usize,
    /// Causal passes over the block, summed over its chunks.
    pub iterations: usize,
    /// Chunks solved.
    pub chunks: usize,
    /// Iterations per token of the block: near 1/L for an easy block, 1 for one that needs
    /// as many passes as the sequential solver ("tough").
    pub toughness: f64,
    /// The relative change at the last iteration of the last chunk.
    pub last_change: f64,
}

/// Options of the inverse pass (ml-tarflow's `Model.reverse` keyword arguments).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReverseOptions {
    /// Guidance weight w; 0 turns guidance off.
    pub guidance: f64,
    /// Ramp the weight along the sequence: `g_i = (i+1)/(T−1)·w`, restarted in every block.
    pub annealed: bool,
    /// What the guidance extrapolates.
    pub guide_what: GuideWhat,
    /// Attention temperature of the unconditional (guidance) pass.
    pub attn_temp: f64,
    /// How the two predictions are combined.
    pub rule: GuidanceRule,
    /// Guide only the first K blocks sampled (the last K in x→z order, STARFlow: 1, the deep
    /// block); 0 guides every block.
    pub guide_blocks: usize,
}

impl Default for ReverseOptions {
    fn default() -> Self {
        Self {
            guidance: 0.0,
            annealed: false,
            guide_what: GuideWhat::Both,
            attn_temp: 1.0,
            rule: GuidanceRule::Linear,
            guide_blocks: 0,
        }
    }
}

/// Result of the forward (x → z) pass.
#[derive(Debug, Clone)]
pub struct FlowOutput {
    /// Latent (N, T, D) in patch-sequence layout.
    pub z: Tensor,
    /// Σ_k logdet_k per sample (N); each term is a per-dimension mean.
    pub logdets: Tensor,
    /// Per-block outputs and log-dets, x→z order.
    pub blocks: Vec<BlockOutput>,
}

/// Bits/dim dimension count: the true C·H·W, or evaluate_bpd.py's hard-coded 3·S².
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BpdConvention {
    /// n = C·H·W (correct for any channel count).
    #[default]
    TrueDims,
    /// n = 3·S², as ml-tarflow's evaluate_bpd.py (differs only when C ≠ 3).
    Reference,
}

/// A TarFlow model.
#[derive(Debug, Clone)]
pub struct TarFlow {
    cfg: ModelConfig,
    blocks: Vec<MetaBlock>,
    var: Tensor, // (T, D) prior variance, ones for affine models
    device: Device,
    dtype: DType,
    /// Its weight copies, made on first use (only for frozen weights: variables change).
    fast_blocks: std::sync::OnceLock<std::sync::Arc<Vec<crate::fast::FastBlock>>>,
    /// The weight map it was built from (checkpoints), kept so that an image whose likelihood
    /// overflows this dtype can be recomputed in f64 ([`Self::widened`]).
    weights: Option<std::sync::Arc<std::collections::HashMap<String, Tensor>>>,
    /// Reduced-precision Linear weights (already inside the layers; kept for [`Self::widened`]).
    quant: Option<std::sync::Arc<QuantWeights>>,
}

/// The fast path's blocks: all of them (kept for frozen dense weights), or built one at a time
/// from quantised weights.
enum FastBlocks {
    All(std::sync::Arc<Vec<crate::fast::FastBlock>>),
    PerBlock,
}

const LN_2PI: f64 = 1.837_877_066_409_345_3;
const LN_128: f64 = 4.852_030_263_919_617;

impl TarFlow {
    /// Builds the model from `vb`, which must hold every key of [`crate::params::param_specs`].
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        Self::build(cfg, vb, None)
    }

    fn build(
        cfg: &ModelConfig,
        vb: VarBuilder,
        quant: Option<std::sync::Arc<QuantWeights>>,
    ) -> Result<Self> {
        cfg.validate()?;
        let blocks = (0..cfg.num_blocks)
            .map(|k| MetaBlock::load(cfg, k, vb.pp("blocks").pp(k), quant.as_deref()))
            .collect::<Result<Vec<_>>>()?;
        let shape = (cfg.num_tokens(), cfg.patch_dim());
        let var = if vb.contains_tensor("var") {
            vb.get(shape, "var")?
        } else {
            Tensor::ones(shape, vb.dtype(), vb.device())?
        };
        Ok(Self {
            cfg: cfg.clone(),
            blocks,
            var,
            device: vb.device().clone(),
            dtype: vb.dtype(),
            fast_blocks: std::sync::OnceLock::new(),
            weights: None,
            quant,
        })
    }

    /// Builds the model from a weight map (every parameter key, plus the `var` buffer where
    /// the prior variance is not one) and keeps the map for [`Self::widened`].
    pub fn from_weights(
        cfg: &ModelConfig,
        weights: std::collections::HashMap<String, Tensor>,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        Self::from_parts(cfg, weights, None, device, dtype)
    }

    /// [`Self::from_weights`] where `quant` holds the reduced-precision Linear weights
    /// (absent from `weights`).
    pub fn from_parts(
        cfg: &ModelConfig,
        weights: std::collections::HashMap<String, Tensor>,
        quant: Option<std::sync::Arc<QuantWeights>>,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let weights = std::sync::Arc::new(weights);
        let vb = VarBuilder::from_tensors((*weights).clone(), dtype, device);
        let mut model = Self::build(cfg, vb, quant)?;
        model.weights = Some(weights);
        Ok(model)
    }

    /// The same model in f64 on the CPU, where f32 overflows (inputs far from the data make
    /// `(x − μ)·e^{−α}` exceed 3.4e38 a few blocks in); `None` for a model of variables.
    /// Quantised weights are dequantised into it (the activations are then not quantised).
    pub fn widened(&self) -> Result<Option<TarFlow>> {
        match &self.weights {
            Some(w) if self.dtype != DType::F64 || !self.device.is_cpu() => {
                let mut all = (**w).clone();
                if let Some(q) = &self.quant {
                    for (k, t) in &q.tensors {
                        all.insert(k.clone(), t.dequantize(&Device::Cpu)?);
                    }
                }
                Ok(Some(Self::from_weights(
                    &self.cfg,
                    all,
                    &Device::Cpu,
                    DType::F64,
                )?))
            }
            _ => Ok(None),
        }
    }

    /// The reduced-precision weights, for a model loaded from a `tarflow quantize` file.
    pub fn quant(&self) -> Option<&QuantWeights> {
        self.quant.as_deref()
    }

    /// Whether the weights are plain tensors rather than trainable variables.
    fn frozen(&self) -> bool {
        !self.blocks.iter().any(MetaBlock::is_trainable)
    }

    /// The fast sampler's blocks when it applies to this model.
    fn fast_blocks(&self) -> Result<Option<FastBlocks>> {
        // The buffer-reusing f32 path ([`crate::fast`]) serves gradient-free passes on the CPU
        // unless the one kernel switch ([`crate::kernels::set_enabled`]) is off.
        if !(crate::kernels::enabled() && self.device.is_cpu() && self.dtype == DType::F32) {
            return Ok(None);
        }
        if self.quant.is_some() {
            // Expanded one block at a time, so that the f32 copy of one block only is alive.
            return Ok(match crate::quant::native_matmul() {
                true => None,
                false => Some(FastBlocks::PerBlock),
            });
        }
        if let Some(b) = self.fast_blocks.get() {
            return Ok(Some(FastBlocks::All(b.clone())));
        }
        let blocks = std::sync::Arc::new(
            self.blocks
                .iter()
                .map(crate::fast::FastBlock::new)
                .collect::<Result<Vec<_>>>()?,
        );
        if self.frozen() {
            let _ = self.fast_blocks.set(blocks.clone());
        }
        Ok(Some(FastBlocks::All(blocks)))
    }

    /// Block `k` of `fb`, built now from the expanded weights where they are quantised.
    fn fast_block<'a>(
        &self,
        fb: &'a FastBlocks,
        k: usize,
        built: &'a mut Option<crate::fast::FastBlock>,
    ) -> Result<&'a crate::fast::FastBlock> {
        match fb {
            FastBlocks::All(v) => Ok(&v[k]),
            FastBlocks::PerBlock => {
                let block = &self.blocks[k];
                let b = match block.expanded()? {
                    Some(e) => crate::fast::FastBlock::new(&e)?,
                    None => crate::fast::FastBlock::new(block)?,
                };
                Ok(built.insert(b))
            }
        }
    }

    /// Replaces the prior variance buffer `var` (T, D) used by sampling.
    pub fn set_prior_var(&mut self, var: &Tensor) -> Result<()> {
        let want = [self.cfg.num_tokens(), self.cfg.patch_dim()];
        if var.dims() != want {
            return Err(FlowError::Input(format!(
                "prior variance of shape {:?}, expected {want:?}",
                var.dims()
            )));
        }
        self.var = var.to_device(&self.device)?.to_dtype(self.dtype)?;
        Ok(())
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The dtype of the weights (and of the inputs they expect).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The flow blocks in x→z order.
    pub fn blocks(&self) -> &[MetaBlock] {
        &self.blocks
    }

    fn check_labels(&self, cond: Cond, n: usize) -> Result<()> {
        if let Cond::Labels(y) = cond {
            if y.len() != n {
                return Err(FlowError::Input(format!(
                    "{} labels given for a batch of {n}",
                    y.len()
                )));
            }
            if self.cfg.num_classes == 0 && y.iter().any(|&l| l >= 0) {
                return Err(FlowError::Input(
                    "labels given to an unconditional model (num_classes = 0)".into(),
                ));
            }
            let classes = self.cfg.num_classes as i64;
            if let Some((i, l)) = y
                .iter()
                .enumerate()
                .find(|(_, &l)| classes > 0 && l >= classes)
            {
                return Err(FlowError::Input(format!(
                    "label {l} of row {i} is out of range: the model has {classes} classes (use -1 for no label)"
                )));
            }
        }
        Ok(())
    }

    /// Checks that `x` is (N, C, S, S) of this model and finite.
    pub fn check_images(&self, x: &Tensor) -> Result<()> {
        let c = &self.cfg;
        let dims = x.dims();
        if dims.len() != 4 || dims[1..] != [c.in_channels, c.img_size, c.img_size] {
            return Err(FlowError::Input(format!(
                "images of shape {dims:?}, expected (N, {}, {}, {})",
                c.in_channels, c.img_size, c.img_size
            )));
        }
        // 0·x is NaN exactly where x is NaN or ±∞.
        let probe = (x.detach() * 0.0)?
            .sum_all()?
            .to_dtype(DType::F32)?
            .to_scalar::<f32>()?;
        if !probe.is_finite() {
            return Err(FlowError::Input(
                "images contain NaN or infinite values".into(),
            ));
        }
        Ok(())
    }

    /// x (N, C, S, S) in [-1, 1] → z, with every block's output and log-det.
    pub fn forward(&self, x: &Tensor, cond: Cond) -> Result<FlowOutput> {
        self.check_images(x)?;
        self.check_labels(cond, x.dim(0)?)?;
        let mut s = patchify(&x.to_dtype(self.dtype)?, self.cfg.patch_size)?; // (N, T, D)
                                                                              // Only without any gradient: neither the input nor the weights (training) are tracked.
        if !x.track_op() && self.frozen() && self.cfg.is_plain_tarflow() {
            if let Some(fb) = self.fast_blocks()? {
                return self.forward_fast(&fb, &s, cond);
            }
        }
        let mut blocks = Vec::with_capacity(self.blocks.len());
        let mut logdets: Option<Tensor> = None;
        for block in &self.blocks {
            let o = block.forward(&s, cond)?;
            s = o.out.clone();
            logdets = Some(match logdets {
                Some(l) => (l + &o.logdet)?,
                None => o.logdet.clone(),
            });
            blocks.push(o);
        }
        let logdets = logdets.ok_or_else(|| FlowError::Config("model has no blocks".into()))?;
        Ok(FlowOutput {
            z: s,
            logdets,
            blocks,
        })
    }

    /// [`Self::forward`] on the fast CPU path (no gradient).
    fn forward_fast(&self, fb: &FastBlocks, s: &Tensor, cond: Cond) -> Result<FlowOutput> {
        let (n, t, d) = s.dims3()?;
        let labels = match cond {
            Cond::Labels(y) => Some(y),
            Cond::Null => None,
        };
        let mut cur = s.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut blocks = Vec::with_capacity(self.blocks.len());
        let mut total = vec![0f32; n];
        for k in 0..self.blocks.len() {
            let mut built = None;
            let f = self.fast_block(fb, k, &mut built)?.forward(&cur, n, labels);
            for (a, l) in total.iter_mut().zip(&f.logdet) {
                *a += l;
            }
            let w = f.proj_out.len() / (n * t);
            blocks.push(crate::block::BlockOutput {
                out: Tensor::from_slice(&f.out, (n, t, d), &self.device)?,
                logdet: Tensor::from_vec(f.logdet, n, &self.device)?,
                proj_out: Tensor::from_vec(f.proj_out, (n, t, w), &self.device)?,
                alpha: Tensor::from_vec(f.alpha, (n, t, d), &self.device)?,
            });
            cur = f.out;
        }
        Ok(FlowOutput {
            z: Tensor::from_vec(cur, (n, t, d), &self.device)?,
            logdets: Tensor::from_vec(total, n, &self.device)?,
            blocks,
        })
    }

    /// ml-tarflow's training loss `0.5·mean(z²) − mean(logdets)` (per-dimension nats, no constant).
    pub fn loss(out: &FlowOutput) -> Result<Tensor> {
        // Reduced in f32 whatever the model's dtype (ARCHITECTURE.md, "Numerics"): a bf16 mean over 10⁵ terms drifts.
        let mse = (out.z.to_dtype(DType::F32)?.sqr()?.mean_all()? * 0.5)?;
        Ok((mse - out.logdets.to_dtype(DType::F32)?.mean_all()?)?)
    }

    /// STARFlow's latent-norm penalty `Σ_k mean(h_k²)` over the intermediate outputs (every
    /// block's output but the last; the input's own term has no gradient and is left out).
    pub fn latent_norm(out: &FlowOutput) -> Result<Tensor> {
        let k = out.blocks.len();
        let mut acc = Tensor::zeros((), DType::F32, out.z.device())?;
        for b in out.blocks.iter().take(k.saturating_sub(1)) {
            acc = (acc + b.out.to_dtype(DType::F32)?.sqr()?.mean_all()?)?;
        }
        Ok(acc)
    }

    /// Per-sample training loss `0.5·mean_{t,d}(z²) − logdets` (N).
    pub fn loss_per_sample(out: &FlowOutput) -> Result<Tensor> {
        let z = crate::block::at_least_f32(&out.z)?;
        let mse = (z.sqr()?.flatten_from(1)?.mean(1)? * 0.5)?;
        Ok((mse - crate::block::at_least_f32(&out.logdets)?)?)
    }

    /// `−log N(z; 0, I)` per image (N) in nats, plus `n·ln 128` when `discrete`.
    fn prior_nll(&self, out: &FlowOutput, discrete: bool) -> Result<Tensor> {
        let n = self.cfg.dims_per_image() as f64;
        let constant = n * (0.5 * LN_2PI + if discrete { LN_128 } else { 0.0 });
        let half_sq = (crate::block::at_least_f32(&out.z)?
            .sqr()?
            .flatten_from(1)?
            .sum(1)?
            * 0.5)?;
        Ok((half_sq + constant)?)
    }

    /// Exact negative log-likelihood per image in nats (N):
    /// `½Σz² + ½n·ln 2π − n·Σ_k logdet_k`, plus `n·ln 128` when `discrete` (8-bit bins of width 2/256).
    pub fn nll(&self, out: &FlowOutput, discrete: bool) -> Result<Tensor> {
        let n = self.cfg.dims_per_image() as f64;
        Ok((self.prior_nll(out, discrete)? - (crate::block::at_least_f32(&out.logdets)? * n)?)?)
    }

    /// Bits per dimension of 8-bit images (N): discrete NLL / (n·ln 2).
    pub fn bits_per_dim(&self, out: &FlowOutput, convention: BpdConvention) -> Result<Tensor> {
        let n = match convention {
            BpdConvention::TrueDims => self.cfg.dims_per_image(),
            BpdConvention::Reference => 3 * self.cfg.img_size * self.cfg.img_size,
        } as f64;
        // evaluate_bpd.py: (−log p_prior)/n − logdets, where log p_prior uses the true C·H·W.
        let nll = ((self.prior_nll(out, true)? / n)? - crate::block::at_least_f32(&out.logdets)?)?;
        Ok((nll / std::f64::consts::LN_2)?)
    }

    /// Per-token NLL in nats (N, T), canonical token order: `½Σ_d z² + const + Σ_k Σ_d α_k`;
    /// sums over T to [`Self::nll`].
    pub fn nll_per_token(&self, out: &FlowOutput, discrete: bool) -> Result<Tensor> {
        let d = self.cfg.patch_dim() as f64;
        let constant = 0.5 * d * LN_2PI + if discrete { d * LN_128 } else { 0.0 };
        let mut tok = ((crate::block::at_least_f32(&out.z)?.sqr()?.sum(2)? * 0.5)? + constant)?;
        for (block, o) in self.blocks.iter().zip(&out.blocks) {
            let a = block.permute(&crate::block::at_least_f32(&o.alpha)?.sum(2)?, 1)?; // (N, T)
            tok = (tok + a)?; // −log|det| of the block is +Σα
        }
        Ok(tok)
    }

    /// z (N, T, D) → images (N, C, S, S), inverting the blocks last to first with KV caches.
    pub fn reverse(&self, z: &Tensor, cond: Cond, opts: &ReverseOptions) -> Result<Tensor> {
        let seq = self.reverse_inner(z, cond, opts, false)?;
        seq.into_iter()
            .last()
            .ok_or_else(|| FlowError::Config("model has no blocks".into()))
    }

    /// Like [`Self::reverse`] but returns the image after undoing each block: entry 0 is
    /// `unpatchify(z)`, entry k after undoing k blocks, the last is the sample.
    pub fn reverse_sequence(
        &self,
        z: &Tensor,
        cond: Cond,
        opts: &ReverseOptions,
    ) -> Result<Vec<Tensor>> {
        self.reverse_inner(z, cond, opts, true)
    }

    fn reverse_inner(
        &self,
        z: &Tensor,
        cond: Cond,
        opts: &ReverseOptions,
        all: bool,
    ) -> Result<Vec<Tensor>> {
        let (t, d) = (self.cfg.num_tokens(), self.cfg.patch_dim());
        let dims = z.dims();
        if dims.len() != 3 || dims[1..] != [t, d] {
            return Err(FlowError::Input(format!(
                "latent of shape {dims:?}, expected (N, {t}, {d})"
            )));
        }
        self.check_labels(cond, dims[0])?;
        let (c, p) = (self.cfg.in_channels, self.cfg.patch_size);
        let mut s = z.to_dtype(self.dtype)?.broadcast_mul(&self.var.sqrt()?)?;
        let mut seq = Vec::new();
        if all {
            seq.push(unpatchify(&s, c, p)?);
        }
        // The fast CPU sampler implements TarFlow's layout and rule only.
        let fast = if self.cfg.is_plain_tarflow()
            && opts.rule == GuidanceRule::Linear
            && opts.guide_blocks == 0
        {
            self.fast_blocks()?
        } else {
            None
        };
        let nb = self.blocks.len();
        for (k, block) in self.blocks.iter().enumerate().rev() {
            s = match &fast {
                Some(fb) => {
                    let n = dims[0];
                    let flat = s.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                    let labels = match cond {
                        Cond::Labels(y) => Some(y),
                        Cond::Null => None,
                    };
                    let mut built = None;
                    let out = self
                        .fast_block(fb, k, &mut built)?
                        .reverse_parallel(&flat, n, labels, opts);
                    Tensor::from_vec(out, (n, t, d), &self.device)?
                }
                None => {
                    let guided = opts.guide_blocks == 0 || k + opts.guide_blocks >= nb;
                    let o = if guided {
                        *opts
                    } else {
                        ReverseOptions {
                            guidance: 0.0,
                            ..*opts
                        }
                    };
                    self.reverse_block(block, &s, cond, &o)?
                }
            };
            if all {
                seq.push(unpatchify(&s, c, p)?);
            }
        }
        if !all {
            seq.push(unpatchify(&s, c, p)?);
        }
        Ok(seq)
    }

    fn reverse_block(
        &self,
        block: &MetaBlock,
        s: &Tensor,
        cond: Cond,
        opts: &ReverseOptions,
    ) -> Result<Tensor> {
        let expanded = block.expanded()?;
        let block = expanded.as_ref().unwrap_or(block);
        let t = s.dim(1)?;
        let x = block.permute(s, 1)?;
        let mut tokens = (0..t)
            .map(|i| x.narrow(1, i, 1))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let guided = opts.guidance > 0.0;
        let cls = block.class_cond(cond, &self.device)?;
        let cls_u = if guided {
            block.class_cond(Cond::Null, &self.device)?
        } else {
            None
        };
        let mut cache = block.new_caches();
        let mut cache_u = block.new_caches();
        // With a start token, position i reads token i−1 (the start token at 0) and yields
        // token i's map; otherwise position i reads token i and yields token i+1's.
        let sos = block.sos();
        let steps = if sos.is_some() { t } else { t - 1 };
        for i in 0..steps {
            let target = if sos.is_some() { i } else { i + 1 };
            let input = match sos {
                Some(s0) if i == 0 => s0
                    .unsqueeze(0)?
                    .broadcast_as(tokens[0].dims())?
                    .to_dtype(tokens[0].dtype())?
                    .contiguous()?,
                Some(_) => tokens[i - 1].clone(),
                None => tokens[i].clone(),
            };
            let (mut a, mut b) = block.step(&input, i, cls.as_ref(), &mut cache, 1.0)?;
            if guided {
                let (au, bu) =
                    block.step(&input, i, cls_u.as_ref(), &mut cache_u, opts.attn_temp)?;
                match opts.rule {
                    GuidanceRule::Linear => {
                        let g = if opts.annealed {
                            (i + 1) as f64 / (t - 1) as f64 * opts.guidance
                        } else {
                            opts.guidance
                        };
                        if opts.guide_what != GuideWhat::Mu {
                            a = (&a + ((&a - au)? * g)?)?;
                        }
                        if opts.guide_what != GuideWhat::Alpha {
                            b = (&b + ((&b - bu)? * g)?)?;
                        }
                    }
                    GuidanceRule::Gaussian => {
                        (a, b) = gaussian_guidance(&a, &b, &au, &bu, opts.guidance)?;
                    }
                }
            }
            tokens[target] = unaffine(&tokens[target], &a, &b)?;
        }
        block.permute(&Tensor::cat(&tokens, 1)?, 1)
    }

    /// The inverse with the parallel GS-Jacobi solver: per block, every token of a chunk is
    /// updated at once, `x ← z·exp(α(x)) + μ(x)`, from one causal pass, until the relative
    /// change is below `j.tol` (Song et al. 2025, "Accelerate TarFlow Sampling with GS-Jacobi
    /// Iteration"). Returns the images and how each block converged.
    pub fn reverse_jacobi(
        &self,
        z: &Tensor,
        cond: Cond,
        opts: &ReverseOptions,
        j: &JacobiOptions,
    ) -> Result<(Tensor, Vec<BlockSolve>)> {
        let (t, d) = (self.cfg.num_tokens(), self.cfg.patch_dim());
        let dims = z.dims();
        if dims.len() != 3 || dims[1..] != [t, d] {
            return Err(FlowError::Input(format!(
                "latent of shape {dims:?}, expected (N, {t}, {d})"
            )));
        }
        self.check_labels(cond, dims[0])?;
        let mut s = z.to_dtype(self.dtype)?.broadcast_mul(&self.var.sqrt()?)?;
        let nb = self.blocks.len();
        let mut report = Vec::new();
        for (order, (k, block)) in self.blocks.iter().enumerate().rev().enumerate() {
            let guided =
                opts.guidance > 0.0 && (opts.guide_blocks == 0 || k + opts.guide_blocks >= nb);
            let chunk = j.block_chunks.get(order).copied().unwrap_or(j.chunk);
            let (x, r) =
                self.jacobi_block(block, &block.permute(&s, 1)?, cond, opts, guided, chunk, j)?;
            s = block.permute(&x, 1)?;
            report.push(BlockSolve { block: k, ..r });
        }
        let (c, p) = (self.cfg.in_channels, self.cfg.patch_size);
        Ok((unpatchify(&s, c, p)?, report))
    }

    /// Solves one block for its input given its output `zb` (block order).
    #[allow(clippy::too_many_arguments)]
    fn jacobi_block(
        &self,
        block: &MetaBlock,
        zb: &Tensor,
        cond: Cond,
        opts: &ReverseOptions,
        guided: bool,
        chunk: usize,
        j: &JacobiOptions,
    ) -> Result<(Tensor, BlockSolve)> {
        let expanded = block.expanded()?;
        let block = expanded.as_ref().unwrap_or(block);
        let (n, t, d) = zb.dims3()?;
        let cls = block.class_cond(cond, &self.device)?;
        let cls_u = if guided {
            block.class_cond(Cond::Null, &self.device)?
        } else {
            None
        };
        // Per-token guidance weights, matching the sequential sampler's annealing.
        let sos = block.sos().is_some();
        let g: Vec<f32> = (0..t)
            .map(|tok| {
                let i = if sos { tok } else { tok.saturating_sub(1) };
                if opts.annealed {
                    ((i + 1) as f64 / (t - 1) as f64 * opts.guidance) as f32
                } else {
                    opts.guidance as f32
                }
            })
            .collect();
        let mut x = match j.init {
            JacobiInit::Zeros => zb.zeros_like()?,
            JacobiInit::Input => zb.clone(),
        };
        let chunk = if chunk == 0 { t } else { chunk.min(t) };
        let (mut iterations, mut chunks, mut last_change) = (0usize, 0usize, 0f64);
        let mut a0 = 0;
        while a0 < t {
            let b0 = (a0 + chunk).min(t);
            chunks += 1;
            for _ in 0..j.max_iters.max(1) {
                iterations += 1;
                let prefix = x.narrow(1, 0, b0)?;
                let (mut a, mut m) = block.params(&prefix, cls.as_ref(), 1.0)?;
                if guided {
                    let (au, mu) = block.params(&prefix, cls_u.as_ref(), opts.attn_temp)?;
                    match opts.rule {
                        GuidanceRule::Linear => {
                            let gw = Tensor::from_slice(&g[..b0], (1, b0, 1), &self.device)?
                                .to_dtype(a.dtype())?;
                            if opts.guide_what != GuideWhat::Mu {
                                a = (&a + (&a - au)?.broadcast_mul(&gw)?)?;
                            }
                            if opts.guide_what != GuideWhat::Alpha {
                                m = (&m + (&m - mu)?.broadcast_mul(&gw)?)?;
                            }
                        }
                        GuidanceRule::Gaussian => {
                            (a, m) = gaussian_guidance(&a, &m, &au, &mu, opts.guidance)?;
                        }
                    }
                }
                let (a, m) = (a.narrow(1, a0, b0 - a0)?, m.narrow(1, a0, b0 - a0)?);
                let zc = zb.narrow(1, a0, b0 - a0)?;
                let new = unaffine(&zc, &a, &m)?;
                let old = x.narrow(1, a0, b0 - a0)?;
                let num = host_f64(&(&new - &old)?.sqr()?.mean_all()?)?.to_scalar::<f64>()?;
                let den = host_f64(&new.sqr()?.mean_all()?)?.to_scalar::<f64>()?;
                last_change = if den > 0.0 { num / den } else { num };
                x = x.slice_assign(&[0..n, a0..b0, 0..d], &new)?;
                if !last_change.is_finite() || last_change < j.tol {
                    break;
                }
            }
            a0 = b0;
        }
        Ok((
            x,
            BlockSolve {
                block: 0,
                iterations,
                chunks,
                toughness: iterations as f64 / t as f64,
                last_change,
            },
        ))
    }

    /// Draws `n` images: z ~ N(0, temperature²) from the seeded `rng`, then [`Self::reverse`].
    pub fn sample(
        &self,
        n: usize,
        cond: Cond,
        temperature: f64,
        rng: &mut FlowRng,
        opts: &ReverseOptions,
    ) -> Result<Tensor> {
        if !(temperature.is_finite() && temperature >= 0.0) {
            return Err(FlowError::Input(format!(
                "temperature must be finite and ≥ 0, got {temperature}"
            )));
        }
        let shape = (n, self.cfg.num_tokens(), self.cfg.patch_dim());
        let z = randn(rng, shape, temperature, &self.device)?;
        self.reverse(&z, cond, opts)
    }

    /// Gradient of the training loss (batch mean) with respect to the input images.
    pub fn loss_input_grad(&self, x: &Tensor, cond: Cond) -> Result<(Tensor, Tensor)> {
        let xv = Var::from_tensor(&x.detach().to_dtype(self.dtype)?)?;
        let out = self.forward(xv.as_tensor(), cond)?;
        let loss = Self::loss(&out)?;
        let grads = loss.backward()?;
        let g = grads
            .get(xv.as_tensor())
            .ok_or_else(|| FlowError::Input("no gradient reached the input".into()))?
            .clone();
        Ok((loss, g))
    }

    /// Score-based (Tweedie) denoising: `x − λσ²·∇ₓ NLL(x)` per sample.
    pub fn denoise(&self, x: &Tensor, cond: Cond, sigma: f64, lambda: f64) -> Result<Tensor> {
        let (_, g) = self.loss_input_grad(x, cond)?;
        // The loss is a mean over N·n dims; rescale to the per-sample NLL's gradient.
        let scale = lambda * sigma * sigma * x.elem_count() as f64;
        Ok((x.to_dtype(self.dtype)? - (g * scale)?)?)
    }
}
