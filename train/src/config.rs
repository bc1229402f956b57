//! The training config: one TOML file with `[model]`, `[data]`, `[optim]`, `[train]`, `[eval]`
//! and `[output]` sections, every one `deny_unknown_fields`, plus `--set section.key=value`
//! overrides validated exactly like the file.

use crate::error::{Result, TrainError};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use tarflow_datasets::source::SourceKind;
use tarflow_datasets::transform::{Noise, Transform};
use tarflow_flows::ModelConfig;

/// A whole training run's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// The flow (see [`ModelConfig`]).
    pub model: ModelConfig,
    /// Where the images come from and how they are augmented.
    #[serde(default)]
    pub data: DataConfig,
    /// AdamW, schedule, clipping, EMA.
    #[serde(default)]
    pub optim: OptimConfig,
    /// Length of the run, batch, seed, device, logging and checkpoint cadence.
    #[serde(default)]
    pub train: TrainSection,
    /// Validation bits/dim and sample grids.
    #[serde(default)]
    pub eval: EvalConfig,
    /// Where the run directory goes.
    #[serde(default)]
    pub output: OutputConfig,
}

/// Training noise (`data.noise`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NoiseKind {
    /// `x + σ·ε` with σ = `data.noise_std` (TarFlow's generation models).
    #[default]
    Gaussian,
    /// Uniform dequantisation (likelihood models, bits/dim).
    Uniform,
    /// Clean images.
    None,
}

/// `[data]`: source, augmentation and the held-out split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// One of embedded, mnist-idx, cifar10, imagenet-npz, folder, hdf5.
    pub source: SourceKind,
    /// File or folder of the training images (all sources but `embedded`).
    pub path: Option<PathBuf>,
    /// Separate validation images of the same source; otherwise `val_count` are held out.
    pub val_path: Option<PathBuf>,
    /// Images held out of the training set for validation when there is no `val_path`.
    pub val_count: usize,
    /// gaussian, uniform or none.
    pub noise: NoiseKind,
    /// σ of the Gaussian noise on the [-1, 1] scale.
    pub noise_std: f64,
    /// Random horizontal flips (off for digits).
    pub flip: bool,
    /// Probability that a label is dropped (→ −1, the mean class embedding) for guidance.
    pub label_drop: f64,
    /// Skip unreadable image files with a counted warning instead of failing.
    pub skip_bad: bool,
    /// Background threads building batches.
    pub workers: usize,
    /// The autoencoder (a diffusers folder) a `latents` source was encoded with: checked
    /// against the file, it decodes the run's sample grids, and `sample` decodes with it.
    pub vae: Option<PathBuf>,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            source: SourceKind::Embedded,
            path: None,
            val_path: None,
            val_count: 1000,
            noise: NoiseKind::Gaussian,
            noise_std: tarflow_flows::rundir::DEFAULT_NOISE_STD,
            flip: false,
            label_drop: 0.0,
            skip_bad: false,
            workers: 2,
            vae: None,
        }
    }
}

impl DataConfig {
    /// The training transform.
    pub fn transform(&self) -> Transform {
        Transform {
            flip: self.flip,
            noise: match self.noise {
                NoiseKind::Gaussian => Noise::Gaussian(self.noise_std),
                NoiseKind::Uniform => Noise::Uniform,
                NoiseKind::None => Noise::None,
            },
            label_drop: self.label_drop,
        }
    }
}

/// `[optim]`: AdamW, the warm-up + cosine schedule, clipping and EMA.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Learning rate at the start of warm-up and at the end of the cosine.
    pub min_lr: f64,
    /// Warm-up length in optimizer steps (wins over `warmup_epochs`).
    pub warmup_steps: Option<u64>,
    /// Warm-up length in epochs (ml-tarflow: 1).
    pub warmup_epochs: Option<f64>,
    /// Length of the cosine in steps; defaults to the run's length. Set it to keep the schedule
    /// of a longer run when stopping early.
    pub decay_steps: Option<u64>,
    /// AdamW β₁.
    pub beta1: f64,
    /// AdamW β₂.
    pub beta2: f64,
    /// AdamW ε.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Clip the global gradient norm to this value; 0 turns clipping off (as ml-tarflow).
    pub grad_clip: f64,
    /// EMA decay of the weights; 0 turns the EMA off (as ml-tarflow).
    pub ema_decay: f64,
    /// Weight of STARFlow's latent-norm penalty on intermediate block outputs (1e-4 in
    /// STARFlow); 0 turns it off.
    pub latent_norm: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            lr: 1e-4,
            min_lr: 1e-6,
            warmup_steps: None,
            warmup_epochs: Some(1.0),
            decay_steps: None,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 1e-4,
            grad_clip: 0.0,
            ema_decay: 0.0,
            latent_norm: 0.0,
        }
    }
}

/// `[train]`: run length, batch, seed, device and cadence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    /// Optimizer steps of the whole run (wins over `epochs`).
    pub max_steps: Option<u64>,
    /// Run length in epochs of the training split.
    pub epochs: Option<f64>,
    /// Images per optimizer step (split into `grad_accum` micro-batches).
    pub batch_size: usize,
    /// Micro-batches whose gradients are summed per step.
    pub grad_accum: usize,
    /// On the CPU, each micro-batch is cut into this many equal parts whose passes run at the
    /// same time (1: off). The numbers depend on this value, not on the machine.
    pub cpu_streams: usize,
    /// Seed of the initial weights, the data order, the noise and the sample grids.
    pub seed: u64,
    /// cpu, cuda, metal or auto.
    pub device: String,
    /// f32, bf16 or auto (bf16 on CUDA/Metal, f32 on CPU).
    pub dtype: String,
    /// Log (progress line and `metrics.jsonl`) every this many steps.
    pub log_every: u64,
    /// Write a checkpoint every this many steps (and always at the end).
    pub checkpoint_every: u64,
    /// Checkpoints kept on disk (the newest ones); 0 keeps all.
    pub keep_checkpoints: usize,
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            max_steps: None,
            epochs: None,
            batch_size: 64,
            grad_accum: 1,
            cpu_streams: 2,
            seed: 0,
            device: "cpu".into(),
            dtype: "auto".into(),
            log_every: 10,
            checkpoint_every: 1000,
            keep_checkpoints: 3,
        }
    }
}

/// `[eval]`: held-out bits/dim and sample grids.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Validation bits/dim every this many steps (and at the end); 0 only at the end.
    pub every: u64,
    /// At most this many validation batches per evaluation; 0 for the whole split.
    pub batches: usize,
    /// A sample grid every this many steps (and at the end); 0 only at the end.
    pub sample_every: u64,
    /// Images in a sample grid.
    pub num_samples: usize,
    /// Sampling temperature of the grids.
    pub temperature: f64,
    /// Classifier-free guidance weight of the grids (conditional models).
    pub guidance: f64,
    /// Remove the training noise from grid samples by one score step (`x + σ²∇log p`);
    /// only with `data.noise = "gaussian"`.
    pub denoise: bool,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            every: 1000,
            batches: 8,
            sample_every: 1000,
            num_samples: 64,
            temperature: 1.0,
            guidance: 0.0,
            denoise: true,
        }
    }
}

/// `[output]`: the run directory is `dir/name`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutputConfig {
    /// Parent of run directories.
    pub dir: PathBuf,
    /// Run name; defaults to the config file's stem.
    pub name: Option<String>,
}

impl Default for OutputConfig {
    fn default() -> Self {
        Self {
            dir: "runs".into(),
            name: None,
        }
    }
}

impl TrainConfig {
    /// Parses TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str, sets: &[String]) -> Result<Self> {
        // Parse the file alone first so its errors carry line and column.
        toml::from_str::<TrainConfig>(text)
            .map_err(|e| TrainError::config(origin, e.to_string()))?;
        let table = toml::from_str::<toml::Table>(text)
            .map_err(|e| TrainError::config(origin, e.to_string()))?;
        let table = crate::overrides::apply_overrides::<Self>(table, sets)?;
        let cfg: TrainConfig = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| TrainError::config(origin, e.message().to_string()))?;
        cfg.validate(origin)?;
        Ok(cfg)
    }

    /// Reads a config file (a bare name is looked up in `experiments/`) and applies `sets`;
    /// `output.name` defaults to the file's stem.
    pub fn load(name: &str, sets: &[String]) -> Result<Self> {
        let path = crate::overrides::resolve(name)?;
        let text = std::fs::read_to_string(&path).map_err(|e| TrainError::io(&path, e))?;
        let mut cfg = Self::from_toml(&text, &path.display().to_string(), sets)?;
        if cfg.output.name.is_none() {
            cfg.output.name = path.file_stem().map(|s| s.to_string_lossy().into_owned());
        }
        Ok(cfg)
    }

    /// The config as TOML (written into the run directory).
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self).map_err(|e| TrainError::config("<run>", e.to_string()))
    }

    /// Checks values serde cannot: ranges and combinations; errors name the key.
    pub fn validate(&self, origin: &str) -> Result<()> {
        let bad = |key: &str, msg: String| Err(TrainError::config(origin, format!("{key}: {msg}")));
        if let Err(e) = self.model.validate() {
            return Err(TrainError::config(origin, format!("[model] {e}")));
        }
        let (o, t, d, e) = (&self.optim, &self.train, &self.data, &self.eval);
        if !(o.lr.is_finite() && o.lr > 0.0) {
            return bad("optim.lr", format!("{} must be a positive number", o.lr));
        }
        if !(o.min_lr.is_finite() && (0.0..=o.lr).contains(&o.min_lr)) {
            return bad(
                "optim.min_lr",
                format!("{} must be in [0, optim.lr]", o.min_lr),
            );
        }
        for (k, v) in [("optim.beta1", o.beta1), ("optim.beta2", o.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return bad(k, format!("{v} must be in [0, 1)"));
            }
        }
        if !(0.0..1.0).contains(&o.ema_decay) {
            return bad(
                "optim.ema_decay",
                format!("{} must be in [0, 1) (0 = off)", o.ema_decay),
            );
        }
        for (k, v) in [
            ("optim.eps", o.eps),
            ("optim.weight_decay", o.weight_decay),
            ("optim.grad_clip", o.grad_clip),
            ("optim.latent_norm", o.latent_norm),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(k, format!("{v} must be ≥ 0"));
            }
        }
        if let Some(w) = o.warmup_epochs {
            if !(w.is_finite() && w >= 0.0) {
                return bad("optim.warmup_epochs", format!("{w} must be ≥ 0"));
            }
        }
        match (t.max_steps, t.epochs) {
            (Some(0), _) => return bad("train.max_steps", "must be ≥ 1".into()),
            (None, None) => {
                return bad(
                    "train.max_steps",
                    "missing: set train.max_steps or train.epochs".into(),
                )
            }
            (None, Some(ep)) if !(ep.is_finite() && ep > 0.0) => {
                return bad("train.epochs", format!("{ep} must be > 0"))
            }
            _ => {}
        }
        for (k, v) in [
            ("train.batch_size", t.batch_size as u64),
            ("train.grad_accum", t.grad_accum as u64),
            ("train.cpu_streams", t.cpu_streams as u64),
            ("train.log_every", t.log_every),
            ("train.checkpoint_every", t.checkpoint_every),
            ("data.workers", d.workers as u64),
            ("eval.num_samples", e.num_samples as u64),
        ] {
            if v == 0 {
                return bad(k, "must be ≥ 1".into());
            }
        }
        if t.batch_size % t.grad_accum != 0 {
            return bad(
                "train.grad_accum",
                format!(
                    "{} must divide train.batch_size = {}",
                    t.grad_accum, t.batch_size
                ),
            );
        }
        if !["cpu", "cuda", "metal", "auto"].contains(&t.device.as_str()) {
            return bad(
                "train.device",
                format!("{:?}: expected cpu, cuda, metal or auto", t.device),
            );
        }
        if !["f32", "bf16", "auto"].contains(&t.dtype.as_str()) {
            return bad(
                "train.dtype",
                format!("{:?}: expected f32, bf16 or auto", t.dtype),
            );
        }
        if d.source != SourceKind::Embedded && d.path.is_none() {
            return bad(
                "data.path",
                format!("missing: data.source = {:?} needs a path", d.source.name()),
            );
        }
        if let Some((key, msg)) = crate::data::latents_problem(d) {
            return bad(key, msg);
        }
        if !(d.noise_std.is_finite() && d.noise_std >= 0.0) {
            return bad("data.noise_std", format!("{} must be ≥ 0", d.noise_std));
        }
        if self.model.denoiser_layers > 0 && !(d.noise == NoiseKind::Gaussian && d.noise_std > 0.0)
        {
            return bad(
                "model.denoiser_layers",
                "the self-denoiser learns to remove the training noise: it needs data.noise = \"gaussian\" with data.noise_std > 0".to_string(),
            );
        }
        if !(0.0..=1.0).contains(&d.label_drop) {
            return bad(
                "data.label_drop",
                format!("{} must be in [0, 1]", d.label_drop),
            );
        }
        if !(e.temperature.is_finite() && e.temperature > 0.0) {
            return bad("eval.temperature", format!("{} must be > 0", e.temperature));
        }
        if let Some(n) = &self.output.name {
            if n.is_empty() || n.contains(['/', '\\']) || n == "." || n == ".." {
                return bad(
                    "output.name",
                    format!("{n:?} must be a plain directory name"),
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = "[model]\nin_channels = 1\nimg_size = 28\npatch_size = 4\nchannels = 64\n\
                       num_blocks = 2\nlayers_per_block = 1\n[train]\nmax_steps = 10\n";

    fn err(text: &str, sets: &[&str]) -> String {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        match TrainConfig::from_toml(text, "x.toml", &sets) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = TrainConfig::from_toml(MIN, "x.toml", &[]).unwrap();
        assert_eq!(c.train.max_steps, Some(10));
        assert_eq!(c.data.source, SourceKind::Embedded);
        assert_eq!(c.optim.beta2, 0.95);
        // Round trip through the run directory's copy.
        let again = TrainConfig::from_toml(&c.to_toml().unwrap(), "y", &[]).unwrap();
        assert_eq!(c, again);
    }

    #[test]
    fn unknown_keys_are_named_with_the_allowed_ones() {
        let e = err(&format!("{MIN}max_step = 3\n"), &[]);
        assert!(e.contains("max_step") && e.contains("max_steps"), "{e}");
        let e = err(MIN, &["train.max_stepz=3"]);
        assert!(
            e.contains("--set train.max_stepz=3") && e.contains("max_steps"),
            "{e}"
        );
        let e = err(MIN, &["bogus.key=1"]);
        assert!(e.contains("bogus") && e.contains("optim"), "{e}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = err(MIN, &["data.source=mnist"]);
        assert!(e.contains("mnist") && e.contains("mnist-idx"), "{e}");
        let e = err(MIN, &["optim.lr=-1"]);
        assert!(e.contains("optim.lr"), "{e}");
        let e = err(MIN, &["train.max_steps=ten"]);
        assert!(e.contains("max_steps"), "{e}");
        let e = err(&MIN.replace("max_steps = 10", ""), &[]);
        assert!(e.contains("train.max_steps"), "{e}");
        let e = err(&MIN.replace("channels = 64", "channels = 60"), &[]);
        assert!(e.contains("[model]") && e.contains("channels"), "{e}");
        let e = err(&MIN.replace("in_channels = 1\n", ""), &[]);
        assert!(e.contains("in_channels"), "{e}");
        let e = err(MIN, &["data.source=folder"]);
        assert!(e.contains("data.path"), "{e}");
    }

    #[test]
    fn overrides_replace_values() {
        let sets = vec![
            "train.max_steps=7".to_string(),
            "output.dir=/tmp/x".to_string(),
        ];
        let c = TrainConfig::from_toml(MIN, "x.toml", &sets).unwrap();
        assert_eq!(c.train.max_steps, Some(7));
        assert_eq!(c.output.dir, PathBuf::from("/tmp/x"));
    }
}
