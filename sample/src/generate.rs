//! Drawing samples in batches: labels, temperature, guidance, NaN redraws, optional denoising,
//! and exact replay from a saved noise tensor.

use crate::error::{Result, SampleError};
use crate::text::TextInput;
use candle_core::{DType, Tensor};
use rand::Rng;
use std::path::Path;
use tarflow_flows::rng::{randn, seeded};
use tarflow_flows::{BlockSolve, Cond, JacobiOptions, ReverseOptions, TarFlow};

/// Which labels the samples get.
#[derive(Debug, Clone, PartialEq)]
pub enum Labels {
    /// No label: the mean class embedding (or an unconditional model).
    None,
    /// Uniformly random classes from the seed.
    Random,
    /// These labels, repeated to fill the requested number.
    List(Vec<i64>),
}

/// How to draw samples.
#[derive(Debug, Clone)]
pub struct SampleOptions {
    /// Number of images.
    pub num: usize,
    /// Images per batch.
    pub batch: usize,
    /// Seed of the noise and of random labels.
    pub seed: u64,
    /// Noise temperature (standard deviation of z).
    pub temperature: f64,
    /// Labels.
    pub labels: Labels,
    /// Guidance and attention temperature of the inverse pass.
    pub reverse: ReverseOptions,
    /// One score-based denoising step `x + λσ²∇log p(x)` with (σ, λ).
    pub denoise: Option<(f64, f64)>,
    /// Redraws allowed per batch whose samples contain NaN/Inf.
    pub max_redraws: usize,
    /// The parallel GS-Jacobi solver instead of the sequential KV-cached one.
    pub jacobi: Option<JacobiOptions>,
    /// Text embeddings of a text-conditioned model (cycled over the images).
    pub text: Option<TextInput>,
    /// One step of the model's learnable self-denoiser after the inverse.
    pub learned_denoise: bool,
}

impl Default for SampleOptions {
    fn default() -> Self {
        Self {
            num: 64,
            batch: 64,
            seed: 0,
            temperature: 1.0,
            labels: Labels::None,
            reverse: ReverseOptions::default(),
            denoise: None,
            max_redraws: 10,
            jacobi: None,
            text: None,
            learned_denoise: false,
        }
    }
}

/// Generated images.
#[derive(Debug)]
pub struct Samples {
    /// (N, C, S, S) f32, unclamped.
    pub images: Tensor,
    /// The label of each image (−1 for none).
    pub labels: Vec<i64>,
    /// Batches redrawn because a sample was NaN/Inf.
    pub redrawn: usize,
    /// Jacobi solves per block (summed over batches), when that solver ran.
    pub solves: Vec<BlockSolve>,
    /// Images left with NaN/Inf values after the redraws.
    pub non_finite: usize,
}

/// Reads tensor `z`, (N, T, D) tokens or (N, C, S, S) in image layout, from a safetensors
/// file and checks it against the model.
pub fn read_noise(path: &Path, model: &TarFlow) -> Result<Tensor> {
    let map = crate::safetensors_file::read_file(path)?;
    let cfg = model.config();
    let (t, d) = (cfg.num_tokens(), cfg.patch_dim());
    let (c, s) = (cfg.in_channels, cfg.img_size);
    let want = format!("(N, {t}, {d}) tokens or (N, {c}, {s}, {s})");
    let z = crate::safetensors_file::named(&map, "z", path, &want)?;
    let up = |z: &Tensor| tarflow_flows::device::upload(z, model.device(), model.dtype());
    match z.dims() {
        [_, tt, dd] if (*tt, *dd) == (t, d) => Ok(up(z)?),
        [_, cc, h, w] if (*cc, *h, *w) == (c, s, s) => Ok(model.to_tokens(&up(z)?)?),
        other => Err(SampleError::file(
            path,
            format!("`z` has shape {other:?}, expected (N, {t}, {d}) tokens or (N, {c}, {s}, {s}) for this model"),
        )),
    }
}

/// Number of images (first dimension) with a NaN/Inf value, tested on the host (a device-side
/// self-comparison can be folded away by fast-math kernels, candle's Metal default).
fn count_non_finite(x: &Tensor) -> Result<usize> {
    let rows = tarflow_flows::device::non_finite_rows(x)?;
    Ok(rows.iter().filter(|&&bad| bad).count())
}

/// The label list for `opts` on `model`.
fn labels_for(model: &TarFlow, opts: &SampleOptions, n: usize) -> Result<Vec<i64>> {
    let classes = model.config().num_classes;
    if classes == 0 {
        return match opts.labels {
            Labels::None => Ok(vec![-1; n]),
            _ => Err(SampleError::Option(
                "--labels: this model is unconditional (num_classes = 0)".into(),
            )),
        };
    }
    Ok(match &opts.labels {
        Labels::None => vec![-1; n],
        Labels::Random => {
            let mut rng = seeded(opts.seed ^ 0x1abe_15ed);
            (0..n)
                .map(|_| rng.random_range(0..classes as i64))
                .collect()
        }
        Labels::List(l) if l.is_empty() => {
            return Err(SampleError::Option("--labels: empty list".into()))
        }
        Labels::List(l) => {
            if let Some(bad) = l.iter().find(|&&v| v < -1 || v >= classes as i64) {
                return Err(SampleError::Option(format!(
                    "--labels: {bad} is not a class of this model (0..{}, or -1 for none)",
                    classes - 1
                )));
            }
            l.iter().cycle().take(n).copied().collect()
        }
    })
}

/// Draws `opts.num` samples (or one per row of `noise`), calling `progress(done, total)`
/// after each batch.
pub fn generate(
    model: &TarFlow,
    opts: &SampleOptions,
    noise: Option<&Tensor>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Samples> {
    let cfg = model.config();
    if opts.reverse.guidance != 0.0 && cfg.num_classes == 0 && cfg.txt_dim == 0 {
        return Err(SampleError::Option(
            "--guidance needs a class- or text-conditional model; this one has num_classes = 0 and no text".into(),
        ));
    }
    crate::text::require(model, opts.text.as_ref())?;
    if !(opts.temperature.is_finite() && opts.temperature >= 0.0) {
        return Err(SampleError::Option(format!(
            "--temperature {} must be ≥ 0",
            opts.temperature
        )));
    }
    let n = noise.map_or(opts.num, |z| z.dims()[0]);
    let batch = opts.batch.max(1);
    let labels = labels_for(model, opts, n)?;
    let text = opts.text.as_ref().map(|t| t.rows(n)).transpose()?;
    let shape = (cfg.num_tokens(), cfg.patch_dim());
    let mut rng = seeded(opts.seed);
    let mut out = Vec::new();
    let mut redrawn = 0;
    let mut done = 0;
    let mut solves: Vec<BlockSolve> = Vec::new();
    let mut non_finite = 0;
    while done < n {
        let b = batch.min(n - done);
        let lab = &labels[done..done + b];
        let cond = match &text {
            Some(t) => t.cond(done),
            None => Cond::of(model.config().num_classes, Some(lab)),
        };
        let mut tries = 0;
        let x = loop {
            let z = match noise {
                Some(z) => z.narrow(0, done, b)?,
                None => randn(
                    &mut rng,
                    (b, shape.0, shape.1),
                    opts.temperature,
                    model.device(),
                )?,
            };
            let z = z.to_dtype(model.dtype())?;
            let mut x = match &opts.jacobi {
                Some(j) => {
                    let (x, rep) = model.reverse_jacobi(&z, cond, &opts.reverse, j)?;
                    for r in rep {
                        match solves
                            .iter_mut()
                            .find(|s: &&mut BlockSolve| s.block == r.block)
                        {
                            Some(s) => {
                                s.iterations += r.iterations;
                                s.chunks += r.chunks;
                                s.toughness = s.toughness.max(r.toughness);
                                s.last_change = r.last_change;
                            }
                            None => solves.push(r),
                        }
                    }
                    x
                }
                None => model.reverse(&z, cond, &opts.reverse)?,
            };
            let mut bad = count_non_finite(&x)?;
            // A given noise cannot be redrawn; fresh noise is, as the reference does.
            if noise.is_some() || tries >= opts.max_redraws || bad == 0 {
                // The score step needs finite images; a batch still non-finite is kept as is
                // and counted.
                if let (Some((sigma, lambda)), 0) = (opts.denoise, bad) {
                    x = model.denoise(&x, cond, sigma, lambda)?;
                    bad = count_non_finite(&x)?;
                }
                if opts.learned_denoise && bad == 0 {
                    // The step's size does not depend on σ when it ends at 0.
                    x = model.learned_denoise(&x, 1.0, 0.0)?;
                    bad = count_non_finite(&x)?;
                }
                non_finite += bad;
                break x;
            }
            tries += 1;
            redrawn += 1;
        };
        out.push(x.to_dtype(DType::F32)?);
        done += b;
        progress(done, n);
    }
    Ok(Samples {
        images: Tensor::cat(&out, 0)?,
        labels,
        redrawn,
        solves,
        non_finite,
    })
}

/// Writes `images` (f32, unclamped) and their labels to a safetensors file.
pub fn save_tensor(s: &Samples, path: &Path) -> Result<()> {
    let labels = Tensor::new(s.labels.as_slice(), &candle_core::Device::Cpu)?;
    let images = tarflow_flows::device::to_host(&s.images)?
        .to_dtype(DType::F32)?
        .contiguous()?;
    let tensors = [("samples", &images), ("labels", &labels)];
    let bytes = safetensors::tensor::serialize(tensors, None)
        .map_err(|e| SampleError::file(path, format!("cannot serialise: {e}")))?;
    tarflow_flows::checkpoint::write_atomic(path, &bytes)?;
    Ok(())
}
