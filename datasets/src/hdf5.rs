//! HDF5 image files (feature `hdf5`, links the system libhdf5). Dataset names and the
//! NCHW / NHWC layout are configuration; images are read in chunks, not all at once.

use crate::error::{DataError, Result};
use crate::ImageSet;
use ndarray::{s, Ix4};
use std::path::Path;

/// Pixel layout of the image dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// (N, C, H, W), e.g. Fuel's `image_data`.
    Nchw,
    /// (N, H, W, C), e.g. `images` written from numpy HWC arrays.
    Nhwc,
}

/// How to read an HDF5 file.
#[derive(Debug, Clone, PartialEq)]
pub struct Hdf5Options {
    /// Image dataset name; `None` tries `images`, `image_data`, `data`, `x`.
    pub images: Option<String>,
    /// Label dataset name; `None` uses `labels` or `y` when present.
    pub labels: Option<String>,
    /// Layout; `None` infers NHWC when the last axis is 1 or 3 and axis 1 is not.
    pub layout: Option<Layout>,
    /// Images read per chunk.
    pub chunk: usize,
}

impl Default for Hdf5Options {
    fn default() -> Self {
        Self {
            images: None,
            labels: None,
            layout: None,
            chunk: 1024,
        }
    }
}

/// Reads images (u8) and optional integer labels from `path`.
pub fn read_hdf5(path: &Path, opts: &Hdf5Options) -> Result<ImageSet> {
    let err = |m: String| DataError::format(path, m);
    let file = hdf5::File::open(path).map_err(|e| err(format!("not a readable HDF5 file: {e}")))?;
    let name = match &opts.images {
        Some(n) => n.clone(),
        None => ["images", "image_data", "data", "x"]
            .into_iter()
            .find(|n| file.link_exists(n))
            .map(str::to_string)
            .ok_or_else(|| {
                err(
                    "no image dataset (tried images, image_data, data, x); name it in the config"
                        .into(),
                )
            })?,
    };
    let ds = file
        .dataset(&name)
        .map_err(|e| err(format!("no dataset `{name}`: {e}")))?;
    let shape = ds.shape();
    let [n, a, b, c] = shape[..] else {
        return Err(err(format!(
            "dataset `{name}` has shape {shape:?}, expected 4 axes (NCHW or NHWC)"
        )));
    };
    let layout = opts
        .layout
        .unwrap_or(if (c == 1 || c == 3) && !(a == 1 || a == 3) {
            Layout::Nhwc
        } else {
            Layout::Nchw
        });
    let (ch, h, w) = match layout {
        Layout::Nchw => (a, b, c),
        Layout::Nhwc => (c, a, b),
    };
    let mut pixels = Vec::with_capacity(n * ch * h * w);
    let step = opts.chunk.max(1);
    for start in (0..n).step_by(step) {
        let end = (start + step).min(n);
        let block = ds
            .read_slice::<u8, _, Ix4>(s![start..end, .., .., ..])
            .map_err(|e| {
                err(format!(
                    "dataset `{name}` images {start}..{end}: {e} (expected u8 pixels)"
                ))
            })?;
        match layout {
            Layout::Nchw => pixels.extend(block.iter().copied()),
            Layout::Nhwc => pixels.extend(block.permuted_axes([0, 3, 1, 2]).iter().copied()),
        }
    }
    let label_name = match &opts.labels {
        Some(l) => Some(l.clone()),
        None => ["labels", "y"]
            .into_iter()
            .find(|l| file.link_exists(l))
            .map(str::to_string),
    };
    let labels = match label_name {
        Some(l) => {
            let v = file
                .dataset(&l)
                .and_then(|d| d.read_raw::<i64>())
                .map_err(|e| err(format!("label dataset `{l}`: {e}")))?;
            if v.len() != n {
                return Err(err(format!(
                    "label dataset `{l}` has {} entries for {n} images",
                    v.len()
                )));
            }
            Some(v)
        }
        None => None,
    };
    Ok(ImageSet {
        channels: ch,
        height: h,
        width: w,
        pixels,
        labels,
    })
}
