//! The exact likelihood: NLL in nats, bits/dim, per-token NLL.

use super::{BpdConvention, FlowOutput, TarFlow, LN_128, LN_2PI};
use crate::error::Result;
use candle_core::Tensor;

/// Bits per dimension of a negative log-likelihood of `nats` over `dims` dimensions: the one
/// conversion scoring, training and evaluation use.
pub fn nats_to_bpd(nats: f64, dims: usize) -> f64 {
    nats / (dims as f64 * std::f64::consts::LN_2)
}

/// ml-tarflow's per-dimension training loss as bits/dim of 8-bit data:
/// `(loss + ½ln 2π + ln 128)/ln 2` (the loss omits the constants of the NLL).
pub fn loss_to_bpd(loss: f64) -> f64 {
    nats_to_bpd(loss + 0.5 * LN_2PI + LN_128, 1)
}

/// The training loss of continuous data (an autoencoder's latents) as bits per dimension of
/// its density: `(loss + ½ln 2π)/ln 2`, no 8-bit bin.
pub fn continuous_loss_to_bpd(loss: f64) -> f64 {
    nats_to_bpd(loss + 0.5 * LN_2PI, 1)
}

/// Bits per dimension above which a score is recomputed in f64 even when finite: an 8-bit
/// image costs at most 8 bits/dim under a uniform model, so past 32 the input is far enough
/// from the data that f32's intermediate values (scaled by e^{−α} block after block) may have
/// lost the digits the result depends on.
pub const WIDEN_ABOVE_BPD: f64 = 32.0;

/// Whether a score of `bpd` bits/dim is recomputed in f64 ([`TarFlow::widened`]): it is not
/// finite, or past [`WIDEN_ABOVE_BPD`]. Scoring and validation both decide by it, per image.
pub fn needs_widening(bpd: f64) -> bool {
    !bpd.is_finite() || bpd > WIDEN_ABOVE_BPD
}

impl TarFlow {
    /// `−log N(z; 0, I)` per image (N) in nats, plus `n·ln 128` when `discrete`.
    fn prior_nll(&self, out: &FlowOutput, discrete: bool) -> Result<Tensor> {
        let n = self.cfg.dims_per_image() as f64;
        let constant = n * (0.5 * LN_2PI + if discrete { LN_128 } else { 0.0 });
        let half_sq = (crate::affine::at_least_f32(&out.z)?
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
        Ok((self.prior_nll(out, discrete)? - (crate::affine::at_least_f32(&out.logdets)? * n)?)?)
    }

    /// Bits per dimension of 8-bit images (N): the discrete [`Self::nll`] through
    /// [`nats_to_bpd`] (the one conversion, as scoring takes it), or evaluate_bpd.py's figure.
    pub fn bits_per_dim(&self, out: &FlowOutput, convention: BpdConvention) -> Result<Tensor> {
        match convention {
            BpdConvention::TrueDims => {
                let n = self.cfg.dims_per_image();
                Ok((self.nll(out, true)? * nats_to_bpd(1.0, n))?)
            }
            BpdConvention::Reference => {
                // evaluate_bpd.py: (−log p_prior)/n − logdets with n = 3·S², where
                // log p_prior sums the true C·H·W dimensions.
                let n = (3 * self.cfg.img_size * self.cfg.img_size) as f64;
                let logdets = crate::affine::at_least_f32(&out.logdets)?;
                let nll = ((self.prior_nll(out, true)? / n)? - logdets)?;
                Ok((nll * nats_to_bpd(1.0, 1))?)
            }
        }
    }

    /// Per-token NLL in nats (N, T), canonical token order: `½Σ_d z² + const + Σ_k Σ_d α_k`;
    /// sums over T to [`Self::nll`].
    pub fn nll_per_token(&self, out: &FlowOutput, discrete: bool) -> Result<Tensor> {
        let d = self.cfg.patch_dim() as f64;
        let constant = 0.5 * d * LN_2PI + if discrete { d * LN_128 } else { 0.0 };
        let mut tok = ((crate::affine::at_least_f32(&out.z)?.sqr()?.sum(2)? * 0.5)? + constant)?;
        for (block, o) in self.blocks.iter().zip(&out.blocks) {
            let a = block.permute(&crate::affine::at_least_f32(&o.alpha)?.sum(2)?, 1)?; // (N, T)
            tok = (tok + a)?; // −log|det| of the block is +Σα
        }
        Ok(tok)
    }
}
