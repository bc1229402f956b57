//! `tarflow score`: exact NLL and bits/dim of image files, with a per-patch heat map.

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use std::path::PathBuf;
use tarflow_sample::heatmap::{render, rows_of};
use tarflow_sample::score::{
    collect_paths, load_for_model, mean_std, score_images, Dequant, ScoreOptions,
};

/// Dequantisation of the 8-bit pixels.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum DequantArg {
    /// Uniform noise in each 8-bit bin, averaged over --draws (a bound on the discrete NLL).
    Uniform,
    /// The density at the pixel values times the bin volume.
    None,
}

/// Arguments of `tarflow score`.
#[derive(Debug, Args)]
pub struct ScoreArgs {
    /// Image files or folders (searched recursively for png/jpeg/bmp/webp/gif).
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// A run directory (its latest checkpoint), a checkpoint folder or a .safetensors file.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Dequantisation.
    #[arg(long, value_enum, default_value = "uniform")]
    dequant: DequantArg,
    /// Uniform dequantisation draws averaged per image.
    #[arg(long, default_value_t = 1)]
    draws: usize,
    /// Seed of the dequantisation noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Class for a conditional model (default: none → the mean class embedding, as the
    /// reference's evaluation).
    #[arg(long)]
    label: Option<i64>,
    /// Resize (shorter side), centre-crop and convert channels to fit the model.
    #[arg(long)]
    resize: bool,
    /// One JSON object per image (path, nll_nats, bits_per_dim, block_logdet_nats, patch_bits).
    #[arg(long)]
    json: bool,
    /// Draw the per-patch bits of the first 16 images with a colour bar into this PNG.
    #[arg(long)]
    heatmap: Option<PathBuf>,
    /// Use the trained weights even where the run kept an EMA.
    #[arg(long)]
    no_ema: bool,
    /// Images per forward pass.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    #[command(flatten)]
    runtime: super::runtime::RuntimeArgs,
}

/// Runs `tarflow score`.
pub fn run(a: ScoreArgs) -> Result<()> {
    if a.draws == 0 {
        bail!("--draws must be ≥ 1");
    }
    let (device, dtype) = a.runtime.select()?;
    let r = tarflow_sample::resolve::resolve(&a.checkpoint, !a.no_ema, &device)?;
    let model = r.checkpoint.model(&device, dtype)?;
    let cfg = model.config().clone();
    let paths = collect_paths(&a.inputs)?;
    let pixels = paths
        .iter()
        .map(|p| load_for_model(p, &cfg, a.resize))
        .collect::<tarflow_sample::Result<Vec<_>>>()?;
    let opts = ScoreOptions {
        dequant: match a.dequant {
            DequantArg::Uniform => Dequant::Uniform(a.draws),
            DequantArg::None => Dequant::None,
        },
        seed: a.seed,
        label: a.label,
        batch: a.batch,
    };
    let scores = score_images(&model, &paths, &pixels, &opts)?;
    for s in &scores {
        if a.json {
            let v = serde_json::json!({
                "path": s.path.display().to_string(),
                "nll_nats": s.nll_nats,
                "bits_per_dim": s.bits_per_dim,
                "block_logdet_nats": s.block_logdet_nats,
                "patch_bits": s.patch_bits,
            });
            println!("{v}");
        } else {
            println!(
                "{}\t{:.2} nats\t{:.4} bits/dim",
                s.path.display(),
                s.nll_nats,
                s.bits_per_dim
            );
        }
    }
    if scores.len() > 1 {
        let bpd: Vec<f64> = scores.iter().map(|s| s.bits_per_dim).collect();
        let (m, sd) = mean_std(&bpd);
        let msg = format!(
            "{} images: bits/dim mean {m:.4}, std {sd:.4}, min {:.4}, max {:.4}",
            bpd.len(),
            bpd.iter().cloned().fold(f64::MAX, f64::min),
            bpd.iter().cloned().fold(f64::MIN, f64::max)
        );
        // Keep stdout one JSON object per line when --json is given.
        if a.json {
            eprintln!("{msg}");
        } else {
            println!("{msg}");
        }
    }
    if let Some(out) = &a.heatmap {
        let rows = rows_of(&scores, &pixels, 16);
        render(&rows, cfg.in_channels, cfg.img_size, cfg.patch_size, out)?;
        eprintln!("heat map of {} image(s): {}", rows.len(), out.display());
    }
    Ok(())
}
