//! A block's transformer for the tape-free training pass: `proj_in`, the position and class
//! embeddings, the layers and `proj_out`, forward and backward over slices, each gradient
//! written once into its own buffer.
//!
//! With each transformer layer one fused node, what candle's backward still spent outside the
//! kernels was bookkeeping: every node's every input gets a zeroed gradient buffer and an add,
//! a few MiB per layer, plus the block-level ops, each a pass over memory with its own thread
//! barrier. This runs the layers' kernels (`layer::Layer`) directly, in the order the
//! tape would. What the head output means (token order, shift, affine map, log-det, loss) is
//! the caller's: this file knows rows of numbers, not the flow.

use super::layer::{Layer, Saved};
use super::linear;
use super::pool::{self, Buf};
use crate::error::{FlowError, Result};
use candle_core::{CpuStorage, Storage, Tensor};
use std::ops::Deref;

/// The weights of one block's transformer, as the caller holds them.
pub struct TrunkParts<'a> {
    /// `proj_in` (C, D) and its bias.
    pub proj_in: (&'a Tensor, &'a Tensor),
    /// (T, C), in the order of the tokens as stored (read reversed when `reversed`).
    pub pos: &'a Tensor,
    /// (classes, C).
    pub class_embed: Option<&'a Tensor>,
    /// Each layer's packed variable ([`super::layer::PARAMS`] order), head width and MLP width.
    pub layers: Vec<(&'a Tensor, usize, usize)>,
    /// `proj_out` (W, C) and its bias.
    pub proj_out: (&'a Tensor, &'a Tensor),
    /// Whether row t of a sample reads position embedding T − 1 − t.
    pub reversed: bool,
}

/// A tensor's f32 values, read in place under its storage's lock.
struct View<'a> {
    guard: Box<dyn Deref<Target = Storage> + 'a>,
    range: (usize, usize),
}

impl<'a> View<'a> {
    fn of(t: &'a Tensor, what: &str) -> Result<Self> {
        let (guard, layout) = t.storage_and_layout();
        let range = layout.contiguous_offsets().ok_or_else(|| {
            FlowError::Config(format!("training pass: `{what}` is not contiguous"))
        })?;
        if !matches!(&*guard, Storage::Cpu(CpuStorage::F32(_))) {
            return Err(FlowError::Config(format!(
                "training pass: `{what}` is not f32 on the CPU"
            )));
        }
        Ok(View {
            guard: Box::new(guard),
            range,
        })
    }

    fn get(&self) -> &[f32] {
        match &**self.guard {
            Storage::Cpu(CpuStorage::F32(v)) => &v[self.range.0..self.range.1],
            _ => &[],
        }
    }
}

/// One block's transformer, its weights read in place for one pass over samples of T tokens.
pub struct Trunk<'a> {
    w_in: View<'a>,
    b_in: View<'a>,
    pos: View<'a>,
    classes: Option<View<'a>>,
    layers: Vec<(View<'a>, Layer)>,
    w_out: View<'a>,
    b_out: View<'a>,
    reversed: bool,
    t: usize,
    c: usize,
}

/// What [`Trunk::forward`] keeps for [`Trunk::backward`].
pub struct Kept {
    /// The layers' inputs and the last layer's output, rows × C each.
    hs: Vec<Buf>,
    saved: Vec<Saved>,
}

/// The gradients of one block's transformer weights, in their parameters' layouts.
pub struct TrunkGrads {
    /// `proj_in`'s weight and bias.
    pub proj_in: (Vec<f32>, Vec<f32>),
    /// The position embeddings.
    pub pos: Vec<f32>,
    /// The class embedding table.
    pub class_embed: Option<Vec<f32>>,
    /// Each layer's packed variable.
    pub layers: Vec<Vec<f32>>,
    /// `proj_out`'s weight and bias.
    pub proj_out: (Vec<f32>, Vec<f32>),
}

impl<'a> Trunk<'a> {
    /// Reads `p` for samples of `t` tokens.
    pub fn of(p: &TrunkParts<'a>, t: usize) -> Result<Self> {
        let c = p.pos.dim(1)?;
        let layers = p
            .layers
            .iter()
            .map(|&(packed, hd, hidden)| {
                Ok((
                    View::of(packed, "packed layer")?,
                    Layer::new(c, hidden, hd, t, 1.0),
                ))
            })
            .collect::<Result<_>>()?;
        Ok(Trunk {
            w_in: View::of(p.proj_in.0, "proj_in.weight")?,
            b_in: View::of(p.proj_in.1, "proj_in.bias")?,
            pos: View::of(p.pos, "pos_embed")?,
            classes: p
                .class_embed
                .map(|c| View::of(c, "class_embed"))
                .transpose()?,
            layers,
            w_out: View::of(p.proj_out.0, "proj_out.weight")?,
            b_out: View::of(p.proj_out.1, "proj_out.bias")?,
            reversed: p.reversed,
            t,
            c,
        })
    }

    /// The head's width W.
    pub fn out_width(&self) -> usize {
        self.b_out.get().len()
    }

    /// The head output `po` (rows × W) of the tokens `x` (samples of T rows of D); `cls` holds
    /// the class embedding of each sample (or one for all).
    pub fn forward(&self, x: &[f32], cls: Option<&[f32]>, po: &mut [f32]) -> Kept {
        let (t, c) = (self.t, self.c);
        let rows = po.len() / self.out_width().max(1);
        // h₀ = x·W_inᵀ + b_in + pos + class embedding.
        let mut h = pool::take(rows * c);
        let (pos, b_in) = (self.pos.get(), self.b_in.get());
        for (r, row) in h.chunks_exact_mut(c).enumerate() {
            let (i, tt) = (r / t, r % t);
            let p = if self.reversed { t - 1 - tt } else { tt };
            let pe = &pos[p * c..][..c];
            match cls {
                Some(e) => {
                    let e = if e.len() == c { e } else { &e[i * c..][..c] };
                    for (((y, a), p), e) in row.iter_mut().zip(b_in).zip(pe).zip(e) {
                        *y = a + p + e;
                    }
                }
                None => {
                    for ((y, a), p) in row.iter_mut().zip(b_in).zip(pe) {
                        *y = a + p;
                    }
                }
            }
        }
        linear::product(x, self.w_in.get(), &mut h, c, true);
        let mut hs = vec![h];
        let mut saved = Vec::with_capacity(self.layers.len());
        for (p, layer) in &self.layers {
            let mut y = pool::take(rows * c);
            let x = hs.last().map(|h| &h[..]).unwrap_or(&[]);
            saved.push(layer.forward(x, p.get(), &mut y));
            hs.push(y);
        }
        let last = hs.last().map(|h| &h[..]).unwrap_or(&[]);
        linear::forward(last, self.w_out.get(), self.b_out.get(), po, None);
        Kept { hs, saved }
    }

    /// The weights' gradients from `dpo` (the loss gradient at the head output) and, when `dx`
    /// is given, the gradient at the input `x` added into it. `classes` names each sample's
    /// embedding row (`None`: the table's mean, which passes its gradient to every row).
    pub fn backward(
        &self,
        k: Kept,
        x: &[f32],
        dpo: &[f32],
        classes: &[Option<usize>],
        dx: Option<&mut [f32]>,
    ) -> TrunkGrads {
        let (t, c) = (self.t, self.c);
        let w = self.out_width();
        let rows = dpo.len() / w.max(1);
        let d = x.len() / rows.max(1);
        let n = rows / t.max(1);
        // The head, then the layers in reverse; dh ends as the gradient of h₀.
        let mut dh = pool::take(rows * c);
        let mut dw_out = vec![0f32; w * c];
        let mut db_out = vec![0f32; w];
        let last = k.hs.last().map(|h| &h[..]).unwrap_or(&[]);
        linear::backward(
            last,
            self.w_out.get(),
            dpo,
            Some(&mut dh),
            &mut dw_out,
            &mut db_out,
        );
        let mut layer_grads = Vec::with_capacity(self.layers.len());
        for (((p, layer), saved), x) in self
            .layers
            .iter()
            .zip(k.saved)
            .zip(&k.hs[..self.layers.len()])
            .rev()
        {
            let mut dp = vec![0f32; layer.packed_len()];
            layer.backward(saved, x, p.get(), &mut dh, &mut dp);
            layer_grads.push(dp);
        }
        layer_grads.reverse();
        let mut dpos = vec![0f32; t * c];
        for (r, row) in dh.chunks_exact(c).enumerate() {
            let tt = r % t;
            let p = if self.reversed { t - 1 - tt } else { tt };
            dpos[p * c..][..c]
                .iter_mut()
                .zip(row)
                .for_each(|(a, v)| *a += v);
        }
        let dclasses = self
            .classes
            .as_ref()
            .map(|table| class_grads(table.get(), &dh, classes, (n, t, c)));
        let mut dw_in = vec![0f32; c * d];
        let mut db_in = vec![0f32; c];
        let mut dx_in = dx.is_some().then(|| pool::take(rows * d));
        linear::backward(
            x,
            self.w_in.get(),
            &dh,
            dx_in.as_deref_mut(),
            &mut dw_in,
            &mut db_in,
        );
        if let (Some(dx), Some(dx_in)) = (dx, dx_in) {
            dx.iter_mut().zip(dx_in.iter()).for_each(|(a, v)| *a += v);
        }
        TrunkGrads {
            proj_in: (dw_in, db_in),
            pos: dpos,
            class_embed: dclasses,
            layers: layer_grads,
            proj_out: (dw_out, db_out),
        }
    }
}

/// The embedding table's gradient from `dh` (the gradient of h₀): each sample's rows summed
/// into its class's row, or spread over every row by 1/classes where it read the mean.
fn class_grads(
    table: &[f32],
    dh: &[f32],
    classes: &[Option<usize>],
    (n, t, c): (usize, usize, usize),
) -> Vec<f32> {
    let mut row_sums = vec![0f32; n * c];
    for (s, rows) in row_sums.chunks_exact_mut(c).zip(dh.chunks_exact(t * c)) {
        super::sum_rows_into(rows, s);
    }
    let k = table.len() / c;
    let mut dt = vec![0f32; k * c];
    let mut mean = vec![0f32; c];
    for (i, s) in row_sums.chunks_exact(c).enumerate() {
        match classes.get(i).copied().flatten() {
            Some(l) => dt[l * c..][..c]
                .iter_mut()
                .zip(s)
                .for_each(|(a, v)| *a += v),
            None => mean.iter_mut().zip(s).for_each(|(a, v)| *a += v),
        }
    }
    for row in dt.chunks_exact_mut(c) {
        row.iter_mut()
            .zip(&mean)
            .for_each(|(a, v)| *a += v / k as f32);
    }
    dt
}
