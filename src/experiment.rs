//! Experiments: a base config plus a list or grid of overrides, each variant trained (resumably:
//! finished variants are skipped) and measured, then a results table, CSV and plots.
//!
//! ```toml
//! name = "blocks-cpu"
//! base = "quickstart"                  # config name or path
//! set = ["train.max_steps=600"]        # overrides for every variant
//! seeds = [0, 1]                       # each variant once per train.seed (default [0])
//! fd_samples = 500                     # generated images per FD measurement
//! [[variant]]                          # a list of variants …
//! name = "1 block"
//! set = ["model.num_blocks=1"]
//! [grid]                               # … or (and) the product of value lists
//! "model.num_blocks" = [1, 2, 4, 8]
//! [[sampling]]                         # sampling settings measured on every trained variant
//! name = "w=2"                         # (default: one plain setting)
//! guidance = 2.0
//! rule = "linear"                      # or "gaussian"
//! guide_blocks = 0
//! denoise = false
//! temperature = 1.0
//! ```

use crate::fd::{classifier_for, measure, Classifier, FeatureExtractor, Reference};
pub use crate::report::Row;
use crate::report::{loss_curve, write_results};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use tarflow_flows::{GuidanceRule, ReverseOptions};
use tarflow_sample::generate::{Labels, SampleOptions};
use tarflow_train::config::TrainConfig;
use tarflow_train::trainer::Trainer;
use tarflow_train::{Result, TrainError};

/// One named set of overrides.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    /// Name in tables and file names.
    pub name: String,
    /// `section.key=value` overrides.
    #[serde(default)]
    pub set: Vec<String>,
}

/// Sampling settings measured on each trained variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Sampling {
    /// Name in tables.
    pub name: String,
    /// Guidance weight.
    pub guidance: f64,
    /// linear or gaussian.
    pub rule: String,
    /// Guide only the first K blocks sampled (0 = all).
    pub guide_blocks: usize,
    /// One denoising step with the training σ.
    pub denoise: bool,
    /// One step of the model's learnable self-denoiser (`model.denoiser_layers` > 0).
    pub learned_denoise: bool,
    /// Noise temperature.
    pub temperature: f64,
    /// A latent variant's samples are decoded by this autoencoder (a decoder fine-tuned on
    /// noisy latents) instead of the run's; pixel variants skip the setting.
    pub decoder: Option<std::path::PathBuf>,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            name: "plain".into(),
            guidance: 0.0,
            rule: "linear".into(),
            guide_blocks: 0,
            denoise: false,
            learned_denoise: false,
            temperature: 1.0,
            decoder: None,
        }
    }
}

/// An experiment file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    /// Name of the results folder.
    pub name: String,
    /// Base training config (name or path).
    pub base: String,
    /// Overrides applied to every variant.
    #[serde(default)]
    pub set: Vec<String>,
    /// Training seeds per variant.
    #[serde(default = "default_seeds")]
    pub seeds: Vec<u64>,
    /// Generated images per FD measurement.
    #[serde(default = "default_fd_samples")]
    pub fd_samples: usize,
    /// Listed variants.
    #[serde(default)]
    pub variant: Vec<Variant>,
    /// Key → values; every combination becomes a variant.
    #[serde(default)]
    pub grid: toml::Table,
    /// Sampling settings; default one plain setting.
    #[serde(default)]
    pub sampling: Vec<Sampling>,
}

fn default_seeds() -> Vec<u64> {
    vec![0]
}
fn default_fd_samples() -> usize {
    500
}

fn slug(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl Experiment {
    /// Reads and checks an experiment file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
        let e: Experiment = toml::from_str(&text)
            .map_err(|e| TrainError::config(path.display().to_string(), e.to_string()))?;
        if e.variants()?.is_empty() {
            return Err(TrainError::config(
                path.display().to_string(),
                "no variant: give [[variant]] entries or a [grid]",
            ));
        }
        Ok(e)
    }

    /// Every variant: the listed ones, then the grid's combinations.
    pub fn variants(&self) -> Result<Vec<Variant>> {
        let mut out = self.variant.clone();
        let mut combos: Vec<Vec<String>> = vec![vec![]];
        for (key, values) in &self.grid {
            let values = values.as_array().ok_or_else(|| {
                TrainError::config("[grid]", format!("`{key}` must be a list of values"))
            })?;
            let mut next = Vec::new();
            for c in &combos {
                for v in values {
                    let mut c = c.clone();
                    c.push(format!("{key}={v}"));
                    next.push(c);
                }
            }
            combos = next;
        }
        if !self.grid.is_empty() {
            for c in combos {
                out.push(Variant {
                    name: c.join(" "),
                    set: c,
                });
            }
        }
        Ok(out)
    }

    /// The full training config of `v` with `seed`, results under `runs_dir`.
    pub fn config_of(&self, v: &Variant, seed: u64, runs_dir: &Path) -> Result<TrainConfig> {
        let mut sets = self.set.clone();
        sets.extend(v.set.iter().cloned());
        sets.push(format!("train.seed={seed}"));
        sets.push(format!("output.dir={:?}", runs_dir.display().to_string()));
        sets.push(format!(
            "output.name={:?}",
            format!("{}-s{seed}", slug(&v.name))
        ));
        TrainConfig::load(&self.base, &sets)
    }
}

/// Validates every variant's config; returns (variant, seed, parameter count) per run.
pub fn dry_run(e: &Experiment, runs_dir: &Path) -> Result<Vec<(String, u64, usize)>> {
    let mut out = Vec::new();
    for v in e.variants()? {
        for &seed in &e.seeds {
            let cfg = e.config_of(&v, seed, runs_dir).map_err(|err| {
                TrainError::config(format!("variant {:?}", v.name), err.to_string())
            })?;
            out.push((
                v.name.clone(),
                seed,
                tarflow_flows::params::count_params(&cfg.model),
            ));
        }
    }
    Ok(out)
}

/// Runs (or resumes) every variant and writes `results_dir/{results.md, results.csv, plots/}`.
pub fn run(
    e: &Experiment,
    runs_dir: &Path,
    results_dir: &Path,
    stop: &AtomicBool,
    log: &mut dyn FnMut(String),
) -> Result<Vec<Row>> {
    dry_run(e, runs_dir)?;
    std::fs::create_dir_all(results_dir.join("grids"))
        .map_err(|err| TrainError::io(results_dir, err))?;
    std::fs::create_dir_all(results_dir.join("plots"))
        .map_err(|err| TrainError::io(results_dir, err))?;
    let mut rows = Vec::new();
    let mut reference: Option<(String, Classifier, Reference)> = None;
    let mut curves: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    let mut devices: Vec<(String, candle_core::Device)> = Vec::new();
    let samplings = if e.sampling.is_empty() {
        vec![Sampling::default()]
    } else {
        e.sampling.clone()
    };
    for v in e.variants()? {
        for &seed in &e.seeds {
            let cfg = e.config_of(&v, seed, runs_dir)?;
            let run_dir = runs_dir.join(cfg.output.name.clone().unwrap_or_default());
            let cached = run_dir.join("experiment-result.json");
            if let Ok(text) = std::fs::read_to_string(&cached) {
                if let Ok(r) = serde_json::from_str::<Vec<Row>>(&text) {
                    // Pixel variants skip the settings that name a latent decoder.
                    let applies = samplings
                        .iter()
                        .filter(|s| s.decoder.is_none() || cfg.data.vae.is_some())
                        .count();
                    if r.len() == applies {
                        log(format!("{} (seed {seed}): done, skipped", v.name));
                        rows.extend(r);
                        curves.push((format!("{} s{seed}", v.name), loss_curve(&run_dir)));
                        continue;
                    }
                }
            }
            let max = cfg.train.max_steps.unwrap_or(0);
            let latest = tarflow_train::checkpoints::RunDir::new(&run_dir).latest()?;
            // Each device a variant names is selected once for the whole experiment.
            let name = cfg.train.device.clone();
            let device = match devices.iter().find(|(n, _)| *n == name) {
                Some((_, d)) => d.clone(),
                None => {
                    let d = tarflow_train::dist::device_for(&name, &tarflow_train::dist::Solo)?.0;
                    devices.push((name, d.clone()));
                    d
                }
            };
            let solo = Box::new(tarflow_train::dist::Solo);
            let (mut trainer, warn) = match latest {
                Some(_) => {
                    let cfg = Trainer::config_of_run(&run_dir, &[])?;
                    Trainer::resume_in(&run_dir, cfg, solo, &device)?
                }
                None => Trainer::start_in(cfg.clone(), solo, &device)?,
            };
            for w in warn {
                log(format!("warning: {w}"));
            }
            log(format!(
                "{} (seed {seed}): training to step {}",
                v.name,
                trainer.max_steps().max(max)
            ));
            let summary = trainer.run(stop, &mut |_| {})?;
            if summary.outcome == tarflow_train::trainer::Outcome::Interrupted {
                return Err(TrainError::Run {
                    path: run_dir.clone(),
                    msg: "interrupted; run the experiment again to resume".into(),
                });
            }
            // Measure every sampling setting on the EMA (or trained) weights.
            let dev = candle_core::Device::Cpu;
            let r = tarflow_sample::resolve::resolve(&run_dir, true, &dev)
                .map_err(|err| TrainError::config("experiment", err.to_string()))?;
            let model = r.checkpoint.model(&dev, candle_core::DType::F32)?;
            let cls_path = results_dir.join("fd-classifier.safetensors");
            // The classifier and the held-out features depend only on the data and its split:
            // built once and reused by every variant that shares them.
            let key = serde_json::to_string(&(
                &cfg.data,
                cfg.train.seed,
                cfg.train.batch_size / cfg.train.grad_accum,
                cfg.model.in_channels,
                cfg.model.img_size,
            ))
            .unwrap_or_default();
            if reference.as_ref().is_none_or(|(k, _, _)| *k != key) {
                // A latent run is compared in pixels, with the images its latents encode.
                let (c, real) = classifier_for(&crate::latent::pixel_twin(&cfg)?, &cls_path)?;
                let r = Reference::of(&c, &real)?;
                reference = Some((key, c, r));
            }
            let Some((_, classifier, real)) = reference.as_ref() else {
                continue;
            };
            let grid_name = format!("{}-s{seed}.png", slug(&v.name));
            let grid_src = run_dir
                .join("samples")
                .join(format!("step-{:07}.png", summary.step));
            if grid_src.is_file() {
                std::fs::copy(&grid_src, results_dir.join("grids").join(&grid_name))
                    .map_err(|err| TrainError::io(&grid_src, err))?;
            }
            let vae = tarflow_train::data::autoencoder(&cfg, &candle_core::Device::Cpu)?;
            let mut mine = Vec::new();
            for s in &samplings {
                let decoder = match (&s.decoder, &vae) {
                    (Some(_), None) => continue,
                    (Some(dir), Some(_)) => Some(tarflow_flows::autoencoder::Autoencoder::load(
                        dir,
                        &dev,
                        candle_core::DType::F32,
                    )?),
                    (None, _) => None,
                };
                let opts = SampleOptions {
                    num: e.fd_samples,
                    batch: 100,
                    seed: 1234,
                    temperature: s.temperature,
                    labels: if cfg.model.num_classes > 0 {
                        Labels::Random
                    } else {
                        Labels::None
                    },
                    reverse: ReverseOptions {
                        guidance: s.guidance,
                        rule: s.rule.parse::<GuidanceRule>()?,
                        guide_blocks: s.guide_blocks,
                        ..Default::default()
                    },
                    denoise: (s.denoise && r.train_noise_std.is_some())
                        .then(|| (r.train_noise_std.unwrap_or(0.0), 1.0)),
                    learned_denoise: s.learned_denoise,
                    max_redraws: 10,
                    jacobi: None,
                    ..SampleOptions::default()
                };
                let rep = measure(
                    &model,
                    &opts,
                    real,
                    classifier,
                    decoder.as_ref().or(vae.as_ref()),
                )?;
                log(format!(
                    "{} (seed {seed}) [{}]: val bpd {}, FD {:.3}",
                    v.name,
                    s.name,
                    summary
                        .val_bpd_ema
                        .or(summary.val_bpd)
                        .map_or("-".into(), |b| format!("{b:.4}")),
                    rep.fd
                ));
                mine.push(Row {
                    variant: v.name.clone(),
                    seed,
                    sampling: s.name.clone(),
                    params: tarflow_flows::params::count_params(&cfg.model),
                    val_bpd: summary.val_bpd_ema.or(summary.val_bpd),
                    fd: rep.fd,
                    train_s: summary.elapsed_s,
                    sample_s_per_image: rep.sample_s_per_image,
                    non_finite: rep.non_finite,
                    grid: format!("grids/{grid_name}"),
                });
            }
            let json = serde_json::to_vec_pretty(&mine).map_err(|err| TrainError::Run {
                path: cached.clone(),
                msg: err.to_string(),
            })?;
            tarflow_flows::checkpoint::write_atomic(&cached, &json)?;
            curves.push((format!("{} s{seed}", v.name), loss_curve(&run_dir)));
            rows.extend(mine);
            log(format!("classifier: {}", classifier.name()));
        }
    }
    let intro = format!(
        "# {}\n\nBase config `{}`, overrides `{}`, seeds {:?}, FD on {} generated images against the held-out split \
         in the features of a small classifier trained on the same data (not Inception FID).",
        e.name,
        e.base,
        e.set.join(" "),
        e.seeds,
        e.fd_samples
    );
    write_results(&intro, &rows, &curves, results_dir)?;
    Ok(rows)
}

/// Where an experiment's runs and results go: `runs/experiments/NAME` and
/// `experiments/results/NAME` under `root`.
pub fn dirs(root: &Path, name: &str) -> (PathBuf, PathBuf) {
    (
        root.join("runs").join("experiments").join(slug(name)),
        root.join("experiments").join("results").join(slug(name)),
    )
}
