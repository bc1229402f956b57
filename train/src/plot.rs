//! Line plots of a run's curves (plotters, bitmap backend, the vendored font of tarflow-sample).

use crate::error::{Result, TrainError};
use crate::metrics::Record;
use plotters::prelude::*;
use std::path::Path;

/// One named curve of (x, y) points.
pub type Series<'a> = (&'a str, &'a [(f64, f64)]);

/// Draws `series` against a shared x axis into a PNG at `path` (written atomically).
pub fn line_plot(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<()> {
    tarflow_sample::font::register();
    let pts = series
        .iter()
        .flat_map(|(_, p)| p.iter())
        .filter(|(x, y)| x.is_finite() && y.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        return Ok(()); // nothing to draw yet
    }
    if x1 - x0 < 1e-9 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-6);
    let (y0, y1) = (y0 - pad, y1 + pad);
    // The encoder picks the format from the extension, so the temporary name ends in .png.
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".tmp-{name}"));
    let err = |e: String| TrainError::Run {
        path: path.into(),
        msg: format!("cannot draw the plot: {e}"),
    };
    {
        let root = BitMapBackend::new(&tmp, (800, 500)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 24))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|e| err(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .draw()
            .map_err(|e| err(e.to_string()))?;
        for (i, (label, p)) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(p.iter().copied(), color.stroke_width(2)))
                .map_err(|e| err(e.to_string()))?
                .label(*label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(e.to_string()))?;
        root.present().map_err(|e| err(e.to_string()))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| TrainError::io(path, e))
}

/// Draws a run's `loss.png` (training loss) and `bpd.png` (training and validation bits/dim)
/// into `dir` from its metrics.
pub fn run_plots(history: &[Record], dir: &Path) -> Result<()> {
    let pick = |f: fn(&Record) -> Option<f64>| -> Vec<(f64, f64)> {
        history
            .iter()
            .filter_map(|r| f(r).map(|v| (r.step as f64, v)))
            .collect()
    };
    let loss = pick(|r| r.loss);
    line_plot(
        &dir.join("loss.png"),
        "training loss",
        "step",
        "loss (nats/dim)",
        &[("train", &loss)],
    )?;
    let (bpd, val, val_ema) = (
        pick(|r| r.bpd),
        pick(|r| r.val_bpd),
        pick(|r| r.val_bpd_ema),
    );
    let mut series: Vec<Series> = vec![("train (noisy input)", &bpd)];
    if !val.is_empty() {
        series.push(("validation", &val));
    }
    if !val_ema.is_empty() {
        series.push(("validation, EMA", &val_ema));
    }
    line_plot(
        &dir.join("bpd.png"),
        "bits per dimension",
        "step",
        "bits/dim",
        &series,
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn writes_a_png() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("loss.png");
        let a: Vec<(f64, f64)> = (0..50)
            .map(|i| (i as f64, (-(i as f64) / 10.0).exp()))
            .collect();
        super::line_plot(&p, "loss", "step", "nats", &[("train", &a)]).unwrap();
        let img = image::open(&p).unwrap();
        assert_eq!((img.width(), img.height()), (800, 500));
    }
}
