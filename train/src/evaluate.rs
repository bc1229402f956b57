//! What a run shows besides its loss: held-out bits/dim and sample grids.

use crate::config::{NoiseKind, TrainConfig};
use crate::error::{Result, TrainError};
use std::path::Path;
use tarflow_datasets::loader::Loader;
use tarflow_flows::autoencoder::Autoencoder;
use tarflow_flows::model::needs_widening;
use tarflow_flows::rng::seeded;
use tarflow_flows::{BpdConvention, Cond, ReverseOptions, TarFlow};
use tarflow_sample::stats::Sums;

/// Mean bits/dim of the first `batches` batches of `val` (all when 0; latent bits/dim of the
/// continuous density for a `latents` set), with the images' own
/// labels for a conditional model, and how many images were left out; `None` when the loader
/// holds no full batch. An image whose f32 score is not finite or implausibly high
/// ([`needs_widening`], scoring's rule) is recomputed in f64 (f32 overflows for images far from
/// what the model has learnt); images still not finite are left out and counted.
pub fn val_bpd(model: &TarFlow, val: &Loader, batches: usize) -> Result<Option<(f64, usize)>> {
    let s = val_bpd_sums(model, val, batches, (0, 1))?;
    Ok(s.mean())
}

/// [`val_bpd`]'s sums over the batches `rank, rank + size, …` (data-parallel validation).
pub fn val_bpd_sums(
    model: &TarFlow,
    val: &Loader,
    batches: usize,
    (rank, size): (usize, usize),
) -> Result<Sums> {
    let order = val.epoch_order(0);
    let n = match batches {
        0 => val.batches_per_epoch(),
        k => k.min(val.batches_per_epoch()),
    };
    let mut sums = Sums::default();
    let mut wide: Option<Option<TarFlow>> = None;
    // Latents are continuous: their bits/dim is the density's, without the 8-bit bin.
    let discrete = val.set().latents.is_none();
    let bpd_of =
        |m: &TarFlow, images: &[f32], shape: [usize; 4], labels: &[i64]| -> Result<Vec<f64>> {
            let [bn, c, h, w] = shape;
            let x = tarflow_flows::device::upload_vec(
                images.to_vec(),
                (bn, c, h, w),
                m.device(),
                m.dtype(),
            )?;
            let cond = Cond::of(m.config().num_classes, Some(labels));
            let out = m.forward(&x, cond)?;
            let bpd = match discrete {
                true => m.bits_per_dim(&out, BpdConvention::TrueDims)?,
                false => {
                    let n = m.config().dims_per_image();
                    (m.nll(&out, false)? * tarflow_flows::model::nats_to_bpd(1.0, n))?
                }
            };
            Ok(tarflow_flows::device::host_f64(&bpd)?.to_vec1::<f64>()?)
        };
    for i in (rank..n).step_by(size.max(1)) {
        let b = val.make_batch(&order, 0, i);
        let mut v = bpd_of(model, &b.images, b.shape, &b.labels)?;
        let redo: Vec<usize> = (0..v.len()).filter(|&i| needs_widening(v[i])).collect();
        if !redo.is_empty() {
            if wide.is_none() {
                wide = Some(model.widened()?);
            }
            if let Some(Some(w)) = &wide {
                // The images to recompute, as a batch of their own.
                let per = b.images.len() / v.len().max(1);
                let images: Vec<f32> = redo
                    .iter()
                    .flat_map(|&i| b.images[i * per..(i + 1) * per].iter().copied())
                    .collect();
                let labels: Vec<i64> = redo
                    .iter()
                    .filter_map(|&i| b.labels.get(i))
                    .copied()
                    .collect();
                let [_, c, h, wd] = b.shape;
                let again = bpd_of(w, &images, [redo.len(), c, h, wd], &labels)?;
                for (&i, x) in redo.iter().zip(again) {
                    v[i] = x;
                }
            }
        }
        v.into_iter().for_each(|x| sums.add(x));
    }
    Ok(sums)
}

/// σ of the denoising step a run's sample grids take: the Gaussian training noise, when
/// `eval.denoise` is on and the run trained with some.
pub fn grid_denoise_sigma(cfg: &TrainConfig) -> Option<f64> {
    let d = &cfg.data;
    (cfg.eval.denoise && d.noise == NoiseKind::Gaussian && d.noise_std > 0.0).then_some(d.noise_std)
}

/// Samples `eval.num_samples` images (labels cycling through the classes, `eval.guidance`,
/// `eval.temperature`, one denoising step when trained with Gaussian noise) from a noise draw
/// fixed by `train.seed`, and writes them as a PNG grid at `path` (atomically).
/// A latent run's samples are decoded by its autoencoder `vae` first.
pub fn sample_grid(
    model: &TarFlow,
    cfg: &TrainConfig,
    vae: Option<&Autoencoder>,
    path: &Path,
) -> Result<()> {
    let (e, m) = (&cfg.eval, &cfg.model);
    let labels: Vec<i64> = (0..e.num_samples)
        .map(|i| (i % m.num_classes.max(1)) as i64)
        .collect();
    let cond = Cond::of(m.num_classes, Some(&labels));
    let opts = ReverseOptions {
        guidance: if m.num_classes > 0 { e.guidance } else { 0.0 },
        ..Default::default()
    };
    // The same noise at every step, so grids show the model change, not the draw.
    let mut rng = seeded(cfg.train.seed ^ 0x5eed_5a3b);
    let mut x = model.sample(e.num_samples, cond, e.temperature, &mut rng, &opts)?;
    // The score step needs finite images: a young or diverging model's NaN samples are drawn
    // as they are (black), not allowed to stop the run.
    if let Some(sigma) = grid_denoise_sigma(cfg) {
        if !tarflow_flows::device::has_non_finite(&x)? {
            x = model.denoise(&x, cond, sigma, 1.0)?;
        }
    }
    if let Some(vae) = vae {
        x = vae.decode_scaled(&x, e.num_samples)?;
    }
    let (_, c, h, w) = x.dims4()?;
    let px = tarflow_sample::grid::to_u8(&x)?;
    let images: Vec<&[u8]> = px.chunks(c * h * w).collect();
    let cols = (e.num_samples as f64).sqrt().ceil() as usize;
    // The encoder picks the format from the extension, so the temporary name ends in .png.
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".tmp-{name}"));
    tarflow_sample::grid::save(&images, c, h, w, cols, &tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| TrainError::io(path, e))
}
