//! `tarflow classify`: Bayes' rule with a class-conditional flow. Each image is scored under
//! every class with the same dequantisation noise; the class of least NLL is the prediction.

use super::dataset::Dataset;
use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;
use tarflow_sample::classes::classify;
use tarflow_sample::score::{Dequant, ScoreOptions};

/// Arguments of `tarflow classify`.
#[derive(Debug, Args)]
pub struct ClassifyArgs {
    /// Labelled images, `KIND:PATH` (e.g. `mnist-idx:data/mnist/t10k-images-idx3-ubyte.gz`).
    #[arg(long)]
    data: String,
    /// Classify only the first N images.
    #[arg(long)]
    limit: Option<usize>,
    /// Uniform dequantisation draws per image and class (the ELBO average).
    #[arg(long, default_value_t = 1)]
    draws: usize,
    /// Seed of the dequantisation noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Draw the confusion matrix into this PNG.
    #[arg(long)]
    confusion: Option<PathBuf>,
    /// Print one JSON object (accuracy, confusion matrix, data identity).
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

/// Runs `tarflow classify`.
pub fn run(a: ClassifyArgs) -> Result<()> {
    if a.draws == 0 {
        bail!("--draws must be ≥ 1");
    }
    let (r, model) = a.model.load()?;
    let cfg = model.config().clone();
    if cfg.num_classes == 0 {
        bail!("{}: the model is unconditional (num_classes = 0); classification by likelihood needs a class-conditional model", r.path.display());
    }
    let d = Dataset::parse(&a.data, &cfg, a.limit, a.strict)?;
    let Some(labels) = d.set.labels.clone() else {
        bail!("{}: has no labels to measure the accuracy against", d.name);
    };
    if let Some(l) = labels
        .iter()
        .find(|&&l| l < 0 || l >= cfg.num_classes as i64)
    {
        bail!(
            "{}: label {l} is outside the model's classes 0..{}",
            d.name,
            cfg.num_classes - 1
        );
    }
    let opts = ScoreOptions {
        dequant: Dequant::Uniform(a.draws),
        seed: a.seed,
        batch: a.batch,
        ..Default::default()
    };
    let c = classify(&model, &d.set.images(), &opts)?;
    let acc = c.accuracy(&labels);
    let m = c.confusion(&labels);
    let n = labels.len() - c.excluded();
    if a.json {
        let v = serde_json::json!({
            "model": r.path.display().to_string(), "data": d.identity(),
            "accuracy": acc, "classified": n, "excluded": c.excluded(), "confusion": m,
        });
        println!("{v:#}");
    } else {
        println!(
            "accuracy {:.2} % ({} of {n} images; {} excluded: overflow under every class)",
            100.0 * acc,
            (acc * n as f64).round() as usize,
            c.excluded()
        );
        println!("confusion (rows: true class, columns: predicted):");
        for (t, row) in m.iter().enumerate() {
            let cells: Vec<String> = row.iter().map(|v| format!("{v:5}")).collect();
            println!("{t:>2} {}", cells.join(""));
        }
    }
    if let Some(out) = &a.confusion {
        let title = format!(
            "Bayes-rule classification: {:.2} % of {n} ({})",
            100.0 * acc,
            d.name
        );
        tarflow_sample::confusion::render(&m, &title, out)?;
        eprintln!("confusion matrix: {}", out.display());
    }
    Ok(())
}
