//! The layout of a training run directory, owned here once: `config.toml`, `metrics.jsonl`,
//! `plots/`, `samples/`, `checkpoints/step-XXXXXXX/{model,ema,optimizer}.safetensors +
//! state.json`, and `latest` naming the newest checkpoint. Training writes it
//! (`tarflow_train::checkpoints`), everything that loads a model reads it through this module.

use crate::error::{FlowError, Result};
use std::path::{Path, PathBuf};

/// The run's training config.
pub const CONFIG: &str = "config.toml";
/// The trained weights of a checkpoint.
pub const MODEL: &str = "model.safetensors";
/// The averaged (EMA) weights of a checkpoint.
pub const EMA: &str = "ema.safetensors";
/// The file naming the newest checkpoint folder.
pub const LATEST: &str = "latest";
/// σ of the Gaussian training noise when a config does not set `data.noise_std`.
pub const DEFAULT_NOISE_STD: f64 = 0.05;

/// Where a run keeps its files.
#[derive(Debug, Clone)]
pub struct RunLayout {
    /// The run's root folder.
    pub root: PathBuf,
}

impl RunLayout {
    /// The run directory at `root` (nothing is created).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    /// `config.toml`.
    pub fn config_path(&self) -> PathBuf {
        self.root.join(CONFIG)
    }
    /// `metrics.jsonl`.
    pub fn metrics_path(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }
    /// `plots/`.
    pub fn plots(&self) -> PathBuf {
        self.root.join("plots")
    }
    /// `samples/`.
    pub fn samples(&self) -> PathBuf {
        self.root.join("samples")
    }
    /// `checkpoints/`.
    pub fn checkpoints(&self) -> PathBuf {
        self.root.join("checkpoints")
    }
    /// `latest`.
    pub fn latest_path(&self) -> PathBuf {
        self.root.join(LATEST)
    }

    /// The folder of the checkpoint at `step`.
    pub fn step_dir(&self, step: u64) -> PathBuf {
        self.checkpoints().join(format!("step-{step:07}"))
    }

    /// The folder `latest` points to; `None` when the run has no checkpoint yet.
    pub fn latest(&self) -> Result<Option<PathBuf>> {
        let p = self.latest_path();
        match std::fs::read_to_string(&p) {
            Ok(s) => {
                let name = s.trim();
                if !name.starts_with("step-") || name.contains(['/', '\\']) {
                    return Err(FlowError::checkpoint(
                        p,
                        format!("holds {name:?}, expected a checkpoint name like step-0001000"),
                    ));
                }
                Ok(Some(self.checkpoints().join(name)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(FlowError::Io { path: p, source }),
        }
    }

    /// σ of the run's Gaussian training noise (`[data] noise`, `noise_std` of `config.toml`);
    /// `None` without a config or with another noise kind.
    pub fn training_noise(&self) -> Option<f64> {
        let text = std::fs::read_to_string(self.config_path()).ok()?;
        let t: toml::Table = toml::from_str(&text).ok()?;
        let data = t.get("data")?.as_table()?;
        let kind = data
            .get("noise")
            .and_then(|v| v.as_str())
            .unwrap_or("gaussian");
        if kind != "gaussian" {
            return None;
        }
        Some(
            data.get("noise_std")
                .and_then(|v| v.as_float().or(v.as_integer().map(|i| i as f64)))
                .unwrap_or(DEFAULT_NOISE_STD),
        )
    }
}

impl RunLayout {
    /// The autoencoder a latent run's data was encoded with (`[data] vae` of `config.toml`,
    /// as written there: relative to where training ran); `None` for a pixel run.
    pub fn autoencoder(&self) -> Option<PathBuf> {
        let text = std::fs::read_to_string(self.config_path()).ok()?;
        let t: toml::Table = toml::from_str(&text).ok()?;
        let vae = t.get("data")?.as_table()?.get("vae")?.as_str()?;
        Some(PathBuf::from(vae))
    }
}

/// The run a checkpoint file belongs to, when it sits in `RUN/checkpoints/step-…/`.
pub fn run_of(file: &Path) -> Option<RunLayout> {
    let run = file.parent()?.parent()?.parent()?;
    run.join(CONFIG).is_file().then(|| RunLayout::new(run))
}
