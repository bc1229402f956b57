//! `tarflow quantize`: Linear weights in reduced precision (candle's GGUF types), written as a
//! self-describing .gguf, and what it costs in exact bits/dim against the f32 model.

use super::dataset::Dataset;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::Args;
use std::path::PathBuf;
use std::time::Instant;
use tarflow_flows::quant::{QuantType, QuantWeights, Recipe, Rule};
use tarflow_flows::TarFlow;
use tarflow_sample::quantize::{
    inversion_error, paired, sensitivity, EvalSet, Paired, SearchSpace,
};
use tarflow_sample::score::ScoreOptions;

/// Arguments of `tarflow quantize`.
#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// The f32 model: a run directory, checkpoint folder or .safetensors file; default: the
    /// embedded MNIST likelihood model.
    checkpoint: Option<PathBuf>,
    /// Storage type of the Linear weights: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q2k,
    /// q3k, q4k, q5k, q6k. Layers whose rows do not fit the type's block stay f32 (listed).
    #[arg(long)]
    to: QuantType,
    /// PATTERN=TYPE: layers matching the glob get TYPE (repeatable, first match wins), e.g.
    /// `--rule '*.mlp.*=q4_0'`, `--rule 'blocks.0.*=q8_0'`.
    #[arg(long = "rule")]
    rules: Vec<Rule>,
    /// Keep the matching layers in f32 (the rule PATTERN=f32, taking precedence over --rule).
    #[arg(long)]
    keep: Vec<String>,
    /// Type of the affine heads `*.proj_out` (μ and the log-scale α, which enters an
    /// exponential): default f16 when --to is a block quantisation (q8_0 on the heads alone costs
    /// the shipped model 5× the ΔBPD of every other layer together), else --to. --rule wins.
    #[arg(long)]
    head: Option<QuantType>,
    /// Write the quantised model here (.gguf); score, sample, bench and info load it.
    #[arg(short, long)]
    out: Option<PathBuf>,
    /// Use the trained weights even where the run kept an EMA.
    #[arg(long)]
    no_ema: bool,
    /// Measure against the f32 model on a dataset, KIND:PATH as `score --source` takes it
    /// (e.g. `mnist-idx:data/mnist/t10k-images-idx3-ubyte.gz`).
    #[arg(long)]
    eval: Option<String>,
    /// Images of --eval used.
    #[arg(long, default_value_t = 2000)]
    limit: usize,
    /// Score with each image's own label (conditional models).
    #[arg(long)]
    true_labels: bool,
    /// Seed of the dequantisation noise (the same for both models: the difference is paired).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Images per forward pass.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Quantise each block's attention, MLP and projections to --to on its own, then choose a
    /// mixed recipe (the rest in --high) whose ΔBPD stays within --budget; needs --eval.
    #[arg(long, requires = "eval")]
    sensitivity: bool,
    /// The type of the parts the mixed recipe does not put in --to.
    #[arg(long, default_value = "q8_0")]
    high: QuantType,
    /// ΔBPD the mixed recipe may cost (bits/dim).
    #[arg(long, default_value_t = 0.01)]
    budget: f64,
    /// Training config naming the data of the FD classifier: adds the Fréchet distance of the
    /// quantised model's samples to the f32 model's samples from the same noise; needs --eval.
    #[arg(long, requires = "eval")]
    fd_config: Option<String>,
    /// Samples for the FD.
    #[arg(long, default_value_t = 500)]
    fd_num: usize,
    /// The FD feature classifier (default as `tarflow fd`).
    #[arg(long)]
    classifier: Option<PathBuf>,
    /// Write the measurements as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// The fixed rules of the command line: `--keep`, then `--rule`, then `--head`.
fn rules(a: &QuantizeArgs) -> Result<Vec<Rule>> {
    let mut rules: Vec<Rule> = a
        .keep
        .iter()
        .map(|p| format!("{p}=f32").parse())
        .collect::<tarflow_flows::Result<_>>()?;
    rules.extend(a.rules.iter().cloned());
    match a.head {
        Some(t) if t != a.to => rules.push(Rule {
            pattern: "*.proj_out".into(),
            to: t,
        }),
        Some(_) => {}
        None => rules.extend(default_rules(a.to)),
    }
    Ok(rules)
}

/// The rules `--to t` adds by default: the affine heads in f16 under a block quantisation.
pub fn default_rules(t: QuantType) -> Vec<Rule> {
    if t.is_quantised() {
        vec![Rule {
            pattern: "*.proj_out".into(),
            to: QuantType::F16,
        }]
    } else {
        Vec::new()
    }
}

fn kib(b: usize) -> String {
    format!("{:.1} KiB", b as f64 / 1024.0)
}

/// What a quantised checkpoint holds, as `quantize` and `info` print it.
pub fn describe(q: &QuantWeights, f32_bytes: usize) -> Vec<String> {
    let mut lines = vec![format!("recipe       {}", q.recipe.describe())];
    let mut by_type: std::collections::BTreeMap<&str, (usize, usize)> = Default::default();
    for p in &q.plan {
        let e = by_type.entry(p.stored.name()).or_default();
        e.0 += 1;
        e.1 += p.bytes;
    }
    let total: usize = q.plan.iter().map(|p| p.bytes).sum();
    lines.push(format!(
        "linears      {} ({} of weights, {:.1} % of their f32 {})",
        by_type
            .iter()
            .map(|(t, (n, _))| format!("{n} {t}"))
            .collect::<Vec<_>>()
            .join(", "),
        kib(total),
        100.0 * total as f64 / f32_bytes.max(1) as f64,
        kib(f32_bytes)
    ));
    let kept: Vec<_> = q.kept_f32().collect();
    if !kept.is_empty() {
        lines.push(format!("kept in f32  {} layer(s):", kept.len()));
        for p in kept {
            lines.push(format!(
                "  {} {:?}: {}",
                p.layer,
                p.shape,
                p.note.as_deref().unwrap_or("")
            ));
        }
    }
    lines
}

/// Bytes the Linear weights of `q`'s model take in f32.
pub fn f32_linear_bytes(q: &QuantWeights) -> usize {
    q.plan.iter().map(|p| 4 * p.shape[0] * p.shape[1]).sum()
}

/// Runs `tarflow quantize`.
pub fn run(a: QuantizeArgs) -> Result<()> {
    if a.out.is_none() && a.eval.is_none() {
        bail!("nothing to do: give -o OUT.gguf to write the model, --eval KIND:PATH to measure it, or both");
    }
    let cpu = Device::Cpu;
    let r = tarflow_sample::default_model::resolve_or_default(
        a.checkpoint.as_deref(),
        !a.no_ema,
        &cpu,
    )?;
    let fixed = rules(&a)?;
    let mut recipe = Recipe {
        base: a.to,
        rules: fixed.clone(),
    };
    let opts = ScoreOptions {
        seed: a.seed,
        batch: a.batch,
        ..Default::default()
    };
    let mut report = serde_json::json!({
        "model": r.path.display().to_string(),
        "cpu": cpu_name(),
    });
    let mut eval = None;
    if let Some(spec) = &a.eval {
        let d = Dataset::parse(spec, &r.checkpoint.config, Some(a.limit), false)?;
        let labels = if a.true_labels {
            Some(
                d.set
                    .labels
                    .clone()
                    .with_context(|| format!("--true-labels: {} has no labels", d.name))?,
            )
        } else {
            None
        };
        let set = EvalSet {
            names: d.image_names(),
            pixels: d.set.images().into_iter().map(<[u8]>::to_vec).collect(),
            labels,
        };
        report["data"] = d.identity();
        let f32_model = r.checkpoint.model(&cpu, DType::F32)?;
        let t0 = Instant::now();
        let reference = set.bits_per_dim(&f32_model, &opts)?;
        let f32_secs = t0.elapsed().as_secs_f64();
        eprintln!(
            "f32: {} images in {:.2} s ({:.0} images/s)",
            set.pixels.len(),
            f32_secs,
            set.pixels.len() as f64 / f32_secs
        );
        report["f32_images_per_s"] = (set.pixels.len() as f64 / f32_secs).into();
        if a.sensitivity {
            let space = SearchSpace {
                low: a.to,
                high: a.high,
                fixed: fixed.clone(),
                budget: a.budget,
            };
            let s = sensitivity(&r.checkpoint, &set, &reference, &space, &opts, &mut |m| {
                eprintln!("{m}")
            })?;
            print_sensitivity(&s, &space);
            report["sensitivity"] = serde_json::to_value(&s)?;
            recipe = s.recipe.clone();
        }
        eval = Some((set, reference, f32_model, f32_secs));
    }
    let mut q = r.checkpoint.quantized(&recipe)?;
    if let Some(qw) = q.quant.take() {
        let mut qw = std::sync::Arc::try_unwrap(qw)
            .map_err(|_| anyhow::anyhow!("quantised weights are shared"))?;
        qw.train_noise_std = r.train_noise_std;
        qw.source = Some(r.path.display().to_string());
        q.quant = Some(std::sync::Arc::new(qw));
    }
    let qw = q
        .quant
        .clone()
        .context("quantize returned no quantised weights")?;
    for line in describe(&qw, f32_linear_bytes(&qw)) {
        println!("{line}");
    }
    report["recipe"] = serde_json::to_value(&qw.recipe)?;
    report["plan"] = serde_json::to_value(&qw.plan)?;
    if let Some(out) = &a.out {
        q.save(out)?;
        let size = std::fs::metadata(out)?.len();
        let f32_size = match std::fs::metadata(&r.path) {
            Ok(m) if m.is_file() => m.len() as usize,
            // Only the embedded model has no file of its own.
            _ => tarflow_sample::default_model::file_size(),
        };
        println!(
            "wrote        {} ({}; the f32 safetensors is {}: {:.1} %)",
            out.display(),
            kib(size as usize),
            kib(f32_size),
            100.0 * size as f64 / f32_size as f64
        );
        report["file_bytes"] = size.into();
        report["f32_file_bytes"] = f32_size.into();
    }
    if let Some((set, reference, f32_model, f32_secs)) = eval {
        let qm = q.model(&cpu, DType::F32)?;
        let t0 = Instant::now();
        let scores = set.bits_per_dim(&qm, &opts)?;
        let q_secs = t0.elapsed().as_secs_f64();
        let p = paired(&reference, &scores);
        print_paired(&p, recipe.describe().as_str());
        let n = set.pixels.len() as f64;
        println!(
            "scoring      {:.0} images/s quantised, {:.0} f32 (batch {}, {} thread(s))",
            n / q_secs,
            n / f32_secs,
            a.batch,
            candle_core::utils::get_num_threads()
        );
        let k = set.pixels.len().min(16);
        let lab = set.labels.as_deref().map(|l| &l[..k]);
        let (inv_q, inv_f) = (
            inversion_error(&qm, &set.pixels[..k], lab)?,
            inversion_error(&f32_model, &set.pixels[..k], lab)?,
        );
        println!(
            "inversion    max|f⁻¹(f(x)) − x| = {inv_q:.2e} quantised, {inv_f:.2e} f32 ({k} images)"
        );
        report["delta"] = serde_json::to_value(p)?;
        report["images_per_s"] = (n / q_secs).into();
        report["inversion_error"] = inv_q.into();
        report["f32_inversion_error"] = inv_f.into();
        if let Some(cfg_path) = &a.fd_config {
            let fd = fd_against_f32(&a, cfg_path, &f32_model, &qm)?;
            println!(
                "samples      FD to the f32 model's samples {:.3} (same noise, {} each); FD to held-out: {:.3} quantised, {:.3} f32; sampling {:.3} s vs {:.3} s",
                fd.to_f32, a.fd_num, fd.q_real, fd.f32_real, fd.q_secs, fd.f32_secs
            );
            report["fd"] = serde_json::json!({
                "to_f32_samples": fd.to_f32, "quantised_to_held_out": fd.q_real,
                "f32_to_held_out": fd.f32_real, "samples": a.fd_num,
                "sampling_s": fd.q_secs, "f32_sampling_s": fd.f32_secs,
            });
        }
    }
    if let Some(path) = &a.json {
        tarflow_flows::checkpoint::write_atomic(path, format!("{report:#}\n").as_bytes())?;
        eprintln!("report: {}", path.display());
    }
    Ok(())
}

fn print_paired(p: &Paired, what: &str) {
    println!(
        "bits/dim     {:.4} quantised vs {:.4} f32 on {} images{}",
        p.other,
        p.reference,
        p.count,
        if p.excluded > 0 {
            format!(" ({} not finite, left out)", p.excluded)
        } else {
            String::new()
        }
    );
    println!(
        "ΔBPD         {:+.5} ± {:.5} (paired: same images and noise; {what})",
        p.delta, p.delta_se
    );
}

fn print_sensitivity(s: &tarflow_sample::quantize::Sensitivity, space: &SearchSpace) {
    let (low, high, budget) = (space.low, space.high, space.budget);
    println!("| part in {low} alone (rest f32) | ΔBPD | ± | bytes saved vs {high} |");
    println!("|---|---|---|---|");
    for c in &s.parts {
        println!(
            "| {} | {:+.5} | {:.5} | {} |",
            c.part.name, c.delta.delta, c.delta.delta_se, c.bytes_saved
        );
    }
    if !s.met {
        println!(
            "no recipe of {low} and {high} keeps ΔBPD ≤ {budget}: even every part in {high} costs {:+.5}",
            s.delta.delta
        );
    }
    println!(
        "{} recipe: {} → ΔBPD {:+.5} ± {:.5}, {} of Linear weights",
        if s.met { "mixed" } else { "closest" },
        s.recipe.describe(),
        s.delta.delta,
        s.delta.delta_se,
        kib(s.bytes)
    );
}

struct FdFigures {
    to_f32: f64,
    q_real: f64,
    f32_real: f64,
    q_secs: f64,
    f32_secs: f64,
}

fn fd_against_f32(
    a: &QuantizeArgs,
    cfg_path: &str,
    f32_model: &TarFlow,
    qm: &TarFlow,
) -> Result<FdFigures> {
    use tarflow::fd::{classifier_for, frechet_distance, sample_features, Reference};
    use tarflow_sample::generate::{Labels, SampleOptions};
    let cfg = tarflow_train::TrainConfig::load(cfg_path, &[])?;
    // A latent model is compared in pixels: its samples decoded, the images its latents encode.
    let pixels = tarflow::latent::pixel_twin(&cfg)?;
    let cls_path = a
        .classifier
        .clone()
        .unwrap_or_else(|| tarflow::fd::default_classifier_path(&pixels));
    let (classifier, real) = classifier_for(&pixels, &cls_path)?;
    let vae = tarflow_train::data::autoencoder(&cfg, &candle_core::Device::Cpu)?;
    let opts = SampleOptions {
        num: a.fd_num,
        batch: 100,
        seed: a.seed,
        labels: if qm.config().num_classes > 0 {
            Labels::Random
        } else {
            Labels::None
        },
        ..Default::default()
    };
    let (fq, q_secs, _) = sample_features(qm, &opts, &classifier, vae.as_ref())?;
    let (ff, f32_secs, _) = sample_features(f32_model, &opts, &classifier, vae.as_ref())?;
    let reference = Reference::of(&classifier, &real)?;
    Ok(FdFigures {
        to_f32: frechet_distance(&fq, &ff)?,
        q_real: reference.fd_to(&fq)?,
        f32_real: reference.fd_to(&ff)?,
        q_secs,
        f32_secs,
    })
}

/// The CPU's model name (lscpu's), for the report.
pub fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}
