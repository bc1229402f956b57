//! A sample-quality figure beside bits/dim: the Fréchet distance between generated and held-out
//! images in the feature space of a small classifier trained once on the same data. It is
//! named "FD (classifier features)", never FID: the features are not Inception-v3's. The
//! extractor is a trait, so Inception weights supplied by a user can replace it.

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{Module, VarBuilder, VarMap};
use std::collections::HashMap;
use std::path::Path;
use tarflow_datasets::ImageSet;
use tarflow_flows::autoencoder::Autoencoder;
use tarflow_flows::rng::seeded;
use tarflow_train::optim::{AdamW, AdamWConfig};
use tarflow_train::{Result, TrainError};

/// Turns images (N, C, S, S) in [-1, 1] into feature vectors (N, F).
pub trait FeatureExtractor {
    /// Features of a batch.
    fn features(&self, images: &Tensor) -> Result<Tensor>;
    /// A name for reports.
    fn name(&self) -> String;
}

/// Width of the classifier's hidden layer and of its feature layer.
const HIDDEN: usize = 256;
const FEATURES: usize = 64;

/// An MLP classifier `in → 256 → 64 (features) → classes` with ReLU.
pub struct Classifier {
    l1: candle_nn::Linear,
    l2: candle_nn::Linear,
    l3: candle_nn::Linear,
    /// Accuracy on the held-out images it was checked on.
    pub accuracy: f64,
    /// (C, S) of the images it takes.
    pub shape: (usize, usize),
}

impl Classifier {
    fn build(
        vb: VarBuilder,
        in_dim: usize,
        classes: usize,
    ) -> Result<(candle_nn::Linear, candle_nn::Linear, candle_nn::Linear)> {
        Ok((
            candle_nn::linear(in_dim, HIDDEN, vb.pp("l1"))?,
            candle_nn::linear(HIDDEN, FEATURES, vb.pp("l2"))?,
            candle_nn::linear(FEATURES, classes, vb.pp("l3"))?,
        ))
    }

    fn feats(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.flatten_from(1)?;
        Ok(self.l2.forward(&self.l1.forward(&x)?.relu()?)?.relu()?)
    }

    /// Trains on `train` (labelled) for `epochs` and measures accuracy on `val`.
    pub fn train(train: &ImageSet, val: &ImageSet, epochs: usize, seed: u64) -> Result<Self> {
        let labels = train.labels.as_ref().ok_or_else(|| {
            TrainError::config(
                "fd",
                "the classifier needs labelled images (this data set has none)",
            )
        })?;
        let classes = train.num_classes().max(2);
        let in_dim = train.image_len();
        let dev = Device::Cpu;
        let vm = VarMap::new();
        {
            // Seeded initial weights (candle's CPU randn is not reproducible): the same data
            // always give the same classifier, so FDs compare across experiments.
            let mut rng = seeded(seed ^ 0xfd);
            let mut data = vm
                .data()
                .lock()
                .map_err(|_| TrainError::config("fd", "variable map lock poisoned"))?;
            for (name, rows, fan_in) in [
                ("l1", HIDDEN, in_dim),
                ("l2", FEATURES, HIDDEN),
                ("l3", classes, FEATURES),
            ] {
                let b = 1.0 / (fan_in as f64).sqrt();
                let w = tarflow_flows::rng::uniform(&mut rng, (rows, fan_in), -b, b, &dev)?;
                let bias = tarflow_flows::rng::uniform(&mut rng, rows, -b, b, &dev)?;
                data.insert(format!("{name}.weight"), Var::from_tensor(&w)?);
                data.insert(format!("{name}.bias"), Var::from_tensor(&bias)?);
            }
        }
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let (l1, l2, l3) = Self::build(vb, in_dim, classes)?;
        let vars: Vec<(String, Var)> = vm
            .data()
            .lock()
            .map_err(|_| TrainError::config("fd", "variable map lock poisoned"))?
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut opt = AdamW::new(
            vars,
            AdamWConfig {
                beta2: 0.999,
                weight_decay: 0.0,
                ..Default::default()
            },
        )?;
        let mut me = Self {
            l1,
            l2,
            l3,
            accuracy: 0.0,
            shape: (train.channels, train.height),
        };
        let batch = 128;
        let mut order: Vec<usize> = (0..train.len()).collect();
        let mut rng = seeded(seed);
        for _ in 0..epochs {
            use rand::seq::SliceRandom;
            order.shuffle(&mut rng);
            for chunk in order.chunks(batch) {
                let x = to_tensor(train, chunk)?;
                let y: Vec<u32> = chunk.iter().map(|&i| labels[i].max(0) as u32).collect();
                let y = Tensor::new(y.as_slice(), &dev)?;
                let logits = me.l3.forward(&me.feats(&x)?)?;
                let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
                opt.step(&loss.backward()?, 1e-3)?;
            }
        }
        me.accuracy = me.accuracy_on(val)?;
        Ok(me)
    }

    /// Fraction of `set`'s images classified correctly.
    pub fn accuracy_on(&self, set: &ImageSet) -> Result<f64> {
        let Some(labels) = &set.labels else {
            return Ok(f64::NAN);
        };
        let idx: Vec<usize> = (0..set.len()).collect();
        let mut right = 0usize;
        for chunk in idx.chunks(512) {
            let logits = self.l3.forward(&self.feats(&to_tensor(set, chunk)?)?)?;
            let pred = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
            right += chunk
                .iter()
                .zip(pred)
                .filter(|(&i, p)| labels[i] == *p as i64)
                .count();
        }
        Ok(right as f64 / set.len().max(1) as f64)
    }

    /// Writes the weights, shape and accuracy to a safetensors file (atomically).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut t: Vec<(String, Tensor)> = Vec::new();
        for (name, l) in [("l1", &self.l1), ("l2", &self.l2), ("l3", &self.l3)] {
            t.push((format!("{name}.weight"), l.weight().clone()));
            if let Some(b) = l.bias() {
                t.push((format!("{name}.bias"), b.clone()));
            }
        }
        let meta = HashMap::from([
            ("accuracy".to_string(), self.accuracy.to_string()),
            ("channels".to_string(), self.shape.0.to_string()),
            ("size".to_string(), self.shape.1.to_string()),
        ]);
        let bytes =
            safetensors::tensor::serialize(t.iter().map(|(k, v)| (k.as_str(), v)), Some(meta))
                .map_err(|e| TrainError::Run {
                    path: path.into(),
                    msg: e.to_string(),
                })?;
        tarflow_flows::checkpoint::write_atomic(path, &bytes)?;
        Ok(())
    }

    /// Reads a classifier written by [`Self::save`].
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| TrainError::io(path, e))?;
        let bad = |m: String| TrainError::Run {
            path: path.into(),
            msg: m,
        };
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let m = meta.metadata().clone().unwrap_or_default();
        let num = |k: &str| {
            m.get(k)
                .and_then(|v| v.parse::<f64>().ok())
                .ok_or_else(|| bad(format!("no `{k}` in its metadata")))
        };
        let (acc, c, s) = (
            num("accuracy")?,
            num("channels")? as usize,
            num("size")? as usize,
        );
        let t = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .map_err(|e| bad(e.to_string()))?;
        let w = |k: &str| {
            t.get(k)
                .cloned()
                .ok_or_else(|| bad(format!("no tensor `{k}`")))
        };
        let lin = |n: &str| -> Result<candle_nn::Linear> {
            Ok(candle_nn::Linear::new(
                w(&format!("{n}.weight"))?,
                Some(w(&format!("{n}.bias"))?),
            ))
        };
        Ok(Self {
            l1: lin("l1")?,
            l2: lin("l2")?,
            l3: lin("l3")?,
            accuracy: acc,
            shape: (c, s),
        })
    }
}

impl FeatureExtractor for Classifier {
    fn features(&self, images: &Tensor) -> Result<Tensor> {
        self.feats(&tarflow_flows::device::to_host(images)?.to_dtype(DType::F32)?)
    }

    fn name(&self) -> String {
        format!(
            "MLP classifier features ({FEATURES}-d, held-out accuracy {:.1} %)",
            100.0 * self.accuracy
        )
    }
}

/// Images `idx` of `set` as (n, C, H, W) in [-1, 1], dequantised by half a bin.
pub fn to_tensor(set: &ImageSet, idx: &[usize]) -> Result<Tensor> {
    let n = set.image_len();
    let mut v = Vec::with_capacity(idx.len() * n);
    for &i in idx {
        let im = set
            .image(i)
            .ok_or_else(|| TrainError::config("fd", format!("image {i} out of range")))?;
        v.extend(im.iter().map(|&k| tarflow_datasets::transform::to_unit(k)));
    }
    Ok(Tensor::from_vec(
        v,
        (idx.len(), set.channels, set.height, set.width),
        &Device::Cpu,
    )?)
}

/// Mean and covariance (f64) of feature rows.
fn moments(f: &Tensor) -> Result<(nalgebra::DVector<f64>, nalgebra::DMatrix<f64>)> {
    let rows = tarflow_flows::device::host_f64(f)?.to_vec2::<f64>()?;
    let (n, d) = (rows.len(), rows.first().map_or(0, Vec::len));
    let m = nalgebra::DMatrix::from_row_iterator(n, d, rows.into_iter().flatten());
    let mean = m.row_mean().transpose();
    let centred = nalgebra::DMatrix::from_fn(n, d, |i, j| m[(i, j)] - mean[j]);
    let cov = centred.transpose() * &centred / (n.saturating_sub(1).max(1) as f64);
    Ok((mean, cov))
}

/// Fréchet distance between Gaussians fitted to two feature sets:
/// `|μ₁ − μ₂|² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁^{½} Σ₂ Σ₁^{½})^{½}`.
pub fn frechet_distance(a: &Tensor, b: &Tensor) -> Result<f64> {
    let (m1, s1) = moments(a)?;
    let (m2, s2) = moments(b)?;
    let e = nalgebra::SymmetricEigen::new(s1.clone());
    let sqrt_vals = e.eigenvalues.map(|v| v.max(0.0).sqrt());
    let r1 =
        &e.eigenvectors * nalgebra::DMatrix::from_diagonal(&sqrt_vals) * e.eigenvectors.transpose();
    let inner = &r1 * &s2 * &r1;
    let inner = (&inner + inner.transpose()) * 0.5;
    let tr_sqrt: f64 = nalgebra::SymmetricEigen::new(inner)
        .eigenvalues
        .iter()
        .map(|v| v.max(0.0).sqrt())
        .sum();
    Ok((m1 - m2).norm_squared() + s1.trace() + s2.trace() - 2.0 * tr_sqrt)
}

/// Features of `images` in batches of 512.
pub fn features_of(fx: &dyn FeatureExtractor, images: &Tensor) -> Result<Tensor> {
    let n = images.dim(0)?;
    let mut parts = Vec::new();
    let mut i = 0;
    while i < n {
        let b = 512.min(n - i);
        parts.push(fx.features(&images.narrow(0, i, b)?)?);
        i += b;
    }
    Ok(Tensor::cat(&parts, 0)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tarflow_flows::rng::uniform;

    #[test]
    fn frechet_distance_of_known_gaussians() {
        // Same set: 0. Shifted by c in every one of d dims: d·c².
        let a = uniform(&mut seeded(1), (4000, 3), -1.0, 1.0, &Device::Cpu).unwrap();
        assert!(frechet_distance(&a, &a).unwrap().abs() < 1e-9);
        let b = (&a + 2.0).unwrap();
        let fd = frechet_distance(&a, &b).unwrap();
        assert!((fd - 12.0).abs() < 1e-6, "{fd}");
        // Scaled by 2: per dim var v → 4v, FD = Σ (v + 4v − 2·2v) = Σ v ≈ 3·(1/3).
        let c = (&a * 2.0).unwrap();
        let fd = frechet_distance(&a, &c).unwrap();
        assert!((fd - 1.0).abs() < 0.05, "{fd}");
    }
}

/// A Fréchet-distance measurement of generated images.
#[derive(Debug, Clone)]
pub struct FdReport {
    /// The distance.
    pub fd: f64,
    /// Generated and held-out images compared.
    pub generated: usize,
    /// Held-out images compared.
    pub real: usize,
    /// Feature extractor description.
    pub features: String,
    /// Sampling seconds per generated image.
    pub sample_s_per_image: f64,
    /// Generated images that stayed NaN/Inf after redraws (scored as clamped zeros).
    pub non_finite: usize,
}

/// The held-out images' features, computed once and compared with every sample set.
pub struct Reference {
    features: Tensor,
    count: usize,
}

impl Reference {
    /// Features of every image of `real` under `fx`.
    pub fn of(fx: &dyn FeatureExtractor, real: &ImageSet) -> Result<Self> {
        let idx: Vec<usize> = (0..real.len()).collect();
        Ok(Self {
            features: features_of(fx, &to_tensor(real, &idx)?)?,
            count: real.len(),
        })
    }

    /// The Fréchet distance of `features` (from [`features_of`]) to the held-out images.
    pub fn fd_to(&self, features: &Tensor) -> Result<f64> {
        frechet_distance(features, &self.features)
    }
}

/// Features of `opts.num` images sampled from `model` (a latent model's decoded by `vae`;
/// scored as images: clamped to [-1, 1] and rounded to 8 bits), with the sampling seconds
/// (decoding included) and the images left non-finite.
pub fn sample_features(
    model: &tarflow_flows::TarFlow,
    opts: &tarflow_sample::generate::SampleOptions,
    fx: &dyn FeatureExtractor,
    vae: Option<&Autoencoder>,
) -> Result<(Tensor, f64, usize)> {
    let t0 = std::time::Instant::now();
    let s = tarflow_sample::generate::generate(model, opts, None, &mut |_, _| {})
        .map_err(|e| TrainError::config("fd", e.to_string()))?;
    let images = match vae {
        Some(v) => v.decode_scaled(&s.images, opts.batch)?,
        None => s.images.clone(),
    };
    let secs = t0.elapsed().as_secs_f64();
    let px = tarflow_sample::grid::to_u8(&images)?;
    let gen = Tensor::from_vec(
        px.into_iter()
            .map(tarflow_datasets::transform::to_unit)
            .collect::<Vec<_>>(),
        images.dims(),
        &Device::Cpu,
    )?;
    Ok((features_of(fx, &gen)?, secs, s.non_finite))
}

/// Samples `opts.num` images from `model` (decoded by `vae` for a latent model) and measures
/// their FD to `real` under `fx`.
pub fn measure(
    model: &tarflow_flows::TarFlow,
    opts: &tarflow_sample::generate::SampleOptions,
    real: &Reference,
    fx: &dyn FeatureExtractor,
    vae: Option<&Autoencoder>,
) -> Result<FdReport> {
    let (fg, secs, non_finite) = sample_features(model, opts, fx, vae)?;
    let n = fg.dim(0)?;
    Ok(FdReport {
        fd: frechet_distance(&fg, &real.features)?,
        generated: n,
        real: real.count,
        features: fx.name(),
        sample_s_per_image: secs / n.max(1) as f64,
        non_finite,
    })
}

/// Where `tarflow fd` keeps the classifier of `cfg`'s data when not told:
/// `runs/fd-classifier-<source>-<C>x<S>.safetensors`.
pub fn default_classifier_path(cfg: &tarflow_train::TrainConfig) -> std::path::PathBuf {
    std::path::PathBuf::from(
        format!(
            "runs/fd-classifier-{:?}-{}x{}.safetensors",
            cfg.data.source, cfg.model.in_channels, cfg.model.img_size
        )
        .to_lowercase(),
    )
}

/// Loads the classifier at `path`, or trains one on `cfg`'s data and saves it there.
pub fn classifier_for(
    cfg: &tarflow_train::TrainConfig,
    path: &Path,
) -> Result<(Classifier, ImageSet)> {
    let (train, val) = tarflow_train::data::split_sets(cfg)?;
    if path.is_file() {
        let c = Classifier::load(path)?;
        if c.shape != (val.channels, val.height) {
            return Err(TrainError::Run {
                path: path.into(),
                msg: format!(
                    "classifier takes {}×{} images, the data are {}×{}",
                    c.shape.0, c.shape.1, val.channels, val.height
                ),
            });
        }
        return Ok((c, val));
    }
    let c = Classifier::train(&train, &val, 3, cfg.train.seed)?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
    }
    c.save(path)?;
    Ok((c, val))
}
