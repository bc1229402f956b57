//! `tarflow bench`: throughput figures (never asserted in tests).

use anyhow::{anyhow, Result};
use candle_core::{DType, Device, Tensor, Var};
use clap::{Args, ValueEnum};
use std::sync::Arc;
use std::time::Instant;
use tarflow_datasets::loader::Loader;
use tarflow_datasets::transform::{Noise, Transform};
use tarflow_flows::rng::{seeded, uniform};
use tarflow_flows::{Checkpoint, Cond, ModelConfig, ReverseOptions, TarFlow};
use tarflow_train::optim::{AdamW, AdamWConfig};

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

/// The model config, device, a batch of random images and labels cycling through the classes.
struct Setup {
    cfg: ModelConfig,
    device: Device,
    x: Tensor,
    labels: Vec<i64>,
}

impl Setup {
    fn new(a: &BenchArgs) -> Result<Self> {
        let cfg: ModelConfig = match &a.model {
            Some(j) => serde_json::from_str(j)?,
            None => ModelConfig::new(3, 32, 4, 256, 4, 2, 10),
        };
        let device = tarflow_flows::device::select(&a.device)?;
        let s = cfg.img_size;
        let x = uniform(
            &mut seeded(0),
            (a.batch, cfg.in_channels, s, s),
            -1.0,
            1.0,
            &device,
        )?;
        let labels = (0..a.batch as i64)
            .map(|i| i % cfg.num_classes.max(1) as i64)
            .collect();
        Ok(Self {
            cfg,
            device,
            x,
            labels,
        })
    }

    fn cond(&self) -> Cond<'_> {
        if self.cfg.num_classes > 0 {
            Cond::Labels(&self.labels)
        } else {
            Cond::Null
        }
    }
}

/// Runs `step` once to warm up, then `iters` times; returns seconds per iteration.
fn time(iters: usize, mut step: impl FnMut() -> Result<()>) -> Result<f64> {
    step()?;
    let t0 = Instant::now();
    for _ in 0..iters.max(1) {
        step()?;
    }
    Ok(t0.elapsed().as_secs_f64() / iters.max(1) as f64)
}

/// Runs the benchmark and prints images/s.
pub fn run(a: BenchArgs) -> Result<()> {
    if let What::Loader = a.what {
        return loader(&a);
    }
    let su = Setup::new(&a)?;
    let cond = su.cond();
    let per = match a.what {
        What::Score | What::Sample => {
            let model = Checkpoint::init(&su.cfg, 0, &su.device)?.model(&su.device, DType::F32)?;
            time(a.iters, || {
                if let What::Score = a.what {
                    model
                        .nll(&model.forward(&su.x, cond)?, true)?
                        .to_vec1::<f32>()?;
                } else {
                    let opts = ReverseOptions::default();
                    let x = model.sample(a.batch, cond, 1.0, &mut seeded(1), &opts)?;
                    x.flatten_all()?.to_vec1::<f32>()?;
                }
                Ok(())
            })?
        }
        What::Train => {
            let ckpt = Checkpoint::init(&su.cfg, 0, &su.device)?;
            let (model, varmap) = ckpt.trainable_model(&su.device, DType::F32)?;
            let vars: Vec<(String, Var)> = varmap
                .data()
                .lock()
                .map_err(|_| anyhow!("variable map lock poisoned"))?
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let mut opt = AdamW::new(vars, AdamWConfig::default())?;
            time(a.iters, || {
                let loss = TarFlow::loss(&model.forward(&su.x, cond)?)?;
                opt.step(&loss.backward()?, 1e-4)?;
                Ok(())
            })?
        }
        What::Loader => unreachable!("handled above"),
    };
    let c = &su.cfg;
    println!(
        "{:?}: {:.1} images/s ({:.3} s/iter, {} iters × batch {}, model {}×{}×{} p{} C{} K{} L{})",
        a.what,
        a.batch as f64 / per,
        per,
        a.iters,
        a.batch,
        c.in_channels,
        c.img_size,
        c.img_size,
        c.patch_size,
        c.channels,
        c.num_blocks,
        c.block_layers(0)
    );
    Ok(())
}

/// Loader throughput on synthetic 64×64 RGB images (the downsampled-ImageNet shape).
fn loader(a: &BenchArgs) -> Result<()> {
    let n = a.batch * a.iters.max(1);
    let pixels = uniform(&mut seeded(0), n * 3 * 64 * 64, 0.0, 255.0, &Device::Cpu)?
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
    println!(
        "Loader: {:.0} images/s ({count} images of 3×64×64 in batches of {}, flip + gaussian noise, 2 workers)",
        count as f64 / secs,
        a.batch
    );
    Ok(())
}
