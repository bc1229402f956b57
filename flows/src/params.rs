//! The parameter list of a model: ml-tarflow's state_dict key names, shapes and initialisation.

use crate::config::{ModelConfig, NormKind};
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
            layer_specs(cfg, &format!("{b}.attn_blocks.{l}"), &mut p);
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
    if cfg.denoiser_layers > 0 {
        let b = "learnable_self_denoiser";
        p(format!("{b}.proj_in.weight"), vec![c, d], lin(d));
        p(format!("{b}.proj_in.bias"), vec![c], lin(d));
        for l in 0..cfg.denoiser_layers {
            layer_specs(cfg, &format!("{b}.attn_blocks.{l}"), &mut p);
        }
        if cfg.final_norm {
            p(format!("{b}.final_norm.weight"), vec![c], Init::Zeros);
        }
        p(format!("{b}.proj_out.weight"), vec![d, c], Init::Zeros);
        p(format!("{b}.proj_out.bias"), vec![d], lin(c));
    }
    v
}

/// The parameters of one transformer layer under `a`, as `cfg`'s layer options make it.
fn layer_specs(cfg: &ModelConfig, a: &str, p: &mut impl FnMut(String, Vec<usize>, Init)) {
    let (c, hd) = (cfg.channels, cfg.head_dim);
    let hidden = c * cfg.mlp_ratio;
    let (q, kv) = (cfg.num_heads() * hd, cfg.num_kv_heads() * hd);
    let lin = |fan_in: usize| Init::Uniform(1.0 / (fan_in as f64).sqrt());
    let mut rms = Vec::new();
    let norm = |name: &str, p: &mut dyn FnMut(String, Vec<usize>, Init)| match cfg.norm {
        NormKind::LayerNorm => {
            p(format!("{a}.{name}.weight"), vec![c], Init::Ones);
            p(format!("{a}.{name}.bias"), vec![c], Init::Zeros);
        }
        // The scale is 1 + w.
        NormKind::RmsNorm => p(format!("{a}.{name}.weight"), vec![c], Init::Zeros),
    };
    norm("attention.norm", p);
    norm("mlp.norm", p);
    let mut linear = |name: &str, out: usize, inp: usize| {
        p(format!("{a}.{name}.weight"), vec![out, inp], lin(inp));
        if !cfg.no_bias {
            p(format!("{a}.{name}.bias"), vec![out], lin(inp));
        }
    };
    linear("attention.qkv", q + 2 * kv, c);
    linear("attention.proj", c, q);
    if cfg.swiglu {
        linear("mlp.gate_proj", hidden, c);
        linear("mlp.up_proj", hidden, c);
        linear("mlp.down_proj", c, hidden);
    } else {
        linear("mlp.main.0", hidden, c);
        linear("mlp.main.2", c, hidden);
    }
    if cfg.qk_norm {
        rms.push(("attention.query_norm", hd));
        rms.push(("attention.key_norm", hd));
    }
    if cfg.post_norm {
        rms.push(("attention.post_norm", c));
        rms.push(("mlp.post_norm", c));
    }
    for (name, dim) in rms {
        p(format!("{a}.{name}.weight"), vec![dim], Init::Zeros);
    }
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
