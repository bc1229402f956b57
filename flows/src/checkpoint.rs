//! Self-describing safetensors checkpoints under ml-tarflow key names, atomic writes, and
//! checkpoints built from ml-tarflow state_dicts ([`crate::import`]) and GGUF files
//! ([`crate::gguf`]).

use crate::config::ModelConfig;
use crate::error::{FlowError, Result};
use crate::model::TarFlow;
use crate::packing::Packing;
use crate::params::{buffers, count_params, init_params, is_buffer, param_specs};
use crate::quant::QuantWeights;
use candle_core::Var;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Value of the `format` metadata key of our checkpoints.
pub const FORMAT: &str = "tarflow/1";

/// A model config with its learned tensors (buffers excluded), keyed by ml-tarflow names.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The model the tensors belong to.
    pub config: ModelConfig,
    /// Learned parameters by state_dict key; buffers (`var`, `attn_mask`) are regenerated.
    pub tensors: HashMap<String, Tensor>,
    /// The prior variance buffer `var` when it is not all ones (volume-preserving models).
    pub var: Option<Tensor>,
    /// Reduced-precision Linear weights (a `tarflow quantize` GGUF file); they are absent
    /// from `tensors`.
    pub quant: Option<std::sync::Arc<QuantWeights>>,
}

impl Checkpoint {
    /// A freshly initialised model (ml-tarflow's init) from a seeded RNG.
    pub fn init(config: &ModelConfig, seed: u64, device: &Device) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config: config.clone(),
            tensors: init_params(config, seed, device)?,
            var: None,
            quant: None,
        })
    }

    /// Wraps `tensors` after checking them against `config`; `source` names them in errors.
    pub fn from_tensors(
        config: ModelConfig,
        tensors: HashMap<String, Tensor>,
        source: &Path,
    ) -> Result<Self> {
        Self::from_tensors_with_quant(config, tensors, &HashMap::new(), source)
    }

    /// [`Self::from_tensors`] where the weights in `quant` (a GGUF file's) complete `tensors`;
    /// the caller attaches them.
    pub fn from_tensors_with_quant(
        config: ModelConfig,
        tensors: HashMap<String, Tensor>,
        quant: &HashMap<String, std::sync::Arc<candle_core::quantized::QTensor>>,
        source: &Path,
    ) -> Result<Self> {
        Self::checked(config, tensors, quant, source, None)
    }

    /// [`Self::from_tensors_with_quant`], with each key that does not fit followed by the
    /// setting `hint` says decides it (an importer's argument names).
    fn checked(
        config: ModelConfig,
        mut tensors: HashMap<String, Tensor>,
        quant: &HashMap<String, std::sync::Arc<candle_core::quantized::QTensor>>,
        source: &Path,
        hint: Option<Hint>,
    ) -> Result<Self> {
        config
            .validate()
            .map_err(|e| FlowError::checkpoint(source, e.to_string()))?;
        let var = tensors.remove("var");
        tensors.retain(|k, _| !is_buffer(k));
        let mut shapes: HashMap<String, (Vec<usize>, DType)> = tensors
            .iter()
            .map(|(k, t)| (k.clone(), (t.dims().to_vec(), t.dtype())))
            .collect();
        for (k, q) in quant {
            shapes.insert(k.clone(), (q.shape().dims().to_vec(), DType::F32));
        }
        validate_shapes(&config, &shapes, source, hint)?;
        let var = match var {
            Some(v) => {
                let want = [config.num_tokens(), config.patch_dim()];
                if v.dims() != want {
                    return Err(FlowError::checkpoint(
                        source,
                        format!("buffer `var` has shape {:?}, expected {want:?}", v.dims()),
                    ));
                }
                let v = v.to_dtype(DType::F32)?;
                let all_ones = v
                    .ne(1f32)?
                    .to_dtype(DType::F32)?
                    .sum_all()?
                    .to_scalar::<f32>()?
                    == 0.0;
                (!all_ones).then_some(v)
            }
            None => None,
        };
        Ok(Self {
            config,
            tensors,
            var,
            quant: None,
        })
    }

    /// Loads one of our checkpoints: safetensors with `format = tarflow/1` metadata, or a
    /// GGUF file of `tarflow quantize` (told apart by its magic bytes).
    pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let path = path.as_ref();
        let io = |source| FlowError::Io {
            path: path.into(),
            source,
        };
        let mut file = std::fs::File::open(path).map_err(io)?;
        let mut head = [0u8; 4];
        let n = std::io::Read::read(&mut file, &mut head).map_err(io)?;
        if crate::gguf::is_gguf(&head[..n]) {
            std::io::Seek::rewind(&mut file).map_err(io)?;
            let mut reader = std::io::BufReader::new(file);
            let parts = crate::gguf::read(&mut reader, path)?;
            return Self::on_device(Self::from_gguf(parts, path)?, device);
        }
        drop(file);
        let bytes = std::fs::read(path).map_err(io)?;
        Self::from_bytes(&bytes, path, device)
    }

    /// The checkpoint a GGUF file of `tarflow quantize` holds; `path` names it in errors.
    fn from_gguf(parts: crate::gguf::Parts, path: &Path) -> Result<Self> {
        let mut ck =
            Self::from_tensors_with_quant(parts.config, parts.dense, &parts.quant.tensors, path)?;
        ck.quant = Some(std::sync::Arc::new(parts.quant));
        Ok(ck)
    }

    /// These weights with the Linear layers quantised by `recipe` (f32 where a layer's rows do
    /// not fit); an already quantised checkpoint is refused.
    pub fn quantized(&self, recipe: &crate::quant::Recipe) -> Result<Self> {
        if let Some(q) = &self.quant {
            return Err(FlowError::Config(format!(
                "the checkpoint is already quantised ({}); quantise the f32 checkpoint it came from",
                q.provenance()
            )));
        }
        let (tensors, q) = crate::quant::quantize_weights(&self.config, &self.tensors, recipe)?;
        Ok(Self {
            config: self.config.clone(),
            tensors,
            var: self.var.clone(),
            quant: Some(std::sync::Arc::new(q)),
        })
    }

    /// Dense tensors moved to `device` (quantised ones move when the model is built).
    fn on_device(mut ck: Self, device: &Device) -> Result<Self> {
        for t in ck.tensors.values_mut() {
            *t = crate::device::from_file(t, device)?;
        }
        ck.var = ck
            .var
            .map(|v| crate::device::from_file(&v, device))
            .transpose()?;
        Ok(ck)
    }

    /// Reads a checkpoint held in memory (an embedded model); `path` names it in errors.
    pub fn from_bytes(bytes: &[u8], path: &Path, device: &Device) -> Result<Self> {
        if crate::gguf::is_gguf(bytes) {
            let parts = crate::gguf::read(&mut std::io::Cursor::new(bytes), path)?;
            return Self::on_device(Self::from_gguf(parts, path)?, device);
        }
        let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| FlowError::checkpoint(path, format!("not a safetensors file: {e}")))?;
        let info = meta.metadata().clone().unwrap_or_default();
        let config = match (info.get("format"), info.get("config")) {
            (Some(f), Some(c)) if f == FORMAT => serde_json::from_str::<ModelConfig>(c)
                .map_err(|e| FlowError::checkpoint(path, format!("bad model config in metadata: {e}")))?,
            _ => {
                return Err(FlowError::checkpoint(
                    path,
                    "no tarflow model config in its metadata; convert a raw ml-tarflow state_dict with \
                     `tarflow import FILE --img-size S --patch-size P -o out.safetensors`",
                ))
            }
        };
        // Read on the host: the file may hold f64, which must not reach a GPU uncast.
        let tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu)
            .map_err(|e| FlowError::checkpoint(path, format!("unreadable tensors: {e}")))?;
        Self::on_device(Self::from_tensors(config, tensors, path)?, device)
    }

    /// Imports a raw ml-tarflow state_dict (`.pth` or `.safetensors`), inferring the config
    /// from its shapes; the image size and patch size cannot be inferred and must be given.
    pub fn import(
        path: impl AsRef<Path>,
        img_size: usize,
        patch_size: usize,
        in_channels: Option<usize>,
        device: &Device,
    ) -> Result<Self> {
        let path = path.as_ref();
        let raw = crate::import::read_state_dict(path, device)?;
        let config = crate::import::infer_config(&raw, img_size, patch_size, in_channels, path)?;
        let tensors = raw
            .into_iter()
            .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        Self::from_tensors(config, tensors, path)
    }

    /// Imports an ml-starflow state_dict built by `Model(**kwargs)` ([`crate::import::starflow_config`]).
    pub fn import_starflow(
        path: impl AsRef<Path>,
        kwargs: &serde_json::Value,
        device: &Device,
    ) -> Result<Self> {
        let path = path.as_ref();
        let config = crate::import::starflow_config(kwargs, path)?;
        let raw = crate::import::read_state_dict(path, device)?;
        crate::import::check_rotary_buffer(&config, &raw, path)?;
        let tensors = raw
            .into_iter()
            .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        let hint: Hint = crate::import::starflow_kwarg_of;
        Self::checked(config, tensors, &HashMap::new(), path, Some(hint))
    }

    /// Writes the checkpoint atomically: weights, buffers and the config in the metadata.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        if let Some(q) = self.quant.as_deref() {
            let bytes = crate::gguf::bytes(&self.config, &self.tensors, self.var.as_ref(), q)?;
            return write_atomic(path, &bytes);
        }
        let mut all: BTreeMap<String, Tensor> = self
            .tensors
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.to_dtype(DType::F32)?.contiguous()?)))
            .collect::<Result<_>>()?;
        let device = self
            .tensors
            .values()
            .next()
            .map(|t| t.device().clone())
            .unwrap_or(Device::Cpu);
        // Buffers are written too so that PyTorch's strict load_state_dict accepts the file.
        for (k, v) in buffers(&self.config, &device)? {
            all.insert(k, v);
        }
        if let Some(v) = &self.var {
            all.insert("var".into(), v.clone());
        }
        let config = serde_json::to_string(&self.config)
            .map_err(|e| FlowError::checkpoint(path, format!("cannot encode config: {e}")))?;
        let meta = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("config".to_string(), config),
        ]);
        let bytes =
            safetensors::tensor::serialize(all.iter().map(|(k, v)| (k.as_str(), v)), Some(meta))
                .map_err(|e| FlowError::checkpoint(path, format!("cannot serialise: {e}")))?;
        write_atomic(path, &bytes)
    }

    /// Number of learned scalars.
    pub fn num_params(&self) -> usize {
        count_params(&self.config)
    }

    /// Builds a trainable model: every parameter becomes a [`candle_core::Var`] in the returned
    /// map, each transformer layer's as one packed variable on the CPU in f32
    /// ([`crate::packing`]).
    pub fn trainable_model(&self, device: &Device, dtype: DType) -> Result<(TarFlow, VarMap)> {
        if let Some(q) = &self.quant {
            return Err(FlowError::Config(format!(
                "a quantised model ({}) cannot be trained: train or fine-tune the f32 checkpoint \
                 it came from",
                q.provenance()
            )));
        }
        // On the CPU in f32 each transformer layer's weights are one variable (`packing`).
        let packing = match crate::kernels::applies_to(dtype, device) {
            true => Packing::all(&self.config)?,
            false => Packing::default(),
        };
        let mut tensors = HashMap::new();
        for (k, v) in &self.tensors {
            tensors.insert(k.clone(), crate::device::upload(v, device, dtype)?);
        }
        let varmap = VarMap::new();
        let mut served = HashMap::new();
        {
            let mut data = varmap
                .data()
                .lock()
                .map_err(|_| FlowError::Config("variable map lock poisoned".into()))?;
            for (k, v) in packing.pack(&tensors, "")? {
                let var = Var::from_tensor(&v)?;
                served.insert(k.clone(), var.as_tensor().clone());
                data.insert(k, var);
            }
        }
        packing.with_views(&mut served)?;
        let vb = VarBuilder::from_tensors(served, dtype, device);
        let mut model = TarFlow::new(&self.config, vb)?;
        if let Some(v) = &self.var {
            // The prior variance is a buffer: read by sampling, never trained.
            model.set_prior_var(v)?;
        }
        Ok((model, varmap))
    }

    /// Builds the model with these weights on `device` in `dtype` (inference: no gradients).
    pub fn model(&self, device: &Device, dtype: DType) -> Result<TarFlow> {
        let mut map = self.tensors.clone();
        if let Some(v) = &self.var {
            map.insert("var".into(), v.clone());
        }
        TarFlow::from_parts(&self.config, map, self.quant.clone(), device, dtype)
    }
}

/// Checks `tensors` against the parameter list of `config`: every missing, extra or
/// mis-shaped key is named in the error.
pub fn validate(
    config: &ModelConfig,
    tensors: &HashMap<String, Tensor>,
    source: &Path,
) -> Result<()> {
    let shapes = tensors
        .iter()
        .map(|(k, t)| (k.clone(), (t.dims().to_vec(), t.dtype())))
        .collect();
    validate_shapes(config, &shapes, source, None)
}

/// What decides whether a model has a parameter key: a setting to name in an error.
type Hint = fn(&str) -> &'static str;

/// [`validate`] over (shape, dtype) by key.
fn validate_shapes(
    config: &ModelConfig,
    tensors: &HashMap<String, (Vec<usize>, DType)>,
    source: &Path,
    hint: Option<Hint>,
) -> Result<()> {
    let check = |key: &str| match hint {
        Some(h) => format!(": check `{}`", h(key)),
        None => String::new(),
    };
    // Each transformer layer has a dozen tensors: a config claiming more layers than the file
    // has tensors is not this file's, and listing what it expects could exhaust memory.
    let layers: usize = (0..config.num_blocks).map(|k| config.block_layers(k)).sum();
    if layers > tensors.len() {
        return Err(FlowError::checkpoint(
            source,
            format!(
                "the model config claims {layers} transformer layers but the file holds only {} tensors",
                tensors.len()
            ),
        ));
    }
    let specs = param_specs(config);
    let mut problems = Vec::new();
    for s in &specs {
        match tensors.get(&s.name) {
            None => problems.push(format!(
                "missing key `{}` (expected shape {:?}){}",
                s.name,
                s.shape,
                check(&s.name)
            )),
            Some((dims, _)) if dims != &s.shape => problems.push(format!(
                "key `{}` has shape {:?}, expected {:?}{}",
                s.name,
                dims,
                s.shape,
                check(&s.name)
            )),
            Some((_, dtype))
                if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16 | DType::F64) =>
            {
                problems.push(format!(
                    "key `{}` has dtype {:?}, expected a float type",
                    s.name, dtype
                ))
            }
            _ => {}
        }
    }
    let known: std::collections::HashSet<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    let mut extra: Vec<&String> = tensors
        .keys()
        .filter(|k| !known.contains(k.as_str()))
        .collect();
    extra.sort();
    for k in extra {
        problems.push(format!(
            "unexpected key `{k}` (not a parameter of this model config){}",
            check(k)
        ));
    }
    if problems.is_empty() {
        return Ok(());
    }
    let shown = problems.len().min(12);
    let mut msg = format!(
        "does not match the model ({} problem(s)): {}",
        problems.len(),
        problems[..shown].join("; ")
    );
    if problems.len() > shown {
        msg.push_str(&format!("; … and {} more", problems.len() - shown));
    }
    Err(FlowError::checkpoint(source, msg))
}

/// Writes `bytes` to `path` via a fsynced temporary file in the same directory and a rename,
/// so a crash leaves either the old file or the new one, never a torn one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |p: &Path| {
        let p: PathBuf = p.into();
        move |source| FlowError::Io { path: p, source }
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io(path))?;
    // Persist the rename itself; not every platform can open a directory, so this is best effort.
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}
