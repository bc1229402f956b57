//! `tarflow train-ae`: a small KL autoencoder (SD-VAE's architecture at any width) trained on
//! reconstruction plus a KL term, and saved as a diffusers folder that
//! [`tarflow_flows::autoencoder::Autoencoder::load`] (and diffusers) read back.
//!
//! The loss per image value is `‖x̂ − x‖² + β·KL(q(z|x) ‖ N(0, I))`, the KL summed over the
//! latent and divided by the image's values: β trades reconstruction for a latent the flow can
//! model. SD-VAE adds a perceptual and an adversarial term; at CPU scale they are left out.

mod config;

use crate::error::{Result, TrainError};
use crate::schedule::WarmupCosine;
use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use tarflow_datasets::folder::FolderOptions;
use tarflow_datasets::source;
use tarflow_datasets::ImageSet;
use tarflow_flows::autoencoder::{kl_sum, Autoencoder, AutoencoderConfig};

pub use config::{AeConfig, AeData, AeFinetune, AeModel, AeOutput, AeTrain};

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
    /// A decoder fine-tune: held-out PSNR of decoding noisy latents before it.
    pub noisy_val_psnr_before_db: Option<f64>,
    /// A decoder fine-tune: the same after it.
    pub noisy_val_psnr_db: Option<f64>,
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

/// The squared error per image value of decoding a posterior sample of `x` (noise `eps`)
/// plus Gaussian noise of σ `latent_noise` (before the scaling factor): what a decoder
/// fine-tuned on noisy latents minimises. The encoder's side is held fixed.
fn noisy_reconstruction(
    vae: &Autoencoder,
    x: &Tensor,
    eps: &Tensor,
    latent_noise: f64,
    rng: &mut tarflow_flows::rng::FlowRng,
) -> Result<Tensor> {
    let (mean, logvar) = vae.posterior(x)?;
    let z = (mean.detach() + ((logvar.detach() * 0.5)?.exp()? * eps)?)?;
    let e2 = tarflow_flows::rng::randn(rng, z.dims(), latent_noise, &Device::Cpu)?;
    let z = (z + tarflow_flows::device::upload(&e2, x.device(), DType::F32)?)?;
    Ok((vae.decode(&z)? - x)?.sqr()?.mean_all()?)
}

/// PSNR in dB of `set` decoded from its latent means plus noise of σ `latent_noise` (before
/// the scaling factor; a fixed draw from `seed`): how well a decoder removes the flow's noise.
fn measure_noisy(
    vae: &Autoencoder,
    set: &ImageSet,
    latent_noise: f64,
    seed: u64,
    device: &Device,
) -> Result<f64> {
    let mut rng = tarflow_flows::rng::seeded(seed ^ 0x0de_c0de);
    let (mut se, mut count) = (0f64, 0usize);
    for start in (0..set.len()).step_by(64) {
        let idx: Vec<usize> = (start..(start + 64).min(set.len())).collect();
        let x = batch(set, &idx, device)?;
        let (mean, _) = vae.posterior(&x)?;
        let e = tarflow_flows::rng::randn(&mut rng, mean.dims(), latent_noise, &Device::Cpu)?;
        let z = (mean + tarflow_flows::device::upload(&e, device, DType::F32)?)?;
        let xr = vae.decode(&z)?.clamp(-1f32, 1f32)?;
        se += f64::from((xr - &x)?.sqr()?.sum_all()?.to_scalar::<f32>()?);
        count += x.elem_count();
    }
    let mse01 = se / count.max(1) as f64 / 4.0;
    Ok(10.0 * (1.0 / mse01.max(1e-12)).log10())
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
    all.require_pixels(cfg.data.path.as_deref().unwrap_or(Path::new("data.path")))?;
    let vc = cfg.data.val_count.min(all.len() / 2);
    let mut rng = tarflow_flows::rng::seeded(t.seed);
    let order = {
        use rand::seq::SliceRandom;
        let mut o: Vec<usize> = (0..all.len()).collect();
        o.shuffle(&mut rng);
        o
    };
    let (val, train) = match &cfg.data.val_path {
        Some(vp) => {
            let v = source::load(cfg.data.source, Some(vp), &opts)?.set;
            v.require_pixels(vp)?;
            if (v.channels, v.height, v.width) != (all.channels, all.height, all.width) {
                return Err(TrainError::config(
                    "data.val_path",
                    format!(
                        "{}: {}×{}×{} images, the training images are {}×{}×{}",
                        vp.display(),
                        v.channels,
                        v.height,
                        v.width,
                        all.channels,
                        all.height,
                        all.width
                    ),
                ));
            }
            (v, all.clone())
        }
        None => (all.subset(&order[..vc]), all.subset(&order[vc..])),
    };
    let vc = val.len();
    if train.len() < t.batch_size {
        return Err(TrainError::config(
            "train.batch_size",
            format!("{} training images cannot fill a batch", train.len()),
        ));
    }
    let (vae, varmap, base) = match (&cfg.model, &cfg.finetune) {
        (_, Some(ft)) => {
            let (vae, varmap) = Autoencoder::load_trainable(&ft.from, device)?;
            (vae, varmap, Some(ft))
        }
        (Some(m), None) => {
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
            let (vae, varmap) = Autoencoder::init(config, t.seed, device)?;
            (vae, varmap, None)
        }
        (None, None) => return Err(TrainError::config("model", "missing [model] or [finetune]")),
    };
    let config = vae.config.clone();
    if config.in_channels != all.channels {
        return Err(TrainError::config(
            "data.source",
            format!(
                "{}-channel images; the autoencoder {} takes {}",
                all.channels,
                vae.dir.display(),
                config.in_channels
            ),
        ));
    }
    let f = config.downsample();
    if all.height % f != 0 || all.width % f != 0 {
        return Err(TrainError::config(
            "model.block_out_channels",
            format!(
                "{} levels downsample {f}×, which does not divide {}×{} images",
                config.block_out_channels.len(),
                all.height,
                all.width
            ),
        ));
    }
    // A fine-tune trains the decoder side only: the encoder must keep producing the latents
    // the flow was trained on.
    let vars: Vec<candle_core::Var> = {
        let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        let mut named: Vec<(&String, &candle_core::Var)> = data
            .iter()
            .filter(|(k, _)| {
                base.is_none() || k.starts_with("decoder.") || k.starts_with("post_quant_conv.")
            })
            .collect();
        named.sort_by(|a, b| a.0.cmp(b.0));
        named.into_iter().map(|(_, v)| v.clone()).collect()
    };
    // σ of the latent noise before the scaling factor (the flow's σ is in scaled units).
    let latent_noise = base.map(|ft| ft.noise_std / config.scaling_factor);
    let noisy_before = match latent_noise {
        Some(s) => Some(measure_noisy(&vae, &val, s, t.seed, device)?),
        None => None,
    };
    let params = ParamsAdamW {
        lr: t.lr,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    let mut opt = AdamW::new(vars, params)?;
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
    let lat = (config.latent_channels, h / f, w / f);
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
        let (rec, kl) = match latent_noise {
            None => vae.losses(&x, &eps)?,
            Some(s) => (
                noisy_reconstruction(&vae, &x, &eps, s, &mut rng)?,
                Tensor::zeros((), DType::F32, device)?,
            ),
        };
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
    if base.is_none() {
        config.scaling_factor = 1.0 / std.max(1e-6);
    }
    Autoencoder::save(&config, &varmap, &root.join("vae"))?;
    let noisy_after = match (base, latent_noise) {
        (Some(ft), Some(s)) => {
            let record = tarflow_flows::autoencoder::DecoderFinetune {
                noise_std: ft.noise_std,
                base: ft.from.display().to_string(),
                base_sha256: vae.checksum.clone(),
            };
            let text = serde_json::to_string_pretty(&record)
                .map_err(|e| TrainError::config("finetune", e.to_string()))?;
            let path = root.join("vae").join(tarflow_flows::autoencoder::FINETUNE);
            tarflow_flows::checkpoint::write_atomic(&path, text.as_bytes())?;
            Some(measure_noisy(&vae, &val, s, t.seed, device)?)
        }
        _ => None,
    };
    let summary = AeSummary {
        steps: t.steps,
        val_psnr_db: val_psnr,
        train_psnr_db: train_psnr,
        val_kl_nats: val_kl,
        scaling_factor: config.scaling_factor,
        val_count: val.len(),
        val_checksum: val.checksum(),
        train_seconds,
        noisy_val_psnr_before_db: noisy_before,
        noisy_val_psnr_db: noisy_after,
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
