//! A run directory read back for analysis (notebooks, scripts): its config, its metrics, its
//! sample grids, its held-out images and its weights.

use crate::checkpoints::RunDir;
use crate::error::{Result, TrainError};
use crate::metrics::Record;
use crate::plot::{line_plot_png, Series};
use crate::TrainConfig;
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};
use tarflow_datasets::ImageSet;
use tarflow_flows::autoencoder::Autoencoder;
use tarflow_flows::TarFlow;
use tarflow_sample::display::Png;

/// The metrics a run logs, by the names [`Run::curve`] takes.
pub const CURVES: [&str; 9] = [
    "loss",
    "bpd",
    "val_bpd",
    "val_bpd_ema",
    "lr",
    "grad_norm",
    "images_per_s",
    "elapsed_s",
    "denoiser_loss",
];

/// A training run directory (`runs/NAME`), finished or still going.
#[derive(Debug, Clone)]
pub struct Run {
    /// The run directory.
    pub dir: PathBuf,
    /// Its `config.toml`.
    pub config: TrainConfig,
    /// Every line of its `metrics.jsonl`, in order.
    pub metrics: Vec<Record>,
}

impl Run {
    /// Reads the run at `dir`: its config must parse; a run without metrics yet has none.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let rd = RunDir::new(&dir);
        let cfg_path = rd.config_path();
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| TrainError::Run {
            path: dir.clone(),
            msg: format!("cannot read config.toml ({e}); is this a run directory?"),
        })?;
        let config = TrainConfig::from_toml(&text, &cfg_path.display().to_string(), &[])?;
        let metrics = crate::metrics::read(&rd.metrics_path())?;
        Ok(Self {
            dir,
            config,
            metrics,
        })
    }

    /// The (step, value) points of one metric (a name of [`CURVES`]).
    pub fn curve(&self, name: &str) -> Result<Vec<(f64, f64)>> {
        let pick: fn(&Record) -> Option<f64> = match name {
            "loss" => |r| r.loss,
            "bpd" => |r| r.bpd,
            "val_bpd" => |r| r.val_bpd,
            "val_bpd_ema" => |r| r.val_bpd_ema,
            "lr" => |r| r.lr,
            "grad_norm" => |r| r.grad_norm,
            "images_per_s" => |r| r.images_per_s,
            "elapsed_s" => |r| r.elapsed_s,
            "denoiser_loss" => |r| r.denoiser_loss,
            _ => {
                return Err(TrainError::Run {
                    path: self.dir.clone(),
                    msg: format!("no metric `{name}`; expected one of {}", CURVES.join(", ")),
                })
            }
        };
        Ok(self
            .metrics
            .iter()
            .filter_map(|r| pick(r).map(|v| (r.step as f64, v)))
            .collect())
    }

    /// Plots the named metrics against the step, one line each.
    pub fn plot(&self, names: &[&str]) -> Result<Png> {
        let curves = names
            .iter()
            .map(|n| self.curve(n))
            .collect::<Result<Vec<_>>>()?;
        let series: Vec<Series> = names
            .iter()
            .zip(&curves)
            .map(|(n, c)| (*n, c.as_slice()))
            .collect();
        let name = self.dir.file_name().unwrap_or_default().to_string_lossy();
        line_plot_png(&name, "step", &names.join(", "), &series)
    }

    /// The sample grids the run saved (`samples/step-*.png`), oldest first.
    pub fn sample_grids(&self) -> Result<Vec<PathBuf>> {
        let dir = RunDir::new(&self.dir).samples();
        let mut out: Vec<PathBuf> = match std::fs::read_dir(&dir) {
            Ok(entries) => entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.extension().is_some_and(|x| x == "png")
                        && p.file_name()
                            .is_some_and(|n| n.to_string_lossy().starts_with("step-"))
                })
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(TrainError::io(dir, e)),
        };
        out.sort(); // step numbers are zero-padded
        Ok(out)
    }

    /// The newest sample grid as a picture.
    pub fn latest_samples(&self) -> Result<Png> {
        let grids = self.sample_grids()?;
        let last = grids.last().ok_or_else(|| TrainError::Run {
            path: self.dir.clone(),
            msg: "no sample grid saved yet (samples/step-*.png)".into(),
        })?;
        Ok(Png::from_file(last)?)
    }

    /// The held-out images of the run, split exactly as training split them.
    pub fn validation_set(&self) -> Result<ImageSet> {
        Ok(crate::data::split_sets(&self.config)?.1)
    }

    /// The newest weights (EMA where kept and `ema` is set) as an f32 model on `device`.
    pub fn model(&self, ema: bool, device: &Device) -> Result<TarFlow> {
        let r = tarflow_sample::resolve::resolve(&self.dir, ema, device)?;
        Ok(r.checkpoint.model(device, DType::F32)?)
    }

    /// A latent run's autoencoder (its config's `data.vae`, relative to the working directory)
    /// on `device` in f32; `None` for a pixel run.
    pub fn autoencoder(&self, device: &Device) -> Result<Option<Autoencoder>> {
        crate::data::autoencoder(&self.config, device)
    }

    /// σ of the Gaussian noise the run trained with (for the denoising step), if any.
    pub fn train_noise_std(&self) -> Option<f64> {
        use tarflow_datasets::transform::Noise;
        match self.config.data.transform().noise {
            Noise::Gaussian(s) if s > 0.0 => Some(s),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_without_config_is_named_and_unknown_metrics_list_the_known_ones() {
        let dir = tempfile::tempdir().unwrap();
        let e = Run::open(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("config.toml") && e.contains("run directory"),
            "{e}"
        );
        let text = "[model]\nin_channels = 1\nimg_size = 28\npatch_size = 7\nchannels = 64\n\
                    num_blocks = 2\nlayers_per_block = 1\n[data]\nsource = \"embedded\"\n\
                    [train]\nmax_steps = 2\n";
        std::fs::write(dir.path().join("config.toml"), text).unwrap();
        std::fs::write(
            dir.path().join("metrics.jsonl"),
            "{\"step\":1,\"epoch\":0.1,\"loss\":2.0}\n{\"step\":2,\"epoch\":0.2,\"loss\":1.5}\n",
        )
        .unwrap();
        let run = Run::open(dir.path()).unwrap();
        assert_eq!(run.curve("loss").unwrap(), vec![(1.0, 2.0), (2.0, 1.5)]);
        let e = run.curve("los").unwrap_err().to_string();
        assert!(
            e.contains("no metric `los`") && e.contains("val_bpd"),
            "{e}"
        );
        let png = run.plot(&["loss"]).unwrap();
        let img = image::load_from_memory(png.bytes()).unwrap();
        assert_eq!((img.width(), img.height()), (800, 500));
        assert!(
            run.plot(&["val_bpd"]).is_err(),
            "nothing to draw is an error"
        );
        let e = run.latest_samples().unwrap_err().to_string();
        assert!(e.contains("no sample grid"), "{e}");
    }
}
