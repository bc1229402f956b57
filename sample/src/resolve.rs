//! Finds the weights a user means by `--checkpoint`: a checkpoint file, a checkpoint folder
//! (`checkpoints/step-…/`) or a whole run directory (its `latest`), EMA weights by default.

use crate::error::{Result, SampleError};
use candle_core::Device;
use std::path::{Path, PathBuf};
use tarflow_flows::rundir::{self, run_of, RunLayout};
use tarflow_flows::Checkpoint;

/// Weights ready to use, with what is known of how they were trained.
#[derive(Debug)]
pub struct Resolved {
    /// The weights.
    pub checkpoint: Checkpoint,
    /// The file they came from.
    pub path: PathBuf,
    /// Whether these are the EMA weights of a run.
    pub ema: bool,
    /// σ of the Gaussian training noise, read from the run's `config.toml` when there is one.
    pub train_noise_std: Option<f64>,
    /// A latent run's autoencoder (`[data] vae` of its `config.toml`).
    pub autoencoder: Option<PathBuf>,
}

/// Resolves `path` (file, checkpoint folder or run directory); `prefer_ema` picks
/// `ema.safetensors` where a checkpoint folder has one.
pub fn resolve(path: &Path, prefer_ema: bool, device: &Device) -> Result<Resolved> {
    if !path.exists() {
        return Err(SampleError::file(path, "no such file or directory"));
    }
    let (dir, run) = if path.is_file() {
        let ck = Checkpoint::load(path, device)?;
        // A file inside runs/NAME/checkpoints/step-…/ still knows its run; a quantised file
        // carries σ in its metadata.
        let quant_noise = ck.quant.as_ref().and_then(|q| q.train_noise_std);
        return Ok(Resolved {
            ema: path.file_name().is_some_and(|n| n == rundir::EMA),
            train_noise_std: quant_noise.or_else(|| run_of(path).and_then(|r| r.training_noise())),
            autoencoder: run_of(path).and_then(|r| r.autoencoder()),
            checkpoint: ck,
            path: path.into(),
        });
    } else if let Some(dir) = RunLayout::new(path).latest()? {
        (dir, Some(RunLayout::new(path)))
    } else if path.join(rundir::MODEL).is_file() {
        let run = run_of(&path.join(rundir::MODEL));
        (path.to_path_buf(), run)
    } else {
        return Err(SampleError::file(
            path,
            "not a checkpoint: expected a .safetensors or quantised .gguf file, a run directory (with `latest`) \
             or a checkpoint folder (with model.safetensors)",
        ));
    };
    let ema_path = dir.join(rundir::EMA);
    let (file, ema) = if prefer_ema && ema_path.is_file() {
        (ema_path, true)
    } else {
        (dir.join(rundir::MODEL), false)
    };
    Ok(Resolved {
        checkpoint: Checkpoint::load(&file, device)?,
        path: file,
        ema,
        train_noise_std: run.as_ref().and_then(|r| r.training_noise()),
        autoencoder: run.and_then(|r| r.autoencoder()),
    })
}
