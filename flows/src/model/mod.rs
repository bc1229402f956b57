//! The TarFlow model: patchify, K flow blocks, exact likelihood, the KV-cached inverse
//! with classifier-free guidance, and score-based denoising. By concern: `options` (what the
//! inverse can be asked), `forward` (x → z, the training loss, denoising), `likelihood`
//! (NLL and bits/dim), `inverse` (z → x, sequential and Jacobi, guidance).

mod forward;
mod inverse;
mod likelihood;
mod options;
mod train_pass;

pub use inverse::{gaussian_guidance, guidance_weight, guide};
pub use likelihood::{
    continuous_loss_to_bpd, loss_to_bpd, nats_to_bpd, needs_widening, WIDEN_ABOVE_BPD,
};
pub use options::{BlockSolve, GuidanceRule, GuideWhat, JacobiInit, JacobiOptions, ReverseOptions};
pub use train_pass::TrainPass;

use crate::block::{BlockOutput, Cond, MetaBlock};
use crate::config::ModelConfig;
use crate::error::{FlowError, Result};
use crate::quant::QuantWeights;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

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

impl FlowOutput {
    /// The outputs of two batches as one (rows of `a`, then of `b`).
    pub fn cat(a: &Self, b: &Self) -> Result<Self> {
        let two = |x: &Tensor, y: &Tensor| Tensor::cat(&[x, y], 0);
        Ok(Self {
            z: two(&a.z, &b.z)?,
            logdets: two(&a.logdets, &b.logdets)?,
            blocks: a
                .blocks
                .iter()
                .zip(&b.blocks)
                .map(|(p, q)| {
                    Ok(BlockOutput {
                        out: two(&p.out, &q.out)?,
                        logdet: two(&p.logdet, &q.logdet)?,
                        proj_out: two(&p.proj_out, &q.proj_out)?,
                        alpha: two(&p.alpha, &q.alpha)?,
                    })
                })
                .collect::<Result<_>>()?,
        })
    }
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
    /// The learnable self-denoiser, where the model has one.
    denoiser: Option<crate::denoiser::Denoiser>,
    var: Tensor, // (T, D) prior variance, ones for affine models
    device: Device,
    dtype: DType,
    /// The weight map it was built from (checkpoints), kept so that an image whose likelihood
    /// overflows this dtype can be recomputed in f64 ([`Self::widened`]).
    weights: Option<std::sync::Arc<std::collections::HashMap<String, Tensor>>>,
    /// Reduced-precision Linear weights (already inside the layers; kept for [`Self::widened`]).
    quant: Option<std::sync::Arc<QuantWeights>>,
}

const LN_2PI: f64 = 1.837_877_066_409_345_3;
const LN_128: f64 = 4.852_030_263_919_617;

impl TarFlow {
    /// Images (N, C, S, S) → tokens (N, T, D) in the model's patch layout.
    pub fn to_tokens(&self, x: &Tensor) -> Result<Tensor> {
        crate::patch::patchify_as(x, self.cfg.patch_size, self.cfg.patch_channels_last)
    }

    /// Tokens (N, T, D) → images (N, C, S, S), the inverse of [`Self::to_tokens`].
    pub fn to_image(&self, s: &Tensor) -> Result<Tensor> {
        let c = &self.cfg;
        crate::patch::unpatchify_as(s, c.in_channels, c.patch_size, c.patch_channels_last)
    }

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
        let denoiser = match cfg.denoiser_layers > 0 {
            true => Some(crate::denoiser::Denoiser::new(
                cfg,
                vb.pp("learnable_self_denoiser"),
            )?),
            false => None,
        };
        let shape = (cfg.num_tokens(), cfg.patch_dim());
        let var = if vb.contains_tensor("var") {
            vb.get(shape, "var")?
        } else {
            Tensor::ones(shape, vb.dtype(), vb.device())?
        };
        Ok(Self {
            cfg: cfg.clone(),
            blocks,
            denoiser,
            var,
            device: vb.device().clone(),
            dtype: vb.dtype(),
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
        // Placed before the VarBuilder sees them: it would move a host tensor to the device
        // first and cast it there (an f64 one would reach a GPU that has no f64).
        let placed = weights
            .iter()
            .map(|(k, t)| Ok((k.clone(), crate::device::upload(t, device, dtype)?)))
            .collect::<Result<std::collections::HashMap<_, _>>>()?;
        let weights = std::sync::Arc::new(weights);
        let vb = VarBuilder::from_tensors(placed, dtype, device);
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

    /// Replaces the prior variance buffer `var` (T, D) used by sampling.
    pub fn set_prior_var(&mut self, var: &Tensor) -> Result<()> {
        let want = [self.cfg.num_tokens(), self.cfg.patch_dim()];
        if var.dims() != want {
            return Err(FlowError::Input(format!(
                "prior variance of shape {:?}, expected {want:?}",
                var.dims()
            )));
        }
        self.var = crate::device::upload(var, &self.device, self.dtype)?;
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

    pub(crate) fn check_labels(&self, cond: Cond, n: usize) -> Result<()> {
        if let Cond::Text(t) = cond {
            let (l, d) = (self.cfg.txt_size, self.cfg.txt_dim);
            if d == 0 {
                return Err(FlowError::Input(
                    "text embeddings given to a model that reads no text (txt_dim = 0)".into(),
                ));
            }
            let dims = t.y.dims();
            if dims.len() != 3 || dims[0] < t.from + n || dims[1..] != [l, d] {
                return Err(FlowError::Input(format!(
                    "text embeddings `y` of shape {dims:?}, expected ({n}, {l}, {d}): one row of {l} embeddings of width {d} per image"
                )));
            }
            if let Some(u) = t.null {
                let ud = u.dims();
                if ud.len() != 3 || !(ud[0] == 1 || ud[0] == dims[0]) || ud[1..] != [l, d] {
                    return Err(FlowError::Input(format!(
                        "unconditional text `y_null` of shape {ud:?}, expected (1 or {}, {l}, {d})",
                        dims[0]
                    )));
                }
            }
        }
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
        if crate::device::has_non_finite(x)? {
            return Err(FlowError::Input(
                "images contain NaN or infinite values".into(),
            ));
        }
        Ok(())
    }
}
