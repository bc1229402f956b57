//! `tarflow bench`: throughput figures (never asserted in tests).

use anyhow::Result;
use candle_core::DType;
use clap::{Args, ValueEnum};
use std::time::Instant;
use tarflow_flows::rng::{seeded, uniform};
use tarflow_flows::{Checkpoint, Cond, ModelConfig, ReverseOptions};

/// What to measure.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum What {
    /// Forward pass + exact NLL (bits/dim) of a batch: scoring throughput.
    Score,
    /// KV-cached autoregressive sampling.
    Sample,
    /// One training step: forward, backward and AdamW (batch from --batch, e.g. 32).
    Train,
    /// The data loader alone: 64×64 RGB images, flip + Gaussian noise, 2 workers.
    Loader,
}

/// Arguments of `tarflow bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(value_enum, default_value = "score")]
    what: What,
    /// Model config as JSON (defaults to the reference benchmark "small": 3×32×32, patch 4,
    /// 256 channels, 4 blocks × 2 layers, 10 classes).
    #[arg(long)]
    model: Option<String>,
    /// Batch size.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Timed iterations (after one warm-up).
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// cpu, cuda, metal or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// Runs the benchmark and prints images/s.
pub fn run(a: BenchArgs) -> Result<()> {
    match a.what {
        What::Loader => return loader(&a),
        What::Train => return train_step(&a),
        _ => {}
    }
    let cfg: ModelConfig = match &a.model {
        Some(j) => serde_json::from_str(j)?,
        None => ModelConfig::new(3, 32, 4, 256, 4, 2, 10),
    };
    let device = tarflow_flows::device::select(&a.device)?;
    let model = Checkpoint::init(&cfg, 0, &device)?.model(&device, DType::F32)?;
    let mut rng = seeded(0);
    let s = cfg.img_size;
    let x = uniform(
        &mut rng,
        (a.batch, cfg.in_channels, s, s),
        -1.0,
        1.0,
        &device,
    )?;
    let labels: Vec<i64> = (0..a.batch as i64)
        .map(|i| i % cfg.num_classes.max(1) as i64)
        .collect();
    let cond = if cfg.num_classes > 0 {
        Cond::Labels(&labels)
    } else {
        Cond::Null
    };
    let step = || -> Result<()> {
        match a.what {
            What::Score => {
                let out = model.forward(&x, cond)?;
                model.nll(&out, true)?.to_vec1::<f32>()?;
            }
            What::Sample | What::Loader | What::Train => {
                let opts = ReverseOptions::default();
                let x = model.sample(a.batch, cond, 1.0, &mut seeded(1), &opts)?;
                x.flatten_all()?.to_vec1::<f32>()?;
            }
        }
        Ok(())
    };
    step()?;
    let t0 = Instant::now();
    for _ in 0..a.iters {
        step()?;
    }
    let secs = t0.elapsed().as_secs_f64();
    let ips = (a.iters * a.batch) as f64 / secs;
    println!(
        "{:?}: {:.1} images/s ({} iters × batch {}, {:.3} s/iter, model {}×{}×{} p{} C{} K{} L{})",
        a.what,
        ips,
        a.iters,
        a.batch,
        secs / a.iters as f64,
        cfg.in_channels,
        s,
        s,
        cfg.patch_size,
        cfg.channels,
        cfg.num_blocks,
        cfg.block_layers(0)
    );
    Ok(())
}

/// Loader throughput on synthetic 64×64 RGB images (the downsampled-ImageNet shape).
fn loader(a: &BenchArgs) -> Result<()> {
    use std::sync::Arc;
    use tarflow_datasets::loader::Loader;
    use tarflow_datasets::transform::{Noise, Transform};
    let n = a.batch * a.iters.max(1);
    let mut rng = seeded(0);
    let pixels = uniform(
        &mut rng,
        n * 3 * 64 * 64,
        0.0,
        255.0,
        &candle_core::Device::Cpu,
    )?
    .to_dtype(DType::U8)?
    .to_vec1::<u8>()?;
    let set = Arc::new(tarflow_datasets::ImageSet {
        channels: 3,
        height: 64,
        width: 64,
        pixels,
        labels: Some(vec![0; n]),
    });
    let t = Transform {
        flip: true,
        noise: Noise::Gaussian(0.05),
        label_drop: 0.1,
    };
    let l = Loader::new(set, None, a.batch, 0, t, true);
    let t0 = Instant::now();
    let count: usize = l.epoch_from(0, 0, 2).iter().map(|b| b.shape[0]).sum();
    let secs = t0.elapsed().as_secs_f64();
    println!("Loader: {:.0} images/s ({count} images of 3×64×64 in batches of {}, flip + gaussian noise, 2 workers)", count as f64 / secs, a.batch);
    Ok(())
}

/// Training-step time of forward + backward + AdamW on random images.
fn train_step(a: &BenchArgs) -> Result<()> {
    use tarflow_train::optim::{AdamW, AdamWConfig};
    let cfg: ModelConfig = match &a.model {
        Some(j) => serde_json::from_str(j)?,
        None => ModelConfig::new(3, 32, 4, 256, 4, 2, 10),
    };
    let device = tarflow_flows::device::select(&a.device)?;
    let (model, varmap) =
        Checkpoint::init(&cfg, 0, &device)?.trainable_model(&device, DType::F32)?;
    let vars: Vec<(String, candle_core::Var)> = varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("variable map lock poisoned"))?
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut opt = AdamW::new(vars, AdamWConfig::default())?;
    let s = cfg.img_size;
    let x = uniform(
        &mut seeded(0),
        (a.batch, cfg.in_channels, s, s),
        -1.0,
        1.0,
        &device,
    )?;
    let labels: Vec<i64> = (0..a.batch as i64)
        .map(|i| i % cfg.num_classes.max(1) as i64)
        .collect();
    let cond = if cfg.num_classes > 0 {
        Cond::Labels(&labels)
    } else {
        Cond::Null
    };
    let mut step = || -> Result<f32> {
        let loss = tarflow_flows::TarFlow::loss(&model.forward(&x, cond)?)?;
        let grads = loss.backward()?;
        opt.step(&grads, 1e-4)?;
        Ok(loss.to_scalar::<f32>()?)
    };
    step()?;
    let t0 = Instant::now();
    for _ in 0..a.iters {
        step()?;
    }
    let per = t0.elapsed().as_secs_f64() / a.iters as f64;
    println!(
        "Train: {per:.3} s/step ({:.1} images/s, batch {}, {} iters)",
        a.batch as f64 / per,
        a.batch,
        a.iters
    );
    Ok(())
}
