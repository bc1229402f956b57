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
use candle_core::{DType, Tensor, Var};
use rayon::prelude::*;
use std::collections::HashMap;
use tarflow_flows::kernels;
use tarflow_flows::{Cond, TarFlow};

/// Where an optimizer step reads each variable's gradient: candle's [`GradStore`] (keyed by
/// the variable) or [`Grads`] (by name).
pub trait GradSource {
    /// The gradient of `var`, named `name`, where one reached it.
    fn grad(&self, name: &str, var: &Var) -> Option<&Tensor>;
}

impl GradSource for GradStore {
    fn grad(&self, _: &str, var: &Var) -> Option<&Tensor> {
        self.get(var.as_tensor())
    }
}

/// The gradients of a step by parameter name, from candle's backward or the CPU engine's
/// tape-free pass alike (whose named values become tensors without a copy).
#[derive(Debug, Default)]
pub struct Grads(HashMap<String, Tensor>);

impl GradSource for Grads {
    fn grad(&self, name: &str, _: &Var) -> Option<&Tensor> {
        self.0.get(name)
    }
}

impl Grads {
    /// The gradient named `name`.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.0.get(name)
    }

    /// Sets the gradient named `name`.
    pub fn insert(&mut self, name: &str, g: Tensor) {
        self.0.insert(name.to_string(), g);
    }

    /// `vars`' gradients out of a candle backward pass.
    fn from_store(vars: &[(String, Var)], mut store: GradStore) -> Self {
        Grads(
            vars.iter()
                .filter_map(|(n, v)| Some((n.clone(), store.remove(v.as_tensor())?)))
                .collect(),
        )
    }

    /// The tape-free pass's named values as tensors shaped like `vars`.
    fn from_named(vars: &[(String, Var)], grads: Vec<(String, Vec<f32>)>) -> Result<Self> {
        let by_name: HashMap<&str, &Var> = vars.iter().map(|(n, v)| (n.as_str(), v)).collect();
        let mut out = HashMap::with_capacity(grads.len());
        for (name, g) in grads {
            let var = by_name.get(name.as_str()).ok_or_else(|| {
                crate::error::TrainError::config("model", format!("no trainable variable `{name}`"))
            })?;
            let t = Tensor::from_vec(g, var.shape(), var.device())?;
            out.insert(name, t);
        }
        Ok(Grads(out))
    }
}

/// What one micro-batch gave.
pub enum Pass {
    /// The mean loss over the batch, and the gradients of that loss divided by `divisor`.
    Grads(f64, Grads),
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
        let store = (loss / (divisor * parts) as f64)?.backward()?;
        Ok(Done::Store(v, Grads::from_store(vars, store)))
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
        acc = Some(add_into(vars, acc, Grads::from_named(vars, g)?)?);
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
    Store(f64, Grads),
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

/// `acc + g` for each variable (`g` alone when `acc` is empty): the one place gradients of
/// several passes are summed, in the order given.
pub fn add_into(vars: &[(String, Var)], acc: Option<Grads>, g: Grads) -> Result<Grads> {
    let Some(mut a) = acc else {
        return Ok(g);
    };
    for (name, _) in vars {
        if let Some(gv) = g.get(name) {
            let s = match a.get(name) {
                Some(av) => (av + gv)?,
                None => gv.clone(),
            };
            a.insert(name, s);
        }
    }
    Ok(a)
}

/// The prefix of the learnable self-denoiser's parameters.
pub const DENOISER: &str = "learnable_self_denoiser.";

/// The self-denoiser's objective on a micro-batch, as ml-starflow's train.py: the target is the
/// flow's score scaled by the training noise, `σ·numel·∂loss/∂x` (the loss being the batch's
/// mean, with its latent-norm term), and the denoiser's prediction is fitted to it by mean
/// squared error. Returns that error and its gradients (divided by `divisor`) for the
/// denoiser's parameters only: the flow's own come from [`loss_and_grads`].
pub fn denoiser_grads(
    model: &TarFlow,
    vars: &[(String, Var)],
    (x, labels): (&Tensor, &[i64]),
    divisor: usize,
    sigma: f64,
    latent_norm: f64,
) -> Result<(f64, Grads)> {
    let cond = Cond::of(model.config().num_classes, Some(labels));
    let xv = Var::from_tensor(&x.detach())?;
    let out = model.forward(xv.as_tensor(), cond)?;
    let mut loss = TarFlow::loss(&out)?;
    if latent_norm > 0.0 {
        loss = (loss + (TarFlow::latent_norm(&out)? * latent_norm)?)?;
    }
    let store = loss.backward()?;
    let gx = store.get(xv.as_tensor()).ok_or_else(|| {
        crate::error::TrainError::config("model.denoiser_layers", "no gradient reached the images")
    })?;
    let score = (gx.detach() * (sigma * x.elem_count() as f64))?;
    let pred = model.denoiser_output(&x.detach())?;
    let mse = (pred - score)?.sqr()?.mean_all()?.to_dtype(DType::F32)?;
    let v = mse.to_scalar::<f32>()? as f64;
    let store = (mse / divisor as f64)?.backward()?;
    let mine: Vec<(String, Var)> = vars
        .iter()
        .filter(|(n, _)| n.starts_with(DENOISER))
        .cloned()
        .collect();
    Ok((v, Grads::from_store(&mine, store)))
}
