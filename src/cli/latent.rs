//! What `sample` and `score` need of a latent model's autoencoder: which folder decodes its
//! samples (the one given, else the run's `data.vae`), whether that decoder may stand in for the
//! score step (`--denoise decoder`), and image files encoded to the latents the flow scores.

use super::runtime::RuntimeArgs;
use anyhow::{bail, Result};
use std::path::{Path, PathBuf};
use tarflow_flows::autoencoder::Autoencoder;

/// The autoencoder that decodes a model's samples, on the runtime's device: `given` (--vae),
/// else the run's own (`run`, its config's `data.vae`); `None` for a pixel model. With
/// `decoder_denoises`, it must be a decoder fine-tuned on noisy latents, at the run's `sigma`.
pub fn sample_decoder(
    given: Option<&Path>,
    run: Option<&Path>,
    decoder_denoises: bool,
    sigma: Option<f64>,
    channels: usize,
    runtime: &RuntimeArgs,
) -> Result<Option<Autoencoder>> {
    let dir = match (given, run) {
        (None, _) if decoder_denoises => bail!(
            "--denoise decoder needs --vae DIR: a decoder fine-tuned on noisy latents, as \
             `tarflow train-ae --config experiments/ae-mnist-denoiser.toml` writes it"
        ),
        (Some(d), _) => d,
        (None, Some(d)) if !d.exists() => bail!(
            "the run's autoencoder {} (its config's data.vae) is not here: give --vae DIR",
            d.display()
        ),
        (None, Some(d)) => d,
        (None, None) => return Ok(None),
    };
    let (device, dtype) = runtime.select()?;
    let v = Autoencoder::load(dir, &device, dtype)?;
    if v.config.latent_channels != channels {
        bail!(
            "--vae {}: its latents have {} channels, the model's samples {channels}",
            dir.display(),
            v.config.latent_channels,
        );
    }
    if decoder_denoises {
        let Some(ft) = &v.finetune else {
            bail!(
                "--denoise decoder: {} is a plain autoencoder (no {}); fine-tune its decoder on \
                 noisy latents with `tarflow train-ae` and a [finetune] section",
                dir.display(),
                tarflow_flows::autoencoder::FINETUNE
            );
        };
        if let Some(s) = sigma.filter(|s| (s - ft.noise_std).abs() > 1e-9) {
            eprintln!(
                "warning: the decoder {} was fine-tuned on latent noise σ = {}, the model trained with σ = {s}",
                dir.display(),
                ft.noise_std
            );
        }
    }
    Ok(Some(v))
}

/// Image files encoded by the autoencoder `dir` to the latents `model` scores: the posterior
/// means × the scaling factor (N, latent, s, s), without the training noise. Files are read at
/// the autoencoder's image size (`resize` resizes, centre-crops and converts, as for pixels).
pub fn encode_files(
    dir: &Path,
    inputs: &[PathBuf],
    resize: bool,
    model: &tarflow_flows::TarFlow,
    batch: usize,
) -> Result<candle_core::Tensor> {
    use candle_core::{DType, Device, Tensor};
    if !dir.exists() {
        bail!(
            "the run's autoencoder {} (its config's data.vae) is not here: run from where it trained",
            dir.display()
        );
    }
    let vae = Autoencoder::load(dir, &Device::Cpu, DType::F32)?;
    let m = model.config();
    if vae.config.latent_channels != m.in_channels {
        bail!(
            "{}: latents of {} channels, the model's {}",
            dir.display(),
            vae.config.latent_channels,
            m.in_channels
        );
    }
    // The images as the autoencoder takes them.
    let mut pixel = m.clone();
    pixel.in_channels = vae.config.in_channels;
    pixel.img_size = m.img_size * vae.config.downsample();
    let files = tarflow_sample::inputs::load_files(inputs, &pixel, resize, true)?;
    let n = files.pixels.len();
    let v: Vec<f32> = files
        .pixels
        .iter()
        .flatten()
        .map(|&k| tarflow_datasets::transform::to_unit(k))
        .collect();
    let x = Tensor::from_vec(
        v,
        (n, pixel.in_channels, pixel.img_size, pixel.img_size),
        &Device::Cpu,
    )?;
    let mut parts = Vec::new();
    for i in (0..n).step_by(batch.max(1)) {
        let (mean, _) = vae.encode(&x.narrow(0, i, batch.max(1).min(n - i))?)?;
        parts.push((mean * vae.config.scaling_factor)?);
    }
    eprintln!(
        "encoded {n} image(s) by {}: scoring the scaled posterior means (the flow trained with its noise added; its validation figure includes it)",
        dir.display()
    );
    Ok(Tensor::cat(&parts, 0)?)
}
