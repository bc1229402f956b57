//! `tarflow info CHECKPOINT`.

use anyhow::Result;
use candle_core::Device;
use clap::Args;
use std::path::PathBuf;
use tarflow_flows::Checkpoint;

/// Arguments of `tarflow info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// A tarflow checkpoint (.safetensors written by `tarflow import` or training).
    checkpoint: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Prints the config and parameter count of a checkpoint.
pub fn run(a: InfoArgs) -> Result<()> {
    let ckpt = Checkpoint::load(&a.checkpoint, &Device::Cpu)?;
    let c = &ckpt.config;
    if a.json {
        let v = serde_json::json!({ "config": c, "num_params": ckpt.num_params() });
        println!("{v}");
        return Ok(());
    }
    let layers: Vec<usize> = (0..c.num_blocks).map(|k| c.block_layers(k)).collect();
    println!("checkpoint   {}", a.checkpoint.display());
    println!(
        "image        {}×{}×{}",
        c.in_channels, c.img_size, c.img_size
    );
    println!(
        "patches      {}×{} → {} tokens of dim {}",
        c.patch_size,
        c.patch_size,
        c.num_tokens(),
        c.patch_dim()
    );
    println!(
        "width        {} ({} heads of {}, MLP ×{})",
        c.channels,
        c.num_heads(),
        c.head_dim,
        c.mlp_ratio
    );
    println!("blocks       {} with layers {:?}", c.num_blocks, layers);
    println!(
        "classes      {}",
        if c.num_classes == 0 {
            "unconditional".to_string()
        } else {
            c.num_classes.to_string()
        }
    );
    println!(
        "coupling     {}",
        if c.nvp {
            "affine (nvp)"
        } else {
            "volume-preserving"
        }
    );
    println!(
        "parameters   {} ({:.2} M)",
        ckpt.num_params(),
        ckpt.num_params() as f64 / 1e6
    );
    Ok(())
}
