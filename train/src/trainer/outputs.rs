//! What a run writes besides its weights' updates: validation bits/dim, sample grids,
//! metrics records and plots, and atomic checkpoints (checked equal across ranks).

use super::{Event, Trainer};
use crate::error::{Result, TrainError};
use crate::metrics::Record;
use candle_core::DType;
use tarflow_flows::Checkpoint;

impl Trainer {
    /// The current weights as a checkpoint (f32).
    pub(super) fn current(&self) -> Result<Checkpoint> {
        Ok(Checkpoint {
            config: self.cfg.model.clone(),
            tensors: self.packing.unpack(self.opt.weights()?, "")?,
            var: None,
            quant: None,
        })
    }

    pub(super) fn ema_checkpoint(&self) -> Result<Option<Checkpoint>> {
        let Some(e) = &self.ema else {
            return Ok(None);
        };
        Ok(Some(Checkpoint {
            config: self.cfg.model.clone(),
            tensors: self.packing.unpack(e.weights().clone(), "")?,
            var: None,
            quant: None,
        }))
    }

    /// Mean held-out bits/dim of `weights`, and the images left out as not finite; each rank
    /// scores its share of the batches and the sums are added up.
    pub(super) fn val_bpd(&self, weights: &Checkpoint) -> Result<Option<(f64, usize)>> {
        let Some(val) = &self.val else {
            return Ok(None);
        };
        let model = weights.model(&self.device, self.dtype)?;
        let g = self.group.as_ref();
        let s = crate::evaluate::val_bpd_sums(
            &model,
            val,
            self.cfg.eval.batches,
            (g.rank(), g.size()),
        )?;
        let mut v = [s.sum, s.count as f64, s.excluded as f64];
        g.sum_f64(&mut v)?;
        Ok(tarflow_sample::stats::Sums {
            sum: v[0],
            count: v[1] as usize,
            excluded: v[2] as usize,
        }
        .mean())
    }

    pub(super) fn evaluate(&mut self, on: &mut dyn FnMut(Event)) -> Result<()> {
        let raw = self.val_bpd(&self.current()?)?;
        let ema = match self.ema_checkpoint()? {
            Some(e) => self.val_bpd(&e)?,
            None => None,
        };
        let Some((raw, raw_excluded)) = raw else {
            return Ok(());
        };
        if self.group.rank() != 0 {
            return Ok(());
        }
        let excluded = raw_excluded.max(ema.map_or(0, |e| e.1));
        let rec = Record {
            step: self.state.step,
            epoch: self.epoch_f(),
            val_bpd: Some(raw),
            val_bpd_ema: ema.map(|e| e.0),
            val_excluded: (excluded > 0).then_some(excluded),
            ..Default::default()
        };
        self.push(&rec)?;
        on(Event::Eval(&rec));
        self.history.push(rec);
        Ok(())
    }

    /// Writes `samples/step-XXXXXXX.png` from the EMA weights (or the trained ones).
    pub(super) fn samples(&self, on: &mut dyn FnMut(Event)) -> Result<()> {
        let weights = match self.ema_checkpoint()? {
            Some(e) => e,
            None => self.current()?,
        };
        let model = weights.model(&self.device, self.dtype)?;
        let path = self
            .run
            .samples()
            .join(format!("step-{:07}.png", self.state.step));
        crate::evaluate::sample_grid(&model, &self.cfg, self.vae.as_ref(), &path)?;
        on(Event::Samples(&path));
        Ok(())
    }

    /// Appends to `metrics.jsonl` (rank 0; the other ranks write nothing).
    pub(super) fn push(&mut self, rec: &Record) -> Result<()> {
        match self.metrics.as_mut() {
            Some(m) => m.push(rec),
            None => Ok(()),
        }
    }

    /// Writes a checkpoint (rank 0). With several ranks, every rank first checks that its
    /// weights are rank 0's, and all learn whether the write succeeded.
    pub(super) fn checkpoint(&mut self, on: &mut dyn FnMut(Event)) -> Result<()> {
        if self.group.size() > 1 {
            self.same_weights_as_rank0()?;
            let mut ok = [1.0f64];
            let dir = if self.group.rank() == 0 {
                let r = self.write_checkpoint(on);
                ok[0] = r.is_ok() as u8 as f64;
                self.group.sum_f64(&mut ok)?;
                r?;
                self.last_checkpoint.clone()
            } else {
                ok[0] = 0.0;
                self.group.sum_f64(&mut ok)?;
                if ok[0] < 1.0 {
                    return Err(TrainError::CheckpointWrite {
                        step: self.state.step,
                        msg: "rank 0 could not write it (its own error says why)".into(),
                        last_good: self.last_good("free space or make the folder writable", ""),
                    });
                }
                Some(
                    self.run
                        .checkpoints()
                        .join(format!("step-{:07}", self.state.step)),
                )
            };
            self.last_checkpoint = dir;
            crate::dist::set_resume_hint(self.last_good("fix the failed rank", ""));
            return Ok(());
        }
        self.write_checkpoint(on)
    }

    /// Every rank's weights hash equal to rank 0's (they must: same gradients, same step).
    pub(super) fn same_weights_as_rank0(&self) -> Result<()> {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for (_, var) in &self.vars {
            for v in var.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()? {
                h = (h ^ v.to_bits() as u64).wrapping_mul(0x100_0000_01b3);
            }
        }
        let (_, ranks) = crate::dist::differ_from_rank0(self.group.as_ref(), &h.to_le_bytes())?;
        if ranks.is_empty() {
            return Ok(());
        }
        let ranks: Vec<String> = ranks.iter().map(|r| r.to_string()).collect();
        Err(TrainError::Run {
            path: self.run.root.clone(),
            msg: format!(
                "at step {} the weights of rank {} differ from rank 0's (the ranks must take \
                 identical steps: same build, same device kind, same MPI library). {}",
                self.state.step,
                ranks.join(", "),
                self.last_good("check the ranks' machines", "")
            ),
        })
    }

    pub(super) fn write_checkpoint(&mut self, on: &mut dyn FnMut(Event)) -> Result<()> {
        let (moments, opt_step) = self.opt.state()?;
        let moments = self
            .packing
            .unpack(self.packing.unpack(moments, "m.")?, "v.")?;
        let saved = self.run.save_checkpoint(
            &self.current()?,
            self.ema_checkpoint()?.as_ref(),
            (&moments, opt_step),
            &self.state,
            self.cfg.train.keep_checkpoints,
        );
        let dir = match saved {
            Ok(dir) => dir,
            Err(e @ (TrainError::Io { .. } | TrainError::Flow(_) | TrainError::Run { .. })) => {
                // Free what the partial checkpoint took (a full disk) and say where to resume.
                let tmp = self
                    .run
                    .checkpoints()
                    .join(format!(".tmp-step-{:07}", self.state.step));
                let _ = std::fs::remove_dir_all(tmp);
                return Err(TrainError::CheckpointWrite {
                    step: self.state.step,
                    msg: e.to_string(),
                    last_good: self.last_good("free space or make the folder writable", ""),
                });
            }
            Err(e) => return Err(e),
        };
        on(Event::Checkpoint(&dir));
        self.last_checkpoint = Some(dir);
        Ok(())
    }
}
