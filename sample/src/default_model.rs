//! The model that answers when no `--checkpoint` is given: the likelihood model of
//! `experiments/tarflow-mnist-bpd.toml` (class-conditional TarFlow on MNIST, uniform
//! dequantisation, f32 EMA weights), embedded in the binary so that it works from anywhere.

use crate::error::Result;
use crate::resolve::Resolved;
use candle_core::Device;
use std::path::{Path, PathBuf};
use tarflow_flows::Checkpoint;

/// The run the weights come from (`models/mnist-bpd/` in the repository).
pub const NAME: &str = "tarflow-mnist-bpd";

/// The weights, as `models/mnist-bpd/model.safetensors`.
static WEIGHTS: &[u8] = include_bytes!("../../models/mnist-bpd/model.safetensors");

/// Bytes of the embedded safetensors file (what the model takes on disk).
pub fn file_size() -> usize {
    WEIGHTS.len()
}

/// How the weights are named in messages and errors.
pub fn label() -> PathBuf {
    PathBuf::from(format!("<embedded {NAME}>"))
}

/// Loads the embedded model on `device`.
pub fn load(device: &Device) -> Result<Resolved> {
    let path = label();
    Ok(Resolved {
        checkpoint: Checkpoint::from_bytes(WEIGHTS, &path, device)?,
        path,
        ema: true,
        // Trained with uniform dequantisation: no Gaussian noise to denoise.
        train_noise_std: None,
        autoencoder: None,
    })
}

/// Resolves `--checkpoint` when given, the embedded model otherwise; says on stderr which
/// model answered.
pub fn resolve_or_default(
    checkpoint: Option<&Path>,
    prefer_ema: bool,
    device: &Device,
) -> Result<Resolved> {
    let r = match checkpoint {
        Some(p) => crate::resolve::resolve(p, prefer_ema, device)?,
        None => load(device)?,
    };
    let what = if checkpoint.is_none() {
        format!(
            "the default model {NAME} (embedded; {} on MNIST, {} parameters; pass --checkpoint for another)",
            describe_classes(&r),
            r.checkpoint.num_params()
        )
    } else {
        format!(
            "{}{}",
            r.path.display(),
            if r.ema { " (EMA weights)" } else { "" }
        )
    };
    eprintln!("model: {what}");
    Ok(r)
}

fn describe_classes(r: &Resolved) -> String {
    match r.checkpoint.config.num_classes {
        0 => "unconditional".into(),
        k => format!("{k} classes"),
    }
}
