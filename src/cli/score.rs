//! `tarflow score`: exact NLL and bits/dim of image files or of a whole dataset, with a
//! per-patch heat map.

use super::dataset::Dataset;
use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use std::path::PathBuf;
use tarflow_sample::classes::score_marginal;
use tarflow_sample::heatmap::{render, rows_of};
use tarflow_sample::inputs::load_files;
use tarflow_sample::score::{
    score_images, score_images_labelled, score_images_with_text, Bound, Dequant, ImageScore,
    ScoreOptions, Summary,
};

/// Dequantisation of the 8-bit pixels.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum DequantArg {
    /// Uniform noise in each 8-bit bin, K draws combined by --bound (a bound on the discrete NLL).
    Uniform,
    /// The density at the pixel values times the bin volume.
    None,
}

/// How the --draws combine.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum BoundArg {
    /// The mean of the per-draw bounds −log p(x + u_k) (what training minimises).
    Elbo,
    /// The importance-weighted bound −log (1/K) Σ_k p(x + u_k): tighter, converges as K grows.
    Iw,
}

/// Arguments of `tarflow score`.
#[derive(Debug, Args)]
pub struct ScoreArgs {
    /// Image files or folders (searched recursively for png/jpeg/bmp/webp/gif).
    #[arg(required_unless_present_any = ["source", "tensors"], conflicts_with_all = ["source", "tensors"])]
    inputs: Vec<PathBuf>,
    /// Score raw tensors instead: `x` (N, C, S, S) floats in model space in a safetensors file,
    /// no dequantisation; prints each row's −log p(x) of the continuous density (nats, the
    /// prior's ½·log 2π per dimension included) and bits/dim.
    #[arg(long, conflicts_with_all = ["source", "dequant", "draws", "marginal", "heatmap", "resize"])]
    tensors: Option<PathBuf>,
    /// Text embeddings of a text-conditioned model: `y` (N, L, D) in a safetensors file, row i
    /// for input i (cycled; a --source in its order).
    #[arg(long)]
    text: Option<PathBuf>,
    /// Score a whole dataset instead of files (with --path), as `data inspect` and training
    /// read them.
    #[arg(long, value_enum)]
    source: Option<tarflow_datasets::source::SourceKind>,
    /// File or folder of --source.
    #[arg(long, requires = "source")]
    path: Option<PathBuf>,
    /// Score only the first N images of --source.
    #[arg(long, requires = "source")]
    limit: Option<usize>,
    /// Dequantisation.
    #[arg(long, value_enum, default_value = "uniform")]
    dequant: DequantArg,
    /// Uniform dequantisation draws per image.
    #[arg(long, default_value_t = 1)]
    draws: usize,
    /// How the draws combine into one score.
    #[arg(long, value_enum, default_value = "elbo")]
    bound: BoundArg,
    /// Seed of the dequantisation noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Class for a conditional model (default: none → the mean class embedding, as the
    /// reference's evaluation).
    #[arg(long, conflicts_with = "true_labels")]
    label: Option<i64>,
    /// With --source: each image's own label (the conditional likelihood, as validation).
    #[arg(long, requires = "source")]
    true_labels: bool,
    /// The class mixture p(x) = (1/C) Σ_k p(x | k) of a class-conditional model: its exact
    /// likelihood as an unconditional model (C forward passes per draw).
    #[arg(long, conflicts_with_all = ["label", "true_labels"])]
    marginal: bool,
    /// Resize (shorter side), centre-crop and convert channels to fit the model.
    #[arg(long)]
    resize: bool,
    /// One JSON object per image on stdout (path, nll_nats, bits_per_dim, block_logdet_nats,
    /// patch_bits, precision; an image whose likelihood overflows even f64 has
    /// `"overflow": true` and the block instead of numbers).
    #[arg(long)]
    json: bool,
    /// Write the summary (and the dataset's identity) as JSON here.
    #[arg(long)]
    summary: Option<PathBuf>,
    /// Draw the per-patch bits of the first 16 images with a colour bar into this PNG.
    #[arg(long)]
    heatmap: Option<PathBuf>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Stop at the first unreadable image instead of skipping it (skipped files are listed on
    /// stderr and counted in the summary; without --strict the exit status is non-zero only
    /// when nothing could be scored).
    #[arg(long)]
    strict: bool,
    #[command(flatten)]
    model: super::runtime::ModelArgs,
}

/// One image as a JSON line: numbers only where they are finite.
pub fn json_line(s: &ImageScore) -> serde_json::Value {
    let path = s.path.display().to_string();
    match s.overflow {
        Some(block) => serde_json::json!({
            "path": path,
            "overflow": true,
            "overflow_block": block,
            "precision": "f64",
        }),
        None => serde_json::json!({
            "path": path,
            "nll_nats": s.nll_nats,
            "bits_per_dim": s.bits_per_dim,
            "block_logdet_nats": s.block_logdet_nats,
            "patch_bits": s.patch_bits,
            "precision": if s.widened { "f64" } else { "f32" },
        }),
    }
}

/// Runs `tarflow score`.
pub fn run(a: ScoreArgs) -> Result<()> {
    if a.draws == 0 {
        bail!("--draws must be ≥ 1");
    }
    let (r, model) = a.model.load()?;
    let cfg = model.config().clone();
    let text = a
        .text
        .as_ref()
        .map(|p| tarflow_sample::text::TextInput::read(p, &model))
        .transpose()?;
    if let Some(path) = &a.tensors {
        let x = tarflow_sample::tensors::read_tensors(path, &model)?;
        return print_tensor_scores(&a, &x, &model, text.as_ref(), r.autoencoder.is_some());
    }
    if let Some(dir) = &r.autoencoder {
        // A latent run scores images through its autoencoder's latents.
        if a.source.is_some() || text.is_some() {
            bail!("a latent model scores image files (encoded by its autoencoder) or --tensors latents; not --source or --text");
        }
        let x = super::latent::encode_files(dir, &a.inputs, a.resize, &model, a.batch)?;
        return print_tensor_scores(&a, &x, &model, None, true);
    }
    if text.is_some() && (a.true_labels || a.marginal || a.label.is_some()) {
        bail!("--text gives each image its prompt: not with --label, --true-labels or --marginal");
    }
    let (paths, pixels, labels, identity, skipped) = match &a.source {
        Some(kind) => {
            let d = Dataset::load(*kind, a.path.as_deref(), &cfg, a.limit, a.strict)?;
            let labels = if a.true_labels {
                match &d.set.labels {
                    Some(l) => Some(l.clone()),
                    None => bail!("--true-labels: {} has no labels", d.name),
                }
            } else {
                None
            };
            let pixels: Vec<Vec<u8>> = d.set.images().into_iter().map(<[u8]>::to_vec).collect();
            let id = Some(d.identity());
            (d.image_names(), pixels, labels, id, d.skipped)
        }
        None => {
            let i = load_files(&a.inputs, &cfg, a.resize, a.strict)?;
            for (p, why) in &i.skipped {
                eprintln!("skipped {}: {why}", p.display());
            }
            (i.paths, i.pixels, None, None, i.skipped)
        }
    };
    let opts = ScoreOptions {
        dequant: match a.dequant {
            DequantArg::Uniform => Dequant::Uniform(a.draws),
            DequantArg::None => Dequant::None,
        },
        bound: match a.bound {
            BoundArg::Elbo => Bound::Elbo,
            BoundArg::Iw => Bound::Iw,
        },
        seed: a.seed,
        label: a.label,
        batch: a.batch,
    };
    let scores = match (&labels, &text) {
        (_, Some(t)) => score_images_with_text(&model, &paths, &pixels, t, &opts)?,
        (Some(l), None) => score_images_labelled(&model, &paths, &pixels, l, &opts)?,
        (None, None) if a.marginal => score_marginal(&model, &paths, &pixels, &opts)?,
        (None, None) => score_images(&model, &paths, &pixels, &opts)?,
    };
    for s in &scores {
        if a.json {
            println!("{}", json_line(s));
        } else if let Some(block) = s.overflow {
            println!(
                "{}\toverflow: the likelihood is below what f64 represents (block {block})",
                s.path.display()
            );
        } else {
            println!(
                "{}\t{:.2} nats\t{:.4} bits/dim{}",
                s.path.display(),
                s.nll_nats,
                s.bits_per_dim,
                if s.widened { "\t(f64)" } else { "" }
            );
        }
    }
    let bpd: Vec<f64> = scores.iter().map(|s| s.bits_per_dim).collect();
    let sum = Summary::of(&bpd);
    if !skipped.is_empty() {
        eprintln!(
            "{} image(s) scored, {} unreadable file(s) skipped (listed above; --strict stops at the first)",
            scores.len(),
            skipped.len()
        );
    }
    if scores.len() > 1 {
        let msg = sum.line("bits/dim");
        // Keep stdout one JSON object per line when --json is given.
        if a.json {
            eprintln!("{msg}");
        } else {
            println!("{msg}");
        }
    }
    let widened = scores.iter().filter(|s| s.widened).count();
    // Both bounds of the same draws, so that a table of K shows them on equal noise.
    let per_bound = |b: Bound| -> Summary {
        let v: Vec<f64> = scores
            .iter()
            .map(|s| match s.overflow {
                Some(_) => f64::INFINITY,
                None => tarflow_flows::model::nats_to_bpd(
                    tarflow_sample::score::combine_draws(&s.draw_nll_nats, b),
                    cfg.dims_per_image(),
                ),
            })
            .collect();
        Summary::of(&v)
    };
    let (elbo, iw) = (per_bound(Bound::Elbo), per_bound(Bound::Iw));
    if a.draws > 1 && scores.len() > 1 {
        eprintln!(
            "K = {} draws: ELBO average {:.4} ± {:.4}, IW bound {:.4} ± {:.4} bits/dim",
            a.draws, elbo.mean, elbo.stderr, iw.mean, iw.stderr
        );
    }
    if widened > 0 {
        eprintln!("{widened} image(s) recomputed in f64: their f32 likelihood overflowed or lost precision");
    }
    if let Some(id) = &identity {
        eprintln!(
            "data: {} ({} images, sha256 {})",
            id["source"].as_str().unwrap_or_default(),
            id["count"],
            id["sha256"].as_str().unwrap_or_default()
        );
    }
    if let Some(out) = &a.summary {
        let v = serde_json::json!({
            "model": r.path.display().to_string(),
            "data": identity,
            "dequant": format!("{:?}", a.dequant).to_lowercase(),
            "draws": a.draws,
            "bound": format!("{:?}", a.bound).to_lowercase(),
            "seed": a.seed,
            "true_labels": a.true_labels,
            "marginal": a.marginal,
            "count": sum.count,
            "excluded": sum.excluded,
            "skipped": skipped
                .iter()
                .map(|(p, why)| serde_json::json!({"path": p.display().to_string(), "reason": why}))
                .collect::<Vec<_>>(),
            "widened": widened,
            "bits_per_dim": {
                "mean": sum.mean, "stderr": sum.stderr, "std": sum.std,
                "min": sum.min, "max": sum.max,
            },
            "elbo_bits_per_dim": {"mean": elbo.mean, "stderr": elbo.stderr},
            "iw_bits_per_dim": {"mean": iw.mean, "stderr": iw.stderr},
        });
        tarflow_flows::checkpoint::write_atomic(out, format!("{v:#}\n").as_bytes())?;
        eprintln!("summary: {}", out.display());
    }
    if let Some(out) = &a.heatmap {
        let rows = rows_of(&scores, &pixels, 16);
        render(&rows, cfg.in_channels, cfg.img_size, cfg.patch_size, out)?;
        eprintln!("heat map of {} image(s): {}", rows.len(), out.display());
    }
    Ok(())
}

/// `score --tensors` (or a latent model's encoded images, `latent`): each row's exact
/// continuous NLL, as text or JSON lines.
fn print_tensor_scores(
    a: &ScoreArgs,
    x: &candle_core::Tensor,
    model: &tarflow_flows::TarFlow,
    text: Option<&tarflow_sample::text::TextInput>,
    latent: bool,
) -> Result<()> {
    let scores = tarflow_sample::tensors::score_tensors(model, x, text, a.batch)?;
    let c = model.config().in_channels;
    if latent || !matches!(c, 1 | 3) {
        // The density is the latent's: an autoencoder's map to pixels is not invertible, so
        // no pixel likelihood follows from it.
        eprintln!(
            "note: a latent model ({c} channels): these are bits per latent dimension of the latent density, not comparable with pixel bits/dim, and no pixel-space likelihood follows from them"
        );
    }
    for (i, s) in scores.iter().enumerate() {
        if a.json {
            println!(
                "{}",
                serde_json::json!({
                    "row": i,
                    "nll_nats": s.nll_nats,
                    "bits_per_dim": s.bits_per_dim,
                    "block_logdet_nats": s.block_logdet_nats,
                })
            );
        } else {
            println!(
                "{i}\t{:.4} nats\t{:.4} bits/dim",
                s.nll_nats, s.bits_per_dim
            );
        }
    }
    let bpd: Vec<f64> = scores.iter().map(|s| s.bits_per_dim).collect();
    if scores.len() > 1 {
        let msg = Summary::of(&bpd).line("bits/dim");
        if a.json {
            eprintln!("{msg}");
        } else {
            println!("{msg}");
        }
    }
    Ok(())
}
