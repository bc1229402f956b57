//! Training data: the configured source loaded and checked against the model, split into
//! training and validation loaders, and fed to the loop in global batch order.

use crate::config::TrainConfig;
use crate::error::{Result, TrainError};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use tarflow_datasets::folder::FolderOptions;
use tarflow_datasets::loader::{Batch, Loader};
use tarflow_datasets::transform::{Noise, Transform};
use tarflow_datasets::ImageSet;
use tarflow_flows::autoencoder::Autoencoder;

/// Checks that the data path named by `key` exists; otherwise says what the source kind
/// expects there, where such data comes from, and how to point the config at it.
pub fn check_path(cfg: &TrainConfig, path: Option<&Path>, key: &str) -> Result<()> {
    let kind = cfg.data.source;
    match path {
        Some(p) if !p.exists() => Err(TrainError::config(
            key,
            format!(
                "\"{}\": no such file or folder (data.source = \"{}\"). Expected {}. \
                 Point the config at your copy with --set {key}=PATH",
                p.display(),
                kind_name(cfg),
                kind.layout()
            ),
        )),
        None if kind != tarflow_datasets::source::SourceKind::Embedded && key == "data.path" => {
            Err(TrainError::config(
                key,
                format!(
                    "data.source = \"{}\" needs data.path: {}",
                    kind_name(cfg),
                    kind.layout()
                ),
            ))
        }
        _ => Ok(()),
    }
}

fn kind_name(cfg: &TrainConfig) -> String {
    cfg.data.source.name().to_string()
}

/// What is wrong with the keys a `latents` source adds to `[data]`, as (key, why): it needs
/// `data.vae`, which no other source takes, and Gaussian noise or none (uniform dequantisation
/// fills 8-bit bins).
pub(crate) fn latents_problem(d: &crate::config::DataConfig) -> Option<(&'static str, String)> {
    use tarflow_datasets::source::SourceKind;
    let latents = d.source == SourceKind::Latents;
    match (latents, &d.vae) {
        (true, None) => Some((
            "data.vae",
            "missing: data.source = \"latents\" needs the autoencoder the latents were encoded with (e.g. data.vae = \"models/ae-mnist/vae\")".into(),
        )),
        (false, Some(_)) => Some((
            "data.vae",
            format!("only a `latents` source has an autoencoder (data.source = {:?})", d.source.name()),
        )),
        _ if latents && d.noise == crate::config::NoiseKind::Uniform => Some((
            "data.noise",
            "uniform dequantisation fills 8-bit bins; latents are continuous: use \"gaussian\" (STARFlow: noise_std = 0.3 in latent units) or \"none\"".into(),
        )),
        _ => None,
    }
}

/// A latent run's autoencoder (`data.vae`, relative to the working directory) on `device` in
/// f32 — the decoder is small next to the flow —, `None` for a pixel run. Training's grids,
/// `sample`, `fd` and notebooks all load it here.
pub fn autoencoder(cfg: &TrainConfig, device: &candle_core::Device) -> Result<Option<Autoencoder>> {
    match &cfg.data.vae {
        Some(dir) => Ok(Some(Autoencoder::load(
            dir,
            device,
            candle_core::DType::F32,
        )?)),
        None => Ok(None),
    }
}

/// Loads the images of one source path named by `key`; returns them, the number of files
/// skipped as unreadable and what was inferred (a folder's classes, a resize).
pub(crate) fn load_images(
    cfg: &TrainConfig,
    path: Option<&Path>,
    key: &str,
) -> Result<(ImageSet, usize, Vec<String>)> {
    let m = &cfg.model;
    check_path(cfg, path, key)?;
    let opts = FolderOptions {
        size: Some(m.img_size),
        channels: m.in_channels,
        class_per_subdir: None,
        skip_bad: cfg.data.skip_bad,
    };
    let loaded = tarflow_datasets::source::load(cfg.data.source, path, &opts)?;
    let set = loaded.set;
    let origin = path.map_or("the embedded dataset".into(), |p| p.display().to_string());
    if (set.channels, set.height, set.width) != (m.in_channels, m.img_size, m.img_size) {
        return Err(TrainError::config(
            key,
            format!(
                "{origin} holds {}×{}×{} images but [model] expects in_channels × img_size × img_size = {}×{}×{}",
                set.channels, set.height, set.width, m.in_channels, m.img_size, m.img_size
            ),
        ));
    }
    if m.num_classes > 0 {
        if set.labels.is_none() {
            return Err(TrainError::config(
                key,
                format!("{origin} has no labels but model.num_classes = {}; set it to 0 for an unconditional model", m.num_classes),
            ));
        }
        if set.num_classes() > m.num_classes {
            return Err(TrainError::config(
                key,
                format!(
                    "{origin} has labels up to {} but model.num_classes = {}",
                    set.num_classes() - 1,
                    m.num_classes
                ),
            ));
        }
    }
    if set.is_empty() {
        return Err(TrainError::config(key, format!("{origin} holds no image")));
    }
    if let (Some(l), Some(dir)) = (&set.latents, &cfg.data.vae) {
        let sha = tarflow_flows::autoencoder::weights_checksum(dir)?;
        if sha != l.vae_sha256 {
            return Err(TrainError::config(
                "data.vae",
                format!(
                    "{origin} was encoded by the autoencoder {} (sha256 {}…), not by {} (sha256 {}…): re-encode with `tarflow vae encode --vae {}` or point data.vae at the encoder used",
                    l.vae,
                    &l.vae_sha256[..l.vae_sha256.len().min(12)],
                    dir.display(),
                    &sha[..12],
                    dir.display()
                ),
            ));
        }
    }
    let notes = loaded.notes.iter().map(|n| format!("{key}: {n}")).collect();
    Ok((set, loaded.skipped.len(), notes))
}

/// The training loader (micro-batches, augmented) and the validation loader (uniform
/// dequantisation, no augmentation), or none when nothing is held out.
pub fn loaders(
    cfg: &TrainConfig,
    micro: usize,
    warnings: &mut Vec<String>,
) -> Result<(Loader, Option<Loader>)> {
    let t = &cfg.train;
    let (set, skipped, notes) = load_images(cfg, cfg.data.path.as_deref(), "data.path")?;
    warnings.extend(notes);
    if skipped > 0 {
        warnings.push(format!(
            "skipped {skipped} unreadable image files (data.skip_bad)"
        ));
    }
    let set = Arc::new(set);
    let transform = cfg.data.transform();
    // Pixels are scored dequantised (bits/dim of 8-bit data); latents with the training
    // noise, the density the flow learns.
    let eval_t = Transform {
        flip: false,
        noise: match set.latents {
            Some(_) => transform.noise,
            None => Noise::Uniform,
        },
        label_drop: 0.0,
    };
    let (train, val) = match &cfg.data.val_path {
        Some(vp) => {
            let (vset, vskipped, vnotes) = load_images(cfg, Some(vp), "data.val_path")?;
            warnings.extend(vnotes);
            if vskipped > 0 {
                warnings.push(format!("skipped {vskipped} unreadable validation files"));
            }
            let vb = micro.min(vset.len());
            (
                Loader::new(set, None, micro, t.seed, transform, true),
                Some(Loader::new(Arc::new(vset), None, vb, t.seed, eval_t, false)),
            )
        }
        None => {
            let vc = cfg.data.val_count.min(set.len().saturating_sub(micro));
            let (tr, va) = Loader::split(set, vc, micro, t.seed, transform);
            let va = (vc > 0).then(|| {
                let mut va = va.with_transform(eval_t);
                va.batch_size = micro.min(vc);
                va
            });
            (tr, va)
        }
    };
    if train.batches_per_epoch() == 0 {
        return Err(TrainError::config(
            "train.batch_size",
            format!(
                "{} training images cannot fill one micro-batch of {micro}",
                train.len()
            ),
        ));
    }
    Ok((train, val))
}

/// Training batches in global order, across epoch boundaries; in data-parallel training, only
/// this rank's share of each global batch.
pub(crate) struct Feed {
    loader: Loader,
    workers: usize,
    pub(crate) epoch: u64,
    pub(crate) next: usize,
    rx: Option<Receiver<Batch>>,
    /// (rank, ranks, micro-batches per rank and step): of the `ranks × per_rank` micro-batches
    /// of a step, rank r takes the r-th run of `per_rank`.
    shard: (usize, usize, usize),
}

impl Feed {
    /// The feed from global micro-batch `micro_index` on (all ranks count every micro-batch).
    pub(crate) fn at(
        loader: Loader,
        workers: usize,
        micro_index: u64,
        shard: (usize, usize, usize),
    ) -> Self {
        let bpe = loader.batches_per_epoch() as u64;
        Self {
            loader,
            workers,
            epoch: micro_index / bpe,
            next: (micro_index % bpe) as usize,
            rx: None,
            shard,
        }
    }

    /// (epoch, batch in epoch) after `micro_index` micro-batches of all ranks, as a single
    /// process counts them (an epoch's last batch leaves `batch == batches_per_epoch`).
    pub(crate) fn position(&self, micro_index: u64) -> (u64, usize) {
        let bpe = self.loader.batches_per_epoch() as u64;
        match micro_index {
            0 => (0, 0),
            m => ((m - 1) / bpe, ((m - 1) % bpe + 1) as usize),
        }
    }

    fn mine(&self, epoch: u64, b: usize) -> bool {
        let (rank, ranks, per) = self.shard;
        let m = epoch * self.loader.batches_per_epoch() as u64 + b as u64;
        (m % (ranks * per) as u64) / per as u64 == rank as u64
    }

    pub(crate) fn next(&mut self) -> Result<Batch> {
        let bpe = self.loader.batches_per_epoch();
        loop {
            if self.next >= bpe {
                self.epoch += 1;
                self.next = 0;
                self.rx = None;
            }
            if self.mine(self.epoch, self.next) {
                break;
            }
            self.next += 1;
        }
        let (epoch, start, workers) = (self.epoch, self.next, self.workers);
        if self.rx.is_none() {
            let wanted = (start..bpe).filter(|&b| self.mine(epoch, b)).collect();
            self.rx = Some(self.loader.epoch_batches(epoch, wanted, workers));
        }
        let b = self
            .rx
            .as_ref()
            .and_then(|rx| rx.recv().ok())
            .ok_or_else(|| TrainError::Run {
                path: PathBuf::from("<loader>"),
                msg: format!("the data loader stopped in epoch {epoch}"),
            })?;
        self.next += 1;
        Ok(b)
    }
}

/// The training and held-out images of a run's config, split exactly as training split them.
pub fn split_sets(cfg: &crate::TrainConfig) -> Result<(ImageSet, ImageSet)> {
    let micro = cfg.train.batch_size / cfg.train.grad_accum.max(1);
    let (train, val) = loaders(cfg, micro, &mut Vec::new())?;
    let val = val.ok_or_else(|| {
        TrainError::config(
            "data.val_count",
            "no held-out images to compare samples with",
        )
    })?;
    Ok((
        train.set().subset(train.indices()),
        val.set().subset(val.indices()),
    ))
}
