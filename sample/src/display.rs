//! Pictures for notebooks: an encoded PNG that evcxr shows inline, made from an image grid,
//! a heat map, a plot or a file.

use crate::error::{Result, SampleError};
use base64::Engine;
use candle_core::Tensor;
use std::path::Path;

/// An encoded PNG. In an evcxr notebook a cell whose value is a `Png` shows the picture.
#[derive(Clone, PartialEq, Eq)]
pub struct Png(Vec<u8>);

impl std::fmt::Debug for Png {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Png({} bytes)", self.0.len())
    }
}

impl Png {
    /// Encodes an RGB image.
    pub fn from_rgb(img: &image::RgbImage) -> Result<Self> {
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png)
            .map_err(|e| SampleError::Option(format!("cannot encode a PNG: {e}")))?;
        Ok(Self(out.into_inner()))
    }

    /// Reads a PNG file (a run's sample grid, a saved plot); anything else is an error.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| SampleError::file(path, e.to_string()))?;
        if !bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
            return Err(SampleError::file(path, "not a PNG file"));
        }
        Ok(Self(bytes))
    }

    /// Tiles images in [-1, 1], (N, C, H, W) with C = 1 or 3, into rows of `cols`, each pixel
    /// drawn as a `zoom`×`zoom` square so that 28-pixel digits are visible.
    pub fn grid(images: &Tensor, cols: usize, zoom: u32) -> Result<Self> {
        let (n, c, h, w) = images.dims4()?;
        let bytes = crate::grid::to_u8(images)?;
        let per = c * h * w;
        let views: Vec<&[u8]> = (0..n).map(|i| &bytes[i * per..(i + 1) * per]).collect();
        let img = crate::grid::tile(&views, c, h, w, cols)?;
        Self::from_rgb(&zoomed(&img, zoom))
    }

    /// The encoded bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    /// Writes the PNG to `path`.
    pub fn save(&self, path: &Path) -> Result<()> {
        std::fs::write(path, &self.0).map_err(|e| SampleError::file(path, e.to_string()))
    }

    /// The evcxr display protocol: a MIME bundle between markers on standard output.
    pub fn evcxr_display(&self) {
        println!("{}", self.mime_bundle());
    }

    /// What [`Png::evcxr_display`] prints.
    pub fn mime_bundle(&self) -> String {
        let b64 = base64::engine::general_purpose::STANDARD.encode(&self.0);
        format!("EVCXR_BEGIN_CONTENT image/png\n{b64}\nEVCXR_END_CONTENT")
    }
}

/// Writes `img` as a PNG at `path` through a temporary name (ending in .png, which the encoder
/// goes by) and a rename, so a reader never sees half a picture.
pub fn save_png_atomic(img: &image::RgbImage, path: &Path) -> std::io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".tmp-{name}"));
    img.save(&tmp).map_err(std::io::Error::other)?;
    std::fs::rename(&tmp, path)
}

/// Nearest-neighbour enlargement (a blurred digit hides what the model did).
pub fn zoomed(img: &image::RgbImage, zoom: u32) -> image::RgbImage {
    let z = zoom.max(1);
    if z == 1 {
        return img.clone();
    }
    image::RgbImage::from_fn(img.width() * z, img.height() * z, |x, y| {
        *img.get_pixel(x / z, y / z)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_png_decodes_to_the_tiled_size_and_prints_a_bundle() {
        let x = Tensor::zeros(
            (3, 1, 4, 5),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let png = Png::grid(&x, 2, 3).unwrap();
        let img = image::load_from_memory(png.bytes()).unwrap();
        // 2 columns × (5 + 2 gap) + 2, 2 rows × (4 + 2) + 2, times the zoom.
        assert_eq!((img.width(), img.height()), (16 * 3, 14 * 3));
        let b = png.mime_bundle();
        assert!(b.starts_with("EVCXR_BEGIN_CONTENT image/png\niVBORw0KGgo"));
        assert!(b.ends_with("\nEVCXR_END_CONTENT"));
    }

    #[test]
    fn from_file_refuses_what_is_not_a_png() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.png");
        std::fs::write(&p, b"GIF89a").unwrap();
        assert!(Png::from_file(&p)
            .unwrap_err()
            .to_string()
            .contains("not a PNG"));
    }
}
