//! What `sample` needs of a latent model's autoencoder: which folder decodes its samples (the
//! one given, else the run's `data.vae`), and whether that decoder may stand in for the score
//! step (`--denoise decoder`).

use super::runtime::RuntimeArgs;
use anyhow::{bail, Result};
use std::path::Path;
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
