//! Image grids: many 8-bit C×H×W images tiled into one PNG.

use std::path::{Path, PathBuf};

/// Writing a grid failed.
#[derive(Debug, thiserror::Error)]
pub enum GridError {
    /// The images do not fit the stated shape.
    #[error("grid: {0}")]
    Shape(String),
    /// The PNG could not be written.
    #[error("{}: {source}", path.display())]
    Write {
        /// Output file.
        path: PathBuf,
        /// Encoder or file-system error.
        source: image::ImageError,
    },
}

/// Tiles `images` (each C×H×W u8 planar, C = 1 or 3) into rows of `cols` with a 2-pixel gap
/// and returns an RGB image.
pub fn tile(
    images: &[&[u8]],
    c: usize,
    h: usize,
    w: usize,
    cols: usize,
) -> Result<image::RgbImage, GridError> {
    if !(c == 1 || c == 3) {
        return Err(GridError::Shape(format!("{c} channels, expected 1 or 3")));
    }
    if let Some((i, im)) = images
        .iter()
        .enumerate()
        .find(|(_, im)| im.len() != c * h * w)
    {
        return Err(GridError::Shape(format!(
            "image {i} has {} bytes, expected {}",
            im.len(),
            c * h * w
        )));
    }
    let cols = cols.clamp(1, images.len().max(1));
    let rows = images.len().div_ceil(cols).max(1);
    let gap = 2;
    let (gw, gh) = (cols * (w + gap) + gap, rows * (h + gap) + gap);
    let mut out = image::RgbImage::from_pixel(gw as u32, gh as u32, image::Rgb([255, 255, 255]));
    for (k, im) in images.iter().enumerate() {
        let (ox, oy) = (gap + (k % cols) * (w + gap), gap + (k / cols) * (h + gap));
        for y in 0..h {
            for x in 0..w {
                let px = |ch: usize| im[(ch.min(c - 1) * h + y) * w + x];
                out.put_pixel(
                    (ox + x) as u32,
                    (oy + y) as u32,
                    image::Rgb([px(0), px(1), px(2)]),
                );
            }
        }
    }
    Ok(out)
}

/// Tiles `images` and writes the PNG to `path`.
pub fn save(
    images: &[&[u8]],
    c: usize,
    h: usize,
    w: usize,
    cols: usize,
    path: &Path,
) -> Result<(), GridError> {
    tile(images, c, h, w, cols)?
        .save(path)
        .map_err(|source| GridError::Write {
            path: path.into(),
            source,
        })
}

/// Writes one planar C×H×W image (C = 1 or 3) as a PNG of exactly H×W pixels.
pub fn save_image(
    pixels: &[u8],
    c: usize,
    h: usize,
    w: usize,
    path: &Path,
) -> Result<(), GridError> {
    if !(c == 1 || c == 3) || pixels.len() != c * h * w {
        return Err(GridError::Shape(format!(
            "{} bytes for {c}×{h}×{w}, expected C = 1 or 3 and C·H·W bytes",
            pixels.len()
        )));
    }
    let n = h * w;
    let img: image::DynamicImage = if c == 1 {
        // Grayscale stays one channel so that it scores as the model's input again.
        image::GrayImage::from_raw(w as u32, h as u32, pixels.to_vec())
            .ok_or_else(|| GridError::Shape(format!("{h}×{w} gray image")))?
            .into()
    } else {
        image::RgbImage::from_fn(w as u32, h as u32, |x, y| {
            let i = y as usize * w + x as usize;
            image::Rgb([pixels[i], pixels[n + i], pixels[2 * n + i]])
        })
        .into()
    };
    img.save(path).map_err(|source| GridError::Write {
        path: path.into(),
        source,
    })
}

/// Images in [-1, 1] (any shape) as 8-bit values, clamped; NaN becomes 0.
pub fn to_u8(x: &candle_core::Tensor) -> candle_core::Result<Vec<u8>> {
    Ok(x.to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|v| ((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_gray_and_rgb_images_in_place() {
        let a = vec![10u8; 4];
        let b: Vec<u8> = vec![1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3];
        let g = tile(&[&a, &a, &a], 1, 2, 2, 2).unwrap();
        assert_eq!(g.dimensions(), (2 * 4 + 2, 2 * 4 + 2));
        assert_eq!(g.get_pixel(2, 2).0, [10, 10, 10]);
        assert_eq!(g.get_pixel(0, 0).0, [255, 255, 255]);
        assert_eq!(
            g.get_pixel(6, 6).0,
            [255, 255, 255],
            "empty slot stays white"
        );
        let g = tile(&[&b], 3, 2, 2, 8).unwrap();
        assert_eq!(g.get_pixel(3, 3).0, [1, 2, 3]);
        assert!(tile(&[&a], 2, 2, 2, 1).is_err());
        assert!(tile(&[&b[..5]], 3, 2, 2, 1)
            .unwrap_err()
            .to_string()
            .contains("image 0"));
    }
}
