//! `tarflow bench`: the reference benchmark's figures (never asserted in tests).
//!
//! Without a measure named, every config gets a training step, scoring of a batch of 64 and
//! sampling of 16 images without and with guidance 2.0, each the median of `--iters` timed
//! runs after one warm-up, plus the peak RSS.

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use clap::{Args, ValueEnum};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;
use tarflow_datasets::loader::Loader;
use tarflow_datasets::transform::{Noise, Transform};
use tarflow_flows::rng::{seeded, uniform};
use tarflow_flows::{Checkpoint, Cond, ModelConfig, ReverseOptions, TarFlow};
use tarflow_sample::text::TextInput;
use tarflow_train::optim::{AdamW, AdamWConfig};

/// One measure.
#[derive(Debug, Clone, Copy, PartialEq, ValueEnum)]
enum What {
    /// Forward pass + exact NLL of a batch (--batch, default 64).
    Score,
    /// KV-cached sampling of --batch images (default 16); --guidance for classifier-free guidance.
    Sample,
    /// One training step: forward, backward and AdamW (--batch, default 32).
    Train,
    /// The data loader alone: 64×64 RGB images, flip + Gaussian noise, 2 workers.
    Loader,
}

/// Arguments of `tarflow bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// One measure; without it, the whole reference benchmark for each --config.
    #[arg(value_enum)]
    what: Option<What>,
    /// `small` (3×32×32, p4, 256 ch, 4×2, 10 classes), `tiny` (1×28×28, p4, 128 ch, 4×2, 10
    /// classes), a model config as JSON (inline or a .json file) or a training .toml (its
    /// [model]); repeatable. Default: small and tiny for the whole benchmark, small otherwise.
    #[arg(long = "config")]
    configs: Vec<String>,
    /// Batch size of a single measure.
    #[arg(long)]
    batch: Option<usize>,
    /// Guidance weight of `bench sample`.
    #[arg(long, default_value_t = 0.0)]
    guidance: f64,
    /// `bench sample` with the GS-Jacobi solver (tolerance --tol, chunk --chunk) and compare
    /// with the sequential one on the same noise.
    #[arg(long)]
    jacobi: bool,
    /// Jacobi tolerance.
    #[arg(long, default_value_t = 1e-8)]
    tol: f64,
    /// Jacobi chunk (0 = whole sequence).
    #[arg(long, default_value_t = 0)]
    chunk: usize,
    /// Quantise the model's Linear weights to this type first (the `tarflow quantize --to`
    /// recipe: affine heads in f16), to measure a quantised model of any config.
    #[arg(long)]
    quantize: Option<tarflow_flows::quant::QuantType>,
    /// Timed runs (after one warm-up); the median is reported.
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Print one JSON object per config.
    #[arg(long)]
    json: bool,
    /// Text embeddings of a text-conditioned model (`y` (N, L, D) in a safetensors file,
    /// cycled over the batch); without it such a model gets N(0, 1) embeddings.
    #[arg(long)]
    text: Option<std::path::PathBuf>,
    /// `--checkpoint` measures a trained (or quantised) model instead of a freshly initialised
    /// one of each --config.
    #[command(flatten)]
    model: super::runtime::ModelArgs,
}

fn named_config(spec: &str) -> Result<(String, ModelConfig)> {
    let cfg = match spec {
        "small" => ModelConfig::new(3, 32, 4, 256, 4, 2, 10),
        "tiny" => ModelConfig::new(1, 28, 4, 128, 4, 2, 10),
        s if s.trim_start().starts_with('{') => serde_json::from_str(s).context("--config JSON")?,
        path => {
            let text = std::fs::read_to_string(path).with_context(|| format!("--config {path}"))?;
            if path.ends_with(".json") {
                serde_json::from_str(&text).with_context(|| path.to_string())?
            } else {
                let t: toml::Table = toml::from_str(&text).with_context(|| path.to_string())?;
                let m = t
                    .get("model")
                    .ok_or_else(|| anyhow!("{path}: no [model] section"))?
                    .clone();
                m.try_into().with_context(|| format!("{path}: [model]"))?
            }
        }
    };
    cfg.validate()?;
    Ok((spec.to_string(), cfg))
}

/// Runs `step` once to warm up, then `iters` times; returns the median seconds.
fn median_time(iters: usize, mut step: impl FnMut() -> Result<()>) -> Result<f64> {
    step()?;
    let mut t: Vec<f64> = (0..iters.max(1))
        .map(|_| {
            let t0 = Instant::now();
            step().map(|_| t0.elapsed().as_secs_f64())
        })
        .collect::<Result<_>>()?;
    t.sort_by(|a, b| a.total_cmp(b));
    Ok(t[t.len() / 2])
}

/// Peak resident memory of this process since the last [`reset_peak_rss`], in MiB (Linux).
fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn reset_peak_rss() {
    // Linux ≥ 4.0: writing 5 resets the high-water mark.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn images(cfg: &ModelConfig, n: usize, device: &Device) -> Result<(Tensor, Vec<i64>)> {
    let s = cfg.img_size;
    let x = uniform(
        &mut seeded(0),
        (n, cfg.in_channels, s, s),
        -1.0,
        1.0,
        device,
    )?;
    let labels = (0..n as i64)
        .map(|i| i % cfg.num_classes.max(1) as i64)
        .collect();
    Ok((x, labels))
}

fn cond<'a>(cfg: &ModelConfig, labels: &'a [i64], text: Option<&'a TextInput>) -> Cond<'a> {
    match text {
        Some(t) => t.cond(0),
        None => Cond::of(cfg.num_classes, Some(labels)),
    }
}

/// The text rows of a batch of `n` for a model that reads text: --text's, or random ones.
fn text_for(
    model: &TarFlow,
    n: usize,
    path: Option<&std::path::Path>,
) -> Result<Option<TextInput>> {
    if model.config().txt_dim == 0 {
        if let Some(p) = path {
            bail!(
                "--text {}: this model reads no text (txt_dim = 0)",
                p.display()
            );
        }
        return Ok(None);
    }
    let t = match path {
        Some(p) => TextInput::read(p, model)?,
        None => TextInput::random(model, n, 0)?,
    };
    Ok(Some(t.rows(n)?))
}

fn time_train(
    cfg: &ModelConfig,
    batch: usize,
    iters: usize,
    device: &Device,
    dtype: DType,
) -> Result<f64> {
    if cfg.txt_dim > 0 {
        bail!("bench train: training a text-conditioned model is not built yet (bench score and sample measure it)");
    }
    let (x, labels) = images(cfg, batch, device)?;
    let (model, varmap) = Checkpoint::init(cfg, 0, device)?.trainable_model(device, dtype)?;
    let vars: Vec<(String, Var)> = varmap
        .data()
        .lock()
        .map_err(|_| anyhow!("variable map lock poisoned"))?
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut opt = AdamW::new(vars.clone(), AdamWConfig::default())?;
    // What `tarflow train` does with one micro-batch (on the CPU: `train.cpu_streams` passes
    // at once), then the optimizer.
    let streams = tarflow_train::config::TrainSection::default().cpu_streams;
    median_time(iters, || {
        match tarflow_train::grads::loss_and_grads(&model, &vars, (&x, &labels), 1, streams, 0.0)? {
            tarflow_train::grads::Pass::Grads(_, g) => opt.step(&g, 1e-4)?,
            tarflow_train::grads::Pass::NonFinite(v) => bail!("the benchmark's loss is {v}"),
        }
        Ok(())
    })
}

fn time_score(model: &TarFlow, batch: usize, iters: usize, text: Option<&Path>) -> Result<f64> {
    let cfg = model.config();
    let (x, labels) = images(cfg, batch, model.device())?;
    let text = text_for(model, batch, text)?;
    median_time(iters, || {
        let out = model.forward(&x, cond(cfg, &labels, text.as_ref()))?;
        model.nll(&out, true)?.to_vec1::<f32>()?;
        Ok(())
    })
}

fn time_sample(
    model: &TarFlow,
    n: usize,
    guidance: f64,
    iters: usize,
    text: Option<&Path>,
) -> Result<f64> {
    let cfg = model.config();
    let (_, labels) = images(cfg, n, model.device())?;
    let text = text_for(model, n, text)?;
    let opts = ReverseOptions {
        guidance,
        ..Default::default()
    };
    median_time(iters, || {
        let x = model.sample(
            n,
            cond(cfg, &labels, text.as_ref()),
            1.0,
            &mut seeded(1),
            &opts,
        )?;
        x.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        Ok(())
    })
}

/// Runs the benchmark.
pub fn run(a: BenchArgs) -> Result<()> {
    let (device, dtype) = a.model.runtime.select()?;
    if a.what == Some(What::Loader) {
        return loader(&a);
    }
    let specs = if a.configs.is_empty() {
        match a.what {
            None => vec!["small".to_string(), "tiny".to_string()],
            Some(_) => vec!["small".to_string()],
        }
    } else {
        a.configs.clone()
    };
    for spec in &specs {
        let (name, cfg) = named_config(spec)?;
        reset_peak_rss();
        let ck = match &a.model.checkpoint {
            Some(p) => tarflow_sample::resolve::resolve(p, !a.model.no_ema, &device)?.checkpoint,
            None => Checkpoint::init(&cfg, 0, &device)?,
        };
        let ck = match a.quantize {
            Some(t) => ck.quantized(&tarflow_flows::quant::Recipe {
                base: t,
                rules: super::quantize::default_rules(t),
            })?,
            None => ck,
        };
        // What the weights take in memory: f32 dense tensors and the quantised blocks.
        let weight_bytes = ck
            .tensors
            .values()
            .map(|t| 4 * t.elem_count())
            .sum::<usize>()
            + ck.quant.as_ref().map_or(0, |q| q.bytes());
        let model = ck.model(&device, dtype)?;
        let cfg = model.config().clone();
        let shape = format!(
            "{}×{}×{} p{} C{} K{} L{}",
            cfg.in_channels,
            cfg.img_size,
            cfg.img_size,
            cfg.patch_size,
            cfg.channels,
            cfg.num_blocks,
            cfg.block_layers(0)
        );
        let Some(what) = a.what else {
            // The reference benchmark: train batch 32 for small, 64 for tiny.
            let train_batch = a.batch.unwrap_or(if name == "tiny" { 64 } else { 32 });
            let train_s = time_train(&cfg, train_batch, a.iters, &device, dtype)?;
            let score_s = time_score(&model, 64, a.iters, a.text.as_deref())?;
            let s16 = time_sample(&model, 16, 0.0, a.iters, a.text.as_deref())?;
            let s16g = if cfg.num_classes > 0 || cfg.txt_dim > 0 {
                Some(time_sample(&model, 16, 2.0, a.iters, a.text.as_deref())?)
            } else {
                None
            };
            let rss = peak_rss_mib();
            if a.json {
                let v = serde_json::json!({
                    "config": name, "model": shape, "train_batch": train_batch,
                    "train_step_s": train_s, "score_images_per_s": 64.0 / score_s,
                    "sample16_s": s16, "sample16_cfg_s": s16g, "peak_rss_mib": rss,
                    "weight_bytes": weight_bytes, "quantize": a.quantize.map(|q| q.name()),
                });
                println!("{v}");
            } else {
                println!(
                    "{name} ({shape}): train step {train_s:.3} s (batch {train_batch}), score {:.1} images/s (batch 64), \
                     sample 16: {s16:.3} s, with guidance 2: {}, peak RSS {} MiB",
                    64.0 / score_s,
                    s16g.map_or("-".into(), |v| format!("{v:.3} s")),
                    rss.map_or("?".into(), |v| format!("{v:.0}"))
                );
            }
            continue;
        };
        let (batch, secs) = match what {
            What::Score => {
                let b = a.batch.unwrap_or(64);
                (b, time_score(&model, b, a.iters, a.text.as_deref())?)
            }
            What::Sample if a.jacobi => {
                let b = a.batch.unwrap_or(16);
                return jacobi_vs_sequential(&model, b, &a, &name);
            }
            What::Sample => {
                let b = a.batch.unwrap_or(16);
                (
                    b,
                    time_sample(&model, b, a.guidance, a.iters, a.text.as_deref())?,
                )
            }
            What::Train => {
                let b = a.batch.unwrap_or(32);
                (b, time_train(&cfg, b, a.iters, &device, dtype)?)
            }
            What::Loader => unreachable!("handled above"),
        };
        let rss = peak_rss_mib();
        if a.json {
            let v = serde_json::json!({
                "config": name, "model": shape, "measure": format!("{what:?}").to_lowercase(),
                "batch": batch, "seconds": secs, "images_per_s": batch as f64 / secs, "peak_rss_mib": rss,
                "weight_bytes": weight_bytes, "quantize": a.quantize.map(|q| q.name()),
            });
            println!("{v}");
        } else {
            println!(
                "{what:?} {name} ({shape}): {:.1} images/s ({secs:.3} s per batch of {batch}, median of {}), peak RSS {} MiB",
                batch as f64 / secs,
                a.iters,
                rss.map_or("?".into(), |v| format!("{v:.0}"))
            );
        }
    }
    Ok(())
}

/// Times the sequential and the Jacobi sampler on the same noise; prints both, the speed-up,
/// the largest difference and the iterations per block.
fn jacobi_vs_sequential(model: &TarFlow, n: usize, a: &BenchArgs, name: &str) -> Result<()> {
    let cfg = model.config();
    let (_, labels) = images(cfg, n, model.device())?;
    let z = tarflow_flows::rng::randn(
        &mut seeded(1),
        (n, cfg.num_tokens(), cfg.patch_dim()),
        1.0,
        model.device(),
    )?;
    let opts = ReverseOptions {
        guidance: a.guidance,
        ..Default::default()
    };
    let j = tarflow_flows::JacobiOptions {
        tol: a.tol,
        chunk: a.chunk,
        ..Default::default()
    };
    let text = text_for(model, n, a.text.as_deref())?;
    let c = cond(cfg, &labels, text.as_ref());
    let seq = model.reverse(&z, c, &opts)?;
    let t_seq = median_time(a.iters, || {
        model.reverse(&z, c, &opts)?;
        Ok(())
    })?;
    let (par, rep) = model.reverse_jacobi(&z, c, &opts, &j)?;
    let t_par = median_time(a.iters, || {
        model.reverse_jacobi(&z, c, &opts, &j)?;
        Ok(())
    })?;
    let diff = (&par - &seq)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_dtype(DType::F32)?
        .to_scalar::<f32>()?;
    let its: Vec<String> = rep
        .iter()
        .map(|r| {
            format!(
                "block {}: {} it (toughness {:.2})",
                r.block, r.iterations, r.toughness
            )
        })
        .collect();
    println!(
        "sample {n} ({name}, guidance {}): sequential {t_seq:.4} s, jacobi {t_par:.4} s (tol {:.0e}, chunk {}) → {:.2}×, max |diff| {diff:.2e}; {}",
        a.guidance,
        a.tol,
        a.chunk,
        t_seq / t_par,
        its.join(", ")
    );
    Ok(())
}

/// Loader throughput on synthetic 64×64 RGB images (the downsampled-ImageNet shape).
fn loader(a: &BenchArgs) -> Result<()> {
    let batch = a.batch.unwrap_or(256);
    let n = batch * a.iters.max(1);
    let pixels = uniform(&mut seeded(0), n * 3 * 64 * 64, 0.0, 255.0, &Device::Cpu)?
        .to_dtype(DType::U8)?
        .to_vec1::<u8>()?;
    let set = Arc::new(tarflow_datasets::ImageSet {
        channels: 3,
        height: 64,
        width: 64,
        pixels,
        labels: Some(vec![0; n]),
        latents: None,
    });
    let t = Transform {
        flip: true,
        noise: Noise::Gaussian(0.05),
        label_drop: 0.1,
    };
    let l = Loader::new(set, None, batch, 0, t, true);
    let t0 = Instant::now();
    let count: usize = l.epoch_from(0, 0, 2).iter().map(|b| b.shape[0]).sum();
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "Loader: {:.0} images/s ({count} images of 3×64×64 in batches of {batch}, flip + gaussian noise, 2 workers)",
        count as f64 / secs
    );
    Ok(())
}
