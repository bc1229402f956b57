//! A whole flow's training pass on the CPU: the loss and every parameter's gradient from one
//! forward and one backward over slices, with no autograd tape.
//!
//! With each transformer layer one fused node, what candle's backward still spent outside the
//! kernels was bookkeeping: every node's every input gets a zeroed gradient buffer and an add,
//! a few MiB per layer, plus the block-level ops (embeddings, permutation, shift, affine map,
//! log-det, loss), each a pass over memory with its own thread barrier. Here the blocks run
//! their layers' kernels ([`super::layer::Layer`]) directly, in the order the tape would, and
//! each gradient is written once into its own buffer.
//!
//! It covers TarFlow's block (identity or flipped order, optional class embedding, affine or
//! volume-preserving head) with dense weights and layers trained as packed variables
//! ([`crate::packing`]); STARFlow's start token, final norm and soft-clipped head take the
//! composed path. Tests hold the two equal in loss and every gradient.

use super::layer::{Layer, Saved};
use super::linear;
use super::pool::{self, Buf};
use crate::block::{Cond, MetaBlock};
use crate::error::{FlowError, Result};
use crate::model::TarFlow;
use crate::patch::patchify;
use candle_core::{CpuStorage, Storage, Tensor};
use std::ops::Deref;

/// The weights of one block the pass reads ([`MetaBlock::train_parts`]).
pub(crate) struct TrainParts<'a> {
    /// `proj_in` (C, D) and its bias.
    pub proj_in: (&'a Tensor, &'a Tensor),
    /// (T, C), canonical token order.
    pub pos: &'a Tensor,
    /// (classes, C).
    pub class_embed: Option<&'a Tensor>,
    /// Each layer's packed variable, head width and MLP width.
    pub layers: Vec<(&'a Tensor, usize, usize)>,
    /// `proj_out` (W, C) and its bias.
    pub proj_out: (&'a Tensor, &'a Tensor),
    /// Whether the block reverses the token order.
    pub flipped: bool,
    /// Whether the head has a log-scale half (else α ≡ 0).
    pub nvp: bool,
}

/// What one training pass gave.
pub struct TrainPass {
    /// The loss `0.5·mean(z²) − mean(Σ logdets) [+ λ·latent norm]`.
    pub loss: f64,
    /// `scale ×` the gradient of the loss for every parameter, by name (its values in the
    /// parameter's own layout); `None` when the loss was not finite.
    pub grads: Option<Vec<(String, Vec<f32>)>>,
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

/// One block's weights, read in place, and its parameters' prefix (`blocks.{k}`).
struct BlockViews<'a> {
    prefix: String,
    w_in: View<'a>,
    b_in: View<'a>,
    pos: View<'a>,
    classes: Option<View<'a>>,
    layers: Vec<(View<'a>, Layer)>,
    w_out: View<'a>,
    b_out: View<'a>,
    flipped: bool,
    nvp: bool,
}

impl<'a> BlockViews<'a> {
    fn of(p: &TrainParts<'a>, index: usize, t: usize) -> Result<Self> {
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
        Ok(BlockViews {
            prefix: format!("blocks.{index}"),
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
            flipped: p.flipped,
            nvp: p.nvp,
        })
    }
}

/// The pass's shape: N samples of T tokens of D values, width C.
#[derive(Clone, Copy)]
struct Shape {
    n: usize,
    t: usize,
    d: usize,
    c: usize,
}

/// What a block's forward keeps for its backward.
struct Kept {
    /// The input in the block's own order, rows × D.
    xp: Buf,
    /// The hidden states: the layers' inputs and the last layer's output, rows × C each.
    hs: Vec<Buf>,
    saved: Vec<Saved>,
    /// z in the block's own order, rows × D.
    z: Buf,
    /// exp(−α) after the shift, rows × D.
    e: Buf,
}

/// `dst` = `src` (rows of `w` values) in the block's token order (its own inverse).
pub(crate) fn permute(src: &[f32], dst: &mut [f32], t: usize, w: usize, flipped: bool) {
    if !flipped {
        dst.copy_from_slice(src);
        return;
    }
    for (ds, ss) in dst.chunks_exact_mut(t * w).zip(src.chunks_exact(t * w)) {
        for (i, row) in ds.chunks_exact_mut(w).enumerate() {
            row.copy_from_slice(&ss[(t - 1 - i) * w..][..w]);
        }
    }
}

/// A block's affine map over its tokens `xp` (samples of T rows of D, block order): token t's
/// (α, μ) is token t − 1's head output `po` (rows of α then μ, or μ alone without `nvp`), and
/// token 0 passes through. Writes `z = (x − μ)·exp(−α)`, `e = exp(−α)` (the backward's) and the
/// shifted α, and adds each sample's Σα to `alpha_sum`.
pub(crate) fn affine_head(
    xp: &[f32],
    po: &[f32],
    (t, d): (usize, usize),
    nvp: bool,
    (z, e, alpha): (&mut [f32], &mut [f32], &mut [f32]),
    alpha_sum: &mut [f64],
) {
    use rayon::prelude::*;
    let w = if nvp { 2 * d } else { d };
    z.par_chunks_mut(t * d)
        .zip(e.par_chunks_mut(t * d))
        .zip(alpha.par_chunks_mut(t * d))
        .zip(xp.par_chunks(t * d))
        .zip(po.par_chunks(t * w))
        .zip(alpha_sum.par_iter_mut())
        .for_each(|(((((z, e), a), x), po), sum)| {
            *sum += affine_sample(x, po, d, nvp, z, e, a);
        });
}

super::simd_clones! {
/// [`affine_head`] of one sample; returns its Σα.
fn affine_sample(x: &[f32], po: &[f32], d: usize, nvp: bool, z: &mut [f32], e: &mut [f32], a: &mut [f32]) -> f64 {
    let w = if nvp { 2 * d } else { d };
    z[..d].copy_from_slice(&x[..d]);
    e[..d].fill(1.0);
    a[..d].fill(0.0);
    let mut sum = 0f64;
    let rows = z.chunks_exact_mut(d).zip(e.chunks_exact_mut(d)).zip(a.chunks_exact_mut(d)).zip(x.chunks_exact(d));
    for ((((zr, er), ar), xr), head) in rows.skip(1).zip(po.chunks_exact(w)) {
        let mu = &head[w - d..];
        if nvp {
            ar.copy_from_slice(&head[..d]);
        } else {
            ar.fill(0.0);
        }
        for j in 0..d {
            er[j] = super::exp_f32(-ar[j]);
            zr[j] = (xr[j] - mu[j]) * er[j];
        }
        // A loop of its own: the f64 sum's order is fixed, and inside the loop above it kept
        // that loop (and its exp) scalar.
        sum += ar.iter().map(|&a| a as f64).sum::<f64>();
    }
    sum
}
}

/// The class of each row whose embedding is added: `Some(label)`, or `None` for the mean.
fn row_classes(cond: Cond, n: usize) -> Vec<Option<usize>> {
    match cond {
        Cond::Labels(l) => l.iter().map(|&v| (v >= 0).then_some(v as usize)).collect(),
        Cond::Null => vec![None; n],
    }
}

/// One block forward: `s` (canonical, rows × D) → its output (canonical) and Σ_{t,d} α per
/// sample; `cls` holds the class embedding of each row (or one for all).
fn block_forward(
    b: &BlockViews,
    s: &[f32],
    cls: Option<&[f32]>,
    sh: Shape,
    out: &mut [f32],
    alpha_sum: &mut [f64],
) -> Kept {
    let Shape { n, t, d, c } = sh;
    let rows = n * t;
    let mut xp = pool::take(rows * d);
    permute(s, &mut xp, t, d, b.flipped);
    // h₀ = x·W_inᵀ + b_in + pos (in the block's order) + class embedding.
    let mut h = pool::take(rows * c);
    let (pos, b_in) = (b.pos.get(), b.b_in.get());
    for (r, row) in h.chunks_exact_mut(c).enumerate() {
        let (i, tt) = (r / t, r % t);
        let p = if b.flipped { t - 1 - tt } else { tt };
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
    linear::product(&xp, b.w_in.get(), &mut h, c, true);
    let mut hs = vec![h];
    let mut saved = Vec::with_capacity(b.layers.len());
    for (p, layer) in &b.layers {
        let mut y = pool::take(rows * c);
        let x = hs.last().map(|h| &h[..]).unwrap_or(&[]);
        saved.push(layer.forward(x, p.get(), &mut y));
        hs.push(y);
    }
    let w = b.b_out.get().len();
    let mut po = pool::take(rows * w);
    let last = hs.last().map(|h| &h[..]).unwrap_or(&[]);
    linear::forward(last, b.w_out.get(), b.b_out.get(), &mut po, None);
    let mut z = pool::take(rows * d);
    let mut e = pool::take(rows * d);
    let mut alpha = pool::take(rows * d);
    affine_head(
        &xp,
        &po,
        (t, d),
        b.nvp,
        (&mut z, &mut e, &mut alpha),
        alpha_sum,
    );
    permute(&z, out, t, d, b.flipped);
    Kept {
        xp,
        hs,
        saved,
        z,
        e,
    }
}

/// One block backward from `g` (the loss gradient at its output, canonical, rows × D): the
/// weights' gradients into `grads` under their parameter names and, when `g_in` is given, the
/// gradient at its input (canonical). `dlogdet` is the gradient of each α (the log-det term).
#[allow(clippy::too_many_arguments)]
fn block_backward(
    b: &BlockViews,
    k: Kept,
    g: &[f32],
    classes: &[Option<usize>],
    sh: Shape,
    dlogdet: f32,
    g_in: Option<&mut [f32]>,
    grads: &mut Vec<(String, Vec<f32>)>,
) {
    let Shape { n, t, d, c } = sh;
    let rows = n * t;
    let w = b.b_out.get().len();
    let mut dz = pool::take(rows * d);
    permute(g, &mut dz, t, d, b.flipped);
    // z = (x − μ)·e^{−α}: dx = dz·e^{−α}, dμ = −dz·e^{−α}, dα = −dz·z (+ the log-det term).
    let mut dpo = pool::take(rows * w);
    let mut dxp = pool::take(rows * d);
    for (r, (dpr, dxr)) in dpo
        .chunks_exact_mut(w)
        .zip(dxp.chunks_exact_mut(d))
        .enumerate()
    {
        let (dzr, er) = (&dz[r * d..][..d], &k.e[r * d..][..d]);
        for j in 0..d {
            dxr[j] = dzr[j] * er[j];
        }
        // Row r's head predicts token r + 1; the last token's head predicts nothing.
        if r % t == t - 1 {
            dpr.fill(0.0);
            continue;
        }
        let next = r + 1;
        let (dzn, en, zn) = (
            &dz[next * d..][..d],
            &k.e[next * d..][..d],
            &k.z[next * d..][..d],
        );
        let (da, dmu) = if b.nvp {
            dpr.split_at_mut(d)
        } else {
            (&mut [][..], &mut dpr[..])
        };
        for j in 0..d {
            dmu[j] = -dzn[j] * en[j];
        }
        for j in 0..da.len() {
            da[j] = -dzn[j] * zn[j] + dlogdet;
        }
    }
    drop(dz);
    // The head, then the layers in reverse; dh ends as the gradient of h₀.
    let mut dh = pool::take(rows * c);
    let mut dw_out = vec![0f32; w * c];
    let mut db_out = vec![0f32; w];
    let last = k.hs.last().map(|h| &h[..]).unwrap_or(&[]);
    linear::backward(
        last,
        b.w_out.get(),
        &dpo,
        Some(&mut dh),
        &mut dw_out,
        &mut db_out,
    );
    drop(dpo);
    let mut layer_grads = Vec::with_capacity(b.layers.len());
    for (((p, layer), saved), x) in b
        .layers
        .iter()
        .zip(k.saved)
        .zip(&k.hs[..b.layers.len()])
        .rev()
    {
        let mut dp = vec![0f32; layer.packed_len()];
        layer.backward(saved, x, p.get(), &mut dh, &mut dp);
        layer_grads.push(dp);
    }
    layer_grads.reverse();
    // h₀ = x·W_inᵀ + b_in + pos + class embedding.
    let mut dpos = vec![0f32; t * c];
    for (r, row) in dh.chunks_exact(c).enumerate() {
        let tt = r % t;
        let p = if b.flipped { t - 1 - tt } else { tt };
        dpos[p * c..][..c]
            .iter_mut()
            .zip(row)
            .for_each(|(a, v)| *a += v);
    }
    let dclasses = b.classes.as_ref().map(|table| {
        // Each sample's rows summed: the gradient of the embedding added to all of them.
        let mut row_sums = vec![0f32; n * c];
        for (s, rows) in row_sums.chunks_exact_mut(c).zip(dh.chunks_exact(t * c)) {
            super::sum_rows_into(rows, s);
        }
        let k = table.get().len() / c;
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
        // The mean embedding passes its gradient to every class by 1/classes.
        for row in dt.chunks_exact_mut(c) {
            row.iter_mut()
                .zip(&mean)
                .for_each(|(a, v)| *a += v / k as f32);
        }
        dt
    });
    let mut dw_in = vec![0f32; c * d];
    let mut db_in = vec![0f32; c];
    let mut dx_in = g_in.is_some().then(|| pool::take(rows * d));
    linear::backward(
        &k.xp,
        b.w_in.get(),
        &dh,
        dx_in.as_deref_mut(),
        &mut dw_in,
        &mut db_in,
    );
    if let (Some(g_in), Some(dx_in)) = (g_in, dx_in) {
        dxp.iter_mut().zip(dx_in.iter()).for_each(|(a, v)| *a += v);
        permute(&dxp, g_in, t, d, b.flipped);
    }
    let name = |p: &str| format!("{}.{p}", b.prefix);
    grads.push((name("proj_in.weight"), dw_in));
    grads.push((name("proj_in.bias"), db_in));
    grads.push((name("pos_embed"), dpos));
    if let Some(dt) = dclasses {
        grads.push((name("class_embed"), dt));
    }
    for (l, dp) in layer_grads.into_iter().enumerate() {
        let packed = name(&format!("attn_blocks.{l}.{}", crate::packing::PACKED));
        grads.push((packed, dp));
    }
    grads.push((name("proj_out.weight"), dw_out));
    grads.push((name("proj_out.bias"), db_out));
}

/// Whether [`train_pass`] covers `model`: the kernels apply to it, and every block is one it
/// covers.
pub fn covers(model: &TarFlow) -> bool {
    covered_parts(model).is_some()
}

/// Every block's [`TrainParts`] when [`train_pass`] covers `model`.
fn covered_parts(model: &TarFlow) -> Option<Vec<TrainParts<'_>>> {
    if !super::applies_to(model.dtype(), model.device()) || model.blocks().is_empty() {
        return None;
    }
    model.blocks().iter().map(MetaBlock::train_parts).collect()
}

/// The training loss of `x` (N, C, S, S) under `cond` plus `latent_norm ×` STARFlow's
/// latent-norm penalty, and `scale ×` its gradient for every parameter; `None` when
/// [`covers`] does not hold.
pub fn train_pass(
    model: &TarFlow,
    x: &Tensor,
    cond: Cond,
    latent_norm: f64,
    scale: f64,
) -> Result<Option<TrainPass>> {
    let Some(parts) = covered_parts(model) else {
        return Ok(None);
    };
    model.check_images(x)?;
    let n = x.dim(0)?;
    model.check_labels(cond, n)?;
    let cfg = model.config();
    let s0 = patchify(&x.to_dtype(model.dtype())?, cfg.patch_size)?; // (N, T, D)
    let (_, t, d) = s0.dims3()?;
    let sh = Shape {
        n,
        t,
        d,
        c: cfg.channels,
    };
    let views = parts
        .iter()
        .enumerate()
        .map(|(k, p)| BlockViews::of(p, k, t))
        .collect::<Result<Vec<_>>>()?;
    let classes = row_classes(cond, n);
    // Forward: each block's output is the next one's input.
    let mut outs: Vec<Vec<f32>> = vec![s0.flatten_all()?.to_vec1::<f32>()?];
    let mut kept = Vec::with_capacity(views.len());
    let mut alpha_sum = vec![0f64; n];
    for (block, v) in model.blocks().iter().zip(&views) {
        let cls = block
            .class_cond(cond, x.device())?
            .map(|c| c.flatten_all()?.to_vec1::<f32>())
            .transpose()?;
        let mut out = vec![0f32; n * t * d];
        let s = outs.last().map(|o| &o[..]).unwrap_or(&[]);
        kept.push(block_forward(
            v,
            s,
            cls.as_deref(),
            sh,
            &mut out,
            &mut alpha_sum,
        ));
        outs.push(out);
    }
    let dims = (n * t * d) as f64;
    let sq = |v: &[f32]| v.iter().map(|&a| (a as f64) * (a as f64)).sum::<f64>();
    let z = outs.last().map(|o| &o[..]).unwrap_or(&[]);
    // −mean_n Σ_k logdet_k = Σ α / (N·T·D).
    let mut loss = 0.5 * sq(z) / dims + alpha_sum.iter().sum::<f64>() / dims;
    let k_blocks = views.len();
    if latent_norm > 0.0 {
        loss += latent_norm * outs[1..k_blocks].iter().map(|o| sq(o)).sum::<f64>() / dims;
    }
    if !loss.is_finite() {
        return Ok(Some(TrainPass { loss, grads: None }));
    }
    // Backward, last block first: g is the gradient at the current block's output.
    let mut g: Vec<f32> = z
        .iter()
        .map(|&v| (scale * v as f64 / dims) as f32)
        .collect();
    let dlogdet = (scale / dims) as f32;
    let latent = (scale * latent_norm * 2.0 / dims) as f32;
    let mut named = Vec::new();
    for (kb, (v, k)) in views.iter().zip(kept).enumerate().rev() {
        let mut g_in = (kb > 0).then(|| vec![0f32; n * t * d]);
        block_backward(
            v,
            k,
            &g,
            &classes,
            sh,
            dlogdet,
            g_in.as_deref_mut(),
            &mut named,
        );
        if let Some(mut gi) = g_in {
            // Block kb − 1's output also enters the latent-norm penalty.
            if latent_norm > 0.0 {
                gi.iter_mut()
                    .zip(&outs[kb])
                    .for_each(|(a, &o)| *a += latent * o);
            }
            g = gi;
        }
    }
    Ok(Some(TrainPass {
        loss,
        grads: Some(named),
    }))
}
