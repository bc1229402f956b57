//! Scoring raw tensors: `x` (N, C, S, S) floats already in model space (a latent, a
//! preprocessed image), with no dequantisation. The figure is the continuous density's exact
//! `−log p(x)` in nats, the prior N(0, I) with its ½·log 2π per dimension included.

use crate::error::{Result, SampleError};
use crate::safetensors_file::{named, read_file};
use crate::text::TextInput;
use candle_core::Tensor;
use std::path::Path;
use tarflow_flows::device::host_f64;
use tarflow_flows::model::nats_to_bpd;
use tarflow_flows::{Cond, TarFlow};

/// The score of one row.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorScore {
    /// `−log p(x)` of the continuous density, in nats.
    pub nll_nats: f64,
    /// The same per dimension, in bits.
    pub bits_per_dim: f64,
    /// Each block's log|det| in nats (x→z order).
    pub block_logdet_nats: Vec<f64>,
}

/// Reads tensor `x` from `path` and checks its shape against `model`.
pub fn read_tensors(path: &Path, model: &TarFlow) -> Result<Tensor> {
    let map = read_file(path)?;
    let cfg = model.config();
    let (c, s) = (cfg.in_channels, cfg.img_size);
    let x = named(&map, "x", path, &format!("(N, {c}, {s}, {s})"))?;
    match x.dims() {
        [n, cc, h, w] if *n > 0 && (*cc, *h, *w) == (c, s, s) => {}
        other => {
            return Err(SampleError::file(
                path,
                format!("`x` has shape {other:?}, expected (N, {c}, {s}, {s}) for this model"),
            ))
        }
    }
    if tarflow_flows::device::has_non_finite(x)? {
        return Err(SampleError::file(path, "`x` holds NaN or infinite values"));
    }
    Ok(x.clone())
}

/// Scores the rows of `x` (on the host, any float dtype) in batches of `batch`, with text
/// row i for row i where the model reads text.
pub fn score_tensors(
    model: &TarFlow,
    x: &Tensor,
    text: Option<&TextInput>,
    batch: usize,
) -> Result<Vec<TensorScore>> {
    crate::text::require(model, text)?;
    let n = x.dim(0)?;
    let text = text.map(|t| t.rows(n)).transpose()?;
    let dims = model.config().dims_per_image();
    let mut out = Vec::with_capacity(n);
    let batch = batch.max(1);
    for start in (0..n).step_by(batch) {
        let b = batch.min(n - start);
        let xb =
            tarflow_flows::device::upload(&x.narrow(0, start, b)?, model.device(), model.dtype())?;
        let cond = match &text {
            Some(t) => t.cond(start),
            None => Cond::Null,
        };
        let o = model.forward(&xb, cond)?;
        let nll = host_f64(&model.nll(&o, false)?)?.to_vec1::<f64>()?;
        let blocks = o
            .blocks
            .iter()
            .map(|bo| Ok(host_f64(&bo.logdet)?.to_vec1::<f64>()?))
            .collect::<Result<Vec<_>>>()?;
        for (i, v) in nll.into_iter().enumerate() {
            out.push(TensorScore {
                nll_nats: v,
                bits_per_dim: nats_to_bpd(v, dims),
                block_logdet_nats: blocks.iter().map(|l| l[i] * dims as f64).collect(),
            });
        }
    }
    Ok(out)
}
