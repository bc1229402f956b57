//! `tarflow fd`: Fréchet distance of samples to held-out images in a small classifier's
//! feature space (not Inception FID).

use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;
use tarflow::fd::{classifier_for, measure, FeatureExtractor, Reference};
use tarflow_flows::{GuidanceRule, ReverseOptions};
use tarflow_sample::generate::{Labels, SampleOptions};
use tarflow_train::TrainConfig;

/// Arguments of `tarflow fd`.
#[derive(Debug, Args)]
pub struct FdArgs {
    /// Training config naming the data (default: the run directory's config.toml; needed for a
    /// checkpoint file or the embedded model).
    #[arg(long)]
    config: Option<String>,
    /// The feature classifier; trained on the run's training split and saved here when missing
    /// (default: runs/fd-classifier-<source>-<C>x<S>.safetensors).
    #[arg(long)]
    classifier: Option<PathBuf>,
    /// Generated images.
    #[arg(long, default_value_t = 500)]
    num: usize,
    /// Images per sampling batch.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Seed of the noise and labels.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Sampling temperature.
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// Guidance weight (conditional models; labels are drawn at random).
    #[arg(long, default_value_t = 0.0)]
    guidance: f64,
    /// Guidance rule: linear (TarFlow) or gaussian (STARFlow's closed form).
    #[arg(long, value_enum, default_value = "linear")]
    guidance_rule: GuidanceRule,
    /// Guide only the first K blocks sampled; 0 = all.
    #[arg(long, default_value_t = 0)]
    guide_blocks: usize,
    /// One denoising step with the run's training σ.
    #[arg(long)]
    denoise: bool,
    /// A latent model's decoder: a diffusers folder (default: the run's autoencoder, its
    /// config's data.vae); a decoder fine-tuned on noisy latents measures decoder denoising.
    #[arg(long)]
    vae: Option<PathBuf>,
    /// Print a JSON object.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    model: super::runtime::ModelArgs,
}

/// Runs `tarflow fd`.
pub fn run(a: FdArgs) -> Result<()> {
    let (r, model) = a.model.load()?;
    let cfg = match &a.config {
        Some(c) => TrainConfig::load(c, &[])?,
        None => {
            let dir = a.model.checkpoint.as_ref().with_context(|| {
                "give --config to name the data the embedded model's samples are compared with \
                 (experiments/tarflow-mnist-bpd.toml)"
            })?;
            let p = dir.join("config.toml");
            let text = std::fs::read_to_string(&p).with_context(|| {
                format!(
                    "{}: give --config to name the data of a bare checkpoint file",
                    p.display()
                )
            })?;
            TrainConfig::from_toml(&text, &p.display().to_string(), &[])?
        }
    };
    // A latent model is compared in pixels: its samples decoded, the images its latents encode.
    let pixels = tarflow::latent::pixel_twin(&cfg)?;
    let cls_path = a
        .classifier
        .clone()
        .unwrap_or_else(|| tarflow::fd::default_classifier_path(&pixels));
    let (classifier, real) = classifier_for(&pixels, &cls_path)?;
    let vae = match &a.vae {
        Some(dir) => Some(tarflow_flows::autoencoder::Autoencoder::load(
            dir,
            &candle_core::Device::Cpu,
            candle_core::DType::F32,
        )?),
        None => tarflow_train::data::autoencoder(&cfg, &candle_core::Device::Cpu)?,
    };
    let conditional = model.config().num_classes > 0;
    let opts = SampleOptions {
        num: a.num,
        batch: a.batch,
        seed: a.seed,
        temperature: a.temperature,
        labels: if conditional {
            Labels::Random
        } else {
            Labels::None
        },
        reverse: ReverseOptions {
            guidance: a.guidance,
            rule: a.guidance_rule,
            guide_blocks: a.guide_blocks,
            ..Default::default()
        },
        denoise: match (a.denoise, r.train_noise_std) {
            (true, Some(s)) => Some((s, 1.0)),
            (true, None) => anyhow::bail!("--denoise: the run was not trained with Gaussian noise"),
            _ => None,
        },
        max_redraws: 10,
        jacobi: None,
        ..SampleOptions::default()
    };
    let reference = Reference::of(&classifier, &real)?;
    let rep = measure(&model, &opts, &reference, &classifier, vae.as_ref())?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "fd": rep.fd, "generated": rep.generated, "real": rep.real,
                "features": classifier.name(), "classifier_accuracy": classifier.accuracy,
                "sample_s_per_image": rep.sample_s_per_image,
            })
        );
    } else {
        println!(
            "FD (classifier features) {:.3}: {} samples vs {} held-out images; {}; classifier {}",
            rep.fd,
            rep.generated,
            rep.real,
            rep.features,
            cls_path.display()
        );
    }
    Ok(())
}
