//! Image datasets for tarflow: sources yielding 8-bit C×H×W images with optional labels.
//!
//! Sources ([`source::SourceKind`]): MNIST/Fashion-MNIST IDX files (gz or raw), CIFAR-10 binary
//! batches, downsampled-ImageNet `.npz` batches, a folder of image files, HDF5 (feature
//! `hdf5`), and the embedded default dataset (10,000 real MNIST digits shipped in the crate, see
//! `data/mnist10k/SOURCE.md`). [`loader`] turns a set into batches, [`transform`] maps 8-bit values to
//! [−1, 1] (the one rounding every path uses) and adds noise, flips and label drop.

pub mod cifar;
pub mod crops;
pub mod embedded;
pub mod error;
pub mod folder;
#[cfg(feature = "hdf5")]
pub mod hdf5;
pub mod idx;
pub mod latents;
pub mod loader;
pub mod npz;
pub mod source;
pub mod transform;

pub use error::{DataError, Result};

/// An in-memory set of same-sized 8-bit images (channel-planar C×H×W) with optional labels.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageSet {
    /// Channels C.
    pub channels: usize,
    /// Height H in pixels.
    pub height: usize,
    /// Width W in pixels.
    pub width: usize,
    /// All pixels, image after image, each C·H·W bytes.
    pub pixels: Vec<u8>,
    /// One label per image (0-based), when the source has them.
    pub labels: Option<Vec<i64>>,
    /// An encoded set's posterior (source `latents`), in place of `pixels` (then empty).
    pub latents: Option<std::sync::Arc<latents::Latents>>,
}

impl ImageSet {
    /// The images `idx` (in that order) as a new set.
    pub fn subset(&self, idx: &[usize]) -> ImageSet {
        let n = self.image_len();
        let mut pixels = Vec::with_capacity(idx.len() * n);
        for &i in idx.iter().filter(|_| self.latents.is_none()) {
            pixels.extend_from_slice(&self.pixels[i * n..(i + 1) * n]);
        }
        let rows = |v: &[f32]| -> Vec<f32> {
            idx.iter()
                .flat_map(|&i| v[i * n..(i + 1) * n].iter().copied())
                .collect()
        };
        ImageSet {
            channels: self.channels,
            height: self.height,
            width: self.width,
            pixels,
            labels: self
                .labels
                .as_ref()
                .map(|l| idx.iter().map(|&i| l[i]).collect()),
            latents: self.latents.as_ref().map(|l| {
                std::sync::Arc::new(latents::Latents {
                    mean: rows(&l.mean),
                    std: rows(&l.std),
                    ..l.as_ref().clone()
                })
            }),
        }
    }

    /// SHA-256 (hex) of the shape, the pixels and the labels: two figures computed on sets
    /// with the same count and checksum were computed on the same images.
    pub fn checksum(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for d in [self.channels, self.height, self.width] {
            h.update((d as u64).to_le_bytes());
        }
        h.update(&self.pixels);
        if let Some(l) = &self.latents {
            for v in l.mean.iter().chain(&l.std) {
                h.update(v.to_le_bytes());
            }
            h.update(l.vae_sha256.as_bytes());
        }
        if let Some(l) = &self.labels {
            for v in l {
                h.update(v.to_le_bytes());
            }
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        let values = self
            .latents
            .as_ref()
            .map_or(self.pixels.len(), |l| l.mean.len());
        values / self.image_len().max(1)
    }

    /// Whether the set holds no image.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes per image, C·H·W.
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// Pixels of image `i`, or `None` past the end.
    pub fn image(&self, i: usize) -> Option<&[u8]> {
        let n = self.image_len();
        self.pixels.get(i * n..(i + 1) * n)
    }

    /// Every image's pixels, in order.
    pub fn images(&self) -> Vec<&[u8]> {
        self.pixels.chunks_exact(self.image_len().max(1)).collect()
    }

    /// Label of image `i`, if the set has labels.
    pub fn label(&self, i: usize) -> Option<i64> {
        self.labels.as_ref().and_then(|l| l.get(i).copied())
    }

    /// Number of classes: one more than the largest label (0 without labels).
    pub fn num_classes(&self) -> usize {
        self.labels
            .as_ref()
            .and_then(|l| l.iter().max())
            .map_or(0, |&m| (m + 1).max(0) as usize)
    }

    /// Appends `other` (read from `source`), which must have the same image shape and the
    /// same presence of labels.
    pub fn append(&mut self, other: ImageSet, source: &std::path::Path) -> Result<()> {
        if self.latents.is_some() || other.latents.is_some() {
            return Err(DataError::format(
                source,
                "latents are read from one `vae encode` file, not appended",
            ));
        }
        let same = (
            self.channels,
            self.height,
            self.width,
            self.labels.is_some(),
        ) == (
            other.channels,
            other.height,
            other.width,
            other.labels.is_some(),
        );
        if !same {
            return Err(DataError::format(
                source,
                format!(
                    "{}×{}×{} images (labels: {}) do not match the earlier {}×{}×{} (labels: {})",
                    other.channels,
                    other.height,
                    other.width,
                    other.labels.is_some(),
                    self.channels,
                    self.height,
                    self.width,
                    self.labels.is_some()
                ),
            ));
        }
        self.pixels.extend_from_slice(&other.pixels);
        if let (Some(l), Some(m)) = (self.labels.as_mut(), other.labels) {
            l.extend(m);
        }
        Ok(())
    }

    /// An error naming `origin` unless the set holds pixels: a `latents` set holds an
    /// autoencoder's posterior, which only flow training reads.
    pub fn require_pixels(&self, origin: &std::path::Path) -> Result<()> {
        match self.latents {
            Some(_) => Err(DataError::format(
                origin,
                "holds autoencoder latents, not images: give the images they encode, or decode                  latents with `tarflow vae decode`",
            )),
            None => Ok(()),
        }
    }

    /// Mean pixel value on the 0–255 scale.
    pub fn mean_pixel(&self) -> f64 {
        if self.pixels.is_empty() {
            return 0.0;
        }
        self.pixels.iter().map(|&p| p as u64).sum::<u64>() as f64 / self.pixels.len() as f64
    }
}
