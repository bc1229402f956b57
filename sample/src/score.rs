//! Exact likelihood of image files: decoding with shape checks, dequantisation, NLL in nats,
//! bits/dim, per-block log-dets and the per-patch decomposition.

use crate::error::{Result, SampleError};
use candle_core::Tensor;
use std::path::{Path, PathBuf};
use tarflow_flows::device::host_f64;
use tarflow_flows::rng::{seeded, uniform};
use tarflow_flows::{Cond, ModelConfig, TarFlow};

/// How 8-bit pixels become the continuous input of the flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dequant {
    /// `(k + u)/128 − 1`, u ~ U[0, 1), averaged over this many draws (a bound on the discrete NLL).
    Uniform(usize),
    /// `k/127.5 − 1`: the density at the pixel values (plus the 8-bit bin volume).
    None,
}

/// Options of [`score_images`].
#[derive(Debug, Clone, Copy)]
pub struct ScoreOptions {
    /// Dequantisation.
    pub dequant: Dequant,
    /// Seed of the dequantisation noise.
    pub seed: u64,
    /// Class for a conditional model; `None` uses the mean class embedding.
    pub label: Option<i64>,
    /// Images per forward pass.
    pub batch: usize,
}

impl Default for ScoreOptions {
    fn default() -> Self {
        Self {
            dequant: Dequant::Uniform(1),
            seed: 0,
            label: None,
            batch: 64,
        }
    }
}

/// The likelihood of one image.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageScore {
    /// The file.
    pub path: PathBuf,
    /// Negative log-likelihood of the 8-bit image in nats.
    pub nll_nats: f64,
    /// The same in bits per dimension.
    pub bits_per_dim: f64,
    /// Log-determinant of each block in nats, x→z order (its share of the NLL is minus this).
    pub block_logdet_nats: Vec<f64>,
    /// Bits of each patch (raster order); they sum to the total bits `nll_nats / ln 2`.
    pub patch_bits: Vec<f64>,
}

/// Image file extensions that are scored when a folder is given.
const EXTENSIONS: [&str; 6] = ["png", "jpg", "jpeg", "bmp", "webp", "gif"];

/// Expands files and folders (recursively, sorted) into image files.
pub fn collect_paths(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in inputs {
        if p.is_dir() {
            let mut found: Vec<PathBuf> = walkdir::WalkDir::new(p)
                .sort_by_file_name()
                .into_iter()
                .filter_map(|e| e.ok())
                .map(|e| e.into_path())
                .filter(|f| {
                    f.is_file()
                        && f.extension().is_some_and(|x| {
                            EXTENSIONS.contains(&x.to_string_lossy().to_lowercase().as_str())
                        })
                })
                .collect();
            if found.is_empty() {
                return Err(SampleError::file(p, "folder holds no image file"));
            }
            out.append(&mut found);
        } else if p.is_file() {
            out.push(p.clone());
        } else {
            return Err(SampleError::file(p, "no such file or directory"));
        }
    }
    Ok(out)
}

/// Decodes an image into planar C×S×S bytes for `cfg`; a size or channel mismatch is an
/// error unless `resize` (shorter side → S, centre crop, channel conversion).
pub fn load_for_model(path: &Path, cfg: &ModelConfig, resize: bool) -> Result<Vec<u8>> {
    let (s, c) = (cfg.img_size, cfg.in_channels);
    if resize {
        return tarflow_datasets::folder::load_image(path, s, c)
            .map_err(|e| SampleError::file(path, format!("cannot decode: {e}")));
    }
    let img = image::ImageReader::open(path)
        .map_err(|e| SampleError::file(path, e.to_string()))?
        .with_guessed_format()
        .map_err(|e| SampleError::file(path, e.to_string()))?
        .decode()
        .map_err(|e| SampleError::file(path, format!("cannot decode: {e}")))?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let have = img.color().channel_count() as usize;
    let fits_channels = match c {
        1 => have <= 2,              // gray, gray + alpha
        3 => have == 3 || have == 4, // RGB, RGBA
        _ => false,
    };
    let want = format!(
        "the model expects {s}×{s} {}",
        if c == 1 { "grayscale" } else { "RGB" }
    );
    if (w, h) != (s, s) || !fits_channels {
        return Err(SampleError::file(
            path,
            format!(
                "image is {w}×{h} with {have} channel(s); {want} (use --resize to resize, centre-crop and convert)"
            ),
        ));
    }
    tarflow_datasets::folder::load_image(path, s, c)
        .map_err(|e| SampleError::file(path, format!("cannot decode: {e}")))
}

/// Scores planar 8-bit images (each `cfg.dims_per_image()` bytes) named by `paths`.
pub fn score_images<P: AsRef<[u8]>>(
    model: &TarFlow,
    paths: &[PathBuf],
    pixels: &[P],
    opts: &ScoreOptions,
) -> Result<Vec<ImageScore>> {
    let cfg = model.config();
    if let Some(l) = opts.label {
        if cfg.num_classes == 0 {
            return Err(SampleError::Option(
                "--label: this model is unconditional (num_classes = 0)".into(),
            ));
        }
        if l < 0 || l >= cfg.num_classes as i64 {
            return Err(SampleError::Option(format!(
                "--label {l}: expected a class in 0..{}",
                cfg.num_classes - 1
            )));
        }
    }
    let (c, s) = (cfg.in_channels, cfg.img_size);
    let n_dims = cfg.dims_per_image() as f64;
    let draws = match opts.dequant {
        Dequant::Uniform(k) => k.max(1),
        Dequant::None => 1,
    };
    let mut rng = seeded(opts.seed);
    let mut out = Vec::with_capacity(pixels.len());
    for (chunk_i, chunk) in pixels.chunks(opts.batch.max(1)).enumerate() {
        let b = chunk.len();
        let flat: Vec<f32> = chunk
            .iter()
            .flat_map(|p| p.as_ref().iter())
            .map(|&k| k as f32)
            .collect();
        let k = Tensor::from_vec(flat, (b, c, s, s), model.device())?;
        let labels = vec![opts.label.unwrap_or(-1); b];
        let cond = match opts.label {
            Some(_) => Cond::Labels(&labels),
            None => Cond::Null,
        };
        let (mut nll, mut tok, mut blocks) = (
            vec![0f64; b],
            vec![0f64; b * cfg.num_tokens()],
            vec![0f64; b * cfg.num_blocks],
        );
        for _ in 0..draws {
            let x = match opts.dequant {
                Dequant::Uniform(_) => {
                    let u = uniform(&mut rng, (b, c, s, s), 0.0, 1.0, model.device())?;
                    (((k.clone() + u)? / 128.0)? - 1.0)?
                }
                Dequant::None => ((k.clone() / 127.5)? - 1.0)?,
            };
            let out = model.forward(&x.to_dtype(model.dtype())?, cond)?;
            let v = host_f64(&model.nll(&out, true)?)?.to_vec1::<f64>()?;
            let t = host_f64(&model.nll_per_token(&out, true)?)?
                .flatten_all()?
                .to_vec1::<f64>()?;
            for (a, v) in nll.iter_mut().zip(v) {
                *a += v / draws as f64;
            }
            for (a, v) in tok.iter_mut().zip(t) {
                *a += v / draws as f64 / std::f64::consts::LN_2;
            }
            for (kb, o) in out.blocks.iter().enumerate() {
                let ld = host_f64(&o.logdet)?.to_vec1::<f64>()?;
                for (i, v) in ld.into_iter().enumerate() {
                    blocks[i * cfg.num_blocks + kb] += v * n_dims / draws as f64;
                }
            }
        }
        let t = cfg.num_tokens();
        for i in 0..b {
            let idx = chunk_i * opts.batch.max(1) + i;
            out.push(ImageScore {
                path: paths.get(idx).cloned().unwrap_or_default(),
                nll_nats: nll[i],
                bits_per_dim: nll[i] / (n_dims * std::f64::consts::LN_2),
                block_logdet_nats: blocks[i * cfg.num_blocks..(i + 1) * cfg.num_blocks].to_vec(),
                patch_bits: tok[i * t..(i + 1) * t].to_vec(),
            });
        }
    }
    Ok(out)
}

/// Each image's NLL under every class of a class-conditional model: Bayes' rule with a
/// uniform prior picks the class of least NLL.
#[derive(Debug, Clone, PartialEq)]
pub struct Classification {
    /// `nll[i][k]`: NLL of image i given label k, in nats.
    pub nll: Vec<Vec<f64>>,
    /// The most likely class of each image.
    pub predicted: Vec<i64>,
}

impl Classification {
    /// p(k | x_i) ∝ p(x_i | k) under a uniform prior over the classes.
    pub fn posterior(&self, i: usize) -> Vec<f64> {
        let Some(row) = self.nll.get(i) else {
            return Vec::new();
        };
        let best = row.iter().copied().fold(f64::INFINITY, f64::min);
        let w: Vec<f64> = row.iter().map(|v| (best - v).exp()).collect();
        let sum: f64 = w.iter().sum();
        w.into_iter().map(|v| v / sum).collect()
    }

    /// The fraction of images whose predicted class is `labels[i]`.
    pub fn accuracy(&self, labels: &[i64]) -> f64 {
        let n = self.predicted.len().min(labels.len());
        let hits = (0..n).filter(|&i| self.predicted[i] == labels[i]).count();
        hits as f64 / n.max(1) as f64
    }
}

/// Classifies 8-bit images by likelihood: each is scored under every label with the same
/// dequantisation draws (so the classes are compared on equal noise).
pub fn classify<P: AsRef<[u8]>>(
    model: &TarFlow,
    pixels: &[P],
    opts: &ScoreOptions,
) -> Result<Classification> {
    let k = model.config().num_classes;
    if k == 0 {
        return Err(SampleError::Option(
            "classification by likelihood needs a class-conditional model; this one has num_classes = 0"
                .into(),
        ));
    }
    let mut nll = vec![Vec::with_capacity(k); pixels.len()];
    for class in 0..k as i64 {
        let o = ScoreOptions {
            label: Some(class),
            ..*opts
        };
        for (row, s) in nll.iter_mut().zip(score_images(model, &[], pixels, &o)?) {
            row.push(s.nll_nats);
        }
    }
    let predicted = nll
        .iter()
        .map(|row| {
            row.iter()
                .enumerate()
                .min_by(|a, b| a.1.total_cmp(b.1))
                .map_or(-1, |(k, _)| k as i64)
        })
        .collect();
    Ok(Classification { nll, predicted })
}

/// Mean and sample standard deviation.
pub fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let m = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (m, var.sqrt())
}
