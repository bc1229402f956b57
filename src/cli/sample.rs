//! `tarflow sample`: images from a trained flow, as a grid, single PNGs or a raw tensor.

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use tarflow_flows::{GuidanceRule, GuideWhat, JacobiInit, JacobiOptions, ReverseOptions};
use tarflow_sample::generate::{generate, read_noise, save_tensor, Labels, SampleOptions};
use tarflow_sample::grid::to_u8;

/// The inverse solver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Solver {
    /// KV-cached, position by position: exact.
    Sequential,
    /// Parallel GS-Jacobi iterations to a tolerance.
    Jacobi,
}

/// How sampling removes the training noise (`--denoise`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DenoiseMode {
    /// One score step with the run's σ.
    Score,
    /// Decode the noisy latents with a decoder fine-tuned on them.
    Decoder,
    /// The raw samples.
    None,
}

/// Arguments of `tarflow sample`.
#[derive(Debug, Args)]
pub struct SampleArgs {
    /// Number of images.
    #[arg(long, default_value_t = 64)]
    num: usize,
    /// Images per batch.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Seed of the noise (and of random labels).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Noise temperature.
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// Labels: a comma-separated list (repeated to --num), `random`, or `none` (mean embedding).
    #[arg(long, default_value = "none")]
    labels: String,
    /// Classifier-free guidance weight (conditional models).
    #[arg(long, default_value_t = 0.0)]
    guidance: f64,
    /// Ramp the guidance along the sequence.
    #[arg(long)]
    annealed: bool,
    /// What the guidance extrapolates: a (log-scale), b (shift) or ab (both).
    #[arg(long, value_enum, default_value = "ab")]
    guide: GuideWhat,
    /// Attention temperature of the unconditional pass.
    #[arg(long, default_value_t = 1.0)]
    attn_temp: f64,
    /// Guidance rule: linear (TarFlow) or gaussian (STARFlow's closed form).
    #[arg(long, value_enum, default_value = "linear")]
    guidance_rule: GuidanceRule,
    /// Guide only the first K blocks sampled (STARFlow: 1, the deep block); 0 = all.
    #[arg(long, default_value_t = 0)]
    guide_blocks: usize,
    /// sequential (KV-cached, exact) or jacobi (parallel GS-Jacobi iterations).
    #[arg(long, value_enum, default_value = "sequential")]
    solver: Solver,
    /// Jacobi: stop when mean((new−old)²)/mean(new²) is below this.
    #[arg(long, default_value_t = 1e-8)]
    tol: f64,
    /// Jacobi: at most this many iterations per chunk.
    #[arg(long, default_value_t = 64)]
    max_iters: usize,
    /// Jacobi: tokens per Gauss-Seidel chunk (0 = whole sequence); a comma list sets it per
    /// block in sampling order.
    #[arg(long, default_value = "0")]
    chunk: String,
    /// Jacobi: initial guess, input (the block's output) or zeros.
    #[arg(long, value_enum, default_value = "input")]
    jacobi_init: JacobiInit,
    /// How the training noise is removed: `score` (one step x + λσ²∇log p(x), the default
    /// when the checkpoint's run trained with Gaussian noise, as its own grids were drawn),
    /// `decoder` (a latent model: no score step; --vae names a decoder fine-tuned on noisy
    /// latents by `train-ae` with `[finetune]`, which decodes the noisy samples) or `none`.
    /// A bare `--denoise` means `score`.
    #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "score", conflicts_with = "no_denoise")]
    denoise: Option<DenoiseMode>,
    /// The raw samples, without the denoising step a Gaussian-noise run gets by default
    /// (`--denoise none`).
    #[arg(long)]
    no_denoise: bool,
    /// λ of the denoising step.
    #[arg(long, default_value_t = 1.0)]
    denoise_lambda: f64,
    /// σ of the denoising step (default: the training noise of the checkpoint's run).
    #[arg(long)]
    sigma: Option<f64>,
    /// Output grid PNG.
    #[arg(long, default_value = "samples.png")]
    out: PathBuf,
    /// Images per row of the grid (default: the length of a --labels list, so that each row
    /// is one pass through it; else the square root of the count).
    #[arg(long)]
    cols: Option<usize>,
    /// Draw exactly the grid training drew for this run's checkpoint (its eval.num_samples,
    /// eval.guidance, eval.temperature, denoising and noise seed) into --out.
    #[arg(long, conflicts_with_all = ["noise", "labels", "guidance", "temperature", "seed", "num", "denoise", "no_denoise", "solver", "out_dir", "out_tensor"])]
    like_training: bool,
    /// Also write every image as its own PNG into this folder.
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Replay this noise: tensor `z`, (N, T, D) tokens or (N, C, S, S), in a safetensors file
    /// (--num is then N).
    #[arg(long)]
    noise: Option<PathBuf>,
    /// Text embeddings of a text-conditioned model: tensor `y` (N, L, D) in a safetensors file,
    /// cycled over the images, and optionally `y_null` (the unconditional prompt guidance
    /// contrasts them with; default zeros).
    #[arg(long)]
    text: Option<PathBuf>,
    /// One step of the model's learnable self-denoiser after sampling (ml-starflow's
    /// `x − 0.3·pred`).
    #[arg(long, conflicts_with = "denoise")]
    learned_denoise: bool,
    /// Also write the raw float samples (NCHW, before clamping) and labels to a safetensors file.
    #[arg(long)]
    out_tensor: Option<PathBuf>,
    /// A latent model's autoencoder (a diffusers folder): the samples, divided by its
    /// `scaling_factor` (the flow models scaled latents, as STARFlow does), are decoded, and
    /// the grid and --out-dir hold the images.
    #[arg(long)]
    vae: Option<PathBuf>,
    #[command(flatten)]
    model: super::runtime::ModelArgs,
}

fn parse_labels(s: &str) -> Result<Labels> {
    Ok(match s {
        "none" => Labels::None,
        "random" => Labels::Random,
        list => Labels::List(
            list.split(',')
                .map(|v| {
                    v.trim().parse::<i64>().with_context(|| {
                        format!("--labels: {v:?} is not an integer (or use `random`/`none`)")
                    })
                })
                .collect::<Result<_>>()?,
        ),
    })
}

/// Runs `tarflow sample`.
pub fn run(a: SampleArgs) -> Result<()> {
    let (r, model) = a.model.load()?;
    let cfg = model.config().clone();
    if a.like_training {
        return like_training(&r, &model, &a.out);
    }
    let mode = match (a.denoise, a.no_denoise) {
        (_, true) => Some(DenoiseMode::None),
        (m, false) => m,
    };
    // Denoised when asked, or by default where the run's Gaussian training noise is known.
    let denoise = match (mode, a.sigma.or(r.train_noise_std)) {
        (Some(DenoiseMode::None | DenoiseMode::Decoder), _) | (None, None) => None,
        (_, Some(sigma)) => Some((sigma, a.denoise_lambda)),
        (Some(DenoiseMode::Score), None) => bail!(
            "--denoise needs σ: {} has no run config with Gaussian training noise beside it; give --sigma",
            r.path.display()
        ),
    };
    let opts = SampleOptions {
        num: a.num,
        batch: a.batch,
        seed: a.seed,
        temperature: a.temperature,
        labels: parse_labels(&a.labels)?,
        reverse: ReverseOptions {
            guidance: a.guidance,
            annealed: a.annealed,
            guide_what: a.guide,
            attn_temp: a.attn_temp,
            rule: a.guidance_rule,
            guide_blocks: a.guide_blocks,
        },
        denoise: denoise.filter(|_| !a.learned_denoise),
        max_redraws: 10,
        text: a
            .text
            .as_ref()
            .map(|p| tarflow_sample::text::TextInput::read(p, &model))
            .transpose()?,
        learned_denoise: a.learned_denoise,
        jacobi: match a.solver {
            Solver::Sequential => None,
            Solver::Jacobi => {
                let chunks = a
                    .chunk
                    .split(',')
                    .map(|c| {
                        c.trim()
                            .parse::<usize>()
                            .with_context(|| format!("--chunk: {c:?} is not a number"))
                    })
                    .collect::<Result<Vec<_>>>()?;
                Some(JacobiOptions {
                    tol: a.tol,
                    max_iters: a.max_iters,
                    chunk: if chunks.len() == 1 { chunks[0] } else { 0 },
                    block_chunks: if chunks.len() > 1 { chunks } else { Vec::new() },
                    init: a.jacobi_init,
                })
            }
        },
    };
    let noise = a
        .noise
        .as_ref()
        .map(|p| read_noise(p, &model))
        .transpose()?;
    if noise.is_none() && a.num == 0 {
        bail!("--num must be ≥ 1");
    }
    let bar = ProgressBar::new(noise.as_ref().map_or(a.num, |z| z.dims()[0]) as u64);
    bar.set_style(ProgressStyle::with_template(
        "{bar:30} {pos}/{len} images ETA {eta}",
    )?);
    let vae = super::latent::sample_decoder(
        a.vae.as_deref(),
        r.autoencoder.as_deref(),
        mode == Some(DenoiseMode::Decoder),
        a.sigma.or(r.train_noise_std),
        cfg.in_channels,
        &a.model.runtime,
    )?;
    if !matches!(cfg.in_channels, 1 | 3) && a.out_tensor.is_none() && vae.is_none() {
        bail!(
            "this model's samples have {} channels (latents, not pictures): give --vae DIR (its autoencoder) to decode them, or --out-tensor FILE.safetensors for the raw latents",
            cfg.in_channels
        );
    }
    let s = generate(&model, &opts, noise.as_ref(), &mut |done, _| {
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    // Pictures: the samples, or their decoding by the autoencoder.
    let (pixels, c, sz) = match &vae {
        Some(v) => {
            let x = v.decode_scaled(&s.images, a.batch)?;
            let (c, sz) = (x.dim(1)?, x.dim(2)?);
            (x, c, sz)
        }
        None => (s.images.clone(), cfg.in_channels, cfg.img_size),
    };
    let px = to_u8(&pixels)?;
    let images: Vec<&[u8]> = px.chunks(c * sz * sz).collect();
    let cols = match (a.cols, &opts.labels) {
        (Some(0), _) => bail!("--cols must be ≥ 1"),
        (Some(c), _) => c,
        (None, Labels::List(l)) if !l.is_empty() => l.len().min(images.len()),
        _ => (images.len() as f64).sqrt().ceil() as usize,
    };
    eprintln!(
        "settings: labels {}, guidance {}{}, temperature {}, seed {}, {} inverse, {} (grid {} per row)",
        a.labels,
        a.guidance,
        if a.guidance != 0.0 { format!(" ({:?} rule)", a.guidance_rule).to_lowercase() } else { String::new() },
        a.temperature,
        a.seed,
        match a.solver {
            Solver::Sequential => "sequential",
            Solver::Jacobi => "jacobi",
        },
        match denoise {
            _ if mode == Some(DenoiseMode::Decoder) => "denoised by the fine-tuned decoder".into(),
            Some((s, l)) if a.denoise.is_some() || a.sigma.is_some() => format!("denoised (σ {s}, λ {l})"),
            Some((s, l)) => format!(
                "denoised (σ {s}, λ {l}: the run trained with Gaussian noise; --no-denoise for the raw samples)"
            ),
            None => "not denoised".into(),
        },
        cols
    );
    // A latent model's samples (C ∉ {1, 3}) are no picture: without --vae they go to
    // --out-tensor only.
    let pictures = matches!(c, 1 | 3);
    if pictures {
        tarflow_sample::grid::save(&images, c, sz, sz, cols, &a.out)?;
    }
    if let Some(dir) = &a.out_dir.as_ref().filter(|_| pictures) {
        std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
        for (i, im) in images.iter().enumerate() {
            let p = dir.join(format!("sample-{i:05}.png"));
            tarflow_sample::grid::save_image(im, c, sz, sz, &p)?;
        }
    }
    if let Some(p) = &a.out_tensor {
        save_tensor(&s, p)?;
    }
    for b in &s.solves {
        eprintln!(
            "jacobi block {}: {} iterations over {} chunk(s), toughness {:.2} (iterations per token), last change {:.1e}",
            b.block, b.iterations, b.chunks, b.toughness, b.last_change
        );
    }
    let dest = match (pictures, &a.out_tensor) {
        (false, Some(t)) => t,
        _ => &a.out,
    };
    println!(
        "{} samples from {}{} → {}{}",
        images.len(),
        r.path.display(),
        if r.ema { " (EMA)" } else { "" },
        dest.display(),
        if s.redrawn > 0 {
            format!("; {} batch(es) redrawn after NaN/Inf", s.redrawn)
        } else {
            String::new()
        }
    );
    Ok(())
}

/// `--like-training`: the grid the trainer drew for this checkpoint, with the run's own
/// settings (the same function, so the same pixels).
fn like_training(
    r: &tarflow_sample::resolve::Resolved,
    model: &tarflow_flows::TarFlow,
    out: &std::path::Path,
) -> Result<()> {
    let run = tarflow_flows::rundir::run_of(&r.path).with_context(|| {
        format!(
            "--like-training: {} is not inside a run directory (runs/NAME/checkpoints/step-N/); \
             give --checkpoint RUN_DIR",
            r.path.display()
        )
    })?;
    let cfg = tarflow_train::Trainer::config_of_run(&run.root, &[])?;
    let vae = tarflow_train::data::autoencoder(&cfg, model.device())?;
    tarflow_train::evaluate::sample_grid(model, &cfg, vae.as_ref(), out)?;
    let e = &cfg.eval;
    eprintln!(
        "settings of the run's grids: {} samples, labels cycling through the classes, guidance {}, \
         temperature {}, noise seed from train.seed = {}, {} ({} weights)",
        e.num_samples,
        e.guidance,
        e.temperature,
        cfg.train.seed,
        match tarflow_train::evaluate::grid_denoise_sigma(&cfg) {
            Some(s) => format!("denoised (σ {s}, unless a sample is not finite)"),
            None => "not denoised".into(),
        },
        if r.ema { "EMA" } else { "trained" }
    );
    println!(
        "the training grid of {} → {}",
        r.path.display(),
        out.display()
    );
    Ok(())
}
