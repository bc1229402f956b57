//! The loss and gradients of one micro-batch. On the CPU the batch is cut into
//! `train.cpu_streams` equal parts whose forward and backward passes run at the same time.
//!
//! Where the CPU kernels cover the model, each part is one tape-free pass
//! ([`TarFlow::train_pass`]); elsewhere candle's forward and backward.
//!
//! One pass over a whole batch keeps every core busy only inside its products; its row-wise
//! kernels, small products and block-level loops leave cores waiting. Passes over parts of the
//! batch fill those gaps, for a little more peak memory (the README's "Performance" has the
//! figures). The parts' gradients are added in a fixed order, so a run gives the same numbers
//! on any machine for the same `cpu_streams`, whatever its core count. GPUs run the batch whole.

use crate::error::Result;
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use rayon::prelude::*;
use std::collections::HashMap;
use tarflow_flows::kernels;
use tarflow_flows::{Cond, TarFlow};

/// What one micro-batch gave.
pub enum Pass {
    /// The mean loss over the batch, and the gradients of that loss divided by `divisor`.
    Grads(f64, GradStore),
    /// A part's loss was not finite (its value); no gradient was taken.
    NonFinite(f64),
}

/// The loss of `x` (N, C, H, W) with `labels` (one per image, or none for an unconditional
/// model), plus `latent_norm ×` the latent-norm penalty, and the gradients of that loss divided
/// by `divisor` (the micro-batches of the whole step); on the CPU, `streams` parts at once when
/// N divides evenly.
pub fn loss_and_grads(
    model: &TarFlow,
    vars: &[(String, Var)],
    (x, labels): (&Tensor, &[i64]),
    divisor: usize,
    streams: usize,
    latent_norm: f64,
) -> Result<Pass> {
    let n = x.dim(0)?;
    let cond = Cond::of(model.config().num_classes, Some(labels));
    // A label count that does not match the batch is left to the forward pass to report.
    let whole = matches!(cond, Cond::Labels(l) if l.len() != n);
    let parts = match streams {
        s if s > 1 && !whole && x.device().is_cpu() && n.is_multiple_of(s) => s,
        _ => 1,
    };
    let h = n / parts;
    let part = |i: usize| -> Result<Done> {
        let (xs, c) = match parts {
            1 => (x.clone(), cond),
            _ => (x.narrow(0, i * h, h)?, cond.rows(i * h, (i + 1) * h)),
        };
        let scale = 1.0 / (divisor * parts) as f64;
        if let Some(pass) = model.train_pass(&xs, c, latent_norm, scale)? {
            return Ok(match pass.grads {
                Some(g) => Done::Named(pass.loss, g),
                None => Done::NonFinite(pass.loss),
            });
        }
        let out = model.forward(&xs, c)?;
        let mut loss = TarFlow::loss(&out)?.to_dtype(DType::F32)?;
        if latent_norm > 0.0 {
            loss = (loss + (TarFlow::latent_norm(&out)? * latent_norm)?)?;
        }
        let v = loss.to_scalar::<f32>()? as f64;
        if !v.is_finite() {
            return Ok(Done::NonFinite(v));
        }
        // One division by the number of terms of the whole step (exact for powers of two).
        Ok(Done::Store(
            v,
            (loss / (divisor * parts) as f64)?.backward()?,
        ))
    };
    let done: Vec<_> = if parts == 1 {
        vec![part(0)?]
    } else {
        (0..parts)
            .into_par_iter()
            .map(|i| kernels::as_one_of(parts, || part(i)))
            .collect::<Result<Vec<_>>>()?
    };
    let mut sum = 0.0;
    let mut named: Option<Vec<(String, Vec<f32>)>> = None;
    let mut acc = None;
    for d in done {
        match d {
            Done::Named(v, g) => {
                sum += v;
                named = Some(match named {
                    Some(a) => add_named(a, g)?,
                    None => g,
                });
            }
            Done::Store(v, g) => {
                sum += v;
                acc = Some(add_into(vars, acc, g)?);
            }
            Done::NonFinite(v) => return Ok(Pass::NonFinite(v)),
        }
    }
    if let Some(g) = named {
        acc = Some(add_into(vars, acc, store(vars, g)?)?);
    }
    let grads =
        acc.ok_or_else(|| crate::error::TrainError::config("train.cpu_streams", "no pass ran"))?;
    Ok(Pass::Grads(sum / parts as f64, grads))
}

/// What one part of a micro-batch gave.
enum Done {
    /// The loss and the tape-free pass's gradients by parameter name.
    Named(f64, Vec<(String, Vec<f32>)>),
    /// The loss and candle's gradients.
    Store(f64, GradStore),
    /// A loss that was not finite.
    NonFinite(f64),
}

/// `a + g`, parameter by parameter, in place in `a`: the parts' gradients summed as
/// [`add_into`] sums them (the same order, the same rounding) without a tensor op each.
fn add_named(
    mut a: Vec<(String, Vec<f32>)>,
    g: Vec<(String, Vec<f32>)>,
) -> Result<Vec<(String, Vec<f32>)>> {
    if a.len() != g.len() || a.iter().zip(&g).any(|((x, _), (y, _))| x != y) {
        return Err(crate::error::TrainError::config(
            "train.cpu_streams",
            "the parts of a batch gave different parameters",
        ));
    }
    a.par_iter_mut().zip(g).for_each(|((_, av), (_, gv))| {
        av.iter_mut().zip(gv).for_each(|(x, y)| *x += y);
    });
    Ok(a)
}

/// The gradients of the CPU training pass, by parameter name, as a store keyed by `vars`.
fn store(vars: &[(String, Var)], grads: Vec<(String, Vec<f32>)>) -> Result<GradStore> {
    let by_name: HashMap<&str, &Var> = vars.iter().map(|(n, v)| (n.as_str(), v)).collect();
    // candle makes a store only through a backward pass: that of a constant holds just itself.
    let one = Tensor::zeros((), DType::F32, &Device::Cpu)?;
    let mut s = one.backward()?;
    s.remove(&one);
    for (name, g) in grads {
        let var = by_name.get(name.as_str()).ok_or_else(|| {
            crate::error::TrainError::config("model", format!("no trainable variable `{name}`"))
        })?;
        let t = Tensor::from_vec(g, var.shape(), var.device())?;
        s.insert(var.as_tensor(), t);
    }
    Ok(s)
}

/// `acc + g` for each variable (`g` alone when `acc` is empty): the one place gradients of
/// several passes are summed, in the order given.
pub fn add_into(vars: &[(String, Var)], acc: Option<GradStore>, g: GradStore) -> Result<GradStore> {
    let Some(mut a) = acc else {
        return Ok(g);
    };
    for (_, var) in vars {
        if let Some(gv) = g.get(var.as_tensor()) {
            let s = match a.get(var.as_tensor()) {
                Some(av) => (av + gv)?,
                None => gv.clone(),
            };
            a.insert(var.as_tensor(), s);
        }
    }
    Ok(a)
}
