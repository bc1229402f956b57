//! ml-tarflow's and ml-starflow's raw state_dicts: a `.pth` (PyTorch zip pickle, checked by the
//! pickle guard and read as data, never executed) or `.safetensors` file, and the model config:
//! inferred from the shapes (ml-tarflow) or read from `Model(**kwargs)` (ml-starflow).
//! [`crate::checkpoint::Checkpoint::import`] builds a checkpoint from them.

use crate::config::ModelConfig;
use crate::error::{FlowError, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Reads a raw state_dict from a `.pth` (PyTorch zip pickle, parsed as data only, never
/// executed) or `.safetensors` file, stripping `module.` / `_orig_mod.` prefixes.
pub fn read_state_dict(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let is_safetensors = path.extension().is_some_and(|e| e == "safetensors");
    let pairs: Vec<(String, Tensor)> = if is_safetensors {
        let bytes = std::fs::read(path).map_err(|source| FlowError::Io {
            path: path.into(),
            source,
        })?;
        // Read on the host: the file may hold f64, which must not reach a GPU uncast.
        candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .map_err(|e| {
                FlowError::checkpoint(path, format!("not a readable safetensors file: {e}"))
            })?
            .into_iter()
            .collect()
    } else {
        read_pth(path)?
    };
    if pairs.is_empty() {
        return Err(FlowError::checkpoint(
            path,
            "holds no tensors: expected an ml-tarflow state_dict",
        ));
    }
    let mut out = HashMap::new();
    for (k, v) in pairs {
        let mut k = k.as_str();
        for prefix in ["module.", "_orig_mod."] {
            k = k.strip_prefix(prefix).unwrap_or(k);
        }
        out.insert(k.to_string(), crate::device::from_file(&v, device)?);
    }
    Ok(out)
}

fn read_pth(path: &Path) -> Result<Vec<(String, Tensor)>> {
    if !path.exists() {
        return Err(FlowError::Io {
            path: path.into(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        });
    }
    // Refuse anything but a plain state_dict before candle's reader interprets the pickle.
    crate::pickle_guard::check_pth(path).map_err(|e| FlowError::checkpoint(path, e))?;
    let mut last_err = String::from("no tensors found");
    // A plain state_dict, or one wrapped under a key as training scripts often save it.
    for key in [
        None,
        Some("model"),
        Some("state_dict"),
        Some("model_state_dict"),
    ] {
        // The pickle reader is third-party code on untrusted bytes: never let it take us down.
        let res = std::panic::catch_unwind(|| candle_core::pickle::read_all_with_key(path, key));
        match res {
            Ok(Ok(v)) if !v.is_empty() => return Ok(v),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => last_err = e.to_string(),
            Err(_) => last_err = "malformed pickle".into(),
        }
    }
    Err(FlowError::checkpoint(
        path,
        format!("not a PyTorch state_dict of tensors ({last_err}); expected a zip-format .pth saved by torch.save(model.state_dict())"),
    ))
}

/// Infers the model config of a raw ml-tarflow state_dict from its shapes.
pub fn infer_config(
    t: &HashMap<String, Tensor>,
    img_size: usize,
    patch_size: usize,
    in_channels: Option<usize>,
    source: &Path,
) -> Result<ModelConfig> {
    let err = |m: String| FlowError::checkpoint(source, m);
    let shape = |k: &str| t.get(k).map(|x| x.dims().to_vec());
    let proj_in = shape("blocks.0.proj_in.weight").ok_or_else(|| {
        err("missing key `blocks.0.proj_in.weight`: not an ml-tarflow TarFlow state_dict".into())
    })?;
    let [channels, d] = proj_in[..] else {
        return Err(err(format!(
            "`blocks.0.proj_in.weight` has shape {proj_in:?}, expected (channels, patch_dim)"
        )));
    };
    if patch_size == 0 || !img_size.is_multiple_of(patch_size) {
        return Err(err(format!(
            "--img-size {img_size} must be a multiple of --patch-size {patch_size}"
        )));
    }
    let p2 = patch_size * patch_size;
    let in_channels = match in_channels {
        Some(c) => c,
        None if d % p2 == 0 => d / p2,
        None => {
            return Err(err(format!(
                "patch dim {d} is not a multiple of patch_size² = {p2}"
            )))
        }
    };
    if in_channels * p2 != d {
        return Err(err(format!(
            "patch dim of the weights is {d}, but {in_channels} channels × {patch_size}² = {}",
            in_channels * p2
        )));
    }
    let tokens = (img_size / patch_size).pow(2);
    if let Some(pe) = shape("blocks.0.pos_embed") {
        if pe.first() != Some(&tokens) {
            return Err(err(format!(
                "`blocks.0.pos_embed` has {:?} rows but img_size {img_size} / patch_size {patch_size} gives {tokens} tokens",
                pe.first()
            )));
        }
    }
    let mut layers = Vec::new();
    while t.contains_key(&format!("blocks.{}.proj_in.weight", layers.len())) {
        let k = layers.len();
        let mut l = 0;
        while t.contains_key(&format!("blocks.{k}.attn_blocks.{l}.attention.qkv.weight")) {
            l += 1;
        }
        layers.push(l);
    }
    let num_classes = shape("blocks.0.class_embed")
        .and_then(|s| s.first().copied())
        .unwrap_or(0);
    let out = shape("blocks.0.proj_out.weight")
        .and_then(|s| s.first().copied())
        .ok_or_else(|| err("missing key `blocks.0.proj_out.weight`".into()))?;
    let nvp = match out {
        o if o == 2 * d => true,
        o if o == d => false,
        o => {
            return Err(err(format!(
                "`blocks.0.proj_out.weight` has {o} rows, expected {} (affine) or {d}",
                2 * d
            )))
        }
    };
    let uniform = layers.windows(2).all(|w| w[0] == w[1]);
    let mut cfg = ModelConfig::new(
        in_channels,
        img_size,
        patch_size,
        channels,
        layers.len(),
        layers[0],
        num_classes,
    );
    cfg.nvp = nvp;
    if !uniform {
        cfg.layers = Some(layers);
    }
    Ok(cfg)
}

/// The model config of ml-starflow's `Model(**kwargs)`, from the keyword arguments as a JSON
/// object. Every argument is read or refused: an option this crate does not build yet, or one
/// it does not know, is an error naming it, never a silently different model.
pub fn starflow_config(kwargs: &serde_json::Value, source: &Path) -> Result<ModelConfig> {
    use serde_json::Value;
    let err = |m: String| FlowError::checkpoint(source, m);
    let Value::Object(kw) = kwargs else {
        return Err(err(
            "model kwargs must be a JSON object of Model(...)'s keyword arguments".into(),
        ));
    };
    let uint = |k: &str| -> Result<Option<usize>> {
        match kw.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
                err(format!(
                    "kwarg `{k}` = {v}: expected a non-negative integer"
                ))
            }),
        }
    };
    let need = |k: &str| -> Result<usize> {
        uint(k)?.ok_or_else(|| err(format!("kwarg `{k}` is missing (Model(...) requires it)")))
    };
    let flag = |k: &str| -> Result<bool> {
        match kw.get(k) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            // Checkpointing frequencies are ints used as switches upstream.
            Some(v) if v.as_u64().is_some() => Ok(v.as_u64() != Some(0)),
            Some(v) => Err(err(format!("kwarg `{k}` = {v}: expected true or false"))),
        }
    };
    let (img, patch) = (need("img_size")?, need("patch_size")?);
    let (channels, num_blocks) = (need("channels")?, need("num_blocks")?);
    let layers: Vec<usize> = match kw.get("layers_per_block") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_u64().map(|n| n as usize))
            .collect::<Option<_>>()
            .ok_or_else(|| err("kwarg `layers_per_block`: expected a list of integers".into()))?,
        Some(v) if v.as_u64().is_some() => vec![v.as_u64().unwrap_or(0) as usize],
        _ => {
            return Err(err(
                "kwarg `layers_per_block` is missing or not a list".into()
            ))
        }
    };
    let layers = match layers.len() {
        1 => vec![layers[0]; num_blocks],
        n if n == num_blocks => layers,
        n => {
            return Err(err(format!(
                "kwarg `layers_per_block` has {n} entries for num_blocks = {num_blocks}"
            )))
        }
    };
    let head_dim = uint("head_dim")?.unwrap_or(64);
    let mut cfg = ModelConfig::new(
        need("in_channels")?,
        img,
        patch,
        channels,
        num_blocks,
        layers[0],
        0,
    );
    cfg.head_dim = head_dim;
    // ml-starflow lays a patch out as (row, col, channel); with p = 1 the orders agree.
    cfg.patch_channels_last = patch > 1;
    if layers.windows(2).any(|w| w[0] != w[1]) {
        cfg.layers = Some(layers);
    }
    cfg.rope = flag("rope")?;
    cfg.hf_style_rope = flag("hf_style_rope")?;
    cfg.sos = flag("sos")?;
    cfg.final_norm = flag("use_final_norm")?;
    cfg.cond_deep_only = flag("cond_top_only")?;
    cfg.txt_size = uint("txt_size")?.unwrap_or(0);
    cfg.txt_dim = uint("txt_dim")?.unwrap_or(0);
    cfg.scale = match flag("use_softplus")? {
        true => crate::config::ScaleHead::Softplus,
        false => crate::config::ScaleHead::Exp,
    };
    // Upstream clips only where soft_clip > 0; ours defaults to 4 with softplus.
    let clip = match kw.get("soft_clip") {
        None | Some(Value::Null) => 0.0,
        Some(v) => v
            .as_f64()
            .ok_or_else(|| err(format!("kwarg `soft_clip` = {v}: expected a number")))?,
    };
    cfg.soft_clip = match clip == cfg.soft_clip() {
        true => None,
        false => Some(clip),
    };
    cfg.permutation = match kw.get("seq_order").and_then(Value::as_str).unwrap_or("R2L") {
        "R2L" => crate::config::Permutation::Alternate,
        "L2R" => crate::config::Permutation::L2r,
        o => {
            return Err(err(format!(
                "kwarg `seq_order` = {o:?}: expected \"L2R\" or \"R2L\""
            )))
        }
    };
    let grid = img / patch.max(1);
    let same = |k: &str, want: usize| -> Result<()> {
        match uint(k)? {
            Some(v) if v != want => Err(err(format!(
                "kwarg `{k}` = {v} is not built yet (only {want}, its default here)"
            ))),
            _ => Ok(()),
        }
    };
    same("pt_seq_len", grid)?;
    same("top_block_channels", channels)?;
    same("temporal_causal", 0)?;
    cfg.num_heads = uint("num_heads")?;
    cfg.num_kv_heads = uint("num_kv_heads")?;
    cfg.swiglu = flag("use_swiglu")?;
    cfg.qk_norm = flag("use_qk_norm")?;
    cfg.post_norm = flag("use_post_norm")?;
    cfg.no_bias = kw.get("use_bias").is_some_and(|v| v == &Value::Bool(false));
    cfg.norm = match kw.get("norm_type").and_then(Value::as_str) {
        None | Some("layer_norm") => crate::config::NormKind::LayerNorm,
        Some("rms_norm") => crate::config::NormKind::RmsNorm,
        Some(o) => {
            return Err(err(format!(
                "kwarg `norm_type` = {o:?}: expected \"layer_norm\" or \"rms_norm\""
            )))
        }
    };
    if flag("learnable_self_denoiser")? {
        cfg.denoiser_layers = 8;
    }
    for k in ["conditional_denoiser", "use_mm_attn", "shallow_block_local"] {
        if flag(k)? {
            return Err(err(format!("kwarg `{k}` = true is not built yet")));
        }
    }
    for k in ["use_pretrained_lm", "denoiser_window", "local_attn_window"] {
        if kw.get(k).is_some_and(|v| !v.is_null()) {
            return Err(err(format!("kwarg `{k}` is not built yet")));
        }
    }
    const KNOWN: [&str; 36] = [
        "in_channels",
        "img_size",
        "patch_size",
        "channels",
        "num_blocks",
        "layers_per_block",
        "head_dim",
        "num_heads",
        "num_kv_heads",
        "rope",
        "pt_seq_len",
        "sos",
        "txt_size",
        "txt_dim",
        "cond_top_only",
        "use_softplus",
        "use_swiglu",
        "use_bias",
        "use_qk_norm",
        "use_post_norm",
        "use_final_norm",
        "hf_style_rope",
        "norm_type",
        "use_checkpoint",
        "use_checkpoint_mlp",
        "use_pretrained_lm",
        "use_mm_attn",
        "soft_clip",
        "seq_order",
        "learnable_self_denoiser",
        "conditional_denoiser",
        "temporal_causal",
        "top_block_channels",
        "shallow_block_local",
        "denoiser_window",
        "local_attn_window",
    ];
    if let Some(k) = kw.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(err(format!(
            "unknown kwarg `{k}`: not an argument of ml-starflow's Model(...) (known: {})",
            KNOWN.join(", ")
        )));
    }
    cfg.validate().map_err(|e| err(e.to_string()))?;
    Ok(cfg)
}

/// The `Model(...)` argument that decides whether ml-starflow's state_dict has `key`, for an
/// error that names the fix.
pub fn starflow_kwarg_of(key: &str) -> &'static str {
    const BY_PART: [(&str, &str); 14] = [
        ("learnable_self_denoiser", "learnable_self_denoiser"),
        (
            "proj_txt",
            "txt_dim, txt_size and cond_top_only (which blocks read text)",
        ),
        ("sos_embed", "sos"),
        ("final_norm", "use_final_norm"),
        ("pos_embed", "rope (a model with RoPE has no pos_embed)"),
        ("query_norm", "use_qk_norm"),
        ("key_norm", "use_qk_norm"),
        ("post_norm", "use_post_norm"),
        ("gate_proj", "use_swiglu"),
        ("up_proj", "use_swiglu"),
        ("down_proj", "use_swiglu"),
        ("mlp.main", "use_swiglu"),
        ("norm.bias", "norm_type"),
        (".qkv.", "num_heads, num_kv_heads and head_dim"),
    ];
    match BY_PART.iter().find(|(part, _)| key.contains(part)) {
        Some((_, kwarg)) => kwarg,
        None if key.ends_with(".bias") => "use_bias",
        None if key.contains("attn_blocks") => "layers_per_block",
        None => "num_blocks, channels, in_channels and patch_size",
    }
}

/// ml-starflow's rotary buffer holds no values, but its shape says the head width and the text
/// length, which no weight's shape does: kwargs that disagree with it are refused by name.
pub fn check_rotary_buffer(
    cfg: &ModelConfig,
    tensors: &HashMap<String, Tensor>,
    source: &Path,
) -> Result<()> {
    match tensors.get("feat_rope.freqs_cos") {
        Some(b) if b.dims() != [cfg.num_tokens() + cfg.txt_size, cfg.head_dim] => {
            Err(FlowError::checkpoint(
                source,
                format!(
                    "`feat_rope.freqs_cos` has shape {:?}, but the kwargs give {:?} (positions, head_dim): check head_dim and txt_size",
                    b.dims(),
                    [cfg.num_tokens() + cfg.txt_size, cfg.head_dim]
                ),
            ))
        }
        _ => Ok(()),
    }
}
