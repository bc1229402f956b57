//! Finds the weights a user means by `--checkpoint`: a checkpoint file, a checkpoint folder
//! (`checkpoints/step-…/`) or a whole run directory (its `latest`), EMA weights by default.

use crate::error::{Result, SampleError};
use candle_core::Device;
use std::path::{Path, PathBuf};
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
}

/// Reads `data.noise`/`data.noise_std` of a run's `config.toml` (None unless Gaussian).
fn train_noise(run: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(run.join("config.toml")).ok()?;
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
            .unwrap_or(0.05),
    )
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
        let run = path.parent().and_then(Path::parent).and_then(Path::parent);
        let quant_noise = ck.quant.as_ref().and_then(|q| q.train_noise_std);
        return Ok(Resolved {
            ema: path.file_name().is_some_and(|n| n == "ema.safetensors"),
            train_noise_std: quant_noise.or_else(|| run.and_then(train_noise)),
            checkpoint: ck,
            path: path.into(),
        });
    } else if path.join("latest").is_file() {
        let name = std::fs::read_to_string(path.join("latest"))
            .map_err(|e| SampleError::file(path.join("latest"), e.to_string()))?;
        let name = name.trim();
        if !name.starts_with("step-") || name.contains(['/', '\\']) {
            return Err(SampleError::file(
                path.join("latest"),
                format!("holds {name:?}, expected a checkpoint name like step-0001000"),
            ));
        }
        (
            path.join("checkpoints").join(name),
            Some(path.to_path_buf()),
        )
    } else if path.join("model.safetensors").is_file() {
        let run = path.parent().and_then(Path::parent).map(Path::to_path_buf);
        (path.to_path_buf(), run)
    } else {
        return Err(SampleError::file(
            path,
            "not a checkpoint: expected a .safetensors or quantised .gguf file, a run directory (with `latest`) \
             or a checkpoint folder (with model.safetensors)",
        ));
    };
    let ema_path = dir.join("ema.safetensors");
    let (file, ema) = if prefer_ema && ema_path.is_file() {
        (ema_path, true)
    } else {
        (dir.join("model.safetensors"), false)
    };
    Ok(Resolved {
        checkpoint: Checkpoint::load(&file, device)?,
        path: file,
        ema,
        train_noise_std: run.as_deref().and_then(train_noise),
    })
}
