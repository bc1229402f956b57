//! The parameter list of a model: ml-tarflow's state_dict key names, shapes and initialisation.

use crate::config::ModelConfig;
use crate::error::Result;
use crate::rng::{randn, seeded, uniform};
use candle_core::{Device, Tensor};
use std::collections::HashMap;

/// How a parameter is initialised, as in ml-tarflow.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// U(−b, b): PyTorch's default for Linear weights and biases, b = 1/√fan_in.
    Uniform(f64),
    /// N(0, std²).
    Normal(f64),
    /// All zeros.
    Zeros,
    /// All ones.
    Ones,
}

/// One learned tensor of the model.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    /// ml-tarflow state_dict key.
    pub name: String,
    /// Shape in PyTorch layout.
    pub shape: Vec<usize>,
    /// Initialisation of a fresh model.
    pub init: Init,
}

/// Whether `name` is a regenerated buffer (`var`, `blocks.{k}.attn_mask`, ml-starflow's
/// deprecated all-zero rotary buffers `feat_rope.freqs_{cos,sin}`).
pub fn is_buffer(name: &str) -> bool {
    name == "var"
        || name.ends_with(".attn_mask")
        || name.starts_with("feat_rope.")
        || name.starts_with("feat_rope_gen.")
}

/// Every learned parameter of `cfg`, in construction order.
pub fn param_specs(cfg: &ModelConfig) -> Vec<ParamSpec> {
    let (t, c, d) = (cfg.num_tokens(), cfg.channels, cfg.patch_dim());
    let hidden = c * cfg.mlp_ratio;
    let out = if cfg.nvp { 2 * d } else { d };
    let mut v = Vec::new();
    let mut p =
        |name: String, shape: Vec<usize>, init: Init| v.push(ParamSpec { name, shape, init });
    let lin = |fan_in: usize| Init::Uniform(1.0 / (fan_in as f64).sqrt());
    for k in 0..cfg.num_blocks {
        let b = format!("blocks.{k}");
        if !cfg.rope {
            p(format!("{b}.pos_embed"), vec![t, c], Init::Normal(0.01));
        }
        if cfg.block_conditional(k) {
            p(
                format!("{b}.class_embed"),
                vec![cfg.num_classes, 1, c],
                Init::Normal(0.01),
            );
        }
        p(format!("{b}.proj_in.weight"), vec![c, d], lin(d));
        p(format!("{b}.proj_in.bias"), vec![c], lin(d));
        if cfg.block_text(k) {
            let td = cfg.txt_dim;
            p(format!("{b}.proj_txt.weight"), vec![c, td], lin(td));
            p(format!("{b}.proj_txt.bias"), vec![c], lin(td));
        }
        for l in 0..cfg.block_layers(k) {
            let a = format!("{b}.attn_blocks.{l}");
            for norm in ["attention.norm", "mlp.norm"] {
                p(format!("{a}.{norm}.weight"), vec![c], Init::Ones);
                p(format!("{a}.{norm}.bias"), vec![c], Init::Zeros);
            }
            p(format!("{a}.attention.qkv.weight"), vec![3 * c, c], lin(c));
            p(format!("{a}.attention.qkv.bias"), vec![3 * c], lin(c));
            p(format!("{a}.attention.proj.weight"), vec![c, c], lin(c));
            p(format!("{a}.attention.proj.bias"), vec![c], lin(c));
            p(format!("{a}.mlp.main.0.weight"), vec![hidden, c], lin(c));
            p(format!("{a}.mlp.main.0.bias"), vec![hidden], lin(c));
            p(
                format!("{a}.mlp.main.2.weight"),
                vec![c, hidden],
                lin(hidden),
            );
            p(format!("{a}.mlp.main.2.bias"), vec![c], lin(hidden));
        }
        if cfg.sos {
            p(format!("{b}.sos_embed"), vec![1, 1, d], Init::Normal(1.0));
        }
        if cfg.final_norm {
            p(format!("{b}.final_norm.weight"), vec![c], Init::Zeros);
        }
        // Zero weight: every block starts as an input-independent affine map (upstream init).
        p(format!("{b}.proj_out.weight"), vec![out, c], Init::Zeros);
        p(format!("{b}.proj_out.bias"), vec![out], lin(c));
    }
    v
}

/// The regenerated buffers with their values: `var` (T, D) ones and causal `attn_mask`s.
pub fn buffers(cfg: &ModelConfig, device: &Device) -> Result<Vec<(String, Tensor)>> {
    let (t, d) = (cfg.num_tokens(), cfg.patch_dim());
    let mut v = vec![(
        "var".to_string(),
        Tensor::ones((t, d), candle_core::DType::F32, device)?,
    )];
    let tril: Vec<f32> = (0..t * t)
        .map(|i| if i % t <= i / t { 1.0 } else { 0.0 })
        .collect();
    let mask = Tensor::from_vec(tril, (t, t), device)?;
    for k in 0..cfg.num_blocks {
        v.push((format!("blocks.{k}.attn_mask"), mask.clone()));
    }
    Ok(v)
}

/// Fresh f32 parameters for `cfg`, drawn from a seeded RNG (reproducible on every device).
pub fn init_params(
    cfg: &ModelConfig,
    seed: u64,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let mut rng = seeded(seed);
    let mut out = HashMap::new();
    for s in param_specs(cfg) {
        let t = match s.init {
            Init::Uniform(b) => uniform(&mut rng, s.shape.clone(), -b, b, device)?,
            Init::Normal(std) => randn(&mut rng, s.shape.clone(), std, device)?,
            Init::Zeros => Tensor::zeros(s.shape.clone(), candle_core::DType::F32, device)?,
            Init::Ones => Tensor::ones(s.shape.clone(), candle_core::DType::F32, device)?,
        };
        out.insert(s.name, t);
    }
    Ok(out)
}

/// Number of learned scalars of `cfg`.
pub fn count_params(cfg: &ModelConfig) -> usize {
    param_specs(cfg)
        .iter()
        .map(|s| s.shape.iter().product::<usize>())
        .sum()
}
