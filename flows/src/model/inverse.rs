//! z → x: the sequential inverse (one step engine per block, conditional and unconditional rows
//! as one batch), the parallel GS-Jacobi solver, and the guidance helpers they share.

use super::options::{
    BlockSolve, GuidanceRule, GuideWhat, JacobiInit, JacobiOptions, ReverseOptions,
};
use super::TarFlow;
use crate::affine::unaffine;
use crate::block::{Cond, MetaBlock};
use crate::device::host_f64;
use crate::error::{FlowError, Result};
use crate::rng::{randn, FlowRng};
use candle_core::Tensor;

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

/// The guidance weight of sequence position `i` of `t`: `opts.guidance`, ramped linearly over
/// the positions when annealed (the sequential and the Jacobi inverse share it).
pub fn guidance_weight(opts: &ReverseOptions, i: usize, t: usize) -> f64 {
    if opts.annealed {
        (i + 1) as f64 / (t - 1) as f64 * opts.guidance
    } else {
        opts.guidance
    }
}

/// Guided (α, μ) from the conditional and the unconditional ones: the linear rule with weight
/// `w` (a scalar or a per-token (1, T, 1) tensor) on what `opts.guide_what` names, or STARFlow's
/// Gaussian rule (which takes `opts.guidance` itself).
pub fn guide(
    (a, m): (&Tensor, &Tensor),
    (au, mu): (&Tensor, &Tensor),
    opts: &ReverseOptions,
    w: &Tensor,
) -> Result<(Tensor, Tensor)> {
    match opts.rule {
        GuidanceRule::Linear => {
            let w = w.to_dtype(a.dtype())?;
            let a = if opts.guide_what != GuideWhat::Mu {
                (a + (a - au)?.broadcast_mul(&w)?)?
            } else {
                a.clone()
            };
            let m = if opts.guide_what != GuideWhat::Alpha {
                (m + (m - mu)?.broadcast_mul(&w)?)?
            } else {
                m.clone()
            };
            Ok((a, m))
        }
        GuidanceRule::Gaussian => gaussian_guidance(a, m, au, mu, opts.guidance),
    }
}

impl TarFlow {
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

    /// The latent z (N, T, D), checked with its labels, scaled by the prior's σ: the last
    /// block's output, where both inverses start.
    fn prior_scaled(&self, z: &Tensor, cond: Cond) -> Result<Tensor> {
        let (t, d) = (self.cfg.num_tokens(), self.cfg.patch_dim());
        let dims = z.dims();
        if dims.len() != 3 || dims[1..] != [t, d] {
            return Err(FlowError::Input(format!(
                "latent of shape {dims:?}, expected (N, {t}, {d})"
            )));
        }
        self.check_labels(cond, dims[0])?;
        Ok(z.to_dtype(self.dtype)?.broadcast_mul(&self.var.sqrt()?)?)
    }

    fn reverse_inner(
        &self,
        z: &Tensor,
        cond: Cond,
        opts: &ReverseOptions,
        all: bool,
    ) -> Result<Vec<Tensor>> {
        let mut s = self.prior_scaled(z, cond)?;
        let mut seq = Vec::new();
        if all {
            seq.push(self.to_image(&s)?);
        }
        let nb = self.blocks.len();
        for (k, block) in self.blocks.iter().enumerate().rev() {
            let o = if opts.guides_block(k, nb) {
                *opts
            } else {
                ReverseOptions {
                    guidance: 0.0,
                    ..*opts
                }
            };
            s = self.reverse_block(block, &s, cond, &o)?;
            if all {
                seq.push(self.to_image(&s)?);
            }
        }
        if !all {
            seq.push(self.to_image(&s)?);
        }
        Ok(seq)
    }

    /// Inverts one block position by position: the conditional and (with guidance) the
    /// unconditional rows run as one batch of 2N through the block's step engine. On the CPU,
    /// the samples are split across the threads (each runs the whole loop on its share: the
    /// steps are too small to split).
    fn reverse_block(
        &self,
        block: &MetaBlock,
        s: &Tensor,
        cond: Cond,
        opts: &ReverseOptions,
    ) -> Result<Tensor> {
        use rayon::prelude::*;
        let expanded = block.expanded()?;
        let block = expanded.as_ref().unwrap_or(block);
        let n = s.dim(0)?;
        let threads = rayon::current_num_threads();
        // Below ~4 rows per thread the products lose more than the threads gain.
        let chunk = n.div_ceil(threads).max(4);
        if !(self.device.is_cpu() && crate::kernels::enabled() && threads > 1 && chunk < n) {
            return self.reverse_rows(block, s, cond, opts);
        }
        let parts = (0..n.div_ceil(chunk))
            .into_par_iter()
            .map(|k| {
                let (a, b) = (k * chunk, ((k + 1) * chunk).min(n));
                self.reverse_rows(block, &s.narrow(0, a, b - a)?, cond.rows(a, b), opts)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// [`Self::reverse_block`] on one share of the rows.
    fn reverse_rows(
        &self,
        block: &MetaBlock,
        s: &Tensor,
        cond: Cond,
        opts: &ReverseOptions,
    ) -> Result<Tensor> {
        let (n, t, _) = s.dims3()?;
        let x = block.permute(s, 1)?;
        let mut tokens = (0..t)
            .map(|i| x.narrow(1, i, 1))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let guided = opts.guidance > 0.0;
        let rows = if guided { 2 * n } else { n };
        let cls = block.class_rows(cond, guided, n, &self.device)?;
        let txt = block.text_rows(cond, guided, n)?;
        let temps: Vec<f64> = (0..rows)
            .map(|r| if r < n { 1.0 } else { opts.attn_temp })
            .collect();
        let mut st = block.stepper(rows, &temps, cls.as_ref(), txt.as_ref())?;
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
            let input = if guided {
                Tensor::cat(&[&input, &input], 0)?
            } else {
                input
            };
            let (a, b) = block.step(&input, i, cls.as_ref(), &mut st)?;
            let (a, b) = if guided {
                let w = guidance_weight(opts, i, t);
                guide(
                    (&a.narrow(0, 0, n)?, &b.narrow(0, 0, n)?),
                    (&a.narrow(0, n, n)?, &b.narrow(0, n, n)?),
                    opts,
                    &Tensor::new(w as f32, &self.device)?,
                )?
            } else {
                (a, b)
            };
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
        let mut s = self.prior_scaled(z, cond)?;
        let nb = self.blocks.len();
        let mut report = Vec::new();
        for (order, (k, block)) in self.blocks.iter().enumerate().rev().enumerate() {
            let guided = opts.guides_block(k, nb);
            let chunk = j.block_chunks.get(order).copied().unwrap_or(j.chunk);
            let (x, r) =
                self.jacobi_block(block, &block.permute(&s, 1)?, cond, opts, guided, chunk, j)?;
            s = block.permute(&x, 1)?;
            report.push(BlockSolve { block: k, ..r });
        }
        Ok((self.to_image(&s)?, report))
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
        // The prompts' prefix, and (with guidance) the unconditional prompt's: one projection
        // of both, cut in two.
        let (txt, txt_u) = match block.text_rows(cond, guided, n)? {
            Some(both) if guided => (Some(both.narrow(0, 0, n)?), Some(both.narrow(0, n, n)?)),
            one => (one, None),
        };
        // Per-token guidance weights, matching the sequential sampler's annealing.
        let sos = block.sos().is_some();
        let g: Vec<f32> = (0..t)
            .map(|tok| {
                let i = if sos { tok } else { tok.saturating_sub(1) };
                guidance_weight(opts, i, t) as f32
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
                let (mut a, mut m) = block.params(&prefix, cls.as_ref(), txt.as_ref(), 1.0)?;
                if guided {
                    let (au, mu) =
                        block.params(&prefix, cls_u.as_ref(), txt_u.as_ref(), opts.attn_temp)?;
                    let gw = Tensor::from_slice(&g[..b0], (1, b0, 1), &self.device)?;
                    (a, m) = guide((&a, &m), (&au, &mu), opts, &gw)?;
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
}
