//! KL autoencoders (SD-VAE's architecture) from diffusers folders: `config.json` and
//! `diffusion_pytorch_model.safetensors`, as `save_pretrained` writes them. The network
//! (`nets.rs`) is built from candle-transformers' stable-diffusion blocks; this module reads and
//! checks the folder, so that a config that does not match its tensors is an error naming the
//! file and key, and trains new ones (`tarflow train-ae`).

use crate::error::{FlowError, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The config file of a diffusers autoencoder folder.
pub const CONFIG: &str = "config.json";
/// The weights file of a diffusers autoencoder folder.
pub const WEIGHTS: &str = "diffusion_pytorch_model.safetensors";

mod config;
mod nets;
pub use config::AutoencoderConfig;
use nets::{Decoder, Encoder};

/// The file's tensors, handed to candle-transformers' constructor one by one; which were
/// taken is remembered, so that tensors the config has no place for are found.
struct Tensors {
    all: HashMap<String, Tensor>,
    /// Shared with the loader, which reads it once the network is built.
    taken: Arc<Mutex<BTreeSet<String>>>,
}

impl SimpleBackend for Tensors {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            return Err(candle_core::Error::Msg(format!(
                "tensor `{name}` has shape {:?}, the config implies {:?}",
                t.dims(),
                s.dims()
            )));
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.all.get(name).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "tensor `{name}` is missing (the config implies it)"
            ))
        })?;
        self.taken
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string());
        // Cast on the host: the file may hold f64 or f16, and some GPUs take no f64.
        crate::device::upload(t, dev, dtype).map_err(|e| candle_core::Error::Msg(e.to_string()))
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.all.contains_key(name)
    }
}

/// The encoder and decoder of `cfg` over the variables of `vb`.
fn build(cfg: &AutoencoderConfig, vb: VarBuilder) -> candle_core::Result<(Encoder, Decoder)> {
    Ok((Encoder::new(cfg, vb.clone())?, Decoder::new(cfg, vb)?))
}

/// A KL autoencoder loaded from a diffusers folder.
pub struct Autoencoder {
    encoder: Encoder,
    decoder: Decoder,
    /// What its config says.
    pub config: AutoencoderConfig,
    /// The folder it was read from.
    pub dir: PathBuf,
    /// SHA-256 (hex) of its weights file: latents encoded by it say which autoencoder made them.
    pub checksum: String,
    /// Where its decoder was fine-tuned on noisy latents, what that fine-tune recorded.
    pub finetune: Option<DecoderFinetune>,
    /// Where its weights live, and in which dtype.
    device: Device,
    dtype: DType,
}

/// The file a decoder fine-tune (`train-ae` with `[finetune]`) writes beside the diffusers
/// files; diffusers ignores it.
pub const FINETUNE: &str = "denoiser.json";

/// What a decoder fine-tuned on noisy latents was trained for: decoding `z + σ·ε` (σ in the
/// scaled latent's units, the flow's training noise) to the clean image.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DecoderFinetune {
    /// σ of the latent noise, in scaled-latent units.
    pub noise_std: f64,
    /// The autoencoder it started from.
    pub base: String,
    /// SHA-256 of the base's weights file: its encoder is this one's.
    pub base_sha256: String,
}

impl Autoencoder {
    /// Reads the folder `dir` onto `device` in `dtype`.
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let cfg_path = dir.join(CONFIG);
        let text = std::fs::read_to_string(&cfg_path)
            .map_err(|e| FlowError::checkpoint(&cfg_path, format!("unreadable: {e}")))?;
        let config = AutoencoderConfig::from_json(&text, &cfg_path)?;
        let path = dir.join(WEIGHTS);
        let bytes = std::fs::read(&path)
            .map_err(|e| FlowError::checkpoint(&path, format!("unreadable: {e}")))?;
        let checksum = sha256_hex(&bytes);
        let all = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .map_err(|e| FlowError::checkpoint(&path, format!("not a safetensors file: {e}")))?;
        drop(bytes);
        let keys: BTreeSet<String> = all.keys().cloned().collect();
        let taken = Arc::new(Mutex::new(BTreeSet::new()));
        let backend = Tensors {
            all,
            taken: taken.clone(),
        };
        let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
        let (encoder, decoder) = build(&config, vb).map_err(|e| {
            FlowError::checkpoint(&path, format!("{e} (config: {})", cfg_path.display()))
        })?;
        let taken = taken.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(k) = keys.difference(&taken).next() {
            return Err(FlowError::checkpoint(
                &path,
                format!(
                    "tensor `{k}` has no place in the network {} describes (check block_out_channels, layers_per_block and the quant convs)",
                    cfg_path.display()
                ),
            ));
        }
        let ft_path = dir.join(FINETUNE);
        let finetune = match std::fs::read_to_string(&ft_path) {
            Ok(text) => Some(serde_json::from_str(&text).map_err(|e| {
                FlowError::checkpoint(&ft_path, format!("not a decoder fine-tune record: {e}"))
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(FlowError::checkpoint(&ft_path, format!("unreadable: {e}"))),
        };
        Ok(Self {
            encoder,
            decoder,
            config,
            dir: dir.to_path_buf(),
            checksum,
            finetune,
            device: device.clone(),
            dtype,
        })
    }

    /// The folder `dir` with its weights as the variables of the returned map, for further
    /// training (the folder is first read as [`Self::load`] reads it, with its checks).
    pub fn load_trainable(dir: &Path, device: &Device) -> Result<(Self, candle_nn::VarMap)> {
        let fixed = Self::load(dir, device, DType::F32)?;
        let (mut me, mut varmap) = Self::init(fixed.config.clone(), 0, device)?;
        let path = dir.join(WEIGHTS);
        varmap
            .load(&path)
            .map_err(|e| FlowError::checkpoint(&path, format!("{e} (expected f32 tensors)")))?;
        (me.dir, me.checksum, me.finetune) = (fixed.dir, fixed.checksum, fixed.finetune);
        Ok((me, varmap))
    }

    /// A new autoencoder for training, its weights the variables of the returned map, drawn
    /// from `seed` as PyTorch initialises them (weights uniform in ±1/√fan_in; zero biases, unit
    /// norm scales): candle's own initialisers cannot be seeded on the CPU.
    pub fn init(
        config: AutoencoderConfig,
        seed: u64,
        device: &Device,
    ) -> Result<(Self, candle_nn::VarMap)> {
        config.check()?;
        let varmap = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let (encoder, decoder) = build(&config, vb)?;
        let mut rng = crate::rng::seeded(seed);
        {
            let vars = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
            let mut names: Vec<&String> = vars.keys().collect();
            names.sort();
            for name in names {
                let var = &vars[name];
                let dims = var.dims().to_vec();
                let value = match dims.len() {
                    1 if name.ends_with("bias") => {
                        Tensor::zeros(dims[0], DType::F32, &Device::Cpu)?
                    }
                    1 => Tensor::ones(dims[0], DType::F32, &Device::Cpu)?,
                    _ => {
                        let bound = 1.0 / (dims[1..].iter().product::<usize>() as f64).sqrt();
                        crate::rng::uniform(&mut rng, dims.as_slice(), -bound, bound, &Device::Cpu)?
                    }
                };
                var.set(&crate::device::upload(&value, device, DType::F32)?)?;
            }
        }
        let me = Self {
            encoder,
            decoder,
            config,
            dir: PathBuf::new(),
            checksum: String::new(),
            finetune: None,
            device: device.clone(),
            dtype: DType::F32,
        };
        Ok((me, varmap))
    }

    /// The training loss's two terms for images `x` and the posterior's noise `eps`: the
    /// reconstruction's squared error per image value, and KL(q(z|x) ‖ N(0, I)) summed over the
    /// latent, per image value.
    pub fn losses(&self, x: &Tensor, eps: &Tensor) -> Result<(Tensor, Tensor)> {
        let (mean, logvar) = self.posterior(x)?;
        let z = (&mean + ((&logvar * 0.5)?.exp()? * eps)?)?;
        let rec = (self.decoder.forward(&z)? - x)?.sqr()?.mean_all()?;
        let kl = (twice_kl(&mean, &logvar)? * (0.5 / x.elem_count() as f64))?;
        Ok((rec, kl))
    }

    /// The posterior's mean and log-variance (N, latent, S/f, S/f) of images `x`, the
    /// log-variance clamped to [−30, 20] as diffusers clamps it.
    pub fn posterior(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let p = self.encoder.forward(x)?;
        let l = self.config.latent_channels;
        Ok((p.narrow(1, 0, l)?, p.narrow(1, l, l)?.clamp(-30f32, 20f32)?))
    }

    /// Writes `config` and the variables of `varmap` as a diffusers folder `dir` (each file
    /// atomically).
    pub fn save(config: &AutoencoderConfig, varmap: &candle_nn::VarMap, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|source| FlowError::Io {
            path: dir.into(),
            source,
        })?;
        let text = serde_json::to_string_pretty(&config.to_json())
            .map_err(|e| FlowError::Config(e.to_string()))?;
        crate::checkpoint::write_atomic(&dir.join(CONFIG), text.as_bytes())?;
        let vars = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<(String, Tensor)> = Vec::with_capacity(vars.len());
        for (k, v) in vars.iter() {
            all.push((
                k.clone(),
                crate::device::to_host(v.as_tensor())?.contiguous()?,
            ));
        }
        all.sort_by(|a, b| a.0.cmp(&b.0));
        let bytes = safetensors::tensor::serialize(all.iter().map(|(k, t)| (k.as_str(), t)), None)
            .map_err(|e| FlowError::Config(format!("serialising {}: {e}", dir.display())))?;
        crate::checkpoint::write_atomic(&dir.join(WEIGHTS), &bytes)
    }

    /// The posterior's mean and standard deviation (N, latent, S/f, S/f) of images `x`
    /// (N, C, S, S) in [−1, 1], before the scaling factor.
    pub fn encode(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (mean, logvar) = self.posterior(x)?;
        Ok((mean, (logvar * 0.5)?.exp()?))
    }

    /// Images (N, C, S, S), nominally in [−1, 1], of latents `z` (before the scaling factor).
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        Ok(self.decoder.forward(z)?)
    }

    /// Pictures of a latent flow's samples `x` (N, latent, s, s; any device): divided by the
    /// scaling factor (the flow models scaled latents, as STARFlow does), decoded `batch` at a
    /// time on this autoencoder's device, and returned on the host in f32.
    pub fn decode_scaled(&self, x: &Tensor, batch: usize) -> Result<Tensor> {
        let host = (crate::device::to_host(x)?.to_dtype(DType::F32)? / self.config.scaling_factor)?;
        let n = host.dim(0)?;
        let mut parts = Vec::new();
        for i in (0..n).step_by(batch.max(1)) {
            let z = host.narrow(0, i, batch.max(1).min(n - i))?;
            let z = crate::device::upload(&z, &self.device, self.dtype)?;
            let img = crate::device::to_host(&self.decode(&z)?)?.to_dtype(DType::F32)?;
            parts.push(img);
        }
        Ok(Tensor::cat(&parts, 0)?)
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// SHA-256 (hex) of the weights file of the diffusers folder `dir`, without building the
/// network: what `vae encode` records and a `latents` source is checked against.
pub fn weights_checksum(dir: &Path) -> Result<String> {
    let path = dir.join(WEIGHTS);
    let bytes = std::fs::read(&path)
        .map_err(|e| FlowError::checkpoint(&path, format!("unreadable: {e}")))?;
    Ok(sha256_hex(&bytes))
}

/// KL(N(mean, e^logvar) ‖ N(0, I)) in nats, summed over every value (a scalar tensor).
pub fn kl_sum(mean: &Tensor, logvar: &Tensor) -> Result<Tensor> {
    Ok((twice_kl(mean, logvar)? * 0.5)?)
}

/// Σ (μ² + σ² − 1 − log σ²): twice the KL, so that the training loss scales it once.
fn twice_kl(mean: &Tensor, logvar: &Tensor) -> Result<Tensor> {
    Ok(((mean.sqr()? + logvar.exp()?)? - 1.0)?
        .sub(logvar)?
        .sum_all()?)
}
