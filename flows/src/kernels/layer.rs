//! One transformer layer, `x₂ = x + Attn(LN₁(x))`, `y = x₂ + MLP(LN₂(x₂))`, as a single
//! autograd node for training on the CPU.
//!
//! Composed ops put every intermediate on candle's tape, and candle's backward gives each one a
//! zeroed gradient buffer plus an add: the training step spent more time in those, in page
//! faults on their fresh outputs and in thread barriers than in its products. Here the forward
//! keeps what the backward needs inside the op (the LayerNorm outputs, qkv, the attention
//! probabilities, the MLP's pre- and post-activation), and the backward writes every gradient
//! straight into one buffer: per layer the tape holds one node, and the work is the eight
//! weight products each way plus a few row-wise passes.
//!
//! The slice-level `Layer` (a forward that returns what it keeps, a backward that consumes it)
//! is also what the tape-free training pass ([`super::train`]) runs, with no node at all.
//!
//! The layer's twelve parameters enter as one packed (·, C) matrix: the weights as rows of C,
//! in [`PARAMS`] order. A model built for training on the CPU holds that matrix as its variable
//! (the model's packing), so candle's backward gives the layer's weights one gradient buffer; any
//! other model's weights are joined by `Tensor::cat`, which hands each its slice.

use super::attention::Attn;
use super::pool::{self, Buf};
use super::rope::Rotation;
use super::{layer_norm, linear, slice};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// One transformer layer's weights as the engine reads them: borrowed (weight, bias) pairs.
pub struct LayerParts<'a> {
    /// Attention pre-norm.
    pub ln1: (&'a Tensor, &'a Tensor),
    /// Fused q, k, v projection (3C, C).
    pub qkv: (&'a Tensor, &'a Tensor),
    /// Attention output projection.
    pub proj: (&'a Tensor, &'a Tensor),
    /// MLP pre-norm.
    pub ln2: (&'a Tensor, &'a Tensor),
    /// MLP first linear.
    pub fc1: (&'a Tensor, &'a Tensor),
    /// MLP second linear.
    pub fc2: (&'a Tensor, &'a Tensor),
    /// Attention head width.
    pub head_dim: usize,
    /// All twelve as one packed training variable, in [`PARAMS`] order, when the model was built
    /// that way: the parts above are views of it.
    pub packed: Option<&'a Tensor>,
}

/// The layer's parameters (under `blocks.{k}.attn_blocks.{l}`) in packing order.
pub const PARAMS: [&str; 12] = [
    "attention.norm.weight",
    "attention.norm.bias",
    "attention.qkv.weight",
    "attention.qkv.bias",
    "attention.proj.weight",
    "attention.proj.bias",
    "mlp.norm.weight",
    "mlp.norm.bias",
    "mlp.main.0.weight",
    "mlp.main.0.bias",
    "mlp.main.2.weight",
    "mlp.main.2.bias",
];

/// The layer's widths.
#[derive(Debug, Clone, Copy)]
struct Dims {
    c: usize,
    hidden: usize,
}

impl Dims {
    /// Lengths of ln1.{w,b}, qkv.{w,b}, proj.{w,b}, ln2.{w,b}, fc1.{w,b}, fc2.{w,b}.
    fn sizes(&self) -> [usize; 12] {
        let (c, h) = (self.c, self.hidden);
        [c, c, 3 * c * c, 3 * c, c * c, c, c, c, h * c, h, c * h, c]
    }

    fn len(&self) -> usize {
        self.sizes().iter().sum()
    }

    /// The packed vector cut into its twelve parts.
    fn split<'a>(&self, mut p: &'a [f32]) -> [&'a [f32]; 12] {
        self.sizes().map(|n| {
            let (a, b) = p.split_at(n);
            p = b;
            a
        })
    }

    /// [`Self::split`] of a mutable vector (the parameter gradients).
    fn split_mut<'a>(&self, mut p: &'a mut [f32]) -> [&'a mut [f32]; 12] {
        self.sizes().map(|n| {
            let (a, b) = std::mem::take(&mut p).split_at_mut(n);
            p = b;
            a
        })
    }
}

/// What the forward keeps for the backward (rows = N·T).
pub(crate) struct Saved {
    /// LN₁(x), rows × C.
    h1: Buf,
    /// LN₁'s (mean, 1/σ) per row, and LN₂'s.
    st1: Buf,
    st2: Buf,
    /// rows × 3C.
    qkv: Buf,
    /// Attention probabilities, N·heads·T·T (empty for long sequences: recomputed).
    probs: Buf,
    /// Attention output before its projection, rows × C.
    att: Buf,
    /// x₂, rows × C.
    x2: Buf,
    /// LN₂(x₂), rows × C.
    h2: Buf,
    /// GELU' of the MLP pre-activation (bias included), rows × hidden.
    u: Buf,
    /// GELU(u), rows × hidden.
    g: Buf,
}

/// One layer's shape: what its forward and backward over slices need.
#[derive(Clone)]
pub(crate) struct Layer {
    d: Dims,
    attn: Attn,
    /// Rotary positions: queries and keys of row r of a sample rotated as position r.
    rot: Option<Arc<Rotation>>,
}

impl Layer {
    /// A layer of width `c`, MLP width `hidden`, heads of `head_dim` over `t` positions, scores
    /// divided by `temp`.
    pub(crate) fn new(c: usize, hidden: usize, head_dim: usize, t: usize, temp: f64) -> Self {
        Layer {
            d: Dims { c, hidden },
            attn: Attn {
                heads: c / head_dim.max(1),
                hd: head_dim,
                scale: (1.0 / ((head_dim as f64).sqrt() * temp)) as f32,
                t,
            },
            rot: None,
        }
    }

    /// The layer with rotary positions on its queries and keys.
    pub(crate) fn rotated(self, rot: Option<Arc<Rotation>>) -> Self {
        Layer { rot, ..self }
    }

    /// Adds the qkv bias and rotates each sample's queries and keys; the attention then takes
    /// no bias (the rotation applies to the biased values).
    fn bias_and_rotate(&self, qkv: &mut [f32], bias: &[f32], rot: &Rotation) {
        let (t, c) = (self.attn.t, self.d.c);
        let heads = self.attn.heads;
        qkv.par_chunks_mut(t * 3 * c).for_each(|s| {
            super::add_to_rows(s, bias);
            rot.rotate_qk(s, 3 * c, (heads, c), |r| r);
        });
    }

    /// Values in the packed weights.
    pub(crate) fn packed_len(&self) -> usize {
        self.d.len()
    }

    /// `y` = the layer over `x` (rows × C) with packed weights `p`; returns what the backward
    /// needs besides `x`.
    pub(crate) fn forward(&self, x: &[f32], p: &[f32], y: &mut [f32]) -> Saved {
        let (d, a) = (self.d, self.attn);
        let (c, rows) = (d.c, x.len() / d.c);
        let n = rows / a.t.max(1);
        let [ln1w, ln1b, qkvw, qkvb, projw, projb, ln2w, ln2b, fc1w, fc1b, fc2w, fc2b] = d.split(p);
        let mut h1 = pool::take(rows * c);
        let mut st1 = pool::take(rows * 2);
        layer_norm::forward_keeping_stats(x, ln1w, ln1b, &mut h1, &mut st1);
        // qkv = h₁·W_qkvᵀ; the attention adds the bias sample by sample.
        let mut qkv = pool::take(rows * 3 * c);
        linear::product(&h1, qkvw, &mut qkv, 3 * c, false);
        let mut att = pool::take(rows * c);
        let mut probs = pool::take(if a.keeps_probs() {
            n * a.heads * a.t * a.t
        } else {
            0
        });
        let keep = a.keeps_probs().then_some(&mut probs[..]);
        match &self.rot {
            Some(rot) => {
                self.bias_and_rotate(&mut qkv, qkvb, rot);
                a.forward(&mut qkv, None, &mut att, keep);
            }
            None => a.forward(&mut qkv, Some(qkvb), &mut att, keep),
        }
        let mut x2 = pool::take(x.len());
        linear::forward(&att, projw, projb, &mut x2, Some(x));
        let mut h2 = pool::take(rows * c);
        let mut st2 = pool::take(rows * 2);
        layer_norm::forward_keeping_stats(&x2, ln2w, ln2b, &mut h2, &mut st2);
        // u = h₂·W₁ᵀ, its bias added by the activation's pass, which leaves GELU'(u + b) in u.
        let mut u = pool::take(rows * d.hidden);
        linear::product(&h2, fc1w, &mut u, d.hidden, false);
        let mut g = pool::take(rows * d.hidden);
        super::gelu::forward_keeping_slope(&mut u, fc1b, &mut g);
        linear::forward(&g, fc2w, fc2b, y, Some(&x2));
        Saved {
            h1,
            st1,
            st2,
            qkv,
            probs,
            att,
            x2,
            h2,
            u,
            g,
        }
    }

    /// The backward of [`Self::forward`] for the output gradient `dy`, which it consumes:
    /// `dy` becomes `dx`, and `dp` receives the packed weights' gradient (overwritten).
    pub(crate) fn backward(&self, s: Saved, x: &[f32], p: &[f32], dy: &mut [f32], dp: &mut [f32]) {
        let d = self.d;
        let (c, rows) = (d.c, x.len() / d.c);
        let [ln1w, _, qkvw, _, projw, _, ln2w, _, fc1w, _, fc2w, _] = d.split(p);
        let [dln1w, dln1b, dqkvw, dqkvb, dprojw, dprojb, dln2w, dln2b, dfc1w, dfc1b, dfc2w, dfc2b] =
            d.split_mut(dp);
        // MLP: dg = dy·W₂, du = dg ⊙ GELU'(u), dh₂ = du·W₁.
        let mut du = pool::take(rows * d.hidden);
        linear::backward(&s.g, fc2w, dy, Some(&mut du), dfc2w, dfc2b);
        super::gelu::backward_in_place(&s.u, &mut du, dfc1b);
        let mut dh = pool::take(rows * c);
        linear::backward_products(&s.h2, fc1w, &du, Some(&mut dh), dfc1w, d.hidden);
        drop(du);
        // dx₂ = dy + LN₂'(dh₂), in dy's buffer (the residual passes it on to x).
        layer_norm::backward(&s.x2, &s.st2, ln2w, &dh, dy, dln2w, dln2b);
        // Attention: datt = dx₂·W_proj, dqkv from the kept probabilities, dh₁ = dqkv·W_qkv.
        linear::backward(&s.att, projw, dy, Some(&mut dh), dprojw, dprojb);
        let mut dqkv = pool::take(rows * 3 * c);
        let probs = self.attn.keeps_probs().then_some(&s.probs[..]);
        self.attn.backward(&s.qkv, probs, &dh, &mut dqkv, dqkvb);
        if let Some(rot) = &self.rot {
            // The bias entered before the rotation: its gradient sums the unrotated rows.
            let (t, heads) = (self.attn.t, self.attn.heads);
            dqkv.par_chunks_mut(t * 3 * c).for_each(|s| {
                rot.unrotate_qk(s, 3 * c, (heads, c), |r| r);
            });
            dqkvb.fill(0.0);
            super::sum_rows_into(&dqkv, dqkvb);
        }
        linear::backward_products(&s.h1, qkvw, &dqkv, Some(&mut dh), dqkvw, 3 * c);
        layer_norm::backward(x, &s.st1, ln1w, &dh, dy, dln1w, dln1b);
    }
}

struct LayerOp {
    layer: Layer,
    saved: Mutex<Option<Saved>>,
}

struct LayerBwd {
    layer: Layer,
    saved: Mutex<Option<Saved>>,
}

/// What a forward kept, taken once; `err` says why it is missing.
fn take_saved(slot: &Mutex<Option<Saved>>, err: &str) -> candle_core::Result<Saved> {
    slot.lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .ok_or_else(|| candle_core::Error::Msg(format!("fused transformer layer: {err}")))
}

fn sizes_error(what: &str, got: usize, want: usize) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "fused transformer layer: {what} has {got} values, expected {want}"
    ))
}

impl CustomOp2 for LayerOp {
    fn name(&self) -> &'static str {
        "tarflow-transformer-layer"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, p) = (slice(s1, l1, "layer")?, slice(s2, l2, "layer weights")?);
        let (_, _, c) = l1.shape().dims3()?;
        let d = self.layer.d;
        if c != d.c || p.len() != d.len() {
            return Err(sizes_error("the packed weights", p.len(), d.len()));
        }
        let mut y = pool::take(x.len());
        let saved = self.layer.forward(x, p, &mut y);
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved);
        Ok((CpuStorage::F32(y.into_vec()), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        p: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let saved = take_saved(&self.saved, "backward asked twice of one forward pass")?;
        let bwd = LayerBwd {
            layer: self.layer.clone(),
            saved: Mutex::new(Some(saved)),
        };
        // One buffer: [dx (rows·C) | d(packed weights)].
        let out = x.apply_op3_no_bwd(p, &g.contiguous()?, &bwd)?;
        let nx = x.elem_count();
        let dx = out.narrow(0, 0, nx)?.reshape(x.shape())?;
        let dp = out.narrow(0, nx, self.layer.d.len())?.reshape(p.shape())?;
        Ok((Some(dx), Some(dp)))
    }
}

impl CustomOp3 for LayerBwd {
    fn name(&self) -> &'static str {
        "tarflow-transformer-layer-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, p, dy) = (
            slice(s1, l1, "layer bwd")?,
            slice(s2, l2, "layer bwd weights")?,
            slice(s3, l3, "layer bwd gradient")?,
        );
        let nx = x.len();
        if dy.len() != nx {
            return Err(sizes_error("the output gradient", dy.len(), nx));
        }
        let saved = take_saved(&self.saved, "no saved pass")?;
        // Every value is written: dx from dy, each weight's gradient by its kernel.
        let mut out = pool::take(nx + self.layer.d.len());
        let (dx, dp) = out.split_at_mut(nx);
        pool::par_copy(dx, dy);
        self.layer.backward(saved, x, p, dx, dp);
        let len = out.len();
        Ok((CpuStorage::F32(out.into_vec()), Shape::from(len)))
    }
}

/// The layer over `x` (N, T, C) with `parts`' weights, attention scores divided by `temp`,
/// queries and keys rotated by `rot` (row t as position t); f32 on the CPU. Gradients reach
/// `x` and every weight.
pub fn layer(
    x: &Tensor,
    parts: &LayerParts,
    temp: f64,
    rot: Option<Arc<Rotation>>,
) -> candle_core::Result<Tensor> {
    let (_, t, c) = x.dims3()?;
    let layer = Layer::new(c, parts.fc1.1.elem_count(), parts.head_dim, t, temp).rotated(rot);
    let d = layer.d;
    let packed = match parts.packed {
        Some(p) if p.dims() == [d.len() / c, c] => p.clone(),
        Some(p) => return Err(sizes_error("the packed weights", p.elem_count(), d.len())),
        None => pack(parts, d)?,
    };
    let op = LayerOp {
        layer,
        saved: Mutex::new(None),
    };
    x.contiguous()?.apply_op2(&packed, op)
}

/// The weights joined into the packed (Σ n/C, C) matrix. Every part is a whole number of rows
/// of C: the (k, C) weights enter `cat` as they are, the rest as (n/C, C) views (each extra
/// node would cost candle's backward a zeroed buffer and an add per weight).
fn pack(parts: &LayerParts, d: Dims) -> candle_core::Result<Tensor> {
    let c = d.c;
    let weights = [
        parts.ln1.0,
        parts.ln1.1,
        parts.qkv.0,
        parts.qkv.1,
        parts.proj.0,
        parts.proj.1,
        parts.ln2.0,
        parts.ln2.1,
        parts.fc1.0,
        parts.fc1.1,
        parts.fc2.0,
        parts.fc2.1,
    ];
    let mut rows = Vec::with_capacity(12);
    for (w, n) in weights.into_iter().zip(d.sizes()) {
        if w.elem_count() != n {
            return Err(sizes_error("a weight", w.elem_count(), n));
        }
        rows.push(match w.dims() {
            [_, k] if *k == c => w.clone(),
            _ => w.reshape((n / c, c))?,
        });
    }
    Tensor::cat(&rows, 0)
}
