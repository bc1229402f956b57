//! The training loop: data → forward → loss → backward (accumulated, clipped) → AdamW → EMA,
//! with logging, validation, sample grids, plots and atomic checkpoints in a run directory.
//!
//! Everything random derives from `train.seed` and the step count (initial weights, data order,
//! augmentation and noise per (epoch, batch), sample noise), so a resumed run continues the
//! uninterrupted one exactly on CPU.

use crate::config::TrainConfig;
use crate::dist::{Group, Solo};
use crate::ema::Ema;
use crate::error::{Result, TrainError};
use crate::metrics::{MetricsLog, Record};
use crate::optim::{AdamW, AdamWConfig};
use crate::rundir::{RunDir, TrainState};
use crate::schedule::WarmupCosine;
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use tarflow_datasets::loader::Loader;
use tarflow_flows::packing::Packing;
use tarflow_flows::{Checkpoint, TarFlow};

/// What the loop reports as it goes (the CLI draws a progress bar from these).
#[derive(Debug)]
pub enum Event<'a> {
    /// Training is about to start at `step` of `max_steps`.
    Start {
        /// Steps already done (resumed runs).
        step: u64,
        /// Steps of the whole run.
        max_steps: u64,
        /// Training images.
        train_images: usize,
        /// Held-out images.
        val_images: usize,
        /// Learned scalars.
        params: usize,
        /// Where it runs (`cpu`, `cuda:0`, `metal:0`) and in what precision.
        device: String,
        /// The model's dtype (`F32`, `BF16`).
        dtype: String,
    },
    /// One optimizer step finished.
    Step {
        /// Steps done.
        step: u64,
        /// Fractional epoch.
        epoch: f64,
        /// This step's loss.
        loss: f64,
        /// Learning rate used.
        lr: f64,
    },
    /// A log step: the record just appended to `metrics.jsonl`.
    Log(&'a Record),
    /// A validation result.
    Eval(&'a Record),
    /// A sample grid was written.
    Samples(&'a Path),
    /// A checkpoint was written.
    Checkpoint(&'a Path),
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// `max_steps` reached.
    Finished,
    /// Stopped on request (Ctrl-C) after writing a checkpoint.
    Interrupted,
}

/// The end-of-run summary.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Finished or interrupted.
    pub outcome: Outcome,
    /// Steps done.
    pub step: u64,
    /// Mean loss of the last log window.
    pub last_loss: Option<f64>,
    /// Last validation bits/dim (trained weights).
    pub val_bpd: Option<f64>,
    /// Last validation bits/dim of the EMA weights.
    pub val_bpd_ema: Option<f64>,
    /// Training seconds (all sessions of the run).
    pub elapsed_s: f64,
    /// The run directory.
    pub run_dir: PathBuf,
    /// The last checkpoint folder.
    pub checkpoint: Option<PathBuf>,
}

/// Called on every micro-batch before the forward pass with the step it is for: custom
/// augmentation, or fault injection in tests.
pub type BatchHook = Box<dyn FnMut(u64, &mut tarflow_datasets::loader::Batch) + Send>;

/// A training run in progress.
pub struct Trainer {
    cfg: TrainConfig,
    run: RunDir,
    device: Device,
    dtype: DType,
    model: TarFlow,
    vars: Vec<(String, Var)>,
    /// Which of `vars` are packed layers, unpacked wherever weights leave the trainer.
    packing: Packing,
    opt: AdamW,
    ema: Option<Ema>,
    sched: WarmupCosine,
    feed: crate::data::Feed,
    val: Option<Loader>,
    train_images: usize,
    state: TrainState,
    max_steps: u64,
    /// `metrics.jsonl`, written by rank 0 alone.
    metrics: Option<MetricsLog>,
    history: Vec<Record>,
    last_checkpoint: Option<PathBuf>,
    batch_hook: Option<BatchHook>,
    /// The ranks of a data-parallel run (one process: [`Solo`]).
    group: Box<dyn Group>,
    /// Seconds in the gradient allreduce since the last log line.
    allreduce_s: f64,
    /// The GPUs' communicator (CUDA ranks).
    #[cfg(all(feature = "mpi", feature = "cuda"))]
    nccl: Option<crate::dist::nccl::Nccl>,
}

/// `train.dtype` on `device`: `auto` is bf16 on a GPU that runs it (said in `warnings` where it
/// does not), f32 on the CPU.
fn pick_dtype(name: &str, device: &Device, warnings: &mut Vec<String>) -> DType {
    match name {
        "bf16" => DType::BF16,
        "auto" => {
            let (dtype, why) = tarflow_flows::device::auto_dtype(device);
            warnings.extend(why);
            dtype
        }
        _ => DType::F32,
    }
}

impl Trainer {
    /// Starts a new run in `output.dir/output.name` on `train.device`; refuses to overwrite a
    /// run that has checkpoints.
    pub fn start(cfg: TrainConfig) -> Result<(Self, Vec<String>)> {
        let device = crate::dist::device_for(&cfg.train.device, &Solo)?.0;
        Self::start_in(cfg, Box::new(Solo), &device)
    }

    /// [`Self::start`] as one rank of `group` (data-parallel: `mpirun -np N`) on `device`, the
    /// one the process selected ([`crate::dist::device_for`]).
    pub fn start_in(
        cfg: TrainConfig,
        group: Box<dyn Group>,
        device: &Device,
    ) -> Result<(Self, Vec<String>)> {
        let name = cfg.output.name.clone().unwrap_or_else(|| "run".into());
        let run = RunDir::new(cfg.output.dir.join(&name));
        if run.latest()?.is_some() {
            return Err(TrainError::Run {
                path: run.root.clone(),
                msg: format!(
                    "already holds a training run: resume it with `tarflow train --resume {}`, \
                     or pick another name with `--set output.name=NAME`",
                    run.root.display()
                ),
            });
        }
        Self::build(cfg, run, None, group, device)
    }

    /// Resumes the run in `root` from its `latest` checkpoint; `sets` override its config
    /// (e.g. `train.max_steps`).
    pub fn resume(root: &Path, sets: &[String]) -> Result<(Self, Vec<String>)> {
        let cfg = Self::config_of_run(root, sets)?;
        let device = crate::dist::device_for(&cfg.train.device, &Solo)?.0;
        Self::resume_in(root, sets, Box::new(Solo), &device)
    }

    /// The config of the run in `root` with `sets` applied: what a resume will use (the CLI
    /// reads its `train.device` to select the device before resuming).
    pub fn config_of_run(root: &Path, sets: &[String]) -> Result<TrainConfig> {
        let cp = RunDir::new(root).config_path();
        if !cp.is_file() {
            return Err(not_a_run(root));
        }
        let text = std::fs::read_to_string(&cp).map_err(|e| TrainError::io(&cp, e))?;
        TrainConfig::from_toml(&text, &cp.display().to_string(), sets)
    }

    /// [`Self::resume`] as one rank of `group` on `device` (the one the process selected); the
    /// run may have been started with another number of ranks.
    pub fn resume_in(
        root: &Path,
        sets: &[String],
        group: Box<dyn Group>,
        device: &Device,
    ) -> Result<(Self, Vec<String>)> {
        let run = RunDir::new(root);
        let cp = run.config_path();
        let cfg = Self::config_of_run(root, sets)?;
        // The weights go straight to the device the run trains on: a second device (a second
        // Metal id) would refuse every op that mixes them.
        let restored = run.load_latest(device)?;
        if restored.model.config != cfg.model {
            return Err(TrainError::config(
                cp.display().to_string(),
                format!(
                    "[model] differs from the checkpoint in {} (the model cannot change on resume)",
                    restored.dir.display()
                ),
            ));
        }
        if !sets.is_empty() && group.rank() == 0 {
            tarflow_flows::checkpoint::write_atomic(&cp, cfg.to_toml()?.as_bytes())?;
        }
        Self::build(cfg, run, Some(restored), group, device)
    }

    fn build(
        cfg: TrainConfig,
        run: RunDir,
        restored: Option<crate::rundir::Restored>,
        group: Box<dyn Group>,
        device: &Device,
    ) -> Result<(Self, Vec<String>)> {
        let mut warnings = Vec::new();
        let device = device.clone();
        let dtype = pick_dtype(&cfg.train.dtype, &device, &mut warnings);
        if device.is_cpu() {
            check_memory(&cfg)?;
        }
        let t = &cfg.train;
        // Data: the training set, and a held-out split or a separate validation source. A step
        // is `grad_accum × ranks` micro-batches, each rank taking its own `grad_accum`.
        let shares = t.grad_accum * group.size();
        if !t.batch_size.is_multiple_of(shares) {
            return Err(TrainError::config(
                "train.batch_size",
                format!(
                    "{} images per step cannot be split into train.grad_accum ({}) × {} ranks \
                     = {shares} equal micro-batches",
                    t.batch_size,
                    t.grad_accum,
                    group.size()
                ),
            ));
        }
        let micro = t.batch_size / shares;
        let (train, val) = crate::data::loaders(&cfg, micro, &mut warnings)?;
        let steps_per_epoch = train.batches_per_epoch() as f64 / shares as f64;
        same_as_rank0(
            group.as_ref(),
            &cfg,
            &train,
            val.as_ref(),
            restored.as_ref().map_or(0, |r| r.state.step),
        )?;
        let max_steps = match (t.max_steps, t.epochs) {
            (Some(s), _) => s,
            (None, Some(e)) => (e * steps_per_epoch).ceil().max(1.0) as u64,
            (None, None) => {
                return Err(TrainError::config(
                    "train.max_steps",
                    "missing: set train.max_steps or train.epochs",
                ))
            }
        };
        let o = &cfg.optim;
        let warmup = o
            .warmup_steps
            .unwrap_or_else(|| (o.warmup_epochs.unwrap_or(0.0) * steps_per_epoch).round() as u64);
        let sched = WarmupCosine {
            lr: o.lr,
            start_lr: o.min_lr,
            min_lr: o.min_lr,
            warmup_steps: warmup,
            total_steps: o.decay_steps.unwrap_or(max_steps),
        };

        // Model, optimizer and EMA: fresh, or exactly as saved.
        let weights = match &restored {
            Some(r) => r.model.clone(),
            None => Checkpoint::init(&cfg.model, t.seed, &device)?,
        };
        let (model, varmap) = weights.trainable_model(&device, dtype)?;
        let mut vars: Vec<(String, Var)> = varmap
            .data()
            .lock()
            .map_err(|_| TrainError::config("<model>", "variable map lock poisoned"))?
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let packing = Packing::among(&cfg.model, vars.iter().map(|(k, _)| k.as_str()))?;
        let adam = AdamWConfig {
            beta1: o.beta1,
            beta2: o.beta2,
            eps: o.eps,
            weight_decay: o.weight_decay,
        };
        let mut opt = AdamW::new(vars.clone(), adam)?;
        let mut ema = if o.ema_decay > 0.0 {
            Some(Ema::new(&vars, o.ema_decay)?)
        } else {
            None
        };
        let state = match &restored {
            Some(r) => {
                let in_file = |file: &str, msg: String| TrainError::Run {
                    path: r.dir.join(file),
                    msg,
                };
                opt.set_master(&packing.pack(&weights.tensors, "")?)?;
                let moments = packing
                    .pack(&r.optimizer, "m.")
                    .and_then(|m| packing.pack(&m, "v."))
                    .map_err(|e| in_file("optimizer.safetensors", e.to_string()))?;
                opt.load_state(&moments, r.optimizer_step)
                    .map_err(|e| in_file("optimizer.safetensors", e.to_string()))?;
                if let Some(e) = ema.as_mut() {
                    match &r.ema {
                        Some(w) => e.load(
                            &packing
                                .pack(w, "")
                                .map_err(|e| in_file("ema.safetensors", e.to_string()))?,
                        )?,
                        None => warnings.push(format!(
                            "{} has no EMA weights: the average restarts from the current weights",
                            r.dir.display()
                        )),
                    }
                }
                r.state.clone()
            }
            None => TrainState {
                step: 0,
                epoch: 0,
                batch_in_epoch: 0,
                images_seen: 0,
                elapsed_s: 0.0,
                seed: t.seed,
            },
        };
        let lead = group.rank() == 0;
        if restored.is_none() && lead {
            // Only now that config, data and model are known good does the run directory appear.
            run.create()?;
            tarflow_flows::checkpoint::write_atomic(&run.config_path(), cfg.to_toml()?.as_bytes())?;
        }
        let last_checkpoint = restored.as_ref().map(|r| r.dir.clone());
        let resumed_at = restored.as_ref().map(|r| r.state.step);
        let (metrics, history) = if lead {
            let (m, h) = MetricsLog::open(&run.metrics_path(), resumed_at.or(Some(0)))?;
            (Some(m), h)
        } else {
            (None, Vec::new())
        };
        let feed = crate::data::Feed::at(
            train.clone(),
            cfg.data.workers,
            state.step * shares as u64,
            (group.rank(), group.size(), t.grad_accum),
        );
        crate::dist::watch(group.as_ref())?;
        let train_images = train.len();
        #[cfg(all(feature = "mpi", feature = "cuda"))]
        let nccl = match device.is_cuda() && group.size() > 1 {
            true => Some(crate::dist::nccl::Nccl::new(group.as_ref(), &device)?),
            false => None,
        };
        Ok((
            Self {
                cfg,
                run,
                device,
                dtype,
                model,
                vars,
                packing,
                opt,
                ema,
                sched,
                feed,
                val,
                train_images,
                state,
                max_steps,
                metrics,
                history,
                last_checkpoint,
                batch_hook: None,
                #[cfg(all(feature = "mpi", feature = "cuda"))]
                nccl,
                group,
                allreduce_s: 0.0,
            },
            warnings,
        ))
    }

    /// The run directory.
    pub fn run_dir(&self) -> &Path {
        &self.run.root
    }

    /// Steps of the whole run.
    pub fn max_steps(&self) -> u64 {
        self.max_steps
    }

    /// Steps done so far (those of the checkpoint a resumed run started from).
    pub fn steps_done(&self) -> u64 {
        self.state.step
    }

    fn epoch_f(&self) -> f64 {
        self.state.images_seen as f64 / self.train_images.max(1) as f64
    }

    /// One optimizer step over `grad_accum` micro-batches on each rank. Returns the mean loss,
    /// the gradient norm, the learning rate, and whether any rank asked to stop: every rank
    /// learns that in the same step, so all of them stop together.
    fn step(&mut self, stop: bool) -> Result<(f64, f64, f64, bool)> {
        let accum = self.cfg.train.grad_accum;
        let shares = (accum * self.group.size()) as f64;
        let next_step = self.state.step + 1;
        let mut total: Option<GradStore> = None;
        // Summed over ranks: loss, non-finite input values, non-finite losses, stop requests.
        let mut flags = [0.0f64, 0.0, 0.0, stop as u8 as f64];
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
        let mut sq = 0.0;
        for (_, var) in &self.vars {
            if let Some(g) = grads.get(var.as_tensor()) {
                sq += g
                    .to_dtype(DType::F32)?
                    .sqr()?
                    .sum_all()?
                    .to_scalar::<f32>()? as f64;
            }
        }
        let norm = sq.sqrt();
        if !norm.is_finite() {
            return Err(self.non_finite(next_step, norm));
        }
        let clip = self.cfg.optim.grad_clip;
        let scale = if clip > 0.0 && norm > clip {
            clip / (norm + 1e-6)
        } else {
            1.0
        };
        let lr = self.sched.at(self.state.step);
        self.opt.step_scaled(&grads, lr, scale)?;
        if let Some(e) = self.ema.as_mut() {
            // Ramp the decay up so that short runs get a useful average (1+t)/(10+t).
            let t = next_step as f64;
            let d = e.decay().min((1.0 + t) / (10.0 + t));
            e.update_with(&self.vars, d)?;
        }
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
    fn all_reduce(&self, grads: &mut GradStore) -> Result<()> {
        let parts = self
            .vars
            .iter()
            .map(|(_, var)| match grads.get(var.as_tensor()) {
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
        for (_, var) in &self.vars {
            let n = var.elem_count();
            let g = flat
                .narrow(0, at, n)?
                .reshape(var.shape())?
                .to_dtype(var.dtype())?;
            grads.insert(var.as_tensor(), g);
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

    /// Installs a hook that sees (and may change) every micro-batch before the forward pass.
    pub fn set_batch_hook(&mut self, hook: BatchHook) {
        self.batch_hook = Some(hook);
    }

    fn non_finite(&self, step: u64, value: f64) -> TrainError {
        TrainError::NonFinite {
            step,
            loss: value,
            last_good: self.last_good("lower the learning rate", " --set optim.lr=…"),
        }
    }

    /// Where to go back to after a failure and what to change (`fix`), for error messages.
    fn last_good(&self, fix: &str, resume_sets: &str) -> String {
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

    /// The current weights as a checkpoint (f32).
    fn current(&self) -> Result<Checkpoint> {
        Ok(Checkpoint {
            config: self.cfg.model.clone(),
            tensors: self.packing.unpack(self.opt.weights()?, "")?,
            var: None,
            quant: None,
        })
    }

    fn ema_checkpoint(&self) -> Result<Option<Checkpoint>> {
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
    fn val_bpd(&self, weights: &Checkpoint) -> Result<Option<(f64, usize)>> {
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
        Ok(crate::evaluate::ValSums {
            sum: v[0],
            count: v[1] as usize,
            excluded: v[2] as usize,
        }
        .mean())
    }

    fn evaluate(&mut self, on: &mut dyn FnMut(Event)) -> Result<()> {
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
    fn samples(&self, on: &mut dyn FnMut(Event)) -> Result<()> {
        let weights = match self.ema_checkpoint()? {
            Some(e) => e,
            None => self.current()?,
        };
        let model = weights.model(&self.device, self.dtype)?;
        let path = self
            .run
            .samples()
            .join(format!("step-{:07}.png", self.state.step));
        crate::evaluate::sample_grid(&model, &self.cfg, &path)?;
        on(Event::Samples(&path));
        Ok(())
    }

    /// Appends to `metrics.jsonl` (rank 0; the other ranks write nothing).
    fn push(&mut self, rec: &Record) -> Result<()> {
        match self.metrics.as_mut() {
            Some(m) => m.push(rec),
            None => Ok(()),
        }
    }

    /// Writes a checkpoint (rank 0). With several ranks, every rank first checks that its
    /// weights are rank 0's, and all learn whether the write succeeded.
    fn checkpoint(&mut self, on: &mut dyn FnMut(Event)) -> Result<()> {
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
    fn same_weights_as_rank0(&self) -> Result<()> {
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

    fn write_checkpoint(&mut self, on: &mut dyn FnMut(Event)) -> Result<()> {
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

    /// Trains until `max_steps` or until `stop` is set (then checkpoints and returns).
    pub fn run(&mut self, stop: &AtomicBool, on: &mut dyn FnMut(Event)) -> Result<Summary> {
        // Rank 0 alone reports (progress bar, messages).
        let lead = self.group.rank() == 0;
        let mut on = |ev: Event| {
            if lead {
                on(ev)
            }
        };
        let on: &mut dyn FnMut(Event) = &mut on;
        on(Event::Start {
            step: self.state.step,
            max_steps: self.max_steps,
            train_images: self.train_images,
            val_images: self.val.as_ref().map_or(0, Loader::len),
            params: tarflow_flows::params::count_params(&self.cfg.model),
            device: tarflow_flows::device::describe(&self.device),
            dtype: format!("{:?}", self.dtype).to_lowercase(),
        });
        let t = self.cfg.train.clone();
        let e = self.cfg.eval.clone();
        let session = Instant::now();
        let elapsed0 = self.state.elapsed_s;
        let (mut win_loss, mut win_norm, mut win_n, mut win_time) = (0.0, 0.0, 0u64, 0.0);
        let mut last_loss = None;
        let mut outcome = Outcome::Finished;
        let mut saved_at = self.last_checkpoint.as_ref().map(|_| self.state.step);
        crate::dist::set_resume_hint(self.last_good("fix the failed rank", ""));
        while self.state.step < self.max_steps {
            let t0 = Instant::now();
            let (loss, norm, lr, stop_all) = self.step(stop.load(Ordering::SeqCst))?;
            win_time += t0.elapsed().as_secs_f64();
            self.state.elapsed_s = elapsed0 + session.elapsed().as_secs_f64();
            (win_loss, win_norm, win_n) = (win_loss + loss, win_norm + norm, win_n + 1);
            let step = self.state.step;
            on(Event::Step {
                step,
                epoch: self.epoch_f(),
                loss,
                lr,
            });
            if step.is_multiple_of(t.log_every) || step == self.max_steps {
                let mean = win_loss / win_n as f64;
                let rec = Record {
                    step,
                    epoch: self.epoch_f(),
                    loss: Some(mean),
                    bpd: Some(loss_to_bpd(mean)),
                    lr: Some(lr),
                    grad_norm: Some(win_norm / win_n as f64),
                    images_per_s: Some((win_n * t.batch_size as u64) as f64 / win_time.max(1e-9)),
                    allreduce_s: (self.group.size() > 1)
                        .then(|| std::mem::take(&mut self.allreduce_s) / win_n as f64),
                    elapsed_s: Some(self.state.elapsed_s),
                    ..Default::default()
                };
                self.push(&rec)?;
                on(Event::Log(&rec));
                self.history.push(rec);
                last_loss = Some(mean);
                (win_loss, win_norm, win_n, win_time) = (0.0, 0.0, 0, 0.0);
            }
            let last = step == self.max_steps;
            if (e.every > 0 && step.is_multiple_of(e.every)) || last {
                self.evaluate(on)?;
            }
            if ((e.sample_every > 0 && step.is_multiple_of(e.sample_every)) || last) && lead {
                self.samples(on)?;
            }
            if step.is_multiple_of(t.checkpoint_every) || last {
                self.checkpoint(on)?;
                saved_at = Some(step);
                if lead {
                    crate::plot::run_plots(&self.history, &self.run.plots())?;
                }
            }
            if stop_all {
                outcome = Outcome::Interrupted;
                break;
            }
        }
        if saved_at != Some(self.state.step) {
            self.checkpoint(on)?;
            if lead {
                crate::plot::run_plots(&self.history, &self.run.plots())?;
            }
        }
        let val = self.history.iter().rev().find(|r| r.val_bpd.is_some());
        Ok(Summary {
            outcome,
            step: self.state.step,
            last_loss,
            val_bpd: val.and_then(|r| r.val_bpd),
            val_bpd_ema: val.and_then(|r| r.val_bpd_ema),
            elapsed_s: self.state.elapsed_s,
            run_dir: self.run.root.clone(),
            checkpoint: self.last_checkpoint.clone(),
        })
    }
}

/// Refuses a model whose weights, EMA, gradients and AdamW moments (five f32 copies) cannot
/// fit in the memory this machine has available, before trying to allocate them.
fn check_memory(cfg: &TrainConfig) -> Result<()> {
    let Some(avail) = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find(|l| l.starts_with("MemAvailable:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .map(|kb| kb * 1024.0)
    }) else {
        return Ok(()); // not Linux: nothing to compare with
    };
    let need = cfg.model.approx_params() * 4.0 * 5.0;
    if need > avail {
        const GIB: f64 = (1u64 << 30) as f64;
        return Err(TrainError::config(
            "model",
            format!(
                "{:.3e} parameters need ~{:.1} GiB for weights, EMA, gradients and optimizer state; \
                 this machine has {:.1} GiB available (reduce channels, num_blocks or layers)",
                cfg.model.approx_params(),
                need / GIB,
                avail / GIB
            ),
        ));
    }
    Ok(())
}

pub use tarflow_flows::model::loss_to_bpd;

/// The error for `--resume DIR` where DIR holds no run: the runs inside it, if any, or what a
/// run directory holds.
fn not_a_run(root: &Path) -> TrainError {
    let mut runs: Vec<String> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("config.toml").is_file())
        .map(|p| p.display().to_string())
        .collect();
    runs.sort();
    let msg = if !root.exists() {
        "no such folder".to_string()
    } else if runs.is_empty() {
        "not a run directory: a run holds config.toml, latest and checkpoints/ (written by \
         `tarflow train --config …`)"
            .to_string()
    } else {
        format!(
            "not a run directory but a folder of runs: {}; resume one of them, e.g. --resume {}",
            runs.join(", "),
            runs[0]
        )
    };
    TrainError::Run {
        path: root.to_path_buf(),
        msg,
    }
}

/// Refuses to start a data-parallel run whose ranks disagree with rank 0 about the config,
/// the data (count and SHA-256 of the training and held-out images) or the step they resume
/// from; every rank learns which ranks differ, so none is left waiting.
fn same_as_rank0(
    group: &dyn Group,
    cfg: &TrainConfig,
    train: &Loader,
    val: Option<&Loader>,
    step: u64,
) -> Result<()> {
    if group.size() == 1 {
        return Ok(());
    }
    // The device may differ per rank (one GPU each); everything else must not.
    let mut same = cfg.clone();
    same.train.device = String::new();
    let subset = |l: &Loader| format!("{} of {}", l.len(), l.set().checksum());
    let mine = format!(
        "config {}\ntraining data {}\nheld-out data {}\nresumed at step {step}",
        same.to_toml()?,
        subset(train),
        val.map_or_else(|| "none".to_string(), subset)
    );
    let (theirs, ranks) = crate::dist::differ_from_rank0(group, mine.as_bytes())?;
    if ranks.is_empty() {
        return Ok(());
    }
    let me_too = ranks.contains(&group.rank());
    let ranks: Vec<String> = ranks.iter().map(|r| r.to_string()).collect();
    let what = if group.rank() > 0 && me_too {
        let theirs = String::from_utf8_lossy(&theirs);
        let first = mine
            .lines()
            .zip(theirs.lines())
            .find(|(a, b)| a != b)
            .map(|(a, b)| format!(": this rank has `{a}`, rank 0 has `{b}`"))
            .unwrap_or_default();
        format!("this rank ({}) differs{first}", group.rank())
    } else {
        format!("rank {} differ from rank 0", ranks.join(", "))
    };
    Err(TrainError::config(
        "<ranks>",
        format!(
            "the ranks must train on the same config and data and resume from the same step; \
             {what}. Give every rank the same config file and data (a shared folder)"
        ),
    ))
}
