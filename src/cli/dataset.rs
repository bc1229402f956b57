//! A whole dataset as the input of `score`, `ood` and `classify`: `KIND:PATH` (the kinds of
//! `data inspect` and training), loaded at the model's image size, with its identity.

use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};
use tarflow_datasets::folder::FolderOptions;
use tarflow_datasets::source::{self, SourceKind};
use tarflow_datasets::ImageSet;
use tarflow_flows::ModelConfig;

/// A loaded dataset and how it is named in tables and errors.
pub struct Dataset {
    /// What the user wrote, e.g. `mnist-idx:data/mnist/t10k-images-idx3-ubyte.gz`.
    pub name: String,
    /// The images (the first `limit` when limited).
    pub set: ImageSet,
    /// Unreadable files of a folder, skipped (path, reason); each was said on stderr.
    pub skipped: Vec<(PathBuf, String)>,
}

impl Dataset {
    /// Loads `kind` from `path` for `cfg` (a folder is read at the model's size and channels)
    /// and keeps the first `limit` images (all when None). A folder's unreadable files are
    /// skipped and said, unless `strict` (then the first is an error).
    pub fn load(
        k: SourceKind,
        path: Option<&Path>,
        cfg: &ModelConfig,
        limit: Option<usize>,
        strict: bool,
    ) -> Result<Dataset> {
        let kind = k.name();
        let folder = FolderOptions {
            size: Some(cfg.img_size),
            channels: cfg.in_channels,
            class_per_subdir: None,
            skip_bad: !strict,
        };
        let name = match path {
            Some(p) => format!("{kind}:{}", p.display()),
            None => kind.to_string(),
        };
        let loaded = source::load(k, path, &folder).with_context(|| format!("--source {name}"))?;
        for n in &loaded.notes {
            eprintln!("note: {name}: {n}");
        }
        for (p, why) in &loaded.skipped {
            eprintln!("skipped {}: {why}", p.display());
        }
        let set = loaded.set;
        set.require_pixels(path.unwrap_or(std::path::Path::new("--source")))?;
        let want = (cfg.in_channels, cfg.img_size, cfg.img_size);
        if (set.channels, set.height, set.width) != want {
            bail!(
                "{name}: images are {}×{}×{} (C×H×W); the model expects {}×{}×{}",
                set.channels,
                set.height,
                set.width,
                want.0,
                want.1,
                want.2
            );
        }
        let set = match limit {
            Some(n) if n < set.len() => set.subset(&(0..n).collect::<Vec<_>>()),
            _ => set,
        };
        if set.is_empty() {
            bail!("{name}: no images");
        }
        Ok(Dataset {
            name,
            set,
            skipped: loaded.skipped,
        })
    }

    /// Parses `KIND:PATH` (or a bare `embedded`) and loads it ([`Self::load`]).
    pub fn parse(
        spec: &str,
        cfg: &ModelConfig,
        limit: Option<usize>,
        strict: bool,
    ) -> Result<Dataset> {
        let (kind, path) = match spec.split_once(':') {
            Some((k, p)) => (k, Some(PathBuf::from(p))),
            None => (spec, None),
        };
        let k: SourceKind = kind.parse().map_err(|e: String| anyhow!("{spec}: {e}"))?;
        Self::load(k, path.as_deref(), cfg, limit, strict)
    }

    /// Names for the images: `NAME#index`.
    pub fn image_names(&self) -> Vec<PathBuf> {
        (0..self.set.len())
            .map(|i| PathBuf::from(format!("{}#{i}", self.name)))
            .collect()
    }

    /// Count and SHA-256 of the images and labels: equal identities, equal data.
    pub fn identity(&self) -> serde_json::Value {
        serde_json::json!({
            "source": self.name,
            "count": self.set.len(),
            "sha256": self.set.checksum(),
            "labels": self.set.labels.is_some(),
            "skipped": self.skipped.len(),
        })
    }
}
