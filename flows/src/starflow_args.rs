//! ml-starflow's training arguments (the `arguments:` list of its YAML configs, such as
//! `configs/starflow_3B_t2i_256x256.yaml`) turned into the `Model(**kwargs)` they build, as its
//! `train.py` does: each entry becomes a command-line flag, argparse's defaults fill the rest,
//! the image side is divided by the autoencoder's downsampling and `txt_dim` is the text
//! encoder's width.

use crate::error::{FlowError, Result};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// What a YAML config cannot say by itself: the sizes of the autoencoder and text encoder it
/// names, when they are not in this module's table.
#[derive(Debug, Clone, Copy, Default)]
pub struct Encoders {
    /// Spatial downsampling of the autoencoder (`vae:`), e.g. 8 for SD-VAE.
    pub vae_downsample: Option<usize>,
    /// Hidden width of the text encoder (`text:`), e.g. 2048 for flan-t5-xl.
    pub txt_dim: Option<usize>,
}

/// The model an ml-starflow YAML config describes.
#[derive(Debug, Clone)]
pub struct StarflowArgs {
    /// `Model(**kwargs)`'s keyword arguments, for [`crate::import::starflow_config`].
    pub kwargs: Value,
    /// σ of the training noise (`noise_std`), in the model's input units.
    pub noise_std: f64,
    /// The autoencoder the flow's inputs come from (`vae:`), if any.
    pub vae: Option<String>,
    /// The text encoder whose embeddings the flow reads (`text:`), if any.
    pub text: Option<String>,
}

/// Every argument of ml-starflow's `train.py`; an entry outside this list is refused, as
/// argparse refuses it.
const TRAIN_ARGS: [&str; 95] = [
    "model_config_path",
    "train_seed",
    "data",
    "logdir",
    "dataset",
    "wds",
    "mix_aspect",
    "img_size",
    "vid_size",
    "fps_cond",
    "no_flip",
    "caption_column",
    "secondary_dataset",
    "secondary_img_size",
    "secondary_vid_size",
    "vae",
    "vae_decoder_factor",
    "channel_size",
    "finetuned_vae",
    "text",
    "txt_size",
    "sos",
    "seq_order",
    "patch_size",
    "channels",
    "top_block_channels",
    "blocks",
    "layers_per_block",
    "rope",
    "pt_seq_len",
    "adaln",
    "nvp",
    "use_softplus",
    "cond_top_only",
    "head_dim",
    "num_heads",
    "num_kv_heads",
    "use_swiglu",
    "use_qk_norm",
    "use_post_norm",
    "use_final_norm",
    "use_bias",
    "norm_type",
    "use_pretrained_lm",
    "use_mm_attn",
    "soft_clip",
    "learnable_self_denoiser",
    "conditional_denoiser",
    "noise_embed_denoiser",
    "temporal_causal",
    "shallow_block_local",
    "denoiser_window",
    "local_attn_window",
    "noise_std",
    "noise_type",
    "cond_noise_level",
    "batch_size",
    "secondary_batch_size",
    "secondary_ratio",
    "acc",
    "fp8",
    "use_8bit_adam",
    "epochs",
    "epoch_length",
    "lr",
    "min_lr",
    "drop_label",
    "drop_image",
    "last_frame_cond",
    "video_to_video",
    "resume_path",
    "resume_epoch",
    "warmup_steps",
    "fsdp",
    "fsdp_text_encoder",
    "gradient_checkpoint",
    "gradient_checkpoint_mlp",
    "compile",
    "latent_norm_regularization",
    "loss_scaling",
    "grad_clip",
    "grad_skip",
    "dry_run",
    "wandb_name",
    "save_every",
    "sample_freq",
    "cfg",
    "num_samples",
    "sample_batch_size",
    // Sampling-side arguments that sample.py's configs carry as well.
    "jacobi",
    "jacobi_th",
    "jacobi_block_size",
    "target_length",
    "context_length",
    "checkpoint_path",
];

/// Spatial downsampling of the image autoencoders ml-starflow's configs name (diffusers'
/// `2 ** (len(down_block_types) - 1)`).
fn known_downsample(vae: &str) -> Option<usize> {
    vae.starts_with("stabilityai/sd-vae-")
        .then_some(8)
        .or_else(|| vae.starts_with("stabilityai/sdxl-vae").then_some(8))
}

/// Hidden width (`config.hidden_size`, T5's `d_model`) of the text encoders it names.
fn known_txt_dim(text: &str) -> Option<usize> {
    let t5 = text.trim_start_matches("google/");
    match t5 {
        "flan-t5-small" | "t5-v1_1-small" => Some(512),
        "flan-t5-base" | "t5-v1_1-base" => Some(768),
        "flan-t5-large" | "t5-v1_1-large" => Some(1024),
        "flan-t5-xl" | "t5-v1_1-xl" => Some(2048),
        "flan-t5-xxl" | "t5-v1_1-xxl" => Some(4096),
        _ => None,
    }
}

/// Reads an ml-starflow YAML config (`arguments:` as a list of one-key maps) into the model
/// it builds; `source` names the file in errors.
pub fn starflow_args(yaml: &str, source: &Path, enc: Encoders) -> Result<StarflowArgs> {
    let err = |m: String| FlowError::checkpoint(source, m);
    let docs =
        yaml_rust2::YamlLoader::load_from_str(yaml).map_err(|e| err(format!("not YAML: {e}")))?;
    let list = docs
        .first()
        .and_then(|d| d["arguments"].as_vec())
        .ok_or_else(|| err("no `arguments:` list (ml-starflow's config layout)".into()))?;
    // As train.py does, each value is read as the text it would be on the command line.
    let mut args: BTreeMap<String, String> = BTreeMap::new();
    for entry in list {
        let map = entry.as_hash().ok_or_else(|| {
            err(format!(
                "`arguments:` entry {entry:?} is not `- key: value`"
            ))
        })?;
        for (k, v) in map {
            let key = k
                .as_str()
                .ok_or_else(|| err(format!("argument name {k:?} is not a string")))?;
            if !TRAIN_ARGS.contains(&key) {
                return Err(err(format!(
                    "unknown argument `{key}`: not an argument of ml-starflow's train.py"
                )));
            }
            let text = match v {
                yaml_rust2::Yaml::Real(s) | yaml_rust2::Yaml::String(s) => s.clone(),
                yaml_rust2::Yaml::Integer(i) => i.to_string(),
                yaml_rust2::Yaml::Boolean(b) => (*b as u8).to_string(),
                yaml_rust2::Yaml::Null => "None".into(),
                o => return Err(err(format!("argument `{key}` = {o:?}: expected a scalar"))),
            };
            args.insert(key.to_string(), text);
        }
    }
    let get = |k: &str| args.get(k).map(String::as_str);
    let int = |k: &str, default: Option<i64>| -> Result<Option<i64>> {
        match get(k) {
            None => Ok(default),
            Some("None") => Ok(None),
            Some(s) => s
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| err(format!("argument `{k}` = {s:?}: expected an integer"))),
        }
    };
    let float = |k: &str, default: f64| -> Result<f64> {
        match get(k) {
            None => Ok(default),
            Some(s) => s
                .trim()
                .parse()
                .map_err(|_| err(format!("argument `{k}` = {s:?}: expected a number"))),
        }
    };
    let name = |k: &str| get(k).filter(|s| *s != "None").map(str::to_string);
    if let Some(v) = name("vid_size") {
        return Err(err(format!(
            "argument `vid_size` = {v:?}: video models are not built (image models only)"
        )));
    }
    let vae = name("vae");
    let text = name("text");
    let mut img = int("img_size", Some(32))?.unwrap_or(32);
    if let Some(v) = &vae {
        let f = enc
            .vae_downsample
            .or_else(|| known_downsample(v))
            .ok_or_else(|| {
                err(format!(
                    "autoencoder `{v}` is not one this crate knows: pass --vae-downsample F \
                 (its spatial downsampling, 2^(len(down_block_types) - 1))"
                ))
            })?;
        if f == 0 || img % f as i64 != 0 {
            return Err(err(format!(
                "argument `img_size` = {img} is not a multiple of the autoencoder's downsampling {f}"
            )));
        }
        img /= f as i64;
    }
    let txt_size = int("txt_size", Some(0))?.unwrap_or(0);
    let txt_dim = match &text {
        Some(t) if txt_size > 0 => enc.txt_dim.or_else(|| known_txt_dim(t)).ok_or_else(|| {
            err(format!(
                "text encoder `{t}` is not one this crate knows: pass --txt-dim D (its hidden \
                 size; the checkpoint's proj_txt.weight is (channels, D))"
            ))
        })?,
        _ => 0,
    };
    let layers: Vec<i64> = match get("layers_per_block") {
        None => vec![8],
        Some(s) => s
            .split_whitespace()
            .map(|n| n.parse())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| {
                err(format!(
                    "argument `layers_per_block` = {s:?}: expected integers separated by spaces"
                ))
            })?,
    };
    let blocks = match layers.len() {
        1 => int("blocks", Some(4))?.unwrap_or(4),
        n => n as i64,
    };
    let flag =
        |k: &str, default: i64| -> Result<bool> { Ok(int(k, Some(default))?.unwrap_or(0) != 0) };
    let mut kw = Map::new();
    let mut put = |k: &str, v: Value| {
        kw.insert(k.to_string(), v);
    };
    put("in_channels", json!(int("channel_size", Some(3))?));
    put("img_size", json!(img));
    put("txt_size", json!(txt_size));
    put("txt_dim", json!(txt_dim));
    put("patch_size", json!(int("patch_size", Some(4))?));
    put("channels", json!(int("channels", Some(512))?));
    put("num_blocks", json!(blocks));
    put("layers_per_block", json!(layers));
    put("head_dim", json!(int("head_dim", Some(64))?));
    put("num_heads", json!(int("num_heads", None)?));
    put("num_kv_heads", json!(int("num_kv_heads", None)?));
    put("pt_seq_len", json!(int("pt_seq_len", None)?));
    put(
        "top_block_channels",
        json!(int("top_block_channels", None)?),
    );
    for (k, arg) in [
        ("sos", "sos"),
        ("rope", "rope"),
        ("cond_top_only", "cond_top_only"),
        ("use_softplus", "use_softplus"),
        ("use_final_norm", "use_final_norm"),
        ("use_swiglu", "use_swiglu"),
        ("use_qk_norm", "use_qk_norm"),
        ("use_post_norm", "use_post_norm"),
        ("use_mm_attn", "use_mm_attn"),
        ("learnable_self_denoiser", "learnable_self_denoiser"),
        ("conditional_denoiser", "conditional_denoiser"),
        ("shallow_block_local", "shallow_block_local"),
    ] {
        put(k, json!(flag(arg, 0)?));
    }
    put("use_bias", json!(flag("use_bias", 1)?));
    put("temporal_causal", json!(int("temporal_causal", Some(0))?));
    if flag("noise_embed_denoiser", 0)? {
        return Err(err(
            "argument `noise_embed_denoiser` = 1 is not built yet".into()
        ));
    }
    if flag("adaln", 0)? {
        return Err(err("argument `adaln` = 1 is not built yet".into()));
    }
    put("soft_clip", json!(float("soft_clip", 0.0)?));
    put("seq_order", json!(get("seq_order").unwrap_or("R2L")));
    put("norm_type", json!(get("norm_type").unwrap_or("layer_norm")));
    for k in ["use_pretrained_lm", "denoiser_window", "local_attn_window"] {
        put(k, name(k).map_or(Value::Null, Value::String));
    }
    Ok(StarflowArgs {
        kwargs: Value::Object(kw),
        noise_std: float("noise_std", 0.3)?,
        vae,
        text,
    })
}
