//! `tarflow import FILE --img-size S --patch-size P [--in-channels C] -o OUT`.

use anyhow::{Context, Result};
use candle_core::Device;
use clap::Args;
use std::path::PathBuf;
use tarflow_flows::Checkpoint;

/// Arguments of `tarflow import`.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// ml-tarflow state_dict: a PyTorch `.pth` (read as data, never executed) or `.safetensors`.
    file: PathBuf,
    /// Image side in pixels (not recoverable from the weights).
    #[arg(long)]
    img_size: usize,
    /// Patch side in pixels (not recoverable from the weights).
    #[arg(long)]
    patch_size: usize,
    /// Image channels; inferred as patch_dim / patch_size² when omitted.
    #[arg(long)]
    in_channels: Option<usize>,
    /// Output checkpoint (.safetensors).
    #[arg(short, long)]
    output: PathBuf,
}

/// Converts the state_dict and prints what was inferred.
pub fn run(a: ImportArgs) -> Result<()> {
    let ckpt = Checkpoint::import(
        &a.file,
        a.img_size,
        a.patch_size,
        a.in_channels,
        &Device::Cpu,
    )
    .with_context(|| format!("importing {}", a.file.display()))?;
    ckpt.save(&a.output)?;
    let c = &ckpt.config;
    println!(
        "wrote {}: {}×{}×{} images, patch {}, width {}, {} blocks, {} classes, {:.2} M parameters",
        a.output.display(),
        c.in_channels,
        c.img_size,
        c.img_size,
        c.patch_size,
        c.channels,
        c.num_blocks,
        c.num_classes,
        ckpt.num_params() as f64 / 1e6
    );
    Ok(())
}
