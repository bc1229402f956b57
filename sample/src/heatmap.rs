//! The per-patch picture of where an image's likelihood goes: each image beside a heat map of
//! its patches' bits, with a shared colour bar.

use crate::error::{Result, SampleError};
use plotters::prelude::*;
use std::path::Path;

/// One row of the figure: the image (planar C×S×S bytes) and its patches' bits (raster order).
pub struct Row<'a> {
    /// Planar 8-bit image.
    pub pixels: &'a [u8],
    /// Bits per patch, (S/p)² values.
    pub patch_bits: &'a [f64],
    /// Caption (file name and total bits/dim).
    pub caption: String,
}

/// The rows of the first `max` scored images, captioned with the file name (or the index when
/// the images came from memory) and bits/dim.
pub fn rows_of<'a, P: AsRef<[u8]>>(
    scores: &'a [crate::score::ImageScore],
    pixels: &'a [P],
    max: usize,
) -> Vec<Row<'a>> {
    scores
        .iter()
        .zip(pixels)
        .take(max)
        .enumerate()
        .map(|(i, (s, px))| Row {
            pixels: px.as_ref(),
            patch_bits: &s.patch_bits,
            caption: format!(
                "{}: {:.3} bits/dim",
                s.path
                    .file_name()
                    .map_or(format!("image {i}"), |n| n.to_string_lossy().into_owned()),
                s.bits_per_dim
            ),
        })
        .collect()
}

/// A perceptually ordered colour map (viridis key points), `t` in [0, 1].
pub fn colormap(t: f64) -> RGBColor {
    const KEYS: [(u8, u8, u8); 6] = [
        (68, 1, 84),
        (65, 68, 135),
        (42, 120, 142),
        (34, 168, 132),
        (122, 209, 81),
        (253, 231, 37),
    ];
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let x = t * (KEYS.len() - 1) as f64;
    let i = (x.floor() as usize).min(KEYS.len() - 2);
    let f = x - i as f64;
    let mix = |a: u8, b: u8| (a as f64 + (b as f64 - a as f64) * f).round() as u8;
    let (a, b) = (KEYS[i], KEYS[i + 1]);
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// Draws `rows` (image | heat map) with one colour scale into a PNG at `path` (atomically).
pub fn render(
    rows: &[Row],
    channels: usize,
    img_size: usize,
    patch_size: usize,
    path: &Path,
) -> Result<()> {
    let img = render_image(rows, channels, img_size, patch_size)
        .map_err(|e| SampleError::file(path, format!("cannot draw the heat map: {e}")))?;
    crate::display::save_png_atomic(&img, path)
        .map_err(|e| SampleError::file(path, format!("cannot write the heat map: {e}")))
}

/// The heat map figure as an in-memory picture (a notebook shows it without a file).
pub fn render_png(
    rows: &[Row],
    channels: usize,
    img_size: usize,
    patch_size: usize,
) -> Result<crate::display::Png> {
    crate::display::Png::from_rgb(&render_image(rows, channels, img_size, patch_size)?)
}

/// Draws the heat map figure into an RGB image.
pub fn render_image(
    rows: &[Row],
    channels: usize,
    img_size: usize,
    patch_size: usize,
) -> Result<image::RgbImage> {
    crate::font::register();
    if img_size == 0
        || patch_size == 0
        || !img_size.is_multiple_of(patch_size)
        || !(channels == 1 || channels == 3)
    {
        return Err(SampleError::Option(format!(
            "heat map: {channels} channels, image {img_size}, patch {patch_size}; expected 1 or 3 channels and a patch size dividing the image"
        )));
    }
    if rows.is_empty() {
        return Err(SampleError::Option("--heatmap: no image to draw".into()));
    }
    let grid = img_size / patch_size;
    let cell = (256 / img_size).max(1); // screen pixels per image pixel
    let panel = img_size * cell;
    let (pad, caption_h, bar_w) = (16usize, 22usize, 90usize);
    let width = pad + panel + pad + panel + pad + bar_w;
    let height = pad + rows.len() * (panel + caption_h + pad);
    let (lo, hi) = rows
        .iter()
        .flat_map(|r| r.patch_bits.iter().copied())
        .filter(|v| v.is_finite())
        .fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(v), b.max(v)));
    let (lo, hi) = if lo > hi {
        (0.0, 1.0)
    } else {
        (lo, hi.max(lo + 1e-9))
    };
    let err = |e: String| SampleError::Option(format!("cannot draw the heat map: {e}"));
    let mut buf = vec![255u8; width * height * 3];
    {
        let root =
            BitMapBackend::with_buffer(&mut buf, (width as u32, height as u32)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
        let style = ("sans-serif", 15).into_font().color(&BLACK);
        let n = img_size * img_size;
        for (r, row) in rows.iter().enumerate() {
            if row.pixels.len() != channels * n || row.patch_bits.len() != grid * grid {
                return Err(SampleError::Option(format!(
                    "heat map row {r}: {} bytes and {} patches, expected {} and {}",
                    row.pixels.len(),
                    row.patch_bits.len(),
                    channels * n,
                    grid * grid
                )));
            }
            let y0 = pad + r * (panel + caption_h + pad);
            root.draw(&Text::new(
                row.caption.clone(),
                (pad as i32, y0 as i32),
                style.clone(),
            ))
            .map_err(|e| err(e.to_string()))?;
            let top = (y0 + caption_h) as i32;
            for y in 0..img_size {
                for x in 0..img_size {
                    let px = |c: usize| row.pixels[c.min(channels - 1) * n + y * img_size + x];
                    let (x1, y1) = ((pad + x * cell) as i32, top + (y * cell) as i32);
                    root.draw(&Rectangle::new(
                        [(x1, y1), (x1 + cell as i32, y1 + cell as i32)],
                        RGBColor(px(0), px(1), px(2)).filled(),
                    ))
                    .map_err(|e| err(e.to_string()))?;
                }
            }
            let left = (pad + panel + pad) as i32;
            let pc = (patch_size * cell) as i32;
            for (i, &b) in row.patch_bits.iter().enumerate() {
                let (gx, gy) = ((i % grid) as i32, (i / grid) as i32);
                let (x1, y1) = (left + gx * pc, top + gy * pc);
                root.draw(&Rectangle::new(
                    [(x1, y1), (x1 + pc, y1 + pc)],
                    colormap((b - lo) / (hi - lo)).filled(),
                ))
                .map_err(|e| err(e.to_string()))?;
            }
        }
        // The colour bar: low bits at the bottom, high at the top.
        let bx = (pad + panel + pad + panel + pad) as i32;
        let (by0, bh) = ((pad + caption_h) as i32, panel.min(300) as i32);
        for k in 0..bh {
            let t = 1.0 - k as f64 / (bh - 1).max(1) as f64;
            root.draw(&Rectangle::new(
                [(bx, by0 + k), (bx + 18, by0 + k + 1)],
                colormap(t).filled(),
            ))
            .map_err(|e| err(e.to_string()))?;
        }
        for (t, v) in [(0.0, hi), (0.5, (lo + hi) / 2.0), (1.0, lo)] {
            let y = by0 + (t * (bh - 1) as f64) as i32 - 7;
            root.draw(&Text::new(format!("{v:.1}"), (bx + 22, y), style.clone()))
                .map_err(|e| err(e.to_string()))?;
        }
        root.draw(&Text::new(
            "bits/patch",
            (bx - 4, pad as i32),
            style.clone(),
        ))
        .map_err(|e| err(e.to_string()))?;
        root.present().map_err(|e| err(e.to_string()))?;
    }
    image::RgbImage::from_raw(width as u32, height as u32, buf)
        .ok_or_else(|| err("buffer size".into()))
}
