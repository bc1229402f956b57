//! `tarflow train-ae`: a small KL autoencoder (SD-VAE's architecture at any width) trained on
//! reconstruction plus a KL term, and saved as a diffusers folder that
//! [`tarflow_flows::autoencoder::Autoencoder::load`] (and diffusers) read back.
//!
//! The loss per image value is `‖x̂ − x‖² + β·KL(q(z|x) ‖ N(0, I))`, the KL summed over the
//! latent and divided by the image's values: β trades reconstruction for a latent the flow can
//! model. SD-VAE adds a perceptual and an adversarial term; at CPU scale they are left out.

use crate::error::{Result, TrainError};
use crate::overrides::apply_overrides;
use crate::schedule::WarmupCosine;
use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use tarflow_datasets::folder::FolderOptions;
use tarflow_datasets::source::{self, SourceKind};
use tarflow_datasets::ImageSet;
use tarflow_flows::autoencoder::{kl_sum, Autoencoder, AutoencoderConfig};

/// An autoencoder run's config: `[model]`, `[data]`, `[train]`, `[output]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AeConfig {
    /// The network.
    pub model: AeModel,
    /// The images.
    #[serde(default)]
    pub data: AeData,
    /// The optimisation.
    pub train: AeTrain,
    /// Where the run goes.
    #[serde(default)]
    pub output: AeOutput,
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
#[serde(deny_unknown_fields)]
pub struct AeData {
    /// The kinds of `tarflow data inspect`.
    pub source: SourceKind,
    /// File or folder (all sources but `embedded`).
    pub path: Option<PathBuf>,
    /// Images held out for the reported PSNR (a seeded draw).
    pub val_count: usize,
}

impl Default for AeData {
    fn default() -> Self {
        AeData {
            source: SourceKind::Embedded,
            path: None,
            val_count: 1000,
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
        Ok(cfg)
    }
}

/// What a finished run measured.
#[derive(Debug, Clone, Serialize)]
pub struct AeSummary {
    /// Steps taken.
    pub steps: u64,
    /// PSNR (dB, images in [−1, 1] as [0, 1]) of the held-out images decoded from their mean.
    pub val_psnr_db: f64,
    /// The same on as many training images.
    pub train_psnr_db: f64,
    /// Mean KL per image (nats) on the held-out images.
    pub val_kl_nats: f64,
    /// 1 / std of the held-out latent means: diffusers' `scaling_factor`.
    pub scaling_factor: f64,
    /// Held-out images.
    pub val_count: usize,
    /// SHA-256 of the held-out images.
    pub val_checksum: String,
    /// Wall time of the training steps.
    pub train_seconds: f64,
}

/// Images `idx` of `set` as (N, C, H, W) in [−1, 1].
fn batch(set: &ImageSet, idx: &[usize], device: &Device) -> Result<Tensor> {
    let n = set.image_len();
    let mut v = Vec::with_capacity(idx.len() * n);
    for &i in idx {
        v.extend(
            set.pixels[i * n..(i + 1) * n]
                .iter()
                .map(|&k| tarflow_datasets::transform::to_unit(k)),
        );
    }
    let shape = (idx.len(), set.channels, set.height, set.width);
    Ok(tarflow_flows::device::upload(
        &Tensor::from_vec(v, shape, &Device::Cpu)?,
        device,
        DType::F32,
    )?)
}

/// PSNR in dB of reconstructions of `set` (in batches, from the posterior mean), its mean KL
/// per image, and the latent means' std.
fn measure(vae: &Autoencoder, set: &ImageSet, device: &Device) -> Result<(f64, f64, f64)> {
    let (mut se, mut kl, mut count) = (0f64, 0f64, 0usize);
    let (mut s1, mut s2, mut nz) = (0f64, 0f64, 0usize);
    for start in (0..set.len()).step_by(64) {
        let idx: Vec<usize> = (start..(start + 64).min(set.len())).collect();
        let x = batch(set, &idx, device)?;
        let (mean, logvar) = vae.posterior(&x)?;
        let xr = vae.decode(&mean)?.clamp(-1f32, 1f32)?;
        se += f64::from((xr - &x)?.sqr()?.sum_all()?.to_scalar::<f32>()?);
        count += x.elem_count();
        kl += f64::from(kl_sum(&mean, &logvar)?.to_scalar::<f32>()?);
        s1 += f64::from(mean.sum_all()?.to_scalar::<f32>()?);
        s2 += f64::from(mean.sqr()?.sum_all()?.to_scalar::<f32>()?);
        nz += mean.elem_count();
    }
    // Values in [−1, 1] as [0, 1]: the squared error divides by 4.
    let mse01 = se / count.max(1) as f64 / 4.0;
    let m = s1 / nz.max(1) as f64;
    let std = (s2 / nz.max(1) as f64 - m * m).max(0.0).sqrt();
    Ok((
        10.0 * (1.0 / mse01.max(1e-12)).log10(),
        kl / set.len().max(1) as f64,
        std,
    ))
}

/// Trains the autoencoder of `cfg` (named `name`) and writes `DIR/NAME/{vae/,metrics.jsonl,
/// summary.json,config.toml}`; `log` receives the progress lines.
pub fn train_autoencoder(
    cfg: &AeConfig,
    name: &str,
    device: &Device,
    mut log: impl FnMut(&str),
) -> Result<(PathBuf, AeSummary)> {
    let t = &cfg.train;
    let opts = FolderOptions {
        channels: 3,
        ..Default::default()
    };
    let loaded = source::load(cfg.data.source, cfg.data.path.as_deref(), &opts)?;
    let all = loaded.set;
    let vc = cfg.data.val_count.min(all.len() / 2);
    let mut rng = tarflow_flows::rng::seeded(t.seed);
    let order = {
        use rand::seq::SliceRandom;
        let mut o: Vec<usize> = (0..all.len()).collect();
        o.shuffle(&mut rng);
        o
    };
    let (val, train) = (all.subset(&order[..vc]), all.subset(&order[vc..]));
    if train.len() < t.batch_size {
        return Err(TrainError::config(
            "train.batch_size",
            format!("{} training images cannot fill a batch", train.len()),
        ));
    }
    let m = &cfg.model;
    let config = AutoencoderConfig {
        in_channels: all.channels,
        out_channels: all.channels,
        block_out_channels: m.block_out_channels.clone(),
        layers_per_block: m.layers_per_block,
        latent_channels: m.latent_channels,
        norm_num_groups: m.norm_num_groups,
        scaling_factor: 1.0,
        use_quant_conv: true,
        use_post_quant_conv: true,
    };
    config
        .check()
        .map_err(|e| TrainError::config("model", e.to_string()))?;
    let f = config.downsample();
    if all.height % f != 0 || all.width % f != 0 {
        return Err(TrainError::config(
            "model.block_out_channels",
            format!(
                "{} levels downsample {f}×, which does not divide {}×{} images",
                m.block_out_channels.len(),
                all.height,
                all.width
            ),
        ));
    }
    let (vae, varmap) = Autoencoder::init(config, t.seed, device)?;
    let params = ParamsAdamW {
        lr: t.lr,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    let mut opt = AdamW::new(varmap.all_vars(), params)?;
    let sched = WarmupCosine {
        lr: t.lr,
        start_lr: t.lr * 0.01,
        min_lr: t.lr * 0.01,
        warmup_steps: (t.steps / 20).max(1),
        total_steps: t.steps,
    };
    let root = cfg
        .output
        .dir
        .clone()
        .unwrap_or_else(|| "runs".into())
        .join(name);
    let io = |p: &Path| {
        let path = p.to_path_buf();
        move |source| TrainError::Io { path, source }
    };
    std::fs::create_dir_all(&root).map_err(io(&root))?;
    let text = toml::to_string(cfg).map_err(|e| TrainError::config("config", e.to_string()))?;
    tarflow_flows::checkpoint::write_atomic(&root.join("config.toml"), text.as_bytes())?;
    let metrics_path = root.join("metrics.jsonl");
    let mut metrics = std::fs::File::create(&metrics_path).map_err(io(&metrics_path))?;
    let (h, w) = (all.height, all.width);
    let lat = (m.latent_channels, h / f, w / f);
    let start = std::time::Instant::now();
    let mut cursor = train.len();
    let mut perm: Vec<usize> = Vec::new();
    for step in 1..=t.steps {
        // Epochs of a seeded permutation.
        let mut idx = Vec::with_capacity(t.batch_size);
        while idx.len() < t.batch_size {
            if cursor >= perm.len() {
                use rand::seq::SliceRandom;
                perm = (0..train.len()).collect();
                perm.shuffle(&mut rng);
                cursor = 0;
            }
            idx.push(perm[cursor]);
            cursor += 1;
        }
        let x = batch(&train, &idx, device)?;
        let eps = tarflow_flows::rng::randn(
            &mut rng,
            (idx.len(), lat.0, lat.1, lat.2),
            1.0,
            &Device::Cpu,
        )?;
        let eps = tarflow_flows::device::upload(&eps, device, DType::F32)?;
        let (rec, kl) = vae.losses(&x, &eps)?;
        let loss = (&rec + (&kl * t.kl_weight)?)?;
        let lv = f64::from(loss.to_scalar::<f32>()?);
        if !lv.is_finite() {
            return Err(TrainError::Run {
                path: root.clone(),
                msg: format!("the loss is {lv} at step {step}: lower train.lr"),
            });
        }
        let lr = sched.at(step - 1);
        opt.set_learning_rate(lr);
        opt.backward_step(&loss)?;
        if step % t.log_every == 0 || step == t.steps {
            let el = start.elapsed().as_secs_f64();
            let (r, k) = (
                f64::from(rec.to_scalar::<f32>()?),
                f64::from(kl.to_scalar::<f32>()?),
            );
            let speed = (step as f64 * t.batch_size as f64) / el.max(1e-9);
            let line = serde_json::json!({
                "step": step, "loss": lv, "rec_mse": r, "kl": k,
                "psnr_db": 10.0 * (4.0 / r.max(1e-12)).log10(), "lr": lr,
                "images_per_s": speed, "elapsed_s": el,
            });
            writeln!(metrics, "{line}").map_err(io(&metrics_path))?;
            log(&format!(
                "step {step}/{}  mse {r:.5}  kl {k:.4}  {speed:.1} images/s",
                t.steps
            ));
        }
    }
    let train_seconds = start.elapsed().as_secs_f64();
    let (val_psnr, val_kl, std) = measure(&vae, &val, device)?;
    let probe = train.subset(&(0..vc.min(train.len())).collect::<Vec<_>>());
    let (train_psnr, _, _) = measure(&vae, &probe, device)?;
    let mut config = vae.config.clone();
    config.scaling_factor = 1.0 / std.max(1e-6);
    Autoencoder::save(&config, &varmap, &root.join("vae"))?;
    let summary = AeSummary {
        steps: t.steps,
        val_psnr_db: val_psnr,
        train_psnr_db: train_psnr,
        val_kl_nats: val_kl,
        scaling_factor: config.scaling_factor,
        val_count: val.len(),
        val_checksum: val.checksum(),
        train_seconds,
    };
    let s = serde_json::to_string_pretty(&summary)
        .map_err(|e| TrainError::config("summary", e.to_string()))?;
    tarflow_flows::checkpoint::write_atomic(&root.join("summary.json"), s.as_bytes())?;
    // Held-out images (top rows) over their reconstructions (bottom rows).
    let idx: Vec<usize> = (0..val.len().min(16)).collect();
    let x = batch(&val, &idx, device)?;
    let (mean, _) = vae.encode(&x)?;
    let both = Tensor::cat(&[x.clone(), vae.decode(&mean)?], 0)?;
    let bytes = tarflow_sample::grid::to_u8(&tarflow_flows::device::to_host(&both)?)?;
    let imgs: Vec<&[u8]> = bytes.chunks_exact(all.image_len()).collect();
    let grid = root.join("reconstructions.png");
    tarflow_sample::grid::save(&imgs, all.channels, h, w, idx.len().max(1), &grid)?;
    Ok((root, summary))
}
