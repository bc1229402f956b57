//! ml-tarflow's raw state_dicts: a `.pth` (PyTorch zip pickle, checked by the pickle guard and
//! read as data, never executed) or `.safetensors` file, and the model config inferred from its
//! shapes. [`crate::checkpoint::Checkpoint::import`] builds a checkpoint from them.

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
