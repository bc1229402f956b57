//! One optimizer step: this rank's micro-batches, their gradients summed over the ranks,
//! clipping, AdamW and the EMA; and what a failed step reports.

use super::Trainer;
use crate::error::{Result, TrainError};
use crate::grads::Grads;
use candle_core::{DType, Tensor};
use std::time::Instant;

impl Trainer {
    /// One optimizer step over `grad_accum` micro-batches on each rank. Returns the mean loss,
    /// the gradient norm, the learning rate, and whether any rank asked to stop: every rank
    /// learns that in the same step, so all of them stop together.
    pub(super) fn step(&mut self, stop: bool) -> Result<(f64, f64, f64, bool)> {
        let accum = self.cfg.train.grad_accum;
        let shares = (accum * self.group.size()) as f64;
        let next_step = self.state.step + 1;
        let mut total: Option<Grads> = None;
        // Summed over ranks: loss, non-finite input values, non-finite losses, stop requests,
        // the self-denoiser's error.
        let mut flags = [0.0f64, 0.0, 0.0, stop as u8 as f64, 0.0];
        let mut bad_loss = f64::NAN;
        for _ in 0..accum {
            let mut b = self.feed.next()?;
            if let Some(hook) = self.batch_hook.as_mut() {
                hook(next_step, &mut b);
            }
            let bad = b.images.iter().filter(|v| !v.is_finite()).count();
            if bad > 0 {
                flags[1] += bad as f64;
                continue;
            }
            let [n, c, h, w] = b.shape;
            let x = tarflow_flows::device::upload_vec(
                b.images,
                (n, c, h, w),
                &self.device,
                self.dtype,
            )?;
            let pass = crate::grads::loss_and_grads(
                &self.model,
                &self.vars,
                (&x, &b.labels),
                accum * self.group.size(),
                self.cfg.train.cpu_streams,
                self.cfg.optim.latent_norm,
            )?;
            let (v, grads) = match pass {
                crate::grads::Pass::Grads(v, g) => (v, g),
                crate::grads::Pass::NonFinite(v) => {
                    (flags[2], bad_loss) = (flags[2] + 1.0, v);
                    continue;
                }
            };
            flags[0] += v;
            total = Some(crate::grads::add_into(&self.vars, total, grads)?);
            if self.model.config().denoiser_layers > 0 {
                let (dl, g) = crate::grads::denoiser_grads(
                    &self.model,
                    &self.vars,
                    (&x, &b.labels),
                    accum * self.group.size(),
                    self.cfg.data.noise_std,
                    self.cfg.optim.latent_norm,
                )?;
                total = Some(crate::grads::add_into(&self.vars, total, g)?);
                flags[4] += dl;
            }
        }
        self.group.sum_f64(&mut flags)?;
        if flags[1] > 0.0 {
            return Err(TrainError::NonFiniteInput {
                step: next_step,
                count: flags[1] as usize,
                last_good: self.last_good("fix the data or the batch hook", ""),
            });
        }
        if flags[2] > 0.0 {
            // Every rank stops here; the ones whose own loss was finite report the step too.
            return Err(self.non_finite(next_step, bad_loss));
        }
        let mut grads =
            total.ok_or_else(|| TrainError::config("train.grad_accum", "must be ≥ 1"))?;
        if self.group.size() > 1 {
            let t0 = Instant::now();
            self.all_reduce(&mut grads)?;
            self.allreduce_s += t0.elapsed().as_secs_f64();
        }
        // The flow's gradients and the self-denoiser's are clipped each by its own norm, as
        // ml-starflow's two optimizers do.
        let (mut sq, mut sq_den) = (0.0, 0.0);
        for (name, _) in &self.vars {
            if let Some(g) = grads.get(name) {
                let s = g
                    .to_dtype(DType::F32)?
                    .sqr()?
                    .sum_all()?
                    .to_scalar::<f32>()? as f64;
                match name.starts_with(crate::grads::DENOISER) {
                    true => sq_den += s,
                    false => sq += s,
                }
            }
        }
        let (norm, norm_den) = (sq.sqrt(), sq_den.sqrt());
        if !norm.is_finite() || !norm_den.is_finite() {
            return Err(self.non_finite(next_step, norm + norm_den));
        }
        let clip = self.cfg.optim.grad_clip;
        let clipped = |n: f64| {
            if clip > 0.0 && n > clip {
                clip / (n + 1e-6)
            } else {
                1.0
            }
        };
        let scale = clipped(norm);
        if sq_den > 0.0 && clipped(norm_den) != scale {
            // `step_scaled` scales every gradient by the flow's factor: the denoiser's are
            // brought to their own first.
            let r = clipped(norm_den) / scale;
            for (name, _) in &self.vars {
                if let Some(g) = grads
                    .get(name)
                    .filter(|_| name.starts_with(crate::grads::DENOISER))
                {
                    let g = (g * r)?;
                    grads.insert(name, g);
                }
            }
        }
        let lr = self.sched.at(self.state.step);
        self.opt.step_scaled(&grads, lr, scale)?;
        if let Some(e) = self.ema.as_mut() {
            // Ramp the decay up so that short runs get a useful average (1+t)/(10+t).
            let t = next_step as f64;
            let d = e.decay().min((1.0 + t) / (10.0 + t));
            e.update_with(&self.vars, d)?;
        }
        self.denoiser_loss += flags[4] / shares;
        self.state.step = next_step;
        self.state.images_seen += self.cfg.train.batch_size as u64;
        // The global position (all ranks' micro-batches), the same for any number of ranks.
        let (epoch, next) = self.feed.position(next_step * shares as u64);
        self.state.epoch = epoch;
        self.state.batch_in_epoch = next;
        Ok((flags[0] / shares, norm, lr, flags[3] > 0.0))
    }

    /// Sums every rank's gradients (each already divided by the number of micro-batches of the
    /// whole step) in one allreduce over one flat buffer, in the variables' name order: on the
    /// GPUs with NCCL, else through MPI on the host.
    fn all_reduce(&self, grads: &mut Grads) -> Result<()> {
        let parts = self
            .vars
            .iter()
            .map(|(name, var)| match grads.get(name) {
                Some(g) => g.to_dtype(DType::F32)?.flatten_all(),
                None => Tensor::zeros(var.elem_count(), DType::F32, &self.device),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let flat = Tensor::cat(&parts, 0)?;
        drop(parts);
        let flat = match self.sum_on_device(&flat)? {
            true => flat,
            false => {
                let mut v = flat.to_vec1::<f32>()?;
                self.group.sum_f32(&mut v)?;
                Tensor::from_vec(v, flat.elem_count(), &self.device)?
            }
        };
        let mut at = 0;
        for (name, var) in &self.vars {
            let n = var.elem_count();
            let g = flat
                .narrow(0, at, n)?
                .reshape(var.shape())?
                .to_dtype(var.dtype())?;
            grads.insert(name, g);
            at += n;
        }
        Ok(())
    }

    /// Sums `flat` across the ranks in place on the GPUs (NCCL); false where there is no GPU
    /// communicator and the sum goes through MPI on the host.
    fn sum_on_device(&self, flat: &Tensor) -> Result<bool> {
        #[cfg(all(feature = "mpi", feature = "cuda"))]
        if let Some(nccl) = &self.nccl {
            nccl.sum(flat)?;
            return Ok(true);
        }
        let _ = flat;
        Ok(false)
    }

    fn non_finite(&self, step: u64, value: f64) -> TrainError {
        TrainError::NonFinite {
            step,
            loss: value,
            last_good: self.last_good("lower the learning rate", " --set optim.lr=…"),
        }
    }

    /// Where to go back to after a failure and what to change (`fix`), for error messages.
    pub(super) fn last_good(&self, fix: &str, resume_sets: &str) -> String {
        let launch = match self.group.size() {
            1 => String::new(),
            n => format!("mpirun -np {n} "),
        };
        match &self.last_checkpoint {
            Some(p) => format!(
                "The last good checkpoint is {}; {fix}, then `{launch}tarflow train --resume {}{resume_sets}`.",
                p.display(),
                self.run.root.display()
            ),
            None => format!("No checkpoint had been written yet; {fix}, then start again."),
        }
    }
}
