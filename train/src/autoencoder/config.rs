//! `train-ae`'s config: `[model]` (a new autoencoder) or `[finetune]` (a decoder to fine-tune
//! on noisy latents), `[data]`, `[train]`, `[output]`; unknown keys are errors.

use crate::error::{Result, TrainError};
use crate::overrides::apply_overrides;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use tarflow_datasets::source::SourceKind;

/// An autoencoder run's config: `[model]`, `[data]`, `[train]`, `[output]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AeConfig {
    /// The network of a new autoencoder (not with `[finetune]`).
    #[serde(default)]
    pub model: Option<AeModel>,
    /// The images.
    #[serde(default)]
    pub data: AeData,
    /// The optimisation.
    pub train: AeTrain,
    /// Where the run goes.
    #[serde(default)]
    pub output: AeOutput,
    /// Fine-tune an existing autoencoder's decoder on noisy latents instead (ml-starflow's
    /// `finetune_decoder.py`): decoding then removes the flow's training noise.
    #[serde(default)]
    pub finetune: Option<AeFinetune>,
}

/// `[finetune]`: the decoder of `from` learns to decode `z + σ·ε` (σ = `noise_std` in the
/// scaled latent's units, the latent flow's `data.noise_std`) to the clean image; the encoder
/// and the scaling factor stay as they are.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AeFinetune {
    /// The autoencoder folder to start from.
    pub from: PathBuf,
    /// σ of the latent noise (STARFlow: 0.3).
    pub noise_std: f64,
}

/// `[model]`: diffusers' `AutoencoderKL` arguments.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AeModel {
    /// Widths of the levels; each level after the first halves the side (3 levels: 4×).
    pub block_out_channels: Vec<usize>,
    /// ResNet blocks per level.
    #[serde(default = "one")]
    pub layers_per_block: usize,
    /// Channels of the latent.
    #[serde(default = "four")]
    pub latent_channels: usize,
    /// GroupNorm groups (every width a multiple of it).
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
}

/// `[data]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AeData {
    /// The kinds of `tarflow data inspect`.
    pub source: SourceKind,
    /// File or folder (all sources but `embedded`).
    pub path: Option<PathBuf>,
    /// Images held out for the reported PSNR (a seeded draw), when there is no `val_path`.
    pub val_count: usize,
    /// Separate held-out images of the same source kind (all of `path` then trains).
    #[serde(default)]
    pub val_path: Option<PathBuf>,
}

impl Default for AeData {
    fn default() -> Self {
        AeData {
            source: SourceKind::Embedded,
            path: None,
            val_count: 1000,
            val_path: None,
        }
    }
}

/// `[train]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AeTrain {
    /// Optimiser steps.
    pub steps: u64,
    /// Images per step.
    #[serde(default = "thirty_two_u")]
    pub batch_size: usize,
    /// Peak learning rate of the warm-up + cosine schedule.
    #[serde(default = "lr")]
    pub lr: f64,
    /// β of the KL term.
    #[serde(default = "kl_weight")]
    pub kl_weight: f64,
    /// Initial weights, data order, held-out draw and latent noise.
    #[serde(default)]
    pub seed: u64,
    /// Steps between log lines.
    #[serde(default = "fifty")]
    pub log_every: u64,
}

/// `[output]`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AeOutput {
    /// Parent folder of the run (default `runs`).
    pub dir: Option<PathBuf>,
    /// Run name (default: the config's file stem).
    pub name: Option<String>,
}

fn one() -> usize {
    1
}
fn four() -> usize {
    4
}
fn thirty_two() -> usize {
    32
}
fn thirty_two_u() -> usize {
    32
}
fn lr() -> f64 {
    1e-3
}
fn kl_weight() -> f64 {
    1e-4
}
fn fifty() -> u64 {
    50
}

impl AeConfig {
    /// Parses `text` (from `origin`) with `--set` overrides; unknown keys are errors.
    pub fn from_toml(text: &str, origin: &str, sets: &[String]) -> Result<Self> {
        let table: toml::Table = toml::from_str(text)
            .map_err(|e| TrainError::config(origin, e.message().to_string()))?;
        let table = apply_overrides::<AeConfig>(table, sets)?;
        let cfg: AeConfig = toml::Value::Table(table)
            .try_into()
            .map_err(|e| TrainError::config(origin, e.message().to_string()))?;
        if cfg.train.steps == 0 || cfg.train.batch_size == 0 {
            return Err(TrainError::config(
                origin,
                "train.steps and train.batch_size must be positive",
            ));
        }
        if cfg.data.val_path.is_some() && cfg.data.source == SourceKind::Embedded {
            return Err(TrainError::config(
                "data.val_path",
                "the embedded digits come as one set: hold images out with data.val_count",
            ));
        }
        match (&cfg.model, &cfg.finetune) {
            (None, None) => Err(TrainError::config(
                "model",
                format!("{origin}: give [model] for a new autoencoder, or [finetune] to fine-tune one's decoder"),
            )),
            (Some(_), Some(_)) => Err(TrainError::config(
                "model",
                format!("{origin}: [finetune] takes its network from finetune.from; leave [model] out"),
            )),
            (None, Some(f)) if !(f.noise_std.is_finite() && f.noise_std > 0.0) => Err(
                TrainError::config("finetune.noise_std", format!("{} must be > 0", f.noise_std)),
            ),
            _ => Ok(cfg),
        }
    }
}
