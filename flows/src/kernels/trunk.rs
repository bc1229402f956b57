//! A block's transformer trunk (its `AttentionBlock`s) as one CPU kernel for gradient-free
//! passes: the whole causal sequence (scoring, validation, Jacobi) and one KV-cached position at
//! a time (the sequential inverse). Buffers are allocated once per call and reused by every
//! layer, the residual adds are in place, and the weights are read straight from the model's
//! tensors (no copy). Everything the flow adds around the trunk (patches, permutation,
//! embeddings, the affine head) stays in `MetaBlock`; tests hold this equal to candle's ops.

use super::{gemm_strided, softmax_prefix};
use crate::error::{FlowError, Result};
use crate::gelu::gelu_f32;
use crate::layers::{AttentionBlock, LayerParts};
use candle_core::{CpuStorage, Storage, Tensor};
use rayon::prelude::*;

/// Rows per parallel task of the row-wise ops.
const ROWS: usize = 64;

/// Rows from which a step's products use every thread (below, threads cost more than they gain).
const PAR_ROWS: usize = 64;

/// Runs `f` on the contiguous f32 data of a CPU tensor.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let offsets = layout.contiguous_offsets();
    match (&*storage, offsets) {
        (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => Ok(f(&v[a..b])),
        _ => Err(FlowError::Input(
            "the trunk kernel takes contiguous f32 weights on the CPU".into(),
        )),
    }
}

/// `out (rows × n) = x (rows × k) · Wᵀ + b` for a (n, k) weight.
fn linear(
    x: &[f32],
    rows: usize,
    (w, b): (&Tensor, &Tensor),
    out: &mut [f32],
    par: bool,
) -> Result<()> {
    let (n, k) = w.dims2()?;
    with_f32(b, |b| {
        for r in 0..rows {
            out[r * n..(r + 1) * n].copy_from_slice(b);
        }
    })?;
    with_f32(w, |w| {
        // SAFETY: x is rows×k, W (n×k) read as Wᵀ (k×n), out rows×n.
        unsafe {
            gemm_strided(
                (rows, n, k),
                out.as_mut_ptr(),
                n,
                true,
                (x.as_ptr(), k, 1),
                (w.as_ptr(), 1, k),
                1.0,
                par,
            )
        }
    })
}

/// `out (rows × n) = x (rows × k) · Wᵀ + b` with Wᵀ given (k × n, row-major); on every thread
/// from [`PAR_ROWS`] rows.
fn linear_t(
    x: &[f32],
    rows: usize,
    (wt, b): (&[f32], &Tensor),
    out: &mut [f32],
    par: bool,
) -> Result<()> {
    let n = b.dim(0)?;
    let k = wt.len() / n.max(1);
    with_f32(b, |b| {
        for r in 0..rows {
            out[r * n..(r + 1) * n].copy_from_slice(b);
        }
    })?;
    // SAFETY: x is rows×k, Wᵀ k×n, out rows×n.
    unsafe {
        gemm_strided(
            (rows, n, k),
            out.as_mut_ptr(),
            n,
            true,
            (x.as_ptr(), k, 1),
            (wt.as_ptr(), n, 1),
            1.0,
            par,
        )
    };
    Ok(())
}

/// LayerNorm (eps 1e-5) of each row of `x` into `out`.
fn layer_norm(x: &[f32], (w, b): (&Tensor, &Tensor), out: &mut [f32]) -> Result<()> {
    with_f32(w, |w| {
        with_f32(b, |b| {
            let c = w.len();
            out.par_chunks_mut(ROWS * c)
                .zip(x.par_chunks(ROWS * c))
                .for_each(|(o, x)| {
                    for (o, x) in o.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
                        let (m, r) = super::layer_norm::stats(x);
                        for i in 0..c {
                            o[i] = (x[i] - m) * r * w[i] + b[i];
                        }
                    }
                })
        })
    })?
}

fn add_in_place(h: &mut [f32], d: &[f32]) {
    h.par_chunks_mut(16 * 1024)
        .zip(d.par_chunks(16 * 1024))
        .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += b));
}

/// One row of a step's attention: its index, output, qkv row, K and V caches.
type RowTask<'a> = (
    usize,
    (((&'a mut [f32], &'a [f32]), &'a mut [f32]), &'a mut [f32]),
);

/// The trunk's weights, borrowed from the layers.
pub struct Trunk<'a> {
    layers: Vec<LayerParts<'a>>,
    c: usize,
    heads: usize,
    hd: usize,
    hidden: usize,
}

impl<'a> Trunk<'a> {
    /// The trunk of `layers` (dense f32 weights on the CPU; quantised layers are expanded first).
    pub fn new(layers: &'a [AttentionBlock]) -> Result<Self> {
        let layers = layers
            .iter()
            .map(AttentionBlock::parts)
            .collect::<Result<Vec<_>>>()?;
        let first = layers
            .first()
            .ok_or_else(|| FlowError::Config("a block has no transformer layer".into()))?;
        let (c, hidden, hd) = (first.qkv.0.dim(1)?, first.fc1.0.dim(0)?, first.head_dim);
        Ok(Self {
            heads: c / hd,
            layers,
            c,
            hd,
            hidden,
        })
    }

    /// Every layer over `h` (N·T rows of C, block order) in place, causally; `temp` divides the
    /// attention scores; `wt` ([`Self::transposed`]) where kept saves the GEMM its packing.
    pub fn forward(
        &self,
        h: &mut [f32],
        n: usize,
        t: usize,
        temp: f64,
        wt: Option<&[[Vec<f32>; 4]]>,
    ) -> Result<()> {
        let (c, hd, heads) = (self.c, self.hd, self.heads);
        let rows = n * t;
        let mut tmp = vec![0f32; rows * c];
        let mut qkv = vec![0f32; rows * 3 * c];
        let mut att = vec![0f32; rows * c];
        let mut mlp = vec![0f32; rows * self.hidden];
        let scale = (1.0 / ((hd as f64).sqrt() * temp)) as f32;
        let lin = |x: &[f32], l: usize, j: usize, w: (&Tensor, &Tensor), out: &mut [f32]| match wt {
            Some(wt) => linear_t(x, rows, (&wt[l][j], w.1), out, true),
            None => linear(x, rows, w, out, true),
        };
        for (l, layer) in self.layers.iter().enumerate() {
            layer_norm(h, layer.ln1, &mut tmp)?;
            lin(&tmp, l, 0, layer.qkv, &mut qkv)?;
            // Causal attention per sample and head: S = QKᵀ·scale, row softmax, O = S·V.
            att.par_chunks_mut(t * c)
                .zip(qkv.par_chunks(t * 3 * c))
                .for_each(|(o, q)| {
                    let mut sc = vec![0f32; t * t];
                    for hh in 0..heads {
                        let (qo, ko, vo) = (hh * hd, c + hh * hd, 2 * c + hh * hd);
                        // SAFETY: T rows of hd values at offsets qo/ko/vo inside rows of 3C;
                        // S is T×T, the output rows are C wide.
                        unsafe {
                            gemm_strided(
                                (t, t, hd),
                                sc.as_mut_ptr(),
                                t,
                                false,
                                (q.as_ptr().add(qo), 3 * c, 1),
                                (q.as_ptr().add(ko), 1, 3 * c),
                                scale,
                                false,
                            );
                        }
                        for i in 0..t {
                            softmax_prefix(&mut sc[i * t..(i + 1) * t], i + 1);
                        }
                        unsafe {
                            gemm_strided(
                                (t, hd, t),
                                o.as_mut_ptr().add(hh * hd),
                                c,
                                false,
                                (sc.as_ptr(), t, 1),
                                (q.as_ptr().add(vo), 3 * c, 1),
                                1.0,
                                false,
                            );
                        }
                    }
                });
            lin(&att, l, 1, layer.proj, &mut tmp)?;
            add_in_place(h, &tmp);
            layer_norm(h, layer.ln2, &mut tmp)?;
            lin(&tmp, l, 2, layer.fc1, &mut mlp)?;
            mlp.par_chunks_mut(16 * 1024)
                .for_each(|v| v.iter_mut().for_each(|x| *x = gelu_f32(*x)));
            lin(&mlp, l, 3, layer.fc2, &mut tmp)?;
            add_in_place(h, &tmp);
        }
        Ok(())
    }

    /// A KV-cached pass over `rows` sequences of up to `t` positions; row r's attention scores
    /// are divided by `temps[r]` (guidance's unconditional rows have their own).
    pub fn stepper(&self, rows: usize, t: usize, temps: &[f64]) -> Result<TrunkStep> {
        let cache = rows * self.heads * t * self.hd;
        let scale = 1.0 / (self.hd as f64).sqrt();
        Ok(TrunkStep {
            rows,
            t,
            kc: self.layers.iter().map(|_| vec![0f32; cache]).collect(),
            vc: self.layers.iter().map(|_| vec![0f32; cache]).collect(),
            tmp: vec![0f32; rows * self.c],
            att: vec![0f32; rows * self.c],
            qkv: vec![0f32; rows * 3 * self.c],
            mlp: vec![0f32; rows * self.hidden],
            scales: (0..rows)
                .map(|r| (scale / temps.get(r).copied().unwrap_or(1.0)) as f32)
                .collect(),
        })
    }

    /// Wᵀ of every layer's qkv, proj, fc1 and fc2 (in × out, row-major): a step multiplies a
    /// few rows by each weight, and read this way the GEMM needs no packing.
    pub fn transposed(&self) -> Result<Vec<[Vec<f32>; 4]>> {
        let wt =
            |w: &Tensor| -> Result<Vec<f32>> { Ok(w.t()?.contiguous()?.flatten_all()?.to_vec1()?) };
        self.layers
            .iter()
            .map(|l| Ok([wt(l.qkv.0)?, wt(l.proj.0)?, wt(l.fc1.0)?, wt(l.fc2.0)?]))
            .collect()
    }

    /// Feeds position `i` of every row: `h` (rows × C) in, the trunk's output in place; `wt`
    /// from [`Self::transposed`].
    pub fn step(
        &self,
        st: &mut TrunkStep,
        wt: &[[Vec<f32>; 4]],
        h: &mut [f32],
        i: usize,
    ) -> Result<()> {
        let (c, hd, heads, rows, t) = (self.c, self.hd, self.heads, st.rows, st.t);
        if i >= t || h.len() != rows * c {
            return Err(FlowError::Input(format!(
                "trunk step {i} of {t} with {} values for {rows} rows of {c}",
                h.len()
            )));
        }
        for (l, layer) in self.layers.iter().enumerate() {
            layer_norm(h, layer.ln1, &mut st.tmp)?;
            linear_t(
                &st.tmp,
                rows,
                (&wt[l][0], layer.qkv.1),
                &mut st.qkv,
                rows >= PAR_ROWS,
            )?;
            // Rows are independent: each task owns its rows' caches, scores and output.
            let per = heads * t * hd;
            let scales = &st.scales;
            let attend = |(r, (((out, row), kc), vc)): RowTask| {
                let mut scores = vec![0f32; i + 1];
                for hh in 0..heads {
                    let base = hh * t * hd;
                    let at = base + i * hd;
                    kc[at..at + hd].copy_from_slice(&row[c + hh * hd..c + (hh + 1) * hd]);
                    vc[at..at + hd].copy_from_slice(&row[2 * c + hh * hd..2 * c + (hh + 1) * hd]);
                    let q = &row[hh * hd..(hh + 1) * hd];
                    for (j, s) in scores.iter_mut().enumerate() {
                        let kj = &kc[base + j * hd..base + (j + 1) * hd];
                        *s = q.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() * scales[r];
                    }
                    softmax_prefix(&mut scores, i + 1);
                    let o = &mut out[hh * hd..(hh + 1) * hd];
                    o.fill(0.0);
                    for (j, w) in scores.iter().enumerate() {
                        let vj = &vc[base + j * hd..base + (j + 1) * hd];
                        o.iter_mut().zip(vj).for_each(|(o, v)| *o += w * v);
                    }
                }
            };
            if rows >= PAR_ROWS {
                st.att
                    .par_chunks_mut(c)
                    .zip(st.qkv.par_chunks(3 * c))
                    .zip(st.kc[l].par_chunks_mut(per))
                    .zip(st.vc[l].par_chunks_mut(per))
                    .enumerate()
                    .for_each(attend);
            } else {
                st.att
                    .chunks_mut(c)
                    .zip(st.qkv.chunks(3 * c))
                    .zip(st.kc[l].chunks_mut(per))
                    .zip(st.vc[l].chunks_mut(per))
                    .enumerate()
                    .for_each(attend);
            }
            linear_t(
                &st.att,
                rows,
                (&wt[l][1], layer.proj.1),
                &mut st.tmp,
                rows >= PAR_ROWS,
            )?;
            h.iter_mut().zip(&st.tmp).for_each(|(a, b)| *a += b);
            layer_norm(h, layer.ln2, &mut st.tmp)?;
            linear_t(
                &st.tmp,
                rows,
                (&wt[l][2], layer.fc1.1),
                &mut st.mlp,
                rows >= PAR_ROWS,
            )?;
            st.mlp.iter_mut().for_each(|x| *x = gelu_f32(*x));
            linear_t(
                &st.mlp,
                rows,
                (&wt[l][3], layer.fc2.1),
                &mut st.tmp,
                rows >= PAR_ROWS,
            )?;
            h.iter_mut().zip(&st.tmp).for_each(|(a, b)| *a += b);
        }
        Ok(())
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
