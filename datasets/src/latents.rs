//! The `latents` source: a `tarflow vae encode` file (`mean`, `std`, optional `labels`, and
//! metadata naming the autoencoder and the images), read once into a set whose values are the
//! posterior's, so that training draws a fresh latent per image and step as STARFlow does.

use crate::error::{DataError, Result};
use crate::ImageSet;
use safetensors::{Dtype, SafeTensors};
use std::path::Path;

/// The metadata `format` a latents file carries.
pub const FORMAT: &str = "tarflow-latents/1";

/// An encoded set's values: the autoencoder's posterior for every image.
#[derive(Debug, Clone, PartialEq)]
pub struct Latents {
    /// Posterior means, image after image, C·H·W each (before the scaling factor).
    pub mean: Vec<f32>,
    /// Posterior standard deviations, in the same layout.
    pub std: Vec<f32>,
    /// The autoencoder's `scaling_factor`: the flow models `(mean + std·ε)·scaling_factor`.
    pub scaling_factor: f64,
    /// SHA-256 of the autoencoder's weights file, as `vae encode` recorded it.
    pub vae_sha256: String,
    /// The autoencoder folder `vae encode` read.
    pub vae: String,
    /// What was encoded (`vae encode`'s identity of the images).
    pub data: String,
    /// The pixel source encoded whole, as (kind, path), where `vae encode` read a source
    /// without `--limit`: its held-out split is the latents' own.
    pub source: Option<(String, Option<String>)>,
}

fn floats(st: &SafeTensors, name: &str, path: &Path) -> Result<(Vec<f32>, Vec<usize>)> {
    let t = st.tensor(name).map_err(|_| {
        DataError::format(
            path,
            format!("no tensor `{name}`: a latents file holds `mean`, `std` (N, C, h, w) f32, as `tarflow vae encode` writes it"),
        )
    })?;
    if t.dtype() != Dtype::F32 {
        return Err(DataError::format(
            path,
            format!("tensor `{name}` is {:?}, expected F32", t.dtype()),
        ));
    }
    let v = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok((v, t.shape().to_vec()))
}

/// Reads a `vae encode` output as a set of C×h×w latents (its `pixels` empty).
pub fn read_latents(path: &Path) -> Result<ImageSet> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.into(),
        source,
    })?;
    let bad = |msg: String| DataError::format(path, msg);
    let (_, meta) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let meta = meta.metadata().clone().unwrap_or_default();
    let get = |k: &str| {
        meta.get(k).cloned().ok_or_else(|| {
            bad(format!(
                "metadata has no `{k}`: not a `tarflow vae encode` output (format {FORMAT})"
            ))
        })
    };
    let format = get("format")?;
    if format != FORMAT {
        return Err(bad(format!(
            "metadata format {format:?}; this build reads {FORMAT:?}"
        )));
    }
    let scaling_factor: f64 = get("scaling_factor")?
        .parse()
        .map_err(|_| bad("metadata `scaling_factor` is not a number".into()))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let (mean, shape) = floats(&st, "mean", path)?;
    let (std, sshape) = floats(&st, "std", path)?;
    let [n, c, h, w] = shape[..] else {
        return Err(bad(format!(
            "tensor `mean` has shape {shape:?}, expected (N, C, h, w)"
        )));
    };
    if sshape != shape {
        return Err(bad(format!(
            "tensor `std` has shape {sshape:?}, `mean` {shape:?}"
        )));
    }
    if let Some(i) = mean.iter().chain(&std).position(|v| !v.is_finite()) {
        return Err(bad(format!(
            "value {i} of `mean`/`std` is not finite: re-encode the images"
        )));
    }
    let labels = match st.tensor("labels") {
        Ok(t) if t.dtype() == Dtype::I64 && t.shape() == [n] => Some(
            t.data()
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
                .collect(),
        ),
        Ok(t) => {
            return Err(bad(format!(
                "tensor `labels` is {:?} {:?}, expected I64 ({n})",
                t.dtype(),
                t.shape()
            )))
        }
        Err(_) => None,
    };
    Ok(ImageSet {
        channels: c,
        height: h,
        width: w,
        pixels: Vec::new(),
        labels,
        latents: Some(std::sync::Arc::new(Latents {
            mean,
            std,
            scaling_factor,
            vae_sha256: get("vae_sha256")?,
            vae: get("vae")?,
            data: get("data")?,
            source: meta
                .get("source")
                .map(|k| (k.clone(), meta.get("source_path").cloned())),
        })),
    })
}
