//! The CPU engine's training pass: the loss and every parameter's gradient from one forward and
//! one backward over slices, with no autograd tape. The flow's semantics (token order, shift,
//! affine map, log-det, loss) come from [`crate::affine`]; each block's transformer runs on the
//! engine's [`Trunk`]. It covers what [`MetaBlock::trunk_parts`] covers; anything else trains
//! on the composed ops, and tests hold the two equal in loss and every gradient.

use super::TarFlow;
use crate::affine::{affine_rows, affine_rows_backward, permute_rows};
use crate::block::{Cond, MetaBlock};
use crate::engine::Engine;
use crate::error::Result;
use crate::kernels::pool::{self, Buf};
use crate::kernels::train::{Kept, Trunk, TrunkGrads, TrunkParts};
use candle_core::Tensor;

/// What one training pass gave.
pub struct TrainPass {
    /// The loss `0.5·mean(z²) − mean(Σ logdets) [+ λ·latent norm]`.
    pub loss: f64,
    /// `scale ×` the gradient of the loss for every parameter, by name (its values in the
    /// parameter's own layout); `None` when the loss was not finite.
    pub grads: Option<Vec<(String, Vec<f32>)>>,
}

/// What a block's forward keeps for its backward.
struct Saved {
    /// The input in the block's own order, rows × D.
    xp: Buf,
    trunk: Kept,
    /// z in the block's own order, rows × D.
    z: Buf,
    /// exp(−α) after the shift, rows × D.
    e: Buf,
}

/// One block and its transformer's weights, read for one pass.
struct Block<'a> {
    trunk: Trunk<'a>,
    flipped: bool,
    nvp: bool,
}

/// The class of each row whose embedding is added: `Some(label)`, or `None` for the mean.
fn row_classes(cond: Cond, n: usize) -> Vec<Option<usize>> {
    match cond {
        Cond::Labels(l) => l.iter().map(|&v| (v >= 0).then_some(v as usize)).collect(),
        Cond::Null | Cond::Text(_) => vec![None; n],
    }
}

impl TarFlow {
    /// Whether [`Self::train_pass`] covers this model: the CPU engine runs every block, and
    /// every block is one its training pass covers.
    pub fn train_pass_covers(&self) -> bool {
        self.train_parts().is_some()
    }

    /// Every block's transformer weights when [`Self::train_pass_covers`].
    fn train_parts(&self) -> Option<Vec<(TrunkParts<'_>, &MetaBlock)>> {
        let cpu = |b: &MetaBlock| b.engine() == Engine::Cpu;
        if self.blocks().is_empty() || !self.blocks().iter().all(cpu) {
            return None;
        }
        if let Some(option) = self.blocks().iter().find_map(MetaBlock::train_uncovered) {
            crate::engine::say_training_composed(option);
            return None;
        }
        self.blocks()
            .iter()
            .map(|b| Some((b.trunk_parts()?, b)))
            .collect()
    }

    /// The training loss of `x` (N, C, S, S) under `cond` plus `latent_norm ×` STARFlow's
    /// latent-norm penalty, and `scale ×` its gradient for every parameter; `None` where the
    /// pass does not cover the model ([`Self::train_pass_covers`]).
    pub fn train_pass(
        &self,
        x: &Tensor,
        cond: Cond,
        latent_norm: f64,
        scale: f64,
    ) -> Result<Option<TrainPass>> {
        let Some(parts) = self.train_parts() else {
            return Ok(None);
        };
        self.check_images(x)?;
        let n = x.dim(0)?;
        self.check_labels(cond, n)?;
        let s0 = self.to_tokens(&x.to_dtype(self.dtype())?)?; // (N, T, D)
        let (_, t, d) = s0.dims3()?;
        let blocks = parts
            .iter()
            .map(|(p, b)| {
                Ok(Block {
                    trunk: Trunk::of(p, t)?,
                    flipped: b.is_flipped(),
                    nvp: self.config().nvp,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let classes = row_classes(cond, n);
        // Forward: each block's output is the next one's input.
        let mut outs: Vec<Vec<f32>> = vec![s0.flatten_all()?.to_vec1::<f32>()?];
        let mut kept = Vec::with_capacity(blocks.len());
        let mut alpha_sum = vec![0f64; n];
        for ((_, meta), b) in parts.iter().zip(&blocks) {
            let cls = meta
                .class_cond(cond, x.device())?
                .map(|c| c.flatten_all()?.to_vec1::<f32>())
                .transpose()?;
            let mut out = vec![0f32; n * t * d];
            let s = outs.last().map(|o| &o[..]).unwrap_or(&[]);
            kept.push(block_forward(
                b,
                s,
                cls.as_deref(),
                (t, d),
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
        let k_blocks = blocks.len();
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
        for (kb, (b, k)) in blocks.iter().zip(kept).enumerate().rev() {
            let mut g_in = (kb > 0).then(|| vec![0f32; n * t * d]);
            let grads = block_backward(b, k, &g, &classes, (t, d), dlogdet, g_in.as_deref_mut());
            name_grads(kb, grads, &mut named);
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
}

/// One block forward: `s` (canonical, rows × D) → its output (canonical) and Σ_{t,d} α per
/// sample; `cls` holds the class embedding of each row (or one for all).
fn block_forward(
    b: &Block,
    s: &[f32],
    cls: Option<&[f32]>,
    (t, d): (usize, usize),
    out: &mut [f32],
    alpha_sum: &mut [f64],
) -> Saved {
    let rows = s.len() / d;
    let mut xp = pool::take(rows * d);
    permute_rows(s, &mut xp, t, d, b.flipped);
    let mut po = pool::take(rows * b.trunk.out_width());
    let trunk = b.trunk.forward(&xp, cls, &mut po);
    let (mut z, mut e, mut alpha) = (
        pool::take(rows * d),
        pool::take(rows * d),
        pool::take(rows * d),
    );
    affine_rows(
        &xp,
        &po,
        (t, d),
        b.nvp,
        (&mut z, &mut e, &mut alpha),
        alpha_sum,
    );
    permute_rows(&z, out, t, d, b.flipped);
    Saved { xp, trunk, z, e }
}

/// One block backward from `g` (the loss gradient at its output, canonical, rows × D): its
/// transformer's gradients and, when `g_in` is given, the gradient at its input (canonical).
fn block_backward(
    b: &Block,
    k: Saved,
    g: &[f32],
    classes: &[Option<usize>],
    (t, d): (usize, usize),
    dlogdet: f32,
    g_in: Option<&mut [f32]>,
) -> TrunkGrads {
    let rows = g.len() / d;
    let mut dz = pool::take(rows * d);
    permute_rows(g, &mut dz, t, d, b.flipped);
    let mut dpo = pool::take(rows * b.trunk.out_width());
    let mut dxp = pool::take(rows * d);
    affine_rows_backward(
        &dz,
        (&k.z, &k.e),
        (t, d),
        b.nvp,
        dlogdet,
        &mut dpo,
        &mut dxp,
    );
    drop(dz);
    let dx = g_in.is_some().then_some(&mut dxp[..]);
    let grads = b.trunk.backward(k.trunk, &k.xp, &dpo, classes, dx);
    if let Some(g_in) = g_in {
        permute_rows(&dxp, g_in, t, d, b.flipped);
    }
    grads
}

/// Block `k`'s gradients under their parameter names, in the order the tape would give them.
fn name_grads(k: usize, g: TrunkGrads, named: &mut Vec<(String, Vec<f32>)>) {
    let name = |p: &str| format!("blocks.{k}.{p}");
    named.push((name("proj_in.weight"), g.proj_in.0));
    named.push((name("proj_in.bias"), g.proj_in.1));
    named.push((name("pos_embed"), g.pos));
    if let Some(dt) = g.class_embed {
        named.push((name("class_embed"), dt));
    }
    for (l, dp) in g.layers.into_iter().enumerate() {
        named.push((
            name(&format!("attn_blocks.{l}.{}", crate::packing::PACKED)),
            dp,
        ));
    }
    named.push((name("proj_out.weight"), g.proj_out.0));
    named.push((name("proj_out.bias"), g.proj_out.1));
}
