//! Line plots of a run's curves (plotters, bitmap backend, the vendored font of tarflow-sample).

use crate::error::{Result, TrainError};
use crate::metrics::Record;
use plotters::prelude::*;
use std::path::Path;
use tarflow_sample::display::Png;

/// One named curve of (x, y) points.
pub type Series<'a> = (&'a str, &'a [(f64, f64)]);

/// Draws `series` against a shared x axis into a PNG at `path` (written atomically); nothing
/// is written while no series has a finite point.
pub fn line_plot(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<()> {
    let err = |msg: String| TrainError::Run {
        path: path.into(),
        msg,
    };
    let Some(img) = line_plot_image(title, x_label, y_label, series).map_err(err)? else {
        return Ok(());
    };
    tarflow_sample::display::save_png_atomic(&img, path).map_err(|e| TrainError::io(path, e))
}

/// The same plot as an in-memory picture for a notebook; an error when there is nothing to draw.
pub fn line_plot_png(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> Result<Png> {
    let err = |msg: String| TrainError::config(format!("plot `{title}`"), msg);
    let img = line_plot_image(title, x_label, y_label, series)
        .map_err(err)?
        .ok_or_else(|| err("no finite point to draw".into()))?;
    Png::from_rgb(&img).map_err(|e| err(e.to_string()))
}

/// The y range to draw, within [`lo`, `hi`] (the data's extremes): a loss spike of 10⁷ would
/// flatten the rest of the curve, so the range stops four inter-decile ranges beyond the
/// deciles (what falls outside is drawn at the edge and counted by [`titled`]).
fn y_range(series: &[Series], lo: f64, hi: f64) -> (f64, f64) {
    let mut ys: Vec<f64> = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|&(_, y)| y))
        .filter(|y| y.is_finite())
        .collect();
    if ys.is_empty() {
        return (lo, hi);
    }
    ys.sort_by(f64::total_cmp);
    let q = |f: f64| ys[((ys.len() - 1) as f64 * f).round() as usize];
    let spread = (q(0.9) - q(0.1)).max(1e-9);
    let (a, b) = (lo.max(q(0.1) - 4.0 * spread), hi.min(q(0.9) + 4.0 * spread));
    (a, b)
}

/// A tick's text on an axis spanning `span`: as many decimals as ten ticks over that span
/// need (none for steps: "200", not "200.0"), and never "-0".
fn tick_label(v: f64, span: f64) -> String {
    let decimals = (-(span.abs().max(1e-12) / 10.0).log10())
        .ceil()
        .clamp(0.0, 6.0) as usize;
    let s = format!("{v:.decimals$}");
    match s.strip_prefix('-') {
        Some(rest) if rest.chars().all(|c| c == '0' || c == '.') => rest.to_string(),
        _ => s,
    }
}

/// The plot's title, saying how many points lie beyond the drawn y range [`y0`, `y1`] and so
/// are drawn at its edge (nothing when none do).
fn titled(title: &str, series: &[Series], y0: f64, y1: f64) -> String {
    let beyond = |f: fn(f64, f64, f64) -> bool| {
        series
            .iter()
            .flat_map(|(_, p)| p.iter())
            .filter(|(x, y)| x.is_finite() && y.is_finite() && f(*y, y0, y1))
            .count()
    };
    let (above, below) = (beyond(|y, _, hi| y > hi), beyond(|y, lo, _| y < lo));
    let mut parts = Vec::new();
    if above > 0 {
        parts.push(format!(
            "{above} point(s) above {} drawn at the top",
            tick_label(y1, y1 - y0)
        ));
    }
    if below > 0 {
        parts.push(format!(
            "{below} below {} at the bottom",
            tick_label(y0, y1 - y0)
        ));
    }
    match parts.is_empty() {
        true => title.to_string(),
        false => format!("{title} ({})", parts.join(", ")),
    }
}

/// Draws the plot into an 800×500 RGB image; `None` when no series has a finite point.
fn line_plot_image(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> std::result::Result<Option<image::RgbImage>, String> {
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
        return Ok(None);
    }
    if x1 - x0 < 1e-9 {
        x1 = x0 + 1.0;
    }
    let (y0, y1) = y_range(series, y0, y1);
    let pad = ((y1 - y0) * 0.05).max(1e-6);
    let (y0, y1) = (y0 - pad, y1 + pad);
    let title = titled(title, series, y0, y1);
    let clamp = move |(x, y): (f64, f64)| (x, y.clamp(y0, y1));
    let err = |e: String| format!("cannot draw the plot: {e}");
    let (w, h) = (800u32, 500u32);
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(&title, ("sans-serif", 24))
            .margin(12)
            .margin_right(36)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|e| err(e.to_string()))?;
        let (xs, ys) = (x1 - x0, y1 - y0);
        let x_tick = move |v: &f64| tick_label(*v, xs);
        let y_tick = move |v: &f64| tick_label(*v, ys);
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .x_label_formatter(&x_tick)
            .y_label_formatter(&y_tick)
            .draw()
            .map_err(|e| err(e.to_string()))?;
        for (i, (label, p)) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            // A NaN point would break the line's path; leave it out.
            let finite = p
                .iter()
                .copied()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .map(clamp);
            chart
                .draw_series(LineSeries::new(finite, color.stroke_width(2)))
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
    Ok(image::RgbImage::from_raw(w, h, buf))
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
    fn a_spike_is_clipped_but_the_start_of_a_curve_is_kept() {
        // bits/dim falling from 8.6 to 1.7 with one spike of 1.2e7 at a tenth of the run.
        let mut p: Vec<(f64, f64)> = (0..200)
            .map(|i| (i as f64, 1.7 + 6.9 * (-(i as f64) / 20.0).exp()))
            .collect();
        p[33].1 = 1.2e7;
        let s: Vec<super::Series> = vec![("bpd", &p)];
        let (lo, hi) = super::y_range(&s, 1.7, 1.2e7);
        assert!(lo == 1.7 && (8.6..20.0).contains(&hi), "{lo} {hi}");
        let line: Vec<(f64, f64)> = (0..50).map(|i| (i as f64, i as f64)).collect();
        let smooth: Vec<super::Series> = vec![("bpd", &line)];
        assert_eq!(super::y_range(&smooth, 0.0, 49.0), (0.0, 49.0));
    }

    #[test]
    fn ticks_read_as_numbers_and_the_title_says_what_was_clipped() {
        use super::tick_label;
        assert_eq!(tick_label(200.0, 2000.0), "200");
        assert_eq!(tick_label(12.0, 24.0), "12");
        assert_eq!(tick_label(-0.00001, 0.5), "0.00");
        assert_eq!(tick_label(-0.25, 0.5), "-0.25");
        assert_eq!(tick_label(-1e-9, 3.0), "0.0");
        let mut p: Vec<(f64, f64)> = (0..100).map(|i| (i as f64, 1.0)).collect();
        let s: Vec<super::Series> = vec![("bpd", &p)];
        assert_eq!(super::titled("bpd", &s, 0.0, 2.0), "bpd");
        p[3].1 = 1e7;
        let s: Vec<super::Series> = vec![("bpd", &p)];
        assert_eq!(
            super::titled("bpd", &s, 0.0, 2.0),
            "bpd (1 point(s) above 2.0 drawn at the top)"
        );
    }

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
