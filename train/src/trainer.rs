//! The training loop: data → forward → loss → backward (accumulated, clipped) → AdamW → EMA,
//! with logging, validation, sample grids, plots and atomic checkpoints in a run directory.
//!
//! Everything random derives from `train.seed` and the step count (initial weights, data order,
//! augmentation and noise per (epoch, batch), sample noise), so a resumed run continues the
//! uninterrupted one exactly on CPU.

use crate::config::TrainConfig;
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
use tarflow_flows::{Checkpoint, Cond, TarFlow};

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
    opt: AdamW,
    ema: Option<Ema>,
    sched: WarmupCosine,
    feed: crate::data::Feed,
    val: Option<Loader>,
    train_images: usize,
    state: TrainState,
    max_steps: u64,
    metrics: MetricsLog,
    history: Vec<Record>,
    last_checkpoint: Option<PathBuf>,
    batch_hook: Option<BatchHook>,
}

fn pick_dtype(name: &str, device: &Device) -> DType {
    match name {
        "bf16" => DType::BF16,
        "auto" if !device.is_cpu() => DType::BF16,
        _ => DType::F32,
    }
}

impl Trainer {
    /// Starts a new run in `output.dir/output.name`; refuses to overwrite a run that has
    /// checkpoints.
    pub fn start(cfg: TrainConfig) -> Result<(Self, Vec<String>)> {
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
        Self::build(cfg, run, None)
    }

    /// Resumes the run in `root` from its `latest` checkpoint; `sets` override its config
    /// (e.g. `train.max_steps`).
    pub fn resume(root: &Path, sets: &[String]) -> Result<(Self, Vec<String>)> {
        let run = RunDir::new(root);
        let cp = run.config_path();
        if !cp.is_file() {
            return Err(not_a_run(root));
        }
        let text = std::fs::read_to_string(&cp).map_err(|e| TrainError::io(&cp, e))?;
        let cfg = TrainConfig::from_toml(&text, &cp.display().to_string(), sets)?;
        let device = tarflow_flows::device::select(&cfg.train.device)?;
        let restored = run.load_latest(&device)?;
        if restored.model.config != cfg.model {
            return Err(TrainError::config(
                cp.display().to_string(),
                format!(
                    "[model] differs from the checkpoint in {} (the model cannot change on resume)",
                    restored.dir.display()
                ),
            ));
        }
        if !sets.is_empty() {
            tarflow_flows::checkpoint::write_atomic(&cp, cfg.to_toml()?.as_bytes())?;
        }
        Self::build(cfg, run, Some(restored))
    }

    fn build(
        cfg: TrainConfig,
        run: RunDir,
        restored: Option<crate::rundir::Restored>,
    ) -> Result<(Self, Vec<String>)> {
        let mut warnings = Vec::new();
        let device = tarflow_flows::device::select(&cfg.train.device)?;
        let dtype = pick_dtype(&cfg.train.dtype, &device);
        if device.is_cpu() {
            check_memory(&cfg)?;
        }
        let t = &cfg.train;
        // Data: the training set, and a held-out split or a separate validation source.
        let micro = t.batch_size / t.grad_accum;
        let (train, val) = crate::data::loaders(&cfg, micro, &mut warnings)?;
        let steps_per_epoch = train.batches_per_epoch() as f64 / t.grad_accum as f64;
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
                opt.set_master(&weights.tensors)?;
                opt.load_state(&r.optimizer, r.optimizer_step)
                    .map_err(|e| TrainError::Run {
                        path: r.dir.join("optimizer.safetensors"),
                        msg: e.to_string(),
                    })?;
                if let Some(e) = ema.as_mut() {
                    match &r.ema {
                        Some(w) => e.load(w)?,
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
        if restored.is_none() {
            // Only now that config, data and model are known good does the run directory appear.
            run.create()?;
            tarflow_flows::checkpoint::write_atomic(&run.config_path(), cfg.to_toml()?.as_bytes())?;
        }
        let last_checkpoint = restored.as_ref().map(|r| r.dir.clone());
        let resumed_at = restored.as_ref().map(|r| r.state.step);
        let (metrics, history) = MetricsLog::open(&run.metrics_path(), resumed_at.or(Some(0)))?;
        let feed = crate::data::Feed::at(
            train.clone(),
            cfg.data.workers,
            state.step * t.grad_accum as u64,
        );
        let train_images = train.len();
        Ok((
            Self {
                cfg,
                run,
                device,
                dtype,
                model,
                vars,
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

    fn epoch_f(&self) -> f64 {
        self.state.images_seen as f64 / self.train_images.max(1) as f64
    }

    fn cond<'a>(&self, labels: &'a [i64]) -> Cond<'a> {
        Cond::of(self.cfg.model.num_classes, Some(labels))
    }

    /// One optimizer step over `grad_accum` micro-batches; returns (mean loss, grad norm, lr).
    fn step(&mut self) -> Result<(f64, f64, f64)> {
        let accum = self.cfg.train.grad_accum;
        let next_step = self.state.step + 1;
        let mut total: Option<GradStore> = None;
        let mut loss_sum = 0.0;
        for _ in 0..accum {
            let mut b = self.feed.next()?;
            if let Some(hook) = self.batch_hook.as_mut() {
                hook(next_step, &mut b);
            }
            let bad = b.images.iter().filter(|v| !v.is_finite()).count();
            if bad > 0 {
                return Err(TrainError::NonFiniteInput {
                    step: next_step,
                    count: bad,
                    last_good: self.last_good("fix the data or the batch hook", ""),
                });
            }
            let [n, c, h, w] = b.shape;
            let x = Tensor::from_vec(b.images, (n, c, h, w), &self.device)?.to_dtype(self.dtype)?;
            let out = self.model.forward(&x, self.cond(&b.labels))?;
            let mut loss = TarFlow::loss(&out)?.to_dtype(DType::F32)?;
            if self.cfg.optim.latent_norm > 0.0 {
                loss = (loss + (TarFlow::latent_norm(&out)? * self.cfg.optim.latent_norm)?)?;
            }
            let v = loss.to_scalar::<f32>()? as f64;
            if !v.is_finite() {
                return Err(self.non_finite(next_step, v));
            }
            loss_sum += v;
            let grads = (loss / accum as f64)?.backward()?;
            total = Some(match total {
                None => grads,
                Some(mut acc) => {
                    for (_, var) in &self.vars {
                        if let Some(g) = grads.get(var.as_tensor()) {
                            let sum = match acc.get(var.as_tensor()) {
                                Some(a) => (a + g)?,
                                None => g.clone(),
                            };
                            acc.insert(var.as_tensor(), sum);
                        }
                    }
                    acc
                }
            });
        }
        let grads = total.ok_or_else(|| TrainError::config("train.grad_accum", "must be ≥ 1"))?;
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
        self.state.epoch = self.feed.epoch;
        self.state.batch_in_epoch = self.feed.next;
        Ok((loss_sum / accum as f64, norm, lr))
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
        match &self.last_checkpoint {
            Some(p) => format!(
                "The last good checkpoint is {}; {fix}, then `tarflow train --resume {}{resume_sets}`.",
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
            tensors: self.opt.weights()?,
            var: None,
            quant: None,
        })
    }

    fn ema_checkpoint(&self) -> Option<Checkpoint> {
        self.ema.as_ref().map(|e| Checkpoint {
            config: self.cfg.model.clone(),
            tensors: e.weights().clone(),
            var: None,
            quant: None,
        })
    }

    /// Mean held-out bits/dim of `weights`, and the images left out as not finite.
    fn val_bpd(&self, weights: &Checkpoint) -> Result<Option<(f64, usize)>> {
        let Some(val) = &self.val else {
            return Ok(None);
        };
        let model = weights.model(&self.device, self.dtype)?;
        crate::evaluate::val_bpd(&model, val, self.cfg.eval.batches)
    }

    fn evaluate(&mut self, on: &mut dyn FnMut(Event)) -> Result<()> {
        let raw = self.val_bpd(&self.current()?)?;
        let ema = match self.ema_checkpoint() {
            Some(e) => self.val_bpd(&e)?,
            None => None,
        };
        let Some((raw, raw_excluded)) = raw else {
            return Ok(());
        };
        let excluded = raw_excluded.max(ema.map_or(0, |e| e.1));
        let rec = Record {
            step: self.state.step,
            epoch: self.epoch_f(),
            val_bpd: Some(raw),
            val_bpd_ema: ema.map(|e| e.0),
            val_excluded: (excluded > 0).then_some(excluded),
            ..Default::default()
        };
        self.metrics.push(&rec)?;
        on(Event::Eval(&rec));
        self.history.push(rec);
        Ok(())
    }

    /// Writes `samples/step-XXXXXXX.png` from the EMA weights (or the trained ones).
    fn samples(&self, on: &mut dyn FnMut(Event)) -> Result<()> {
        let weights = match self.ema_checkpoint() {
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

    fn checkpoint(&mut self, on: &mut dyn FnMut(Event)) -> Result<()> {
        let (moments, opt_step) = self.opt.state()?;
        let saved = self.run.save_checkpoint(
            &self.current()?,
            self.ema_checkpoint().as_ref(),
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
        while self.state.step < self.max_steps {
            if stop.load(Ordering::SeqCst) {
                outcome = Outcome::Interrupted;
                break;
            }
            let t0 = Instant::now();
            let (loss, norm, lr) = self.step()?;
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
                    elapsed_s: Some(self.state.elapsed_s),
                    ..Default::default()
                };
                self.metrics.push(&rec)?;
                on(Event::Log(&rec));
                self.history.push(rec);
                last_loss = Some(mean);
                (win_loss, win_norm, win_n, win_time) = (0.0, 0.0, 0, 0.0);
            }
            let last = step == self.max_steps;
            if (e.every > 0 && step.is_multiple_of(e.every)) || last {
                self.evaluate(on)?;
            }
            if (e.sample_every > 0 && step.is_multiple_of(e.sample_every)) || last {
                self.samples(on)?;
            }
            if step.is_multiple_of(t.checkpoint_every) || last {
                self.checkpoint(on)?;
                saved_at = Some(step);
                crate::plot::run_plots(&self.history, &self.run.plots())?;
            }
        }
        if saved_at != Some(self.state.step) {
            self.checkpoint(on)?;
            crate::plot::run_plots(&self.history, &self.run.plots())?;
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
