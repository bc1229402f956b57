//! Scores under every class of a class-conditional model: Bayes' rule (`classify`) and the
//! class mixture p(x) = (1/C) Σ_k p(x | k) (`score --marginal`).

use crate::error::{Result, SampleError};
use crate::score::{combine_draws, score_images, Bound, ImageScore, ScoreOptions};
use std::path::PathBuf;
use tarflow_flows::model::nats_to_bpd;
use tarflow_flows::TarFlow;

/// Each image's NLL under every class of a class-conditional model: Bayes' rule with a
/// uniform prior picks the class of least NLL.
#[derive(Debug, Clone, PartialEq)]
pub struct Classification {
    /// `nll[i][k]`: NLL of image i given label k, in nats.
    pub nll: Vec<Vec<f64>>,
    /// The most likely class of each image.
    pub predicted: Vec<i64>,
}

impl Classification {
    /// p(k | x_i) ∝ p(x_i | k) under a uniform prior over the classes.
    pub fn posterior(&self, i: usize) -> Vec<f64> {
        let Some(row) = self.nll.get(i) else {
            return Vec::new();
        };
        let best = row.iter().copied().fold(f64::INFINITY, f64::min);
        let w: Vec<f64> = row.iter().map(|v| (best - v).exp()).collect();
        let sum: f64 = w.iter().sum();
        w.into_iter().map(|v| v / sum).collect()
    }

    /// The fraction of images whose predicted class is `labels[i]`, over the images with a
    /// prediction (see [`Self::excluded`]).
    pub fn accuracy(&self, labels: &[i64]) -> f64 {
        let n = self.predicted.len().min(labels.len());
        let scored = (0..n).filter(|&i| self.predicted[i] >= 0).count();
        let hits = (0..n).filter(|&i| self.predicted[i] == labels[i]).count();
        hits as f64 / scored.max(1) as f64
    }

    /// Images without a prediction: their likelihood overflowed under every class.
    pub fn excluded(&self) -> usize {
        self.predicted.iter().filter(|&&p| p < 0).count()
    }

    /// `m[true][predicted]`: counts over the images with a prediction.
    pub fn confusion(&self, labels: &[i64]) -> Vec<Vec<usize>> {
        let k = self.nll.first().map_or(0, Vec::len);
        let mut m = vec![vec![0usize; k]; k];
        for (&p, &t) in self.predicted.iter().zip(labels) {
            if p >= 0 && (t as usize) < k && t >= 0 {
                m[t as usize][p as usize] += 1;
            }
        }
        m
    }
}

/// Every image scored under every class of a class-conditional model on the same
/// dequantisation draws: `[class][image]`. `what` names the use in the error for an
/// unconditional model.
fn per_class<P: AsRef<[u8]>>(
    model: &TarFlow,
    paths: &[PathBuf],
    pixels: &[P],
    opts: &ScoreOptions,
    what: &str,
) -> Result<Vec<Vec<ImageScore>>> {
    let k = model.config().num_classes;
    if k == 0 {
        return Err(SampleError::Option(format!(
            "{what} needs a class-conditional model; this one has num_classes = 0"
        )));
    }
    (0..k as i64)
        .map(|class| {
            let o = ScoreOptions {
                label: Some(class),
                ..*opts
            };
            score_images(model, paths, pixels, &o)
        })
        .collect()
}

/// Scores 8-bit images under the class mixture `p(x) = (1/C) Σ_k p(x | k)` of a
/// class-conditional model: the exact likelihood of the model used unconditionally, at most
/// `ln C` nats above the best class's. Every class sees the same dequantisation draws; each
/// draw's mixture NLL is combined by `opts.bound`. Per-patch bits and block log-dets are those
/// of the most likely class.
pub fn score_marginal<P: AsRef<[u8]>>(
    model: &TarFlow,
    paths: &[PathBuf],
    pixels: &[P],
    opts: &ScoreOptions,
) -> Result<Vec<ImageScore>> {
    let per_class = per_class(model, paths, pixels, opts, "the class mixture")?;
    let mut out = Vec::with_capacity(pixels.len());
    for i in 0..pixels.len() {
        let rows: Vec<&ImageScore> = per_class.iter().map(|c| &c[i]).collect();
        let best = rows
            .iter()
            .filter(|r| r.is_finite())
            .min_by(|a, b| a.nll_nats.total_cmp(&b.nll_nats))
            .copied();
        let Some(best) = best else {
            out.push(rows[0].clone()); // overflow under every class: reported as such
            continue;
        };
        // −log (1/C) Σ_k e^{−nll_k} for each draw (the IW combination over classes); a class
        // whose score overflowed contributes e^{−∞} = 0.
        let draw_nll: Vec<f64> = (0..best.draw_nll_nats.len())
            .map(|d| {
                let v: Vec<f64> = rows
                    .iter()
                    .map(|r| {
                        if r.is_finite() {
                            r.draw_nll_nats[d]
                        } else {
                            f64::INFINITY
                        }
                    })
                    .collect();
                combine_draws(&v, Bound::Iw)
            })
            .collect();
        let nll = combine_draws(&draw_nll, opts.bound);
        out.push(ImageScore {
            nll_nats: nll,
            bits_per_dim: nats_to_bpd(nll, model.config().dims_per_image()),
            draw_nll_nats: draw_nll,
            widened: rows.iter().any(|r| r.widened),
            ..best.clone()
        });
    }
    Ok(out)
}

/// Classifies 8-bit images by likelihood: each is scored under every label with the same
/// dequantisation draws (so the classes are compared on equal noise).
pub fn classify<P: AsRef<[u8]>>(
    model: &TarFlow,
    pixels: &[P],
    opts: &ScoreOptions,
) -> Result<Classification> {
    let per_class = per_class(model, &[], pixels, opts, "classification by likelihood")?;
    let nll: Vec<Vec<f64>> = (0..pixels.len())
        .map(|i| per_class.iter().map(|c| c[i].nll_nats).collect())
        .collect();
    let predicted = nll
        .iter()
        .map(|row| {
            row.iter()
                .enumerate()
                .filter(|(_, v)| v.is_finite())
                .min_by(|a, b| a.1.total_cmp(b.1))
                .map_or(-1, |(k, _)| k as i64)
        })
        .collect();
    Ok(Classification { nll, predicted })
}
