//! `tarflow import FILE --img-size S --patch-size P [--in-channels C] -o OUT` (ml-tarflow) and
//! `tarflow import FILE --from ml-starflow (--model-kwargs KW.json | --starflow-config X.yaml) -o OUT`.

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::Args;
use std::path::PathBuf;
use tarflow_flows::starflow_args::{starflow_args, Encoders};
use tarflow_flows::Checkpoint;

/// Where a state_dict comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Source {
    /// apple/ml-tarflow: the config is inferred from the shapes plus --img-size, --patch-size.
    MlTarflow,
    /// apple/ml-starflow: the config is `Model(**kwargs)`'s, given by --model-kwargs or
    /// --starflow-config.
    MlStarflow,
}

/// Arguments of `tarflow import`.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The state_dict: a PyTorch `.pth` (read as data, never executed) or `.safetensors`.
    file: PathBuf,
    /// The code that saved it.
    #[arg(long = "from", value_enum, default_value = "ml-tarflow")]
    from: Source,
    /// ml-starflow: `Model(**kwargs)`'s keyword arguments as a JSON object (a file).
    #[arg(long, conflicts_with = "starflow_config")]
    model_kwargs: Option<PathBuf>,
    /// ml-starflow: its YAML training config (`arguments:`, as under its configs/), read as its
    /// train.py reads it.
    #[arg(long)]
    starflow_config: Option<PathBuf>,
    /// --starflow-config: the autoencoder's spatial downsampling, where the config names one
    /// this crate does not know (SD-VAE's 8 is known).
    #[arg(long, requires = "starflow_config")]
    vae_downsample: Option<usize>,
    /// --starflow-config: the text encoder's hidden size, where the config names one this crate
    /// does not know (the flan-t5 family is known).
    #[arg(long, requires = "starflow_config")]
    txt_dim: Option<usize>,
    /// ml-tarflow: image side in pixels (not recoverable from the weights).
    #[arg(long)]
    img_size: Option<usize>,
    /// ml-tarflow: patch side in pixels (not recoverable from the weights).
    #[arg(long)]
    patch_size: Option<usize>,
    /// Image channels; inferred as patch_dim / patch_size² when omitted.
    #[arg(long)]
    in_channels: Option<usize>,
    /// Output checkpoint (.safetensors).
    #[arg(short, long)]
    output: PathBuf,
}

/// Converts the state_dict and prints what was inferred.
pub fn run(a: ImportArgs) -> Result<()> {
    let ckpt = match a.from {
        Source::MlTarflow => {
            let (Some(img), Some(patch)) = (a.img_size, a.patch_size) else {
                bail!("an ml-tarflow state_dict needs --img-size and --patch-size (the weights do not say them)");
            };
            Checkpoint::import(&a.file, img, patch, a.in_channels, &Device::Cpu)
        }
        Source::MlStarflow => {
            let kwargs = starflow_kwargs(&a)?;
            Checkpoint::import_starflow(&a.file, &kwargs, &Device::Cpu)
        }
    }
    .with_context(|| format!("importing {}", a.file.display()))?;
    ckpt.save(&a.output)?;
    let c = &ckpt.config;
    println!(
        "wrote {}: {}×{}×{} images, patch {}, width {}, {} blocks, {} classes, {} text tokens, {:.2} M parameters",
        a.output.display(),
        c.in_channels,
        c.img_size,
        c.img_size,
        c.patch_size,
        c.channels,
        c.num_blocks,
        c.num_classes,
        c.txt_size,
        ckpt.num_params() as f64 / 1e6
    );
    Ok(())
}

/// `Model(**kwargs)` from --model-kwargs, or from --starflow-config as ml-starflow's train.py
/// builds it.
fn starflow_kwargs(a: &ImportArgs) -> Result<serde_json::Value> {
    if let Some(path) = &a.starflow_config {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading --starflow-config {}", path.display()))?;
        let enc = Encoders {
            vae_downsample: a.vae_downsample,
            txt_dim: a.txt_dim,
        };
        let args = starflow_args(&text, path, enc)?;
        let over = |what: &str, name: &Option<String>| match name {
            Some(n) => format!("; {what} {n}"),
            None => String::new(),
        };
        println!(
            "{}: trained with noise σ = {} (sample with --sigma {} to denoise){}{}",
            path.display(),
            args.noise_std,
            args.noise_std,
            over("inputs are latents of", &args.vae),
            over("text embeddings of", &args.text),
        );
        return Ok(args.kwargs);
    }
    let Some(kw) = &a.model_kwargs else {
        bail!("an ml-starflow state_dict needs --model-kwargs KW.json (the keyword arguments its Model(...) was built with) or --starflow-config X.yaml (its training config)");
    };
    let text = std::fs::read_to_string(kw)
        .with_context(|| format!("reading --model-kwargs {}", kw.display()))?;
    let kwargs: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("--model-kwargs {}: not JSON", kw.display()))?;
    // A config.json that wraps them under "model_kwargs" is read too.
    Ok(kwargs.get("model_kwargs").cloned().unwrap_or(kwargs))
}
