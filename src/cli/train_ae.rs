//! `tarflow train-ae --config experiments/ae-*.toml [--set section.key=value]... [--device D]`.

use anyhow::{Context, Result};
use candle_core::DType;
use clap::Args;
use tarflow_flows::autoencoder::Autoencoder;
use tarflow_train::autoencoder::{train_autoencoder, AeConfig};

/// Arguments of `tarflow train-ae`.
#[derive(Debug, Args)]
pub struct TrainAeArgs {
    /// Config file, or a bare name looked up as `experiments/NAME.toml`.
    #[arg(long)]
    config: String,
    /// Override a config key, e.g. `--set train.steps=200` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    sets: Vec<String>,
    /// Where to train.
    #[arg(long, value_enum, default_value = "cpu")]
    device: tarflow_flows::device::DeviceKind,
}

/// Trains the autoencoder, writes its folder and a grid of held-out images over their
/// reconstructions, and prints the held-out PSNR.
pub fn run(a: TrainAeArgs) -> Result<()> {
    let path = tarflow_train::overrides::resolve(&a.config)?;
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let cfg = AeConfig::from_toml(&text, &path.display().to_string(), &a.sets)?;
    let name = cfg.output.name.clone().unwrap_or_else(|| {
        path.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "ae".into())
    });
    let device = tarflow_flows::device::select(a.device.name())?;
    let (root, s) = train_autoencoder(&cfg, &name, &device, |l| eprintln!("{l}"))?;
    // The saved folder must read back as any user would read it.
    let vae = Autoencoder::load(&root.join("vae"), &device, DType::F32)?;
    let grid = root.join("reconstructions.png");
    println!(
        "wrote {}: held-out PSNR {:.2} dB ({} images; training images {:.2} dB), KL {:.1} nats/image, scaling_factor {:.4}, {:.0} s of training; grid {}",
        root.join("vae").display(),
        s.val_psnr_db,
        s.val_count,
        s.train_psnr_db,
        s.val_kl_nats,
        s.scaling_factor,
        s.train_seconds,
        grid.display()
    );
    if let (Some(before), Some(after)) = (s.noisy_val_psnr_before_db, s.noisy_val_psnr_db) {
        println!(
            "decoder fine-tuned on noisy latents: held-out PSNR of decoding latents with noise σ = {} (scaled units) {before:.2} dB before → {after:.2} dB after",
            cfg.finetune.as_ref().map_or(0.0, |f| f.noise_std)
        );
    }
    drop(vae);
    Ok(())
}
