//! A latent run measured in pixels: the pixel configuration whose held-out split is the
//! latents' own (FD compares decoded samples with those images); the autoencoder itself comes
//! from `tarflow_train::data::autoencoder`.

use tarflow_datasets::source::SourceKind;
use tarflow_train::{Result, TrainConfig, TrainError};

/// `cfg` itself for a pixel run; for a latent run, the same run over the pixels its latents
/// encode (the source `vae encode` recorded, the autoencoder's image shape), so that its
/// seeded split holds out the very images the latent run held out.
pub fn pixel_twin(cfg: &TrainConfig) -> Result<TrainConfig> {
    if cfg.data.source != SourceKind::Latents {
        return Ok(cfg.clone());
    }
    let path = cfg
        .data
        .path
        .as_deref()
        .ok_or_else(|| TrainError::config("data.path", "a `latents` source needs its file"))?;
    let set = tarflow_datasets::latents::read_latents(path)?;
    let latents = set
        .latents
        .as_ref()
        .ok_or_else(|| TrainError::config("data.path", "not a latents file"))?;
    let (kind, source_path) = latents.source.clone().ok_or_else(|| {
        TrainError::config(
            "data.path",
            format!(
                "{} does not say which images it encodes (they were files, --tensors or a --limit): \
                 re-encode a whole source with `tarflow vae encode --source KIND [--path P]` to \
                 compare samples with images",
                path.display()
            ),
        )
    })?;
    let vae_dir = cfg.data.vae.as_deref().ok_or_else(|| {
        TrainError::config("data.vae", "a `latents` source needs its autoencoder")
    })?;
    let text = std::fs::read_to_string(vae_dir.join(tarflow_flows::autoencoder::CONFIG))
        .map_err(|e| TrainError::io(vae_dir, e))?;
    let ae = tarflow_flows::autoencoder::AutoencoderConfig::from_json(&text, vae_dir)?;
    let mut twin = cfg.clone();
    twin.data.source = kind
        .parse()
        .map_err(|e: String| TrainError::config("data.path", e))?;
    twin.data.path = source_path.map(Into::into);
    twin.data.vae = None;
    twin.model.in_channels = ae.in_channels;
    twin.model.img_size = set.height * ae.downsample();
    Ok(twin)
}
