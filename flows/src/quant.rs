//! Reduced-precision and quantised weights: which Linear layer gets which storage type (a
//! [`Recipe`]), the layers quantised with candle's `QTensor`s, and the GGUF file that holds them
//! with the model config and the recipe in its metadata.
//!
//! Only Linear weights change type: they hold ~95 % of the bytes, and candle's `QMatMul` runs
//! them on CPU, CUDA and Metal. Norms, biases, embeddings and the prior variance stay f32. A
//! flow with quantised weights is still an exact flow: its bits/dim is exact, not a proxy.

use crate::config::ModelConfig;
use crate::error::{FlowError, Result};
use crate::params::param_specs;
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

static NATIVE_MATMUL: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(2);

/// Runs block-quantised layers on candle's integer `QMatMul` (activations quantised too) instead
/// of the default weights-only path (each layer's weights expanded to the activations' dtype for
/// the call). Process-wide; `TARFLOW_QMATMUL=native` in the environment sets it.
pub fn set_native_matmul(on: bool) {
    NATIVE_MATMUL.store(on as u8, std::sync::atomic::Ordering::Relaxed);
}

/// Whether [`set_native_matmul`] (or `TARFLOW_QMATMUL=native`) is in force.
pub fn native_matmul() -> bool {
    match NATIVE_MATMUL.load(std::sync::atomic::Ordering::Relaxed) {
        2 => {
            let on = std::env::var("TARFLOW_QMATMUL").is_ok_and(|v| v == "native");
            set_native_matmul(on);
            on
        }
        v => v == 1,
    }
}

/// Value of the `tarflow.format` metadata key of our GGUF files.
pub const GGUF_FORMAT: &str = "tarflow-gguf/1";

/// Storage type of a Linear weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum QuantType {
    /// 32-bit float (unchanged).
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    Bf16,
    /// 8-bit, one f16 scale per 32 weights (8.5 bits/weight).
    Q8_0,
    /// 4-bit, one f16 scale per 32 weights (4.5 bits/weight).
    Q4_0,
    /// 4-bit with scale and minimum per 32 (5 bits/weight).
    Q4_1,
    /// 5-bit, scale per 32 (5.5 bits/weight).
    Q5_0,
    /// 5-bit, scale and minimum per 32 (6 bits/weight).
    Q5_1,
    /// 2-bit k-quant, super-blocks of 256 (2.625 bits/weight).
    Q2k,
    /// 3-bit k-quant, super-blocks of 256 (3.4375 bits/weight).
    Q3k,
    /// 4-bit k-quant, super-blocks of 256 (4.5 bits/weight).
    Q4k,
    /// 5-bit k-quant, super-blocks of 256 (5.5 bits/weight).
    Q5k,
    /// 6-bit k-quant, super-blocks of 256 (6.5625 bits/weight).
    Q6k,
}

const ALL: [QuantType; 13] = [
    QuantType::F32,
    QuantType::F16,
    QuantType::Bf16,
    QuantType::Q8_0,
    QuantType::Q4_0,
    QuantType::Q4_1,
    QuantType::Q5_0,
    QuantType::Q5_1,
    QuantType::Q2k,
    QuantType::Q3k,
    QuantType::Q4k,
    QuantType::Q5k,
    QuantType::Q6k,
];

impl QuantType {
    /// Every type, in the order `--help` lists them.
    pub fn all() -> &'static [QuantType] {
        &ALL
    }

    /// The name used on the command line and in metadata.
    pub fn name(self) -> &'static str {
        match self {
            QuantType::F32 => "f32",
            QuantType::F16 => "f16",
            QuantType::Bf16 => "bf16",
            QuantType::Q8_0 => "q8_0",
            QuantType::Q4_0 => "q4_0",
            QuantType::Q4_1 => "q4_1",
            QuantType::Q5_0 => "q5_0",
            QuantType::Q5_1 => "q5_1",
            QuantType::Q2k => "q2k",
            QuantType::Q3k => "q3k",
            QuantType::Q4k => "q4k",
            QuantType::Q5k => "q5k",
            QuantType::Q6k => "q6k",
        }
    }

    /// candle's GGUF type.
    pub fn ggml(self) -> GgmlDType {
        match self {
            QuantType::F32 => GgmlDType::F32,
            QuantType::F16 => GgmlDType::F16,
            QuantType::Bf16 => GgmlDType::BF16,
            QuantType::Q8_0 => GgmlDType::Q8_0,
            QuantType::Q4_0 => GgmlDType::Q4_0,
            QuantType::Q4_1 => GgmlDType::Q4_1,
            QuantType::Q5_0 => GgmlDType::Q5_0,
            QuantType::Q5_1 => GgmlDType::Q5_1,
            QuantType::Q2k => GgmlDType::Q2K,
            QuantType::Q3k => GgmlDType::Q3K,
            QuantType::Q4k => GgmlDType::Q4K,
            QuantType::Q5k => GgmlDType::Q5K,
            QuantType::Q6k => GgmlDType::Q6K,
        }
    }

    /// The type of a GGUF tensor, when tarflow runs it.
    pub fn from_ggml(t: GgmlDType) -> Option<Self> {
        ALL.iter().copied().find(|q| q.ggml() == t)
    }

    /// Weights per quantisation block: a row's length must be a multiple of it.
    pub fn block(self) -> usize {
        self.ggml().block_size()
    }

    /// Bytes of a (rows, cols) matrix in this type (cols a multiple of [`Self::block`]).
    pub fn bytes(self, rows: usize, cols: usize) -> usize {
        let g = self.ggml();
        rows * cols / g.block_size() * g.type_size()
    }

    /// Whether the type is a block quantisation (run by `QMatMul`) rather than a float format.
    pub fn is_quantised(self) -> bool {
        !matches!(self, QuantType::F32 | QuantType::F16 | QuantType::Bf16)
    }
}

impl std::fmt::Display for QuantType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for QuantType {
    type Err = FlowError;
    fn from_str(s: &str) -> Result<Self> {
        // llama.cpp spells the k-quants q4_k; accept both.
        let norm = s.trim().to_ascii_lowercase().replace("_k", "k");
        ALL.iter()
            .copied()
            .find(|q| q.name() == norm)
            .ok_or_else(|| {
                FlowError::Config(format!(
                    "unknown quantisation type `{s}`; expected one of {}",
                    ALL.map(QuantType::name).join(", ")
                ))
            })
    }
}

impl TryFrom<String> for QuantType {
    type Error = FlowError;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<QuantType> for String {
    fn from(q: QuantType) -> String {
        q.name().to_string()
    }
}

/// `PATTERN=TYPE`: Linear layers whose name matches the glob get this type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rule {
    /// Glob over layer names such as `blocks.0.attn_blocks.1.mlp.main.0` (`*` matches dots too).
    pub pattern: String,
    /// The storage type of the matching layers.
    pub to: QuantType,
}

impl std::str::FromStr for Rule {
    type Err = FlowError;
    fn from_str(s: &str) -> Result<Self> {
        let (pattern, to) = s.rsplit_once('=').ok_or_else(|| {
            FlowError::Config(format!(
                "rule `{s}`: expected PATTERN=TYPE, e.g. `*.mlp.*=q8_0`"
            ))
        })?;
        let rule = Rule {
            pattern: pattern.trim().to_string(),
            to: to.parse()?,
        };
        rule.glob()?;
        Ok(rule)
    }
}

impl Rule {
    fn glob(&self) -> Result<glob::Pattern> {
        glob::Pattern::new(&self.pattern)
            .map_err(|e| FlowError::Config(format!("pattern `{}`: {e}", self.pattern)))
    }
}

/// Which storage type each Linear layer gets: the first matching rule, else `base`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recipe {
    /// The type of layers no rule matches.
    pub base: QuantType,
    /// Exceptions, first match wins (`--keep P` is the rule `P=f32`).
    pub rules: Vec<Rule>,
}

impl Recipe {
    /// Every Linear layer in `base`.
    pub fn uniform(base: QuantType) -> Self {
        Self {
            base,
            rules: Vec::new(),
        }
    }

    /// The type asked for `layer`.
    pub fn type_for(&self, layer: &str) -> Result<QuantType> {
        for r in &self.rules {
            if r.glob()?.matches(layer) {
                return Ok(r.to);
            }
        }
        Ok(self.base)
    }

    /// One line: `q4_0, *.mlp.*=q8_0, blocks.0.*=f32`.
    pub fn describe(&self) -> String {
        let mut s = self.base.name().to_string();
        for r in &self.rules {
            s.push_str(&format!(", {}={}", r.pattern, r.to));
        }
        s
    }
}

/// What one Linear layer was asked to become and what it is stored as.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerPlan {
    /// Layer name (its weight is `{layer}.weight`).
    pub layer: String,
    /// (out, in).
    pub shape: [usize; 2],
    /// The recipe's type for it.
    pub asked: QuantType,
    /// The type it is stored in: `asked`, or f32 where the rows do not fit its blocks.
    pub stored: QuantType,
    /// Bytes of the stored weight.
    pub bytes: usize,
    /// Why `stored` differs from `asked`.
    pub note: Option<String>,
}

/// Every Linear layer of `cfg` as (name, [out, in]), in parameter order.
pub fn linear_layers(cfg: &ModelConfig) -> Vec<(String, [usize; 2])> {
    param_specs(cfg)
        .into_iter()
        .filter(|s| s.shape.len() == 2 && s.name.ends_with(".weight"))
        .map(|s| {
            let layer = s.name.trim_end_matches(".weight").to_string();
            (layer, [s.shape[0], s.shape[1]])
        })
        .collect()
}

/// Applies `recipe` to the layers of `cfg`; a rule that matches no layer is an error (a typo
/// would otherwise silently quantise everything).
pub fn plan(cfg: &ModelConfig, recipe: &Recipe) -> Result<Vec<LayerPlan>> {
    let layers = linear_layers(cfg);
    for r in &recipe.rules {
        let g = r.glob()?;
        if !layers.iter().any(|(l, _)| g.matches(l)) {
            return Err(FlowError::Config(format!(
                "rule `{}={}` matches no Linear layer; layers are named like `{}` \
                 (`*.attention.*`, `*.mlp.*`, `*.proj_in`, `*.proj_out`, `blocks.0.*`)",
                r.pattern,
                r.to,
                layers
                    .get(2)
                    .or(layers.first())
                    .map(|(l, _)| l.as_str())
                    .unwrap_or("blocks.0.proj_in")
            )));
        }
    }
    layers
        .into_iter()
        .map(|(layer, shape)| {
            let asked = recipe.type_for(&layer)?;
            let fits = shape[1] % asked.block() == 0;
            let stored = if fits { asked } else { QuantType::F32 };
            let note = (!fits).then(|| {
                format!(
                    "rows of {} are not a multiple of {asked}'s block of {}",
                    shape[1],
                    asked.block()
                )
            });
            Ok(LayerPlan {
                bytes: stored.bytes(shape[0], shape[1]),
                layer,
                shape,
                asked,
                stored,
                note,
            })
        })
        .collect()
}

/// The reduced-precision Linear weights of a checkpoint, with how they were chosen.
#[derive(Debug)]
pub struct QuantWeights {
    /// `{layer}.weight` → its tensor, on the CPU (moved to the model's device when it is built).
    pub tensors: HashMap<String, Arc<QTensor>>,
    /// The recipe asked for.
    pub recipe: Recipe,
    /// Every Linear layer's outcome.
    pub plan: Vec<LayerPlan>,
    /// σ of the Gaussian noise the model was trained with, when known (for denoising).
    pub train_noise_std: Option<f64>,
    /// The file it was made from.
    pub source: Option<String>,
}

impl QuantWeights {
    /// Bytes of the reduced-precision weights.
    pub fn bytes(&self) -> usize {
        self.tensors
            .values()
            .map(|t| t.storage_size_in_bytes())
            .sum()
    }

    /// `recipe, made from FILE`: what a quantised checkpoint is, for errors that send the user
    /// back to its f32 source.
    pub fn provenance(&self) -> String {
        match &self.source {
            Some(s) => format!("{}, made from {s}", self.recipe.describe()),
            None => self.recipe.describe(),
        }
    }

    /// Layers kept in f32 although the recipe asked for another type.
    pub fn kept_f32(&self) -> impl Iterator<Item = &LayerPlan> {
        self.plan
            .iter()
            .filter(|p| p.stored != p.asked && p.stored == QuantType::F32)
    }
}

/// `qt` on `device` (a copy of its blocks unless it is already there).
pub fn to_device(qt: &Arc<QTensor>, device: &Device) -> Result<Arc<QTensor>> {
    if qt.device().same_device(device) {
        return Ok(qt.clone());
    }
    let storage = QStorage::from_data(qt.data()?, device, qt.dtype())?;
    Ok(Arc::new(QTensor::new(storage, qt.shape().clone())?))
}

/// `tensors`' Linear weights quantised by `recipe` for `config`: the tensors left dense and the
/// quantised weights (f32 where a layer's rows do not fit).
pub fn quantize_weights(
    config: &ModelConfig,
    tensors: &HashMap<String, Tensor>,
    recipe: &Recipe,
) -> Result<(HashMap<String, Tensor>, QuantWeights)> {
    let plan = plan(config, recipe)?;
    let mut dense = tensors.clone();
    let mut quantised = HashMap::new();
    for p in plan.iter().filter(|p| p.stored != QuantType::F32) {
        let key = format!("{}.weight", p.layer);
        let w = dense
            .remove(&key)
            .ok_or_else(|| FlowError::Config(format!("the checkpoint has no `{key}`")))?;
        let w = crate::device::to_host(&w)?.to_dtype(DType::F32)?;
        quantised.insert(key, Arc::new(QTensor::quantize(&w, p.stored.ggml())?));
    }
    Ok((
        dense,
        QuantWeights {
            tensors: quantised,
            recipe: recipe.clone(),
            plan,
            train_noise_std: None,
            source: None,
        },
    ))
}
