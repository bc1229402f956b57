//! A new or resumed run: the device's dtype, the data, the model, AdamW, the EMA, the
//! schedule and the state, checked against the other ranks.

use super::Trainer;
use crate::checkpoints::{RunDir, TrainState};
use crate::config::TrainConfig;
use crate::dist::{Group, Solo};
use crate::ema::Ema;
use crate::error::{Result, TrainError};
use crate::metrics::MetricsLog;
use crate::optim::{AdamW, AdamWConfig};
use crate::schedule::WarmupCosine;
use candle_core::{DType, Device, Var};
use std::path::Path;
use tarflow_datasets::loader::Loader;
use tarflow_flows::packing::Packing;
use tarflow_flows::Checkpoint;

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
        Self::resume_in(root, cfg, Box::new(Solo), &device)
    }

    /// The config of the run in `root` with `sets` applied: what a resume uses (the CLI reads
    /// its `train.device` to select the device, then resumes with it).
    pub fn config_of_run(root: &Path, sets: &[String]) -> Result<TrainConfig> {
        let cp = RunDir::new(root).config_path();
        if !cp.is_file() {
            return Err(not_a_run(root));
        }
        let text = std::fs::read_to_string(&cp).map_err(|e| TrainError::io(&cp, e))?;
        TrainConfig::from_toml(&text, &cp.display().to_string(), sets)
    }

    /// [`Self::resume`] with `cfg` ([`Self::config_of_run`]), as one rank of `group` on
    /// `device` (the one the process selected); the run may have been started with another
    /// number of ranks. The run's `config.toml` is rewritten only where `cfg` changed it.
    pub fn resume_in(
        root: &Path,
        cfg: TrainConfig,
        group: Box<dyn Group>,
        device: &Device,
    ) -> Result<(Self, Vec<String>)> {
        let run = RunDir::new(root);
        let cp = run.config_path();
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
        let text = cfg.to_toml()?;
        if group.rank() == 0 && std::fs::read_to_string(&cp).ok().as_deref() != Some(text.as_str())
        {
            tarflow_flows::checkpoint::write_atomic(&cp, text.as_bytes())?;
        }
        Self::build(cfg, run, Some(restored), group, device)
    }

    fn build(
        cfg: TrainConfig,
        run: RunDir,
        restored: Option<crate::checkpoints::Restored>,
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
        // A latent run's grids are pictures: its autoencoder decodes them.
        let vae = crate::data::autoencoder(&cfg, &device)?;
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
                vae,
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
                denoiser_loss: 0.0,
            },
            warnings,
        ))
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
