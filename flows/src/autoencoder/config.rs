//! The `config.json` of a diffusers `AutoencoderKL` folder: read with every key checked, and
//! written as diffusers writes it.

use crate::error::{FlowError, Result};
use serde::Serialize;
use std::path::Path;

/// What a diffusers `AutoencoderKL` config says, as far as the network is concerned.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AutoencoderConfig {
    /// Image channels in.
    pub in_channels: usize,
    /// Image channels out.
    pub out_channels: usize,
    /// Widths of the resolution levels; each level after the first halves the side.
    pub block_out_channels: Vec<usize>,
    /// ResNet blocks per level.
    pub layers_per_block: usize,
    /// Channels of the latent.
    pub latent_channels: usize,
    /// GroupNorm groups.
    pub norm_num_groups: usize,
    /// The factor diffusion models multiply latents by (not applied here).
    pub scaling_factor: f64,
    /// The 1×1 convolutions around the latent.
    pub use_quant_conv: bool,
    /// See `use_quant_conv`.
    pub use_post_quant_conv: bool,
}

impl AutoencoderConfig {
    /// Reads `config.json`'s text; `path` names it in errors. Keys that would build another
    /// network than this one (another block type, activation or latent normalisation) are
    /// refused by name, as are keys diffusers' `AutoencoderKL` does not have.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        use serde_json::Value;
        let err = |m: String| FlowError::checkpoint(path, m);
        let v: Value = serde_json::from_str(text).map_err(|e| err(format!("not JSON: {e}")))?;
        let Value::Object(o) = &v else {
            return Err(err("expected a JSON object".into()));
        };
        let uint = |k: &str, default: Option<usize>| -> Result<usize> {
            match o.get(k) {
                None => default.ok_or_else(|| err(format!("key `{k}` is missing"))),
                Some(v) => v
                    .as_u64()
                    .map(|n| n as usize)
                    .filter(|&n| n > 0)
                    .ok_or_else(|| err(format!("key `{k}` = {v}: expected a positive integer"))),
            }
        };
        let flag = |k: &str| -> Result<bool> {
            match o.get(k) {
                None => Ok(true),
                Some(Value::Bool(b)) => Ok(*b),
                Some(v) => Err(err(format!("key `{k}` = {v}: expected true or false"))),
            }
        };
        let widths: Vec<usize> = match o.get("block_out_channels") {
            Some(Value::Array(a)) if !a.is_empty() => a
                .iter()
                .map(|v| v.as_u64().map(|n| n as usize).filter(|&n| n > 0))
                .collect::<Option<_>>()
                .ok_or_else(|| {
                    err("key `block_out_channels`: expected a list of positive integers".into())
                })?,
            _ => return Err(err("key `block_out_channels` is missing or empty".into())),
        };
        for (k, want) in [
            ("down_block_types", "DownEncoderBlock2D"),
            ("up_block_types", "UpDecoderBlock2D"),
        ] {
            if let Some(v) = o.get(k) {
                let types = v
                    .as_array()
                    .map(|a| a.iter().map(Value::as_str).collect::<Vec<_>>());
                match types {
                    Some(t) if t.len() != widths.len() => {
                        return Err(err(format!(
                            "key `{k}` has {} entries for {} in `block_out_channels`",
                            t.len(),
                            widths.len()
                        )))
                    }
                    Some(t) if t.iter().all(|s| *s == Some(want)) => {}
                    _ => {
                        return Err(err(format!(
                            "key `{k}` = {v}: only {want} blocks are built (SD-VAE's)"
                        )))
                    }
                }
            }
        }
        let same = |k: &str, want: Value| -> Result<()> {
            match o.get(k) {
                Some(v) if *v != want => Err(err(format!(
                    "key `{k}` = {v}: only {want} is built (SD-VAE's)"
                ))),
                _ => Ok(()),
            }
        };
        same("act_fn", Value::from("silu"))?;
        same("mid_block_add_attention", Value::Bool(true))?;
        for k in ["latents_mean", "latents_std", "shift_factor"] {
            same(k, Value::Null)?;
        }
        const KNOWN: [&str; 19] = [
            "in_channels",
            "out_channels",
            "down_block_types",
            "up_block_types",
            "block_out_channels",
            "layers_per_block",
            "act_fn",
            "latent_channels",
            "norm_num_groups",
            "sample_size",
            "scaling_factor",
            "shift_factor",
            "latents_mean",
            "latents_std",
            "force_upcast",
            "use_quant_conv",
            "use_post_quant_conv",
            "mid_block_add_attention",
            "name_or_path",
        ];
        if let Some(k) = o
            .keys()
            .find(|k| !k.starts_with('_') && !KNOWN.contains(&k.as_str()))
        {
            return Err(err(format!(
                "unknown key `{k}`: not an argument of diffusers' AutoencoderKL"
            )));
        }
        let cfg = AutoencoderConfig {
            in_channels: uint("in_channels", Some(3))?,
            out_channels: uint("out_channels", Some(3))?,
            layers_per_block: uint("layers_per_block", Some(1))?,
            latent_channels: uint("latent_channels", Some(4))?,
            norm_num_groups: uint("norm_num_groups", Some(32))?,
            scaling_factor: o
                .get("scaling_factor")
                .and_then(Value::as_f64)
                .unwrap_or(0.18215),
            use_quant_conv: flag("use_quant_conv")?,
            use_post_quant_conv: flag("use_post_quant_conv")?,
            block_out_channels: widths,
        };
        cfg.check().map_err(|e| err(e.to_string()))?;
        Ok(cfg)
    }

    /// Whether the sizes build a network: every width a multiple of the GroupNorm groups.
    pub fn check(&self) -> Result<()> {
        match self
            .block_out_channels
            .iter()
            .find(|&&w| w % self.norm_num_groups.max(1) != 0)
        {
            Some(w) => Err(FlowError::Config(format!(
                "block width {w} of `block_out_channels` is not a multiple of `norm_num_groups` = {}",
                self.norm_num_groups
            ))),
            None if self.block_out_channels.is_empty() => Err(FlowError::Config(
                "`block_out_channels` is empty".into(),
            )),
            None => Ok(()),
        }
    }

    /// How many times smaller the latent's side is than the image's.
    pub fn downsample(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

impl AutoencoderConfig {
    /// The config as diffusers' `config.json` writes it, so that diffusers and this loader both
    /// read a folder we save.
    pub fn to_json(&self) -> serde_json::Value {
        let n = self.block_out_channels.len();
        serde_json::json!({
            "_class_name": "AutoencoderKL",
            "act_fn": "silu",
            "block_out_channels": self.block_out_channels,
            "down_block_types": vec!["DownEncoderBlock2D"; n],
            "up_block_types": vec!["UpDecoderBlock2D"; n],
            "force_upcast": true,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "latent_channels": self.latent_channels,
            "layers_per_block": self.layers_per_block,
            "norm_num_groups": self.norm_num_groups,
            "scaling_factor": self.scaling_factor,
            "use_quant_conv": self.use_quant_conv,
            "use_post_quant_conv": self.use_post_quant_conv,
            "mid_block_add_attention": true,
            "latents_mean": null,
            "latents_std": null,
            "shift_factor": null,
        })
    }
}
