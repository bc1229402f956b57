//! The training loop: data → forward → loss → backward (accumulated, clipped) → AdamW → EMA,
//! with logging, validation, sample grids, plots and atomic checkpoints in a run directory.
//!
//! Everything random derives from `train.seed` and the step count (initial weights, data order,
//! augmentation and noise per (epoch, batch), sample noise), so a resumed run continues the
//! uninterrupted one exactly on CPU.

//!
//! By concern: `setup` (a new or resumed run: device, data, model, optimizer, state),
//! `step` (one optimizer step, the gradient allreduce, failure reports), `outputs`
//! (validation, sample grids, metrics, checkpoints); this file holds the types and the loop.

mod outputs;
mod setup;
mod step;

use crate::checkpoints::{RunDir, TrainState};
use crate::config::TrainConfig;
use crate::dist::Group;
use crate::ema::Ema;
use crate::error::Result;
use crate::metrics::{MetricsLog, Record};
use crate::optim::AdamW;
use crate::schedule::WarmupCosine;
use candle_core::{DType, Device, Var};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use tarflow_datasets::loader::Loader;
use tarflow_flows::packing::Packing;
use tarflow_flows::TarFlow;

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
    /// A latent run's autoencoder (`data.vae`): it decodes the sample grids.
    vae: Option<tarflow_flows::autoencoder::Autoencoder>,
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
    /// The self-denoiser's error summed over the steps of the current log window.
    denoiser_loss: f64,
    /// The GPUs' communicator (CUDA ranks).
    #[cfg(all(feature = "mpi", feature = "cuda"))]
    nccl: Option<crate::dist::nccl::Nccl>,
}

impl Trainer {
    /// The run directory.
    pub fn run_dir(&self) -> &Path {
        &self.run.root
    }

    /// Whether the run models an autoencoder's latents (its bits/dim are the continuous
    /// latent density's).
    pub fn latent(&self) -> bool {
        self.vae.is_some()
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

    /// Installs a hook that sees (and may change) every micro-batch before the forward pass.
    pub fn set_batch_hook(&mut self, hook: BatchHook) {
        self.batch_hook = Some(hook);
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
                    bpd: Some(match self.vae {
                        None => loss_to_bpd(mean),
                        Some(_) => tarflow_flows::model::continuous_loss_to_bpd(mean),
                    }),
                    lr: Some(lr),
                    grad_norm: Some(win_norm / win_n as f64),
                    images_per_s: Some((win_n * t.batch_size as u64) as f64 / win_time.max(1e-9)),
                    allreduce_s: (self.group.size() > 1)
                        .then(|| std::mem::take(&mut self.allreduce_s) / win_n as f64),
                    denoiser_loss: (self.model.config().denoiser_layers > 0)
                        .then(|| std::mem::take(&mut self.denoiser_loss) / win_n as f64),
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

pub use tarflow_flows::model::loss_to_bpd;
