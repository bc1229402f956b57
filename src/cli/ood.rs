//! `tarflow ood`: out-of-distribution detection by likelihood. Scores an in-distribution test
//! set, a sample of the training set (the typicality reference) and each outlier set, and
//! reports the AUROC of bits/dim and of the typicality test per outlier set.

use super::dataset::Dataset;
use anyhow::{bail, Result};
use clap::Args;
use std::fmt::Write as _;
use tarflow_flows::TarFlow;
use tarflow_sample::ood::{auroc, invert, typicality, uniform_noise};
use tarflow_sample::score::{score_images, Dequant, ScoreOptions, Summary};

/// Arguments of `tarflow ood`.
#[derive(Debug, Args)]
pub struct OodArgs {
    /// In-distribution test images, `KIND:PATH` (e.g. `mnist-idx:data/mnist/t10k-images-idx3-ubyte.gz`).
    #[arg(long = "in")]
    inliers: String,
    /// Training images, `KIND:PATH`: their mean bits/dim is the typicality test's reference.
    #[arg(long)]
    train: String,
    /// Outlier sets (repeatable): `KIND:PATH`, `inverted` (255 − the in-distribution images) or
    /// `noise` (uniformly random bytes).
    #[arg(long = "ood", required = true)]
    outliers: Vec<String>,
    /// Images taken from each set (the first N).
    #[arg(long, default_value_t = 2000)]
    limit: usize,
    /// Batch sizes M of the typicality test (comma-separated; M = 1 tests each image alone).
    #[arg(long, value_delimiter = ',', default_value = "1,10")]
    typical_batch: Vec<usize>,
    /// Uniform dequantisation draws per image.
    #[arg(long, default_value_t = 1)]
    draws: usize,
    /// Seed of the dequantisation noise, the noise images and the typicality batches.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print the table as JSON instead of markdown.
    #[arg(long)]
    json: bool,
    /// Images per forward pass.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Stop at the first unreadable image file of a folder instead of skipping it (skipped
    /// files are listed on stderr and counted).
    #[arg(long)]
    strict: bool,
    #[command(flatten)]
    model: super::runtime::ModelArgs,
}

/// Bits/dim of every image of a set (overflows as +∞, left out of every statistic).
fn bpd_of(model: &TarFlow, pixels: &[Vec<u8>], opts: &ScoreOptions) -> Result<Vec<f64>> {
    Ok(score_images(model, &[], pixels, opts)?
        .into_iter()
        .map(|s| s.bits_per_dim)
        .collect())
}

fn finite(v: &[f64]) -> Vec<f64> {
    v.iter().copied().filter(|x| x.is_finite()).collect()
}

/// Runs `tarflow ood`.
pub fn run(a: OodArgs) -> Result<()> {
    if a.typical_batch.contains(&0) {
        bail!("--typical-batch: batch sizes must be ≥ 1");
    }
    if a.draws == 0 {
        bail!("--draws must be ≥ 1");
    }
    let (r, model) = a.model.load()?;
    let cfg = model.config().clone();
    let opts = ScoreOptions {
        dequant: Dequant::Uniform(a.draws),
        seed: a.seed,
        batch: a.batch,
        ..Default::default()
    };
    let owned =
        |d: &Dataset| -> Vec<Vec<u8>> { d.set.images().into_iter().map(<[u8]>::to_vec).collect() };
    let inl = Dataset::parse(&a.inliers, &cfg, Some(a.limit), a.strict)?;
    let train = Dataset::parse(&a.train, &cfg, Some(a.limit), a.strict)?;
    let in_px = owned(&inl);
    eprintln!("scoring {} ({} images)", inl.name, in_px.len());
    let in_bpd = bpd_of(&model, &in_px, &opts)?;
    eprintln!("scoring {} ({} images)", train.name, train.set.len());
    let train_bpd = bpd_of(&model, &owned(&train), &opts)?;
    let reference = Summary::of(&train_bpd).mean;
    let in_f = finite(&in_bpd);
    let mut rows = Vec::new();
    let summary = |name: &str, v: &[f64]| {
        let s = Summary::of(v);
        serde_json::json!({"set": name, "count": s.count, "excluded": s.excluded,
            "bpd_mean": s.mean, "bpd_stderr": s.stderr})
    };
    rows.push(summary(&format!("{} (in)", inl.name), &in_bpd));
    for spec in &a.outliers {
        let (name, px) = match spec.as_str() {
            "inverted" => (
                format!("inverted {}", inl.name),
                in_px.iter().map(|p| invert(p)).collect(),
            ),
            "noise" => (
                "uniform noise".to_string(),
                uniform_noise(in_px.len(), cfg.dims_per_image(), a.seed ^ 0x0dd),
            ),
            s => {
                let d = Dataset::parse(s, &cfg, Some(a.limit), a.strict)?;
                (d.name.clone(), owned(&d))
            }
        };
        eprintln!("scoring {name} ({} images)", px.len());
        let bpd = bpd_of(&model, &px, &opts)?;
        let out_f = finite(&bpd);
        let mut row = summary(&name, &bpd);
        row["auroc_bpd"] = auroc(&in_f, &out_f).into();
        for &m in &a.typical_batch {
            let t_in = typicality(&in_f, m, reference, a.seed);
            let t_out = typicality(&out_f, m, reference, a.seed.wrapping_add(1));
            row[format!("auroc_typicality_m{m}")] = auroc(&t_in, &t_out).into();
        }
        rows.push(row);
    }
    if a.json {
        let v = serde_json::json!({
            "model": r.path.display().to_string(),
            "train_reference_bpd": reference,
            "in": inl.identity(), "train": train.identity(), "rows": rows,
        });
        println!("{v:#}");
        return Ok(());
    }
    let mut t = String::new();
    let ms: Vec<String> = a
        .typical_batch
        .iter()
        .map(|m| format!("typicality M={m}"))
        .collect();
    let _ = writeln!(
        t,
        "| set | images | excluded | bits/dim (mean ± s.e.) | AUROC bits/dim | {} |",
        ms.join(" | AUROC ")
    );
    let _ = writeln!(t, "|---|---|---|---|---|{}", "---|".repeat(ms.len()));
    // Scores of images far from the data reach 1e289 bits/dim: those in scientific notation.
    let num = |v: f64| {
        if v.abs() >= 1e5 {
            format!("{v:.3e}")
        } else {
            format!("{v:.3}")
        }
    };
    for row in &rows {
        let f = |k: &str| row[k].as_f64().map_or("–".into(), num);
        let typ: Vec<String> = a
            .typical_batch
            .iter()
            .map(|m| f(&format!("auroc_typicality_m{m}")))
            .collect();
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} ± {} | {} | {} |",
            row["set"].as_str().unwrap_or_default(),
            row["count"],
            row["excluded"],
            f("bpd_mean"),
            f("bpd_stderr"),
            f("auroc_bpd"),
            typ.join(" | ")
        );
    }
    print!("{t}");
    println!(
        "typicality reference: mean bits/dim {reference:.4} of {} training images ({})",
        train.set.len(),
        train.name
    );
    Ok(())
}
