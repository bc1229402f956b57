//! Patchify / unpatchify: tokens in raster order over the patch grid; features inside a patch
//! are (channel, row, col) as ml-tarflow's `F.unfold` lays them out, or (row, col, channel) as
//! ml-starflow's `rearrange` does (`patch_channels_last`).

use crate::error::{FlowError, Result};
use candle_core::Tensor;

/// (N, C, H, W) → (N, T, D) with T = (H/p)(W/p), D = C·p², features (channel, row, col).
pub fn patchify(x: &Tensor, p: usize) -> Result<Tensor> {
    patchify_as(x, p, false)
}

/// (N, T, D) → (N, C, S, S), the exact inverse of [`patchify`] for square images.
pub fn unpatchify(x: &Tensor, channels: usize, p: usize) -> Result<Tensor> {
    unpatchify_as(x, channels, p, false)
}

/// [`patchify`] with the features of a patch as (row, col, channel) when `channels_last`.
pub fn patchify_as(x: &Tensor, p: usize, channels_last: bool) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if h % p != 0 || w % p != 0 {
        return Err(FlowError::Input(format!(
            "image {h}×{w} is not a multiple of the patch size {p}"
        )));
    }
    let (gh, gw) = (h / p, w / p);
    // (N, C, gh, p, gw, p) → (N, gh, gw, C, p, p), or (N, gh, gw, p, p, C)
    let order = match channels_last {
        false => vec![0, 2, 4, 1, 3, 5],
        true => vec![0, 2, 4, 3, 5, 1],
    };
    let x = x
        .reshape(vec![n, c, gh, p, gw, p])?
        .permute(order)?
        .contiguous()?;
    Ok(x.reshape((n, gh * gw, c * p * p))?)
}

/// The inverse of [`patchify_as`] for square images.
pub fn unpatchify_as(x: &Tensor, channels: usize, p: usize, channels_last: bool) -> Result<Tensor> {
    let (n, t, d) = x.dims3()?;
    let g = (t as f64).sqrt().round() as usize;
    if g * g != t || d != channels * p * p {
        return Err(FlowError::Input(format!(
            "cannot unpatchify (N,{t},{d}) into {channels} channels with patch {p}"
        )));
    }
    let x = match channels_last {
        false => x
            .reshape(vec![n, g, g, channels, p, p])?
            .permute(vec![0, 3, 1, 4, 2, 5])?,
        true => x
            .reshape(vec![n, g, g, p, p, channels])?
            .permute(vec![0, 5, 1, 3, 2, 4])?,
    }
    .contiguous()?;
    Ok(x.reshape((n, channels, g * p, g * p))?)
}
