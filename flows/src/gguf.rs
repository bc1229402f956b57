//! The GGUF file of a quantised model (`tarflow quantize`): candle's GGUF container with the
//! model config, recipe and per-layer plan in `tarflow.*` metadata. It knows the quantised
//! weights ([`crate::quant`]), not checkpoints: `checkpoint` assembles one from [`Parts`].

use crate::config::ModelConfig;
use crate::error::{FlowError, Result};
use crate::quant::{LayerPlan, QuantType, QuantWeights, Recipe, GGUF_FORMAT};
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek};
use std::path::Path;
use std::sync::Arc;

fn meta_str(v: &str) -> gguf_file::Value {
    gguf_file::Value::String(v.to_string())
}

/// The GGUF file of a quantised model: every tensor (the `dense` ones and `var` as F32), the
/// config, the recipe and the per-layer plan in `tarflow.*` metadata.
pub fn bytes(
    config: &ModelConfig,
    dense: &HashMap<String, Tensor>,
    var: Option<&Tensor>,
    q: &QuantWeights,
) -> Result<Vec<u8>> {
    let mut meta: Vec<(String, gguf_file::Value)> = vec![
        ("general.architecture".into(), meta_str("tarflow")),
        ("tarflow.format".into(), meta_str(GGUF_FORMAT)),
        ("tarflow.config".into(), meta_str(&to_json(config)?)),
        ("tarflow.recipe".into(), meta_str(&to_json(&q.recipe)?)),
        ("tarflow.plan".into(), meta_str(&to_json(&q.plan)?)),
    ];
    if let Some(s) = q.train_noise_std {
        meta.push(("tarflow.train_noise_std".into(), gguf_file::Value::F64(s)));
    }
    if let Some(s) = &q.source {
        meta.push(("tarflow.source".into(), meta_str(s)));
    }
    let mut all: BTreeMap<String, Arc<QTensor>> = q
        .tensors
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut dense: Vec<(&String, &Tensor)> = dense.iter().collect();
    let var_key = "var".to_string();
    if let Some(v) = var {
        dense.push((&var_key, v));
    }
    for (k, v) in dense {
        let v = crate::device::to_host(v)?.to_dtype(DType::F32)?;
        all.insert(k.clone(), Arc::new(QTensor::quantize(&v, GgmlDType::F32)?));
    }
    let meta_refs: Vec<(&str, &gguf_file::Value)> =
        meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> =
        all.iter().map(|(k, v)| (k.as_str(), v.as_ref())).collect();
    let mut out = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut out, &meta_refs, &tensor_refs)?;
    Ok(out.into_inner())
}

/// `v` as a JSON metadata string.
fn to_json<T: Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| FlowError::Config(format!("cannot encode metadata: {e}")))
}

/// Whether `head` (a file's first bytes) is a GGUF file's magic.
pub fn is_gguf(head: &[u8]) -> bool {
    head.starts_with(b"GGUF")
}

/// What a GGUF file of `tarflow quantize` holds: the config, the tensors kept dense (F32) and
/// the quantised weights with their recipe and plan.
pub struct Parts {
    /// The model's config.
    pub config: ModelConfig,
    /// Dense tensors (and the `var` buffer) by name.
    pub dense: HashMap<String, Tensor>,
    /// The quantised Linear weights.
    pub quant: QuantWeights,
}

/// Reads a GGUF file written by [`bytes`]; `path` names it in errors. Tensors are read one by
/// one (the file is never held whole in memory).
pub fn read<R: Read + Seek>(reader: &mut R, path: &Path) -> Result<Parts> {
    let bad = |msg: String| FlowError::checkpoint(path, msg);
    let content = gguf_file::Content::read(reader).map_err(|e| {
        bad(format!(
            "not a readable GGUF file (truncated or corrupt?): {e}"
        ))
    })?;
    let text = |key: &str| -> Result<Option<String>> {
        match content.metadata.get(key) {
            None => Ok(None),
            Some(v) => v
                .to_string()
                .map(|s| Some(s.clone()))
                .map_err(|_| bad(format!("metadata `{key}` is not a string"))),
        }
    };
    match text("tarflow.format")? {
        Some(f) if f == GGUF_FORMAT => {}
        Some(f) => {
            return Err(bad(format!(
                "GGUF format `{f}`, expected `{GGUF_FORMAT}`: written by a newer tarflow?"
            )))
        }
        None => {
            return Err(bad(
                "a GGUF file without tarflow metadata (`tarflow.format`): only files written by \
                 `tarflow quantize` hold a flow"
                    .into(),
            ))
        }
    }
    let need = |key: &str| -> Result<String> {
        text(key)?.ok_or_else(|| bad(format!("metadata `{key}` is missing")))
    };
    let config: ModelConfig = serde_json::from_str(&need("tarflow.config")?)
        .map_err(|e| bad(format!("bad model config in `tarflow.config`: {e}")))?;
    config
        .validate()
        .map_err(|e| bad(format!("`tarflow.config`: {e}")))?;
    let recipe: Recipe = serde_json::from_str(&need("tarflow.recipe")?)
        .map_err(|e| bad(format!("bad `tarflow.recipe`: {e}")))?;
    let plan: Vec<LayerPlan> = serde_json::from_str(&need("tarflow.plan")?)
        .map_err(|e| bad(format!("bad `tarflow.plan`: {e}")))?;
    let stored: HashMap<String, QuantType> = plan
        .iter()
        .map(|p| (format!("{}.weight", p.layer), p.stored))
        .collect();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut dense = HashMap::new();
    let mut quant = HashMap::new();
    for name in names {
        let info = &content.tensor_infos[name];
        let Some(ty) = QuantType::from_ggml(info.ggml_dtype) else {
            return Err(bad(format!(
                "tensor `{name}` has type {:?}, which tarflow does not run",
                info.ggml_dtype
            )));
        };
        let want = stored.get(name).copied().unwrap_or(QuantType::F32);
        if ty != want {
            return Err(bad(format!(
                "tensor `{name}` is stored as {ty}, its plan says {want}"
            )));
        }
        let qt = content
            .tensor(reader, name, &Device::Cpu)
            .map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
        if ty == QuantType::F32 {
            dense.insert(name.clone(), qt.dequantize(&Device::Cpu)?);
        } else {
            quant.insert(name.clone(), Arc::new(qt));
        }
    }
    let train_noise_std = content
        .metadata
        .get("tarflow.train_noise_std")
        .and_then(|v| v.to_f64().ok());
    let source = text("tarflow.source")?;
    Ok(Parts {
        config,
        dense,
        quant: QuantWeights {
            tensors: quant,
            recipe,
            plan,
            train_noise_std,
            source,
        },
    })
}
