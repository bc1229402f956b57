//! What reduced precision costs a flow, in exact numbers: the paired bits/dim difference
//! against the f32 model on the same images and noise, the inversion error, and the
//! sensitivity of each part, from which a mixed recipe under a ΔBPD budget is chosen.

use crate::error::Result;
use crate::score::{score_images, score_images_labelled, ImageScore, ScoreOptions};
use candle_core::DType;
use std::path::PathBuf;
use tarflow_flows::quant::{plan, QuantType, Recipe, Rule};
use tarflow_flows::{Checkpoint, Cond, ReverseOptions, TarFlow};

/// Images to measure on: names, planar 8-bit pixels and (optionally) their labels.
pub struct EvalSet {
    /// `SOURCE#i` names.
    pub names: Vec<PathBuf>,
    /// One planar image per entry.
    pub pixels: Vec<Vec<u8>>,
    /// Each image's class, for the conditional likelihood.
    pub labels: Option<Vec<i64>>,
}

impl EvalSet {
    /// Bits/dim of every image under `model` (+∞ where even f64 overflows).
    pub fn bits_per_dim(&self, model: &TarFlow, opts: &ScoreOptions) -> Result<Vec<f64>> {
        let s: Vec<ImageScore> = match &self.labels {
            Some(l) => score_images_labelled(model, &self.names, &self.pixels, l, opts)?,
            None => score_images(model, &self.names, &self.pixels, opts)?,
        };
        Ok(s.iter()
            .map(|s| {
                if s.is_finite() {
                    s.bits_per_dim
                } else {
                    f64::INFINITY
                }
            })
            .collect())
    }
}

/// A paired comparison of two models' bits/dim on the same images and noise.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Paired {
    /// Images where both are finite.
    pub count: usize,
    /// Images left out (not finite under either model).
    pub excluded: usize,
    /// Mean bits/dim of the reference.
    pub reference: f64,
    /// Mean bits/dim of the other model.
    pub other: f64,
    /// Mean of the per-image differences (other − reference).
    pub delta: f64,
    /// Standard error of that mean: std of the differences / √count.
    pub delta_se: f64,
}

/// Compares `other` with `reference` image by image.
pub fn paired(reference: &[f64], other: &[f64]) -> Paired {
    let pairs: Vec<(f64, f64)> = reference
        .iter()
        .zip(other)
        .filter(|(a, b)| a.is_finite() && b.is_finite())
        .map(|(a, b)| (*a, *b))
        .collect();
    let n = pairs.len();
    let mean = |v: &mut dyn Iterator<Item = f64>| v.sum::<f64>() / n.max(1) as f64;
    let d: Vec<f64> = pairs.iter().map(|(a, b)| b - a).collect();
    let delta = mean(&mut d.iter().copied());
    let var = d.iter().map(|x| (x - delta).powi(2)).sum::<f64>() / (n.max(2) - 1) as f64;
    Paired {
        count: n,
        excluded: reference.len().max(other.len()) - n,
        reference: mean(&mut pairs.iter().map(|p| p.0)),
        other: mean(&mut pairs.iter().map(|p| p.1)),
        delta,
        delta_se: (var / n.max(1) as f64).sqrt(),
    }
}

/// max |f⁻¹(f(x)) − x| over `pixels` (at the pixel values, no noise), with the KV-cached
/// sequential inverse.
pub fn inversion_error(model: &TarFlow, pixels: &[Vec<u8>], labels: Option<&[i64]>) -> Result<f64> {
    let cfg = model.config();
    let (c, s) = (cfg.in_channels, cfg.img_size);
    let flat: Vec<f32> = pixels
        .iter()
        .flat_map(|p| p.iter().map(|&k| tarflow_datasets::transform::to_unit(k)))
        .collect();
    let x = tarflow_flows::device::upload_vec(
        flat,
        (pixels.len(), c, s, s),
        model.device(),
        model.dtype(),
    )?;
    let cond = Cond::of(cfg.num_classes, labels);
    let z = model.forward(&x, cond)?.z;
    let back = model.reverse(&z, cond, &ReverseOptions::default())?;
    let err = (back.to_dtype(DType::F32)? - x.to_dtype(DType::F32)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    Ok(err as f64)
}

/// A part of the model quantised on its own in the sensitivity study.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Part {
    /// `blocks.0 attention`, `blocks.2 mlp`, `blocks.1 proj_in/out`.
    pub name: String,
    /// Layer-name globs that select it.
    pub patterns: Vec<String>,
}

/// Each block's attention, MLP and in/out projections: the parts that are measured.
pub fn parts(ck: &Checkpoint) -> Vec<Part> {
    (0..ck.config.num_blocks)
        .flat_map(|k| {
            let b = format!("blocks.{k}");
            [
                Part {
                    name: format!("{b} attention"),
                    patterns: vec![format!("{b}.attn_blocks.*.attention.*")],
                },
                Part {
                    name: format!("{b} mlp"),
                    patterns: vec![format!("{b}.attn_blocks.*.mlp.*")],
                },
                Part {
                    name: format!("{b} proj_in/out"),
                    patterns: vec![format!("{b}.proj_in"), format!("{b}.proj_out")],
                },
            ]
        })
        .collect()
}

/// One line of the sensitivity table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PartCost {
    /// The part.
    pub part: Part,
    /// ΔBPD when only this part is in the low type (everything else f32).
    pub delta: Paired,
    /// Bytes saved against keeping the part in the high type.
    pub bytes_saved: i64,
}

/// The outcome of [`sensitivity`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct Sensitivity {
    /// Each part on its own.
    pub parts: Vec<PartCost>,
    /// The chosen mixed recipe.
    pub recipe: Recipe,
    /// Its measured ΔBPD.
    pub delta: Paired,
    /// Its Linear-weight bytes.
    pub bytes: usize,
    /// Recipes tried on the way, with their measured ΔBPD (the first is `high` with every
    /// part in `low`).
    pub tried: Vec<(String, f64)>,
    /// Whether the chosen recipe is within the budget (false: not even every part in `high`
    /// is; the recipe is then all `high`).
    pub met: bool,
}

fn weight_bytes(ck: &Checkpoint, recipe: &Recipe) -> Result<usize> {
    Ok(plan(&ck.config, recipe)?.iter().map(|p| p.bytes).sum())
}

/// `fixed` rules first, then `parts` in `low`, the rest in `base`.
fn recipe_with(fixed: &[Rule], base: QuantType, low: QuantType, parts: &[&Part]) -> Recipe {
    let mut rules = fixed.to_vec();
    rules.extend(
        parts
            .iter()
            .flat_map(|p| p.patterns.iter())
            .map(|pattern| Rule {
                pattern: pattern.clone(),
                to: low,
            }),
    );
    Recipe { base, rules }
}

/// How [`sensitivity`] searches.
#[derive(Debug, Clone)]
pub struct SearchSpace {
    /// The aggressive type parts may take.
    pub low: QuantType,
    /// The type of every other part.
    pub high: QuantType,
    /// Rules that hold in every recipe tried (the user's, e.g. the head in f16).
    pub fixed: Vec<Rule>,
    /// ΔBPD the chosen recipe may cost.
    pub budget: f64,
}

/// Measures each part in `low` alone (the rest f32), then picks the parts to put in `low` (the
/// rest in `high`) so that the measured ΔBPD stays within `budget` at the smallest size: parts
/// are taken in order of ΔBPD per byte saved while the sum of their own ΔBPDs fits, and the
/// combined recipe is measured, dropping the costliest part until it fits.
pub fn sensitivity(
    ck: &Checkpoint,
    set: &EvalSet,
    reference: &[f64],
    space: &SearchSpace,
    opts: &ScoreOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<Sensitivity> {
    let SearchSpace {
        low,
        high,
        fixed,
        budget,
    } = space.clone();
    let device = candle_core::Device::Cpu;
    let measure = |recipe: &Recipe| -> Result<Paired> {
        let q = ck.quantized(recipe)?.model(&device, DType::F32)?;
        Ok(paired(reference, &set.bits_per_dim(&q, opts)?))
    };
    let all_parts = parts(ck);
    let mut costs = Vec::new();
    let full = weight_bytes(ck, &recipe_with(&fixed, high, low, &[]))? as i64;
    for part in &all_parts {
        let alone = recipe_with(&fixed, QuantType::F32, low, &[part]);
        let delta = measure(&alone)?;
        let saved = weight_bytes(ck, &recipe_with(&fixed, high, low, &[part]))? as i64;
        progress(&format!(
            "{}: ΔBPD {:+.5} ± {:.5}",
            part.name, delta.delta, delta.delta_se
        ));
        costs.push(PartCost {
            part: part.clone(),
            delta,
            bytes_saved: full - saved,
        });
    }
    // Cheapest bits first: ΔBPD per byte saved (a part that saves nothing is never taken).
    let mut order: Vec<&PartCost> = costs.iter().filter(|c| c.bytes_saved > 0).collect();
    order.sort_by(|a, b| {
        let ka = a.delta.delta.max(0.0) / a.bytes_saved as f64;
        let kb = b.delta.delta.max(0.0) / b.bytes_saved as f64;
        ka.total_cmp(&kb)
    });
    let mut chosen: Vec<&PartCost> = Vec::new();
    let mut sum = 0.0;
    for c in order {
        if sum + c.delta.delta.max(0.0) <= budget {
            sum += c.delta.delta.max(0.0);
            chosen.push(c);
        }
    }
    let mut tried = Vec::new();
    let everything = recipe_with(&fixed, high, low, &all_parts.iter().collect::<Vec<_>>());
    let d_all = measure(&everything)?;
    tried.push((everything.describe(), d_all.delta));
    if d_all.delta <= budget {
        let bytes = weight_bytes(ck, &everything)?;
        return Ok(Sensitivity {
            parts: costs,
            recipe: everything,
            delta: d_all,
            bytes,
            tried,
            met: true,
        });
    }
    loop {
        let recipe = recipe_with(
            &fixed,
            high,
            low,
            &chosen.iter().map(|c| &c.part).collect::<Vec<_>>(),
        );
        let d = measure(&recipe)?;
        progress(&format!(
            "{} part(s) in {low}: ΔBPD {:+.5} ± {:.5}",
            chosen.len(),
            d.delta,
            d.delta_se
        ));
        tried.push((recipe.describe(), d.delta));
        if d.delta <= budget || chosen.is_empty() {
            let bytes = weight_bytes(ck, &recipe)?;
            return Ok(Sensitivity {
                parts: costs,
                recipe,
                met: d.delta <= budget,
                delta: d,
                bytes,
                tried,
            });
        }
        // Interactions made the sum optimistic: give back the costliest part.
        let worst = chosen
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.delta.delta.total_cmp(&b.1.delta.delta))
            .map(|(i, _)| i)
            .unwrap_or(0);
        chosen.remove(worst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paired_difference_and_its_standard_error() {
        let a = [1.0, 2.0, 3.0, f64::INFINITY];
        let b = [1.1, 2.3, 3.2, 5.0];
        let p = paired(&a, &b);
        assert_eq!((p.count, p.excluded), (3, 1));
        assert!((p.delta - 0.2).abs() < 1e-12);
        // differences 0.1, 0.3, 0.2: sample std 0.1, se 0.1/√3
        assert!((p.delta_se - 0.1 / 3f64.sqrt()).abs() < 1e-12);
        assert!((p.reference - 2.0).abs() < 1e-12 && (p.other - 2.2).abs() < 1e-12);
    }
}
