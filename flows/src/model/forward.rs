//! x → z: the forward pass, the training loss, and score-based denoising (its gradient).

use super::{FlowOutput, TarFlow};
use crate::block::Cond;
use crate::error::{FlowError, Result};
use candle_core::{DType, Tensor, Var};

impl TarFlow {
    /// x (N, C, S, S) in [-1, 1] → z, with every block's output and log-det.
    pub fn forward(&self, x: &Tensor, cond: Cond) -> Result<FlowOutput> {
        self.check_images(x)?;
        let n = x.dim(0)?;
        self.check_labels(cond, n)?;
        // Gradient-free on the CPU kernels, the two halves of a batch run at once: one pass
        // keeps the cores busy only inside its products, two fill each other's gaps. Every
        // image's numbers are its own either way.
        let frozen = !x.track_op() && !self.blocks.iter().any(|b| b.is_trainable());
        let kernels = crate::kernels::applies_to(self.dtype, &self.device);
        if frozen && kernels && n >= 8 && n.is_multiple_of(2) {
            let h = n / 2;
            let half = |i: usize| {
                self.forward_whole(&x.narrow(0, i * h, h)?, cond.rows(i * h, (i + 1) * h))
            };
            let one = |i| crate::kernels::as_one_of(2, || half(i));
            let (a, b) = rayon::join(|| one(0), || one(1));
            return FlowOutput::cat(&a?, &b?);
        }
        self.forward_whole(x, cond)
    }

    /// [`Self::forward`] in one pass.
    fn forward_whole(&self, x: &Tensor, cond: Cond) -> Result<FlowOutput> {
        let mut s = self.to_tokens(&x.to_dtype(self.dtype)?)?; // (N, T, D)
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
        let z = crate::affine::at_least_f32(&out.z)?;
        let mse = (z.sqr()?.flatten_from(1)?.mean(1)? * 0.5)?;
        Ok((mse - crate::affine::at_least_f32(&out.logdets)?)?)
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

    /// The learnable self-denoiser's prediction (N, C, S, S) for images `x`, ≈ σ·∇ₓ NLL(x)
    /// at the training noise σ; an error where the model has none.
    pub fn denoiser_output(&self, x: &Tensor) -> Result<Tensor> {
        self.check_images(x)?;
        let d = self.denoiser.as_ref().ok_or_else(|| {
            FlowError::Config(
                "the model has no learnable self-denoiser (denoiser_layers = 0): use the score denoiser".into(),
            )
        })?;
        self.to_image(&d.forward(&self.to_tokens(&x.to_dtype(self.dtype)?)?)?)
    }

    /// One learned denoising step from noise level `sigma` to `sigma_next`:
    /// `x − 0.3·pred·(σ − σ')/σ`, as ml-starflow samples.
    pub fn learned_denoise(&self, x: &Tensor, sigma: f64, sigma_next: f64) -> Result<Tensor> {
        if !(sigma.is_finite() && sigma > 0.0) {
            return Err(FlowError::Input(format!(
                "the denoiser's noise level must be > 0, got {sigma}"
            )));
        }
        let w = crate::denoiser::NOISE_CONST * (sigma - sigma_next) / sigma;
        Ok((x.to_dtype(self.dtype)? - (self.denoiser_output(x)? * w)?)?)
    }
}
