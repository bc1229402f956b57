//! What a run shows besides its loss: held-out bits/dim and sample grids.

use crate::config::{NoiseKind, TrainConfig};
use crate::error::{Result, TrainError};
use candle_core::Tensor;
use std::path::Path;
use tarflow_datasets::loader::Loader;
use tarflow_flows::rng::seeded;
use tarflow_flows::{BpdConvention, Cond, ReverseOptions, TarFlow};

/// Mean bits/dim of the first `batches` batches of `val` (all when 0), with the images' own
/// labels for a conditional model; `None` when the loader holds no full batch.
pub fn val_bpd(model: &TarFlow, val: &Loader, batches: usize) -> Result<Option<f64>> {
    let order = val.epoch_order(0);
    let n = match batches {
        0 => val.batches_per_epoch(),
        k => k.min(val.batches_per_epoch()),
    };
    let conditional = model.config().num_classes > 0;
    let (mut sum, mut count) = (0.0, 0usize);
    for i in 0..n {
        let b = val.make_batch(&order, 0, i);
        let [bn, c, h, w] = b.shape;
        let x =
            Tensor::from_vec(b.images, (bn, c, h, w), model.device())?.to_dtype(model.dtype())?;
        let cond = if conditional && !b.labels.is_empty() {
            Cond::Labels(&b.labels)
        } else {
            Cond::Null
        };
        let out = model.forward(&x, cond)?;
        let bpd = model.bits_per_dim(&out, BpdConvention::TrueDims)?;
        sum += tarflow_flows::device::host_f64(&bpd)?
            .sum_all()?
            .to_scalar::<f64>()?;
        count += bn;
    }
    Ok((count > 0).then(|| sum / count as f64))
}

/// Samples `eval.num_samples` images (labels cycling through the classes, `eval.guidance`,
/// `eval.temperature`, one denoising step when trained with Gaussian noise) from a noise draw
/// fixed by `train.seed`, and writes them as a PNG grid at `path` (atomically).
pub fn sample_grid(model: &TarFlow, cfg: &TrainConfig, path: &Path) -> Result<()> {
    let (e, m) = (&cfg.eval, &cfg.model);
    let labels: Vec<i64> = (0..e.num_samples)
        .map(|i| (i % m.num_classes.max(1)) as i64)
        .collect();
    let cond = if m.num_classes > 0 {
        Cond::Labels(&labels)
    } else {
        Cond::Null
    };
    let opts = ReverseOptions {
        guidance: if m.num_classes > 0 { e.guidance } else { 0.0 },
        ..Default::default()
    };
    // The same noise at every step, so grids show the model change, not the draw.
    let mut rng = seeded(cfg.train.seed ^ 0x5eed_5a3b);
    let mut x = model.sample(e.num_samples, cond, e.temperature, &mut rng, &opts)?;
    if e.denoise && cfg.data.noise == NoiseKind::Gaussian && cfg.data.noise_std > 0.0 {
        x = model.denoise(&x, cond, cfg.data.noise_std, 1.0)?;
    }
    let px = tarflow_sample::grid::to_u8(&x)?;
    let images: Vec<&[u8]> = px.chunks(m.dims_per_image()).collect();
    let cols = (e.num_samples as f64).sqrt().ceil() as usize;
    // The encoder picks the format from the extension, so the temporary name ends in .png.
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".tmp-{name}"));
    tarflow_sample::grid::save(&images, m.in_channels, m.img_size, m.img_size, cols, &tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| TrainError::io(path, e))
}
