//! `tarflow info CHECKPOINT`.

use anyhow::Result;
use candle_core::Device;
use clap::Args;
use std::path::PathBuf;

/// Arguments of `tarflow info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// A run directory (its latest checkpoint), a checkpoint folder, a .safetensors file
    /// (written by `tarflow import` or training) or a .gguf of `tarflow quantize`; default: the
    /// embedded MNIST likelihood model.
    checkpoint: Option<PathBuf>,
    /// The same as the positional argument, as every other command spells it.
    #[arg(
        long = "checkpoint",
        value_name = "CHECKPOINT",
        conflicts_with = "checkpoint"
    )]
    checkpoint_flag: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Prints the config and parameter count of a checkpoint.
pub fn run(a: InfoArgs) -> Result<()> {
    let r = tarflow_sample::default_model::resolve_or_default(
        a.checkpoint.as_deref().or(a.checkpoint_flag.as_deref()),
        true,
        &Device::Cpu,
    )?;
    let ckpt = &r.checkpoint;
    let c = &ckpt.config;
    if a.json {
        let mut v = serde_json::json!({
            "path": r.path.display().to_string(), "config": c, "num_params": ckpt.num_params(),
        });
        if let Some(q) = &ckpt.quant {
            v["quantisation"] = serde_json::json!({
                "recipe": q.recipe, "plan": q.plan, "weight_bytes": q.bytes(),
                "source": q.source, "train_noise_std": q.train_noise_std,
            });
        }
        println!("{v}");
        return Ok(());
    }
    let layers: Vec<usize> = (0..c.num_blocks).map(|k| c.block_layers(k)).collect();
    println!("checkpoint   {}", r.path.display());
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
    if let Some(q) = &ckpt.quant {
        for line in super::quantize::describe(q, super::quantize::f32_linear_bytes(q)) {
            println!("{line}");
        }
        if let Some(s) = &q.source {
            println!("quantised    from {s}");
        }
    }
    Ok(())
}
