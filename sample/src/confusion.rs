//! The confusion matrix of a classification as a picture: rows are the true classes, columns
//! the predicted ones, each cell shaded by its share of its row and labelled with its count.

use crate::error::{Result, SampleError};
use plotters::prelude::*;
use std::path::Path;

/// Draws `m[true][predicted]` into a PNG at `path` (atomically), with `title` above it.
pub fn render(m: &[Vec<usize>], title: &str, path: &Path) -> Result<()> {
    let img = render_image(m, title)?;
    crate::display::save_png_atomic(&img, path)
        .map_err(|e| SampleError::file(path, format!("cannot write the confusion matrix: {e}")))
}

/// The confusion matrix as an in-memory picture (a notebook shows it without a file).
pub fn render_png(m: &[Vec<usize>], title: &str) -> Result<crate::display::Png> {
    crate::display::Png::from_rgb(&render_image(m, title)?)
}

/// Draws the confusion matrix into an RGB image.
pub fn render_image(m: &[Vec<usize>], title: &str) -> Result<image::RgbImage> {
    crate::font::register();
    let k = m.len();
    if k == 0 || m.iter().any(|r| r.len() != k) {
        return Err(SampleError::Option(
            "confusion matrix: expected a square matrix of at least one class".into(),
        ));
    }
    let cell = 44usize;
    let (left, top, pad) = (70usize, 70usize, 20usize);
    let (width, height) = (left + k * cell + pad, top + k * cell + pad + 20);
    let err = |e: String| SampleError::Option(format!("cannot draw the confusion matrix: {e}"));
    let mut buf = vec![255u8; width * height * 3];
    {
        let root =
            BitMapBackend::with_buffer(&mut buf, (width as u32, height as u32)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
        let style = ("sans-serif", 14).into_font().color(&BLACK);
        root.draw(&Text::new(title.to_string(), (10, 8), style.clone()))
            .map_err(|e| err(e.to_string()))?;
        root.draw(&Text::new(
            "predicted →".to_string(),
            (left as i32, 32),
            style.clone(),
        ))
        .map_err(|e| err(e.to_string()))?;
        root.draw(&Text::new("true ↓".to_string(), (8, 50), style.clone()))
            .map_err(|e| err(e.to_string()))?;
        for (t, row) in m.iter().enumerate() {
            let total = row.iter().sum::<usize>().max(1) as f64;
            let y = (top + t * cell) as i32;
            root.draw(&Text::new(
                t.to_string(),
                (left as i32 - 22, y + 14),
                style.clone(),
            ))
            .map_err(|e| err(e.to_string()))?;
            for (p, &c) in row.iter().enumerate() {
                let x = (left + p * cell) as i32;
                let share = c as f64 / total;
                // White to dark blue by the cell's share of its row.
                let shade = |full: f64| (255.0 - share * (255.0 - full)).round() as u8;
                let fill = RGBColor(shade(20.0), shade(60.0), shade(140.0));
                root.draw(&Rectangle::new(
                    [(x, y), (x + cell as i32 - 1, y + cell as i32 - 1)],
                    fill.filled(),
                ))
                .map_err(|e| err(e.to_string()))?;
                let ink = if share > 0.5 { &WHITE } else { &BLACK };
                root.draw(&Text::new(
                    c.to_string(),
                    (x + 6, y + 14),
                    ("sans-serif", 13).into_font().color(ink),
                ))
                .map_err(|e| err(e.to_string()))?;
            }
        }
        for p in 0..k {
            root.draw(&Text::new(
                p.to_string(),
                ((left + p * cell + cell / 2 - 4) as i32, top as i32 - 18),
                style.clone(),
            ))
            .map_err(|e| err(e.to_string()))?;
        }
        root.present().map_err(|e| err(e.to_string()))?;
    }
    image::RgbImage::from_raw(width as u32, height as u32, buf)
        .ok_or_else(|| err("buffer size".into()))
}
