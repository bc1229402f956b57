//! Seeded square crops of a few photographs at several scales: a colour training set made here
//! from freely licensed photos (`tarflow data crops`), written as CIFAR-10 binary records so the
//! `cifar10` source reads it back.

use crate::error::{DataError, Result};
use crate::ImageSet;
use image::imageops::FilterType;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};

/// What to cut.
#[derive(Debug, Clone)]
pub struct CropOptions {
    /// Side of every crop in pixels.
    pub size: usize,
    /// Crops in all, taken from the photos in turn.
    pub count: usize,
    /// Downscaling factors of the photo a crop is cut from (1 = full resolution), drawn
    /// uniformly among those that leave the photo at least `size` on its shorter side.
    pub scales: Vec<u32>,
    /// Seed of the positions, scales and flips.
    pub seed: u64,
}

/// `count` RGB crops of `photos` (label = the photo's index: at most 10 photos, CIFAR-10's
/// label range), each at a random scale, position and horizontal flip from `seed`.
pub fn random_crops(photos: &[PathBuf], o: &CropOptions) -> Result<ImageSet> {
    if photos.is_empty() || photos.len() > 10 {
        return Err(DataError::format(
            photos.first().map_or(Path::new("<none>"), |p| p.as_path()),
            format!(
                "{} photos given; crops take 1 to 10 (one label each)",
                photos.len()
            ),
        ));
    }
    // Every photo at every usable scale, decoded and resized once.
    let mut levels: Vec<Vec<image::RgbImage>> = Vec::new();
    for p in photos {
        let img = crate::folder::decode(p).map_err(|e| DataError::format(p, e.to_string()))?;
        let mut mine = Vec::new();
        for &s in &o.scales {
            let (w, h) = (img.width() / s.max(1), img.height() / s.max(1));
            if (w.min(h) as usize) < o.size {
                continue;
            }
            mine.push(img.resize_exact(w, h, FilterType::Triangle).to_rgb8());
        }
        if mine.is_empty() {
            return Err(DataError::format(
                p,
                format!(
                    "{}×{} is smaller than one {}-pixel crop at every scale {:?}",
                    img.width(),
                    img.height(),
                    o.size,
                    o.scales
                ),
            ));
        }
        levels.push(mine);
    }
    let mut rng = StdRng::seed_from_u64(o.seed);
    let (s, n) = (o.size as u32, o.size * o.size);
    let mut pixels = Vec::with_capacity(o.count * 3 * n);
    let mut labels = Vec::with_capacity(o.count);
    for i in 0..o.count {
        let photo = i % photos.len();
        let img = &levels[photo][rng.random_range(0..levels[photo].len())];
        let x0 = rng.random_range(0..=img.width() - s);
        let y0 = rng.random_range(0..=img.height() - s);
        let flip = rng.random_bool(0.5);
        for c in 0..3 {
            for y in 0..s {
                for x in 0..s {
                    let sx = if flip { s - 1 - x } else { x };
                    pixels.push(img.get_pixel(x0 + sx, y0 + y)[c]);
                }
            }
        }
        labels.push(photo as i64);
    }
    Ok(ImageSet {
        channels: 3,
        height: o.size,
        width: o.size,
        pixels,
        labels: Some(labels),
        latents: None,
    })
}
