//! A block's transformer trunk (its `AttentionBlock`s) as one CPU kernel for gradient-free
//! passes: the whole causal sequence (scoring, validation, Jacobi) and one KV-cached position at
//! a time (the sequential inverse). The weights are laid out once (Wᵀ, in × out row-major: a
//! step multiplies a few rows by each weight, and read this way the GEMM needs no packing),
//! buffers are allocated once per call and reused by every layer, and the residual adds are in
//! place. Everything the flow adds around the trunk (patches, permutation, embeddings, the
//! affine head) stays in `MetaBlock`; tests hold this equal to candle's ops.

use super::attention::Attn;
use super::gemm_strided;
use super::rope::Rotation;
use super::LayerParts;
use crate::error::{FlowError, Result};
use candle_core::{DType, Tensor};
use rayon::prelude::*;

/// Rows from which a step's products use every thread (below, threads cost more than they gain).
const PAR_ROWS: usize = 64;

/// A Linear layer as Wᵀ (in × out, row-major) and its bias.
pub(crate) struct DenseT {
    wt: Vec<f32>,
    pub(crate) b: Vec<f32>,
}

impl DenseT {
    /// Lays out a PyTorch (out, in) weight and its bias.
    pub(crate) fn new((w, b): (&Tensor, &Tensor)) -> Result<Self> {
        Ok(Self {
            wt: w
                .to_dtype(DType::F32)?
                .t()?
                .contiguous()?
                .flatten_all()?
                .to_vec1()?,
            b: b.to_dtype(DType::F32)?.to_vec1()?,
        })
    }

    /// Input width.
    pub(crate) fn k(&self) -> usize {
        self.wt.len() / self.b.len().max(1)
    }

    /// `out (rows × n) = x (rows × k) · Wᵀ + b`, on every thread when `parallel`.
    pub(crate) fn apply(&self, x: &[f32], rows: usize, out: &mut [f32], parallel: bool) {
        self.apply_into(x, rows, out, parallel, false)
    }

    /// `h (rows × n) += x (rows × k) · Wᵀ + b`: a residual branch added in place, with no
    /// buffer between the product and the sum.
    pub(crate) fn add_to(&self, x: &[f32], rows: usize, h: &mut [f32], parallel: bool) {
        self.apply_into(x, rows, h, parallel, true)
    }

    fn apply_into(&self, x: &[f32], rows: usize, out: &mut [f32], parallel: bool, add: bool) {
        let n = self.b.len();
        // A short `out` is left to `times_wt`'s check.
        let filled = (rows * n).min(out.len());
        for r in out[..filled].chunks_exact_mut(n.max(1)) {
            if add {
                r.iter_mut().zip(&self.b).for_each(|(r, b)| *r += b);
            } else {
                r.copy_from_slice(&self.b);
            }
        }
        times_wt(x, &self.wt, rows, n, out, true, parallel);
    }
}

/// `out (rows × n) [+]= x (rows × k) · wt (k × n, row-major)`, k from `wt`'s length; added onto
/// `out` when `accumulate`, on every thread when `parallel`.
fn times_wt(
    x: &[f32],
    wt: &[f32],
    rows: usize,
    n: usize,
    out: &mut [f32],
    accumulate: bool,
    parallel: bool,
) {
    let k = wt.len() / n.max(1);
    assert!(
        x.len() >= rows * k && out.len() >= rows * n,
        "trunk product: buffer sizes"
    );
    // SAFETY: x holds rows×k, wt k×n and out rows×n values (checked above).
    unsafe {
        gemm_strided(
            (rows, n, k),
            out.as_mut_ptr(),
            n,
            accumulate,
            (x.as_ptr(), k, 1),
            (wt.as_ptr(), n, 1),
            1.0,
            parallel,
        )
    }
}

/// A Linear whose input rows end in a 1: Wᵀ with the bias as one more row, (in + 1) × out.
/// The product then writes `x·Wᵀ + b` in one pass, where a separate bias would cost a fill of
/// the output and the product a read of it (a sixth of a scoring pass went to those fills); a
/// residual branch adds `x·Wᵀ + b` onto its stream with no pass of its own.
struct Folded {
    wt: Vec<f32>,
    n: usize,
}

impl Folded {
    fn new(parts: (&Tensor, &Tensor)) -> Result<Self> {
        let d = DenseT::new(parts)?;
        let n = d.b.len();
        let mut wt = d.wt;
        wt.reserve_exact(n);
        wt.extend_from_slice(&d.b);
        Ok(Self { wt, n })
    }

    /// `out (rows × n) = x (rows × (in + 1), last column 1) · [Wᵀ; b]`.
    fn apply(&self, x: &[f32], rows: usize, out: &mut [f32], parallel: bool) {
        times_wt(x, &self.wt, rows, self.n, out, false, parallel)
    }

    /// `h (rows × n) += x (rows × (in + 1), last column 1) · [Wᵀ; b]`.
    fn add_to(&self, x: &[f32], rows: usize, h: &mut [f32], parallel: bool) {
        times_wt(x, &self.wt, rows, self.n, h, true, parallel)
    }
}

/// A LayerNorm's scale and shift.
struct Norm {
    w: Vec<f32>,
    b: Vec<f32>,
}

impl Norm {
    fn new((w, b): (&Tensor, &Tensor)) -> Result<Self> {
        Ok(Self {
            w: w.to_dtype(DType::F32)?.to_vec1()?,
            b: b.to_dtype(DType::F32)?.to_vec1()?,
        })
    }

    /// LayerNorm (eps 1e-5) of each row of `x` into `out`, rows of C + 1 ending in 1 (the
    /// input of a [`Folded`] product).
    fn apply(&self, x: &[f32], out: &mut [f32]) {
        super::layer_norm::forward_strided(x, &self.w, &self.b, out, self.w.len() + 1)
    }
}

/// One row of a step's attention: its index, output, qkv row, K and V caches.
type RowTask<'a> = (
    usize,
    (((&'a mut [f32], &'a [f32]), &'a mut [f32]), &'a mut [f32]),
);

/// One transformer layer in the kernel's layout. The inputs of qkv, proj and fc1 end in a 1
/// (the norms write it, the attention output keeps a column of ones), so their biases ride in
/// their products. fc2's does not: with k = 4C + 1 the GEMM would split its depth into three
/// passes over the output where 4C takes two, which costs more than the fill it saves.
struct Layer {
    ln1: Norm,
    qkv: Folded,
    proj: Folded,
    ln2: Norm,
    fc1: Folded,
    fc2: DenseT,
}

/// The trunk's weights in the kernel's layout.
pub struct Trunk {
    layers: Vec<Layer>,
    c: usize,
    heads: usize,
    hd: usize,
    hidden: usize,
}

impl Trunk {
    /// Lays out `layers` (dense weights).
    pub fn new(layers: &[LayerParts]) -> Result<Self> {
        let layers = layers
            .iter()
            .map(|p| {
                Ok((
                    p.head_dim,
                    Layer {
                        ln1: Norm::new(p.ln1)?,
                        qkv: Folded::new(p.qkv)?,
                        proj: Folded::new(p.proj)?,
                        ln2: Norm::new(p.ln2)?,
                        fc1: Folded::new(p.fc1)?,
                        fc2: DenseT::new(p.fc2)?,
                    },
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let hd = layers
            .first()
            .map(|(hd, _)| *hd)
            .ok_or_else(|| FlowError::Config("a block has no transformer layer".into()))?;
        let layers: Vec<Layer> = layers.into_iter().map(|(_, l)| l).collect();
        let (c, hidden) = (layers[0].proj.n, layers[0].fc1.n);
        Ok(Self {
            heads: c / hd,
            layers,
            c,
            hd,
            hidden,
        })
    }

    /// Every layer over `h` (N·T rows of C, block order) in place, causally; `temp` divides the
    /// attention scores; `rot` rotates queries and keys by their position in the sequence.
    pub fn forward(&self, h: &mut [f32], n: usize, t: usize, temp: f64, rot: Option<&Rotation>) {
        let (c, hd, heads) = (self.c, self.hd, self.heads);
        let rows = n * t;
        let mut tmp = super::pool::take(rows * (c + 1));
        let mut qkv = super::pool::take(rows * 3 * c);
        let mut att = super::pool::take(rows * (c + 1));
        let mut mlp = super::pool::take(rows * self.hidden);
        // The attention never writes its ones.
        ones_column(&mut att, c + 1);
        let scale = (1.0 / ((hd as f64).sqrt() * temp)) as f32;
        for layer in &self.layers {
            layer.ln1.apply(h, &mut tmp);
            layer.qkv.apply(&tmp, rows, &mut qkv, true);
            if let Some(r) = rot {
                qkv.par_chunks_mut(t * 3 * c).for_each(|s| {
                    r.rotate_qk(s, 3 * c, (heads, c), |row| row);
                });
            }
            let attn = Attn {
                heads,
                hd,
                scale,
                t,
            };
            attn.forward_into(&mut qkv, None, (&mut att, c + 1), None);
            layer.proj.add_to(&att, rows, h, true);
            layer.ln2.apply(h, &mut tmp);
            layer.fc1.apply(&tmp, rows, &mut mlp, true);
            super::gelu::in_place(&mut mlp);
            layer.fc2.add_to(&mlp, rows, h, true);
        }
    }

    /// A KV-cached pass over `rows` sequences of up to `t` positions; row r's attention scores
    /// are divided by `temps[r]` (guidance's unconditional rows have their own).
    pub fn stepper(&self, rows: usize, t: usize, temps: &[f64]) -> TrunkStep {
        let cache = rows * self.heads * t * self.hd;
        let scale = 1.0 / (self.hd as f64).sqrt();
        TrunkStep {
            rows,
            t,
            kc: self.layers.iter().map(|_| vec![0f32; cache]).collect(),
            vc: self.layers.iter().map(|_| vec![0f32; cache]).collect(),
            tmp: vec![0f32; rows * (self.c + 1)],
            // Ones throughout: the attention writes each row's first C, the last stays 1.
            att: vec![1f32; rows * (self.c + 1)],
            qkv: vec![0f32; rows * 3 * self.c],
            mlp: vec![0f32; rows * self.hidden],
            scales: (0..rows)
                .map(|r| (scale / temps.get(r).copied().unwrap_or(1.0)) as f32)
                .collect(),
        }
    }

    /// Feeds position `i` of every row: `h` (rows × C) in, the trunk's output in place; `rot`
    /// rotates its query and key as position `i`.
    pub fn step(
        &self,
        st: &mut TrunkStep,
        h: &mut [f32],
        i: usize,
        rot: Option<&Rotation>,
    ) -> Result<()> {
        let (c, hd, heads, rows, t) = (self.c, self.hd, self.heads, st.rows, st.t);
        if i >= t || h.len() != rows * c {
            return Err(FlowError::Input(format!(
                "trunk step {i} of {t} with {} values for {rows} rows of {c}",
                h.len()
            )));
        }
        let par = rows >= PAR_ROWS;
        for (l, layer) in self.layers.iter().enumerate() {
            layer.ln1.apply(h, &mut st.tmp);
            layer.qkv.apply(&st.tmp, rows, &mut st.qkv, par);
            if let Some(r) = rot {
                r.rotate_qk(&mut st.qkv, 3 * c, (heads, c), |_| i);
            }
            // Rows are independent: each task owns its rows' caches, scores and output.
            let per = heads * t * hd;
            let scales = &st.scales;
            let attend = |(r, (((out, row), kc), vc)): RowTask| {
                attend_row(row, kc, vc, out, (heads, hd, t, i), scales[r]);
            };
            if rows >= PAR_ROWS {
                st.att
                    .par_chunks_mut(c + 1)
                    .zip(st.qkv.par_chunks(3 * c))
                    .zip(st.kc[l].par_chunks_mut(per))
                    .zip(st.vc[l].par_chunks_mut(per))
                    .enumerate()
                    .for_each(attend);
            } else {
                st.att
                    .chunks_mut(c + 1)
                    .zip(st.qkv.chunks(3 * c))
                    .zip(st.kc[l].chunks_mut(per))
                    .zip(st.vc[l].chunks_mut(per))
                    .enumerate()
                    .for_each(attend);
            }
            layer.proj.add_to(&st.att, rows, h, par);
            layer.ln2.apply(h, &mut st.tmp);
            layer.fc1.apply(&st.tmp, rows, &mut st.mlp, par);
            super::gelu::in_place_chunk(&mut st.mlp);
            layer.fc2.add_to(&st.mlp, rows, h, par);
        }
        Ok(())
    }
}

super::simd_clones! {
/// One row's attention at step `i`: its K and V (from its qkv `row`) go into the caches, and
/// each head's output into `out` from its scores against positions 0..=i. A head's K cache is
/// hd × T (position fastest), so the scores are sixteen positions per vector FMA, where K as
/// T × hd made each score a dot product ending in a horizontal sum. A function of its own so
/// that it is compiled for the CPU's SIMD (a closure would be baseline SSE2 code).
fn attend_row(
    row: &[f32],
    kc: &mut [f32],
    vc: &mut [f32],
    out: &mut [f32],
    (heads, hd, t, i): (usize, usize, usize, usize),
    scale: f32,
) {
    let c = heads * hd;
    // Whole 16-position chunks, also past i where they fit in T (those scores are dropped by
    // the softmax's selection), and single positions after them.
    let whole = (i + 1).div_ceil(16).min(t / 16) * 16;
    let mut scores = vec![0f32; whole.max(i + 1)];
    for hh in 0..heads {
        let (k, v) = (&mut kc[hh * hd * t..][..hd * t], &mut vc[hh * t * hd..][..t * hd]);
        let q = &row[hh * hd..(hh + 1) * hd];
        for (d, kd) in k.chunks_exact_mut(t).enumerate() {
            kd[i] = row[c + hh * hd + d];
        }
        v[i * hd..(i + 1) * hd].copy_from_slice(&row[2 * c + hh * hd..2 * c + (hh + 1) * hd]);
        for (cj, sc) in scores[..whole].chunks_exact_mut(16).enumerate() {
            sc.copy_from_slice(&scores16(q, k, t, cj * 16, scale));
        }
        for j in whole..=i {
            let dot = q.iter().zip(k.chunks_exact(t)).fold(0f32, |s, (qd, kd)| qd.mul_add(kd[j], s));
            scores[j] = dot * scale;
        }
        super::softmax_row(&mut scores, i + 1);
        weighted_rows(&scores[..=i], v, hd, &mut out[hh * hd..(hh + 1) * hd]);
    }
}
}

/// `scale·q·k_j` for the sixteen positions from `j0`, K as hd rows of `t` (position fastest):
/// a vector FMA per dimension, in four chains (dimension mod 4) kept in registers.
#[inline(always)]
fn scores16(q: &[f32], k: &[f32], t: usize, j0: usize, scale: f32) -> [f32; 16] {
    let mut a = [[0f32; 16]; 4];
    let (mut qs, mut ks) = (q.chunks_exact(4), k.chunks_exact(4 * t));
    for (q4, k4) in (&mut qs).zip(&mut ks) {
        for r in 0..4 {
            let kr = &k4[r * t + j0..][..16];
            for l in 0..16 {
                a[r][l] = q4[r].mul_add(kr[l], a[r][l]);
            }
        }
    }
    for (r, qd) in qs.remainder().iter().enumerate() {
        let kr = &ks.remainder()[r * t + j0..][..16];
        for l in 0..16 {
            a[0][l] = qd.mul_add(kr[l], a[0][l]);
        }
    }
    let mut s = [0f32; 16];
    for l in 0..16 {
        s[l] = ((a[0][l] + a[1][l]) + (a[2][l] + a[3][l])) * scale;
    }
    s
}

/// `o = Σ_j w_j·v_j` over the rows of `v` (hd each), 64 dimensions at a time in registers
/// (through `o` in memory, each row waited on the last one's store).
#[inline(always)]
fn weighted_rows(w: &[f32], v: &[f32], hd: usize, o: &mut [f32]) {
    let mut d0 = 0;
    while d0 + 64 <= hd {
        let mut acc = [0f32; 64];
        for (wj, vj) in w.iter().zip(v.chunks_exact(hd)) {
            let vj = &vj[d0..d0 + 64];
            for l in 0..64 {
                acc[l] = wj.mul_add(vj[l], acc[l]);
            }
        }
        o[d0..d0 + 64].copy_from_slice(&acc);
        d0 += 64;
    }
    o[d0..].fill(0.0);
    if d0 < hd {
        for (wj, vj) in w.iter().zip(v.chunks_exact(hd)) {
            o[d0..]
                .iter_mut()
                .zip(&vj[d0..])
                .for_each(|(o, v)| *o = wj.mul_add(*v, *o));
        }
    }
}

/// Sets the last value of every row (rows of `stride`) to 1: the column that multiplies a
/// [`Folded`] product's bias.
fn ones_column(x: &mut [f32], stride: usize) {
    for r in x.chunks_exact_mut(stride) {
        r[stride - 1] = 1.0;
    }
}

/// The KV caches and buffers of one sequential inverse through a [`Trunk`].
pub struct TrunkStep {
    rows: usize,
    t: usize,
    kc: Vec<Vec<f32>>,
    vc: Vec<Vec<f32>>,
    tmp: Vec<f32>,
    att: Vec<f32>,
    qkv: Vec<f32>,
    mlp: Vec<f32>,
    scales: Vec<f32>,
}
