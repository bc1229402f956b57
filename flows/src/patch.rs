//! Patchify / unpatchify with ml-tarflow's layout (`F.unfold` / `F.fold`).
//!
//! Tokens are raster order over the patch grid; features inside a patch are (channel, row, col).

use crate::error::{FlowError, Result};
use candle_core::Tensor;

/// (N, C, H, W) → (N, T, D) with T = (H/p)(W/p), D = C·p².
pub fn patchify(x: &Tensor, p: usize) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if h % p != 0 || w % p != 0 {
        return Err(FlowError::Input(format!(
            "image {h}×{w} is not a multiple of the patch size {p}"
        )));
    }
    let (gh, gw) = (h / p, w / p);
    // (N, C, gh, p, gw, p) → (N, gh, gw, C, p, p)
    let x = x
        .reshape(vec![n, c, gh, p, gw, p])?
        .permute(vec![0, 2, 4, 1, 3, 5])?
        .contiguous()?;
    Ok(x.reshape((n, gh * gw, c * p * p))?)
}

/// (N, T, D) → (N, C, S, S), the exact inverse of [`patchify`] for square images.
pub fn unpatchify(x: &Tensor, channels: usize, p: usize) -> Result<Tensor> {
    let (n, t, d) = x.dims3()?;
    let g = (t as f64).sqrt().round() as usize;
    if g * g != t || d != channels * p * p {
        return Err(FlowError::Input(format!(
            "cannot unpatchify (N,{t},{d}) into {channels} channels with patch {p}"
        )));
    }
    let x = x
        .reshape(vec![n, g, g, channels, p, p])?
        .permute(vec![0, 3, 1, 4, 2, 5])?
        .contiguous()?;
    Ok(x.reshape((n, channels, g * p, g * p))?)
}
