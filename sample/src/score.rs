//! Exact likelihood of image files: decoding with shape checks, dequantisation, NLL in nats,
//! bits/dim, per-block log-dets and the per-patch decomposition.

use crate::error::{Result, SampleError};
use crate::text::TextInput;
use candle_core::Tensor;
use std::path::PathBuf;
use tarflow_datasets::transform::{dequantised, to_unit};
use tarflow_flows::device::host_f64;
use tarflow_flows::model::nats_to_bpd;
use tarflow_flows::rng::{seeded, uniform};
use tarflow_flows::{Cond, TarFlow};

/// How 8-bit pixels become the continuous input of the flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dequant {
    /// `(k + u)/128 − 1`, u ~ U[0, 1), averaged over this many draws (a bound on the discrete NLL).
    Uniform(usize),
    /// `k/127.5 − 1`: the density at the pixel values (plus the 8-bit bin volume).
    None,
}

/// How the K dequantisation draws of one image combine into its score.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Bound {
    /// The mean of the per-draw bounds `−log p(x + u_k)` (the variational bound, as training).
    #[default]
    Elbo,
    /// The importance-weighted bound `−log (1/K) Σ_k p(x + u_k)`: never above the ELBO average,
    /// equal at K = 1, and converging to the discrete NLL as K grows.
    Iw,
}

/// Combines the per-draw NLLs (nats) of one image by `bound`.
pub fn combine_draws(nll: &[f64], bound: Bound) -> f64 {
    let k = nll.len().max(1) as f64;
    match bound {
        Bound::Elbo => nll.iter().sum::<f64>() / k,
        Bound::Iw => {
            // −log Σ e^{−v} + ln K, shifted by the least NLL so that no term underflows.
            let m = nll.iter().copied().fold(f64::INFINITY, f64::min);
            if !m.is_finite() {
                return m;
            }
            let s: f64 = nll.iter().map(|v| (m - v).exp()).sum();
            m - (s / k).ln()
        }
    }
}

use tarflow_flows::model::needs_widening;
pub use tarflow_flows::model::WIDEN_ABOVE_BPD;

/// Options of [`score_images`].
#[derive(Debug, Clone, Copy)]
pub struct ScoreOptions {
    /// Dequantisation.
    pub dequant: Dequant,
    /// How the draws combine (uniform dequantisation only).
    pub bound: Bound,
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
            bound: Bound::Elbo,
            seed: 0,
            label: None,
            batch: 64,
        }
    }
}

/// The likelihood of one image.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageScore {
    /// The file (or `SOURCE#index` for an image of a dataset).
    pub path: PathBuf,
    /// Negative log-likelihood of the 8-bit image in nats (+∞ only with `overflow`).
    pub nll_nats: f64,
    /// The same in bits per dimension.
    pub bits_per_dim: f64,
    /// The NLL of each dequantisation draw in nats (one entry without dequantisation).
    pub draw_nll_nats: Vec<f64>,
    /// Log-determinant of each block in nats, x→z order (its share of the NLL is minus this),
    /// averaged over the draws.
    pub block_logdet_nats: Vec<f64>,
    /// Bits of each patch (raster order), averaged over the draws; they sum to the ELBO
    /// average of the draws in bits.
    pub patch_bits: Vec<f64>,
    /// Whether this image was recomputed in f64 because its f32 score overflowed or passed
    /// [`WIDEN_ABOVE_BPD`].
    pub widened: bool,
    /// Where even f64 overflowed: the first block (x→z order) whose output is not finite.
    pub overflow: Option<usize>,
}

impl ImageScore {
    /// Whether the score is a finite number (no overflow).
    pub fn is_finite(&self) -> bool {
        self.overflow.is_none() && self.nll_nats.is_finite()
    }
}

/// Per-image results of one batch: NLL per draw, averaged per-token bits and block log-dets,
/// and the first block whose output is not finite.
struct Batch {
    nll: Vec<Vec<f64>>,    // [image][draw]
    tok: Vec<Vec<f64>>,    // [image][token], bits averaged over draws
    blocks: Vec<Vec<f64>>, // [image][block], nats averaged over draws
    bad_block: Vec<Option<usize>>,
}

/// Scores the 8-bit images `kv` (N·C·S·S bytes) under `model`, one forward pass per
/// dequantisation draw `u` ((N, C, S, S) on the host; None: no dequantisation).
fn score_batch(model: &TarFlow, kv: &[u8], us: &[Option<Tensor>], cond: Cond) -> Result<Batch> {
    let cfg = model.config();
    let (c, s) = (cfg.in_channels, cfg.img_size);
    let b = kv.len() / cfg.dims_per_image().max(1);
    let (nt, nb) = (cfg.num_tokens(), cfg.num_blocks);
    let n_dims = cfg.dims_per_image() as f64;
    let draws = us.len() as f64;
    let mut r = Batch {
        nll: vec![Vec::with_capacity(us.len()); b],
        tok: vec![vec![0.0; nt]; b],
        blocks: vec![vec![0.0; nb]; b],
        bad_block: vec![None; b],
    };
    for u in us {
        // Dequantised on the host in f32, cast there, then uploaded.
        let x: Vec<f32> = match u {
            Some(u) => {
                let uv = host_f64(u)?.flatten_all()?.to_vec1::<f64>()?;
                kv.iter().zip(uv).map(|(&k, u)| dequantised(k, u)).collect()
            }
            None => kv.iter().map(|&k| to_unit(k)).collect(),
        };
        let x = tarflow_flows::device::upload_vec(x, (b, c, s, s), model.device(), model.dtype())?;
        let out = model.forward(&x, cond)?;
        let v = host_f64(&model.nll(&out, true)?)?.to_vec1::<f64>()?;
        let t = host_f64(&model.nll_per_token(&out, true)?)?.to_vec2::<f64>()?;
        for i in 0..b {
            r.nll[i].push(v[i]);
            for (a, v) in r.tok[i].iter_mut().zip(&t[i]) {
                *a += nats_to_bpd(v / draws, 1);
            }
        }
        // Where a score is not finite, the first block whose output is not: read only then, so
        // the common case pays no extra pass over the block outputs.
        let any_bad = v.iter().any(|x| !x.is_finite());
        for (kb, o) in out.blocks.iter().enumerate() {
            let ld = host_f64(&o.logdet)?.to_vec1::<f64>()?;
            for (row, l) in r.blocks.iter_mut().zip(&ld) {
                row[kb] += l * n_dims / draws;
            }
            if any_bad {
                let bad = tarflow_flows::device::non_finite_rows(&o.out)?;
                for (i, &b) in bad.iter().enumerate() {
                    if b && r.bad_block[i].is_none_or(|q| q > kb) {
                        r.bad_block[i] = Some(kb);
                    }
                }
            }
        }
    }
    Ok(r)
}

/// Scores planar 8-bit images (each `cfg.dims_per_image()` bytes) named by `paths`. An image
/// whose f32 score overflows (or passes [`WIDEN_ABOVE_BPD`]) is recomputed in f64 on the CPU
/// with the same noise; where even f64 overflows, its `overflow` names the block.
pub fn score_images<P: AsRef<[u8]>>(
    model: &TarFlow,
    paths: &[PathBuf],
    pixels: &[P],
    opts: &ScoreOptions,
) -> Result<Vec<ImageScore>> {
    score_inner(model, paths, pixels, None, None, opts)
}

/// [`score_images`] for a text-conditioned model: image i with prompt i of `text` (cycled).
pub fn score_images_with_text<P: AsRef<[u8]>>(
    model: &TarFlow,
    paths: &[PathBuf],
    pixels: &[P],
    text: &TextInput,
    opts: &ScoreOptions,
) -> Result<Vec<ImageScore>> {
    score_inner(model, paths, pixels, None, Some(text), opts)
}

/// [`score_images`] with each image's own class (a dataset's labels): the conditional
/// likelihood, as validation during training measures it.
pub fn score_images_labelled<P: AsRef<[u8]>>(
    model: &TarFlow,
    paths: &[PathBuf],
    pixels: &[P],
    labels: &[i64],
    opts: &ScoreOptions,
) -> Result<Vec<ImageScore>> {
    let k = model.config().num_classes as i64;
    if k == 0 {
        return Err(SampleError::Option(
            "the images' own labels: this model is unconditional (num_classes = 0)".into(),
        ));
    }
    if labels.len() != pixels.len() {
        return Err(SampleError::Option(format!(
            "{} labels for {} images",
            labels.len(),
            pixels.len()
        )));
    }
    if let Some((i, l)) = labels.iter().enumerate().find(|(_, &l)| l < 0 || l >= k) {
        return Err(SampleError::Option(format!(
            "label {l} of image {i}: the model has classes 0..{}",
            k - 1
        )));
    }
    score_inner(model, paths, pixels, Some(labels), None, opts)
}

fn score_inner<P: AsRef<[u8]>>(
    model: &TarFlow,
    paths: &[PathBuf],
    pixels: &[P],
    per_image: Option<&[i64]>,
    text: Option<&TextInput>,
    opts: &ScoreOptions,
) -> Result<Vec<ImageScore>> {
    let cfg = model.config();
    crate::text::require(model, text)?;
    let text = text.map(|t| t.rows(pixels.len())).transpose()?;
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
    let draws = match opts.dequant {
        Dequant::Uniform(k) => k.max(1),
        Dequant::None => 1,
    };
    let bpd = |nats: f64| nats_to_bpd(nats, cfg.dims_per_image());
    let mut rng = seeded(opts.seed);
    let mut wide: Option<Option<TarFlow>> = None;
    let mut out = Vec::with_capacity(pixels.len());
    for (chunk_i, chunk) in pixels.chunks(opts.batch.max(1)).enumerate() {
        let b = chunk.len();
        let kv: Vec<u8> = chunk
            .iter()
            .flat_map(|p| p.as_ref().iter().copied())
            .collect();
        let cpu = candle_core::Device::Cpu;
        // The noise is drawn on the host so that a recomputation sees the same draws.
        let us = (0..draws)
            .map(|_| match opts.dequant {
                Dequant::Uniform(_) => uniform(&mut rng, (b, c, s, s), 0.0, 1.0, &cpu).map(Some),
                Dequant::None => Ok(None),
            })
            .collect::<tarflow_flows::Result<Vec<_>>>()?;
        let start = chunk_i * opts.batch.max(1);
        let labels = match per_image {
            Some(l) => Some(l[start..start + b].to_vec()),
            None => opts.label.map(|l| vec![l; b]),
        };
        let cond = match &text {
            Some(t) => t.cond(start),
            None => Cond::of(cfg.num_classes, labels.as_deref()),
        };
        let mut r = score_batch(model, &kv, &us, cond)?;
        let redo: Vec<usize> = (0..b)
            .filter(|&i| {
                r.nll[i].iter().any(|v| needs_widening(bpd(*v))) || r.bad_block[i].is_some()
            })
            .collect();
        let mut widened = vec![false; b];
        if !redo.is_empty() {
            if wide.is_none() {
                wide = Some(model.widened()?);
            }
            if let Some(Some(w)) = &wide {
                let idx = Tensor::from_vec(
                    redo.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                    redo.len(),
                    &cpu,
                )?;
                let pick = |t: &Tensor| -> Result<Tensor> {
                    Ok(t.index_select(&idx, 0)?.to_dtype(candle_core::DType::F64)?)
                };
                let us_w = us
                    .iter()
                    .map(|u| u.as_ref().map(pick).transpose())
                    .collect::<Result<Vec<_>>>()?;
                let labels_w = labels
                    .as_ref()
                    .map(|l| redo.iter().map(|&i| l[i]).collect::<Vec<_>>());
                let n = cfg.dims_per_image();
                let kv_w: Vec<u8> = redo
                    .iter()
                    .flat_map(|&i| kv[i * n..(i + 1) * n].iter().copied())
                    .collect();
                // The f64 model lives on the host: its prompts are copied there.
                let rows: Vec<usize> = redo.iter().map(|&i| start + i).collect();
                let text_w = text
                    .as_ref()
                    .map(|t| t.select(&rows)?.to_host())
                    .transpose()?;
                let cond_w = match &text_w {
                    Some(t) => t.cond(0),
                    None => Cond::of(cfg.num_classes, labels_w.as_deref()),
                };
                let rw = score_batch(w, &kv_w, &us_w, cond_w)?;
                for (j, &i) in redo.iter().enumerate() {
                    r.nll[i] = rw.nll[j].clone();
                    r.tok[i] = rw.tok[j].clone();
                    r.blocks[i] = rw.blocks[j].clone();
                    r.bad_block[i] = rw.bad_block[j];
                    widened[i] = true;
                }
            }
        }
        let rows = r.nll.into_iter().zip(r.tok).zip(r.blocks).zip(r.bad_block);
        for (i, (((draws, tok), blocks), bad)) in rows.enumerate() {
            let finite = bad.is_none() && draws.iter().all(|v| v.is_finite());
            let overflow = (!finite).then(|| bad.unwrap_or(cfg.num_blocks - 1));
            let nll = if finite {
                combine_draws(&draws, opts.bound)
            } else {
                f64::INFINITY
            };
            out.push(ImageScore {
                path: paths.get(start + i).cloned().unwrap_or_default(),
                nll_nats: nll,
                bits_per_dim: bpd(nll),
                draw_nll_nats: draws,
                block_logdet_nats: blocks,
                patch_bits: tok,
                widened: widened[i],
                overflow,
            });
        }
    }
    Ok(out)
}

pub use crate::inputs::{collect_paths, load_for_model};
pub use crate::stats::{mean_std, Summary};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iw_combination_against_direct_formulas() {
        let v = [3.0, 5.0, 4.0];
        assert_eq!(combine_draws(&v, Bound::Elbo), 4.0);
        let direct = -((-3f64).exp() + (-5f64).exp() + (-4f64).exp()).ln() + 3f64.ln();
        assert!((combine_draws(&v, Bound::Iw) - direct).abs() < 1e-12);
        assert!(combine_draws(&v, Bound::Iw) <= combine_draws(&v, Bound::Elbo));
        // One draw: both bounds are that draw; equal draws: both equal it.
        assert_eq!(combine_draws(&[2.5], Bound::Iw), 2.5);
        assert!((combine_draws(&[7.0; 4], Bound::Iw) - 7.0).abs() < 1e-12);
        // NLLs of thousands of nats do not underflow the exponentials.
        let big = [5000.0, 5001.0];
        let want = 5000.0 - ((1.0 + (-1f64).exp()) / 2.0).ln();
        assert!((combine_draws(&big, Bound::Iw) - want).abs() < 1e-9);
    }
}
