//! One block's inference in plain f32 on the CPU. The KV-cached inverse allocates every buffer
//! once per block: the sequential sampler runs T steps of a few tiny matrix products, where
//! candle's per-op dispatch and allocation cost more than the arithmetic. The gradient-free
//! forward (scoring) does the whole pass as a few large products plus per-head attention
//! without the layout copies and mask materialisation of the composed ops.
//!
//! Guidance runs the conditional and unconditional rows as one batch of 2N rows. The
//! composed-op path of [`crate::model::TarFlow`] stays the reference (and the path on other
//! devices and dtypes); tests hold the two equal.

use crate::block::MetaBlock;
use crate::error::Result;
use crate::gelu::gelu_f32;
use crate::model::{GuideWhat, ReverseOptions};
use candle_core::{DType, Tensor};

/// `y = x·W + b` with W stored transposed (in × out, row-major).
struct Dense {
    wt: Vec<f32>,
    b: Vec<f32>,
    k: usize,
    n: usize,
}

impl Dense {
    fn new(weight: &Tensor, bias: &Tensor) -> Result<Self> {
        let (n, k) = weight.dims2()?;
        Ok(Self {
            wt: weight
                .to_dtype(DType::F32)?
                .t()?
                .contiguous()?
                .flatten_all()?
                .to_vec1()?,
            b: bias.to_dtype(DType::F32)?.to_vec1()?,
            k,
            n,
        })
    }

    /// `out (rows × n) = x (rows × k) · W + b`, one thread.
    fn apply(&self, x: &[f32], rows: usize, out: &mut [f32]) {
        self.apply_with(x, rows, out, gemm::Parallelism::None)
    }

    /// The same over all threads (for the many rows of a forward pass).
    fn apply_par(&self, x: &[f32], rows: usize, out: &mut [f32]) {
        let threads = rayon::current_num_threads();
        let par = if threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        self.apply_with(x, rows, out, par)
    }

    fn apply_with(&self, x: &[f32], rows: usize, out: &mut [f32], par: gemm::Parallelism) {
        let (k, n) = (self.k, self.n);
        for r in 0..rows {
            out[r * n..(r + 1) * n].copy_from_slice(&self.b);
        }
        // SAFETY: the slices hold rows·k, k·n and rows·n elements, as the strides below assume.
        unsafe {
            gemm::gemm(
                rows,
                n,
                k,
                out.as_mut_ptr(),
                1,
                n as isize,
                true,
                x.as_ptr(),
                1,
                k as isize,
                self.wt.as_ptr(),
                1,
                n as isize,
                1.0f32,
                1.0f32,
                false,
                false,
                false,
                par,
            );
        }
    }
}

struct Norm {
    w: Vec<f32>,
    b: Vec<f32>,
}

impl Norm {
    fn new(w: &Tensor, b: &Tensor) -> Result<Self> {
        Ok(Self {
            w: w.to_dtype(DType::F32)?.to_vec1()?,
            b: b.to_dtype(DType::F32)?.to_vec1()?,
        })
    }

    /// LayerNorm (eps 1e-5) of each row of `x` into `out`.
    fn apply(&self, x: &[f32], out: &mut [f32]) {
        let c = self.w.len();
        for (xr, or) in x.chunks_exact(c).zip(out.chunks_exact_mut(c)) {
            let mean = xr.iter().sum::<f32>() / c as f32;
            let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / c as f32;
            let inv = 1.0 / (var + 1e-5).sqrt();
            for i in 0..c {
                or[i] = (xr[i] - mean) * inv * self.w[i] + self.b[i];
            }
        }
    }
}

/// Exact GELU in place.
fn gelu(v: &mut [f32]) {
    for x in v {
        *x = gelu_f32(*x);
    }
}

/// Per-block results of [`FastBlock::forward`], flat row-major.
pub struct FastForward {
    /// z in canonical token order (N, T, D).
    pub out: Vec<f32>,
    /// `−mean(α)` per sample (N).
    pub logdet: Vec<f32>,
    /// Raw proj_out (N, T, W), block's own order.
    pub proj_out: Vec<f32>,
    /// α after the shift (N, T, D), block's own order.
    pub alpha: Vec<f32>,
}

struct Layer {
    ln1: Norm,
    qkv: Dense,
    proj: Dense,
    ln2: Norm,
    fc1: Dense,
    fc2: Dense,
}

/// One block's weights in the layout the step loop wants.
pub struct FastBlock {
    c: usize,
    d: usize,
    t: usize,
    heads: usize,
    hd: usize,
    proj_in: Dense,
    pos: Vec<f32>,
    /// Class embeddings (classes × C) followed by their mean (the "no label" row).
    cls: Option<Vec<f32>>,
    layers: Vec<Layer>,
    proj_out: Dense,
    nvp: bool,
    flipped: bool,
}

impl FastBlock {
    /// Copies the weights of `block` (any dtype) into f32 buffers.
    pub fn new(block: &MetaBlock) -> Result<Self> {
        let p = block.parts()?;
        let (t, c) = p.pos_embed.dims2()?;
        let cls = match p.class_embed {
            Some(table) => {
                let mean = table.mean_keepdim(0)?;
                Some(
                    Tensor::cat(&[table, &mean], 0)?
                        .to_dtype(DType::F32)?
                        .flatten_all()?
                        .to_vec1()?,
                )
            }
            None => None,
        };
        let mut layers = Vec::new();
        let mut hd = 64;
        for l in p.layers {
            let a = l.parts()?;
            hd = a.head_dim;
            layers.push(Layer {
                ln1: Norm::new(a.ln1.0, a.ln1.1)?,
                qkv: Dense::new(a.qkv.0, a.qkv.1)?,
                proj: Dense::new(a.proj.0, a.proj.1)?,
                ln2: Norm::new(a.ln2.0, a.ln2.1)?,
                fc1: Dense::new(a.fc1.0, a.fc1.1)?,
                fc2: Dense::new(a.fc2.0, a.fc2.1)?,
            });
        }
        Ok(Self {
            c,
            d: p.patch_dim,
            t,
            heads: c / hd,
            hd,
            proj_in: Dense::new(p.proj_in.0, p.proj_in.1)?,
            pos: p.pos_embed.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
            cls,
            layers,
            proj_out: Dense::new(p.proj_out.0, p.proj_out.1)?,
            nvp: p.nvp,
            flipped: block.is_flipped(),
        })
    }

    /// x → z for `n` samples `x` (N, T, D) in canonical order, as `MetaBlock::forward` (no
    /// gradient).
    pub fn forward(&self, x: &[f32], n: usize, labels: Option<&[i64]>) -> FastForward {
        use rayon::prelude::*;
        let (t, d, c, hd, heads) = (self.t, self.d, self.c, self.hd, self.heads);
        let rows = n * t;
        let perm = |i: usize| if self.flipped { t - 1 - i } else { i };
        let xs = self.reorder(x, n); // block order
        let mut h = vec![0f32; rows * c];
        self.proj_in.apply_par(&xs, rows, &mut h);
        let classes = self.cls.as_ref().map_or(0, |v| v.len() / c - 1);
        h.par_chunks_mut(t * c).enumerate().for_each(|(r, hr)| {
            let k = match labels {
                Some(l) if l[r] >= 0 => l[r] as usize,
                _ => classes,
            };
            for i in 0..t {
                let p = perm(i);
                let row = &mut hr[i * c..(i + 1) * c];
                for (a, e) in row.iter_mut().zip(&self.pos[p * c..(p + 1) * c]) {
                    *a += e;
                }
                if let Some(cls) = &self.cls {
                    for (a, e) in row.iter_mut().zip(&cls[k * c..(k + 1) * c]) {
                        *a += e;
                    }
                }
            }
        });
        let hidden = self.layers.first().map_or(0, |l| l.fc1.n);
        let mut tmp = vec![0f32; rows * c];
        let mut qkv = vec![0f32; rows * 3 * c];
        let mut att = vec![0f32; rows * c];
        let mut mlp = vec![0f32; rows * hidden];
        let scale = 1.0 / (hd as f32).sqrt();
        for layer in &self.layers {
            tmp.par_chunks_mut(64 * c)
                .zip(h.par_chunks(64 * c))
                .for_each(|(o, x)| layer.ln1.apply(x, o));
            layer.qkv.apply_par(&tmp, rows, &mut qkv);
            // Causal attention per sample and head: S = QKᵀ·scale, row softmax, O = S·V.
            att.par_chunks_mut(t * c)
                .zip(qkv.par_chunks(t * 3 * c))
                .for_each(|(o, q)| {
                    let mut sc = vec![0f32; t * t];
                    for hh in 0..heads {
                        let (qo, ko, vo) = (hh * hd, c + hh * hd, 2 * c + hh * hd);
                        // SAFETY: strides address T rows of hd values inside the 3C-wide rows.
                        unsafe {
                            gemm::gemm(
                                t,
                                t,
                                hd,
                                sc.as_mut_ptr(),
                                1,
                                t as isize,
                                false,
                                q.as_ptr().add(qo),
                                1,
                                (3 * c) as isize,
                                q.as_ptr().add(ko),
                                (3 * c) as isize,
                                1,
                                0.0f32,
                                scale,
                                false,
                                false,
                                false,
                                gemm::Parallelism::None,
                            );
                        }
                        for i in 0..t {
                            let row = &mut sc[i * t..(i + 1) * t];
                            let max = row[..=i].iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                            let mut sum = 0.0;
                            for v in row[..=i].iter_mut() {
                                *v = (*v - max).exp();
                                sum += *v;
                            }
                            for v in row[..=i].iter_mut() {
                                *v /= sum;
                            }
                            row[i + 1..].fill(0.0);
                        }
                        // SAFETY: as above; the output rows are C wide.
                        unsafe {
                            gemm::gemm(
                                t,
                                hd,
                                t,
                                o.as_mut_ptr().add(hh * hd),
                                1,
                                c as isize,
                                false,
                                sc.as_ptr(),
                                1,
                                t as isize,
                                q.as_ptr().add(vo),
                                1,
                                (3 * c) as isize,
                                0.0f32,
                                1.0f32,
                                false,
                                false,
                                false,
                                gemm::Parallelism::None,
                            );
                        }
                    }
                });
            layer.proj.apply_par(&att, rows, &mut tmp);
            h.par_iter_mut().zip(&tmp).for_each(|(a, b)| *a += b);
            tmp.par_chunks_mut(64 * c)
                .zip(h.par_chunks(64 * c))
                .for_each(|(o, x)| layer.ln2.apply(x, o));
            layer.fc1.apply_par(&tmp, rows, &mut mlp);
            mlp.par_chunks_mut(16 * 1024).for_each(gelu);
            layer.fc2.apply_par(&mlp, rows, &mut tmp);
            h.par_iter_mut().zip(&tmp).for_each(|(a, b)| *a += b);
        }
        let w = self.proj_out.n;
        let mut proj_out = vec![0f32; rows * w];
        self.proj_out.apply_par(&h, rows, &mut proj_out);
        let mut alpha = vec![0f32; rows * d];
        let mut out = vec![0f32; rows * d];
        let mut logdet = vec![0f32; n];
        for r in 0..n {
            let mut sum = 0f64;
            for i in 1..t {
                let o = &proj_out[(r * t + i - 1) * w..(r * t + i) * w];
                let a = &mut alpha[(r * t + i) * d..(r * t + i + 1) * d];
                let dst = (r * t + perm(i)) * d;
                for e in 0..d {
                    let (al, mu) = if self.nvp {
                        (o[e], o[d + e])
                    } else {
                        (0.0, o[e])
                    };
                    a[e] = al;
                    sum += al as f64;
                    out[dst + e] = (xs[(r * t + i) * d + e] - mu) * (-al).exp();
                }
            }
            // Token 0 has α = μ = 0: it passes through.
            let dst = (r * t + perm(0)) * d;
            out[dst..dst + d].copy_from_slice(&xs[r * t * d..r * t * d + d]);
            logdet[r] = -(sum / (t * d) as f64) as f32;
        }
        FastForward {
            out,
            logdet,
            proj_out,
            alpha,
        }
    }

    /// [`Self::reverse`] with the samples split across the rayon threads: samples are
    /// independent, so each thread runs the whole step loop on its share.
    pub fn reverse_parallel(
        &self,
        s: &[f32],
        n: usize,
        labels: Option<&[i64]>,
        opts: &ReverseOptions,
    ) -> Vec<f32> {
        use rayon::prelude::*;
        let per = self.t * self.d;
        let threads = rayon::current_num_threads().max(1);
        // Below ~4 rows per thread the products lose more than the threads gain.
        let chunk = n.div_ceil(threads).max(4).min(n.max(1));
        let parts: Vec<Vec<f32>> = (0..n.div_ceil(chunk))
            .into_par_iter()
            .map(|c| {
                let (a, b) = (c * chunk, ((c + 1) * chunk).min(n));
                self.reverse(&s[a * per..b * per], b - a, labels.map(|l| &l[a..b]), opts)
            })
            .collect();
        parts.concat()
    }

    /// Inverts the block: `s` is (n, T, D) row-major in canonical token order; `labels` one per
    /// row (−1 or none → mean embedding). Returns the block's input in canonical order.
    pub fn reverse(
        &self,
        s: &[f32],
        n: usize,
        labels: Option<&[i64]>,
        opts: &ReverseOptions,
    ) -> Vec<f32> {
        let (t, d, c) = (self.t, self.d, self.c);
        let guided = opts.guidance > 0.0;
        let rows = if guided { 2 * n } else { n };
        let mut x = self.reorder(s, n); // block order
                                        // Per-row class rows: conditional rows use their label, guidance rows the mean.
        let classes = self.cls.as_ref().map_or(0, |v| v.len() / c - 1);
        let cls_row = |r: usize| -> usize {
            if r >= n {
                return classes;
            }
            match labels {
                Some(l) if l[r] >= 0 => l[r] as usize,
                _ => classes,
            }
        };
        let cache_len = rows * self.heads * t * self.hd;
        let mut kc: Vec<Vec<f32>> = self.layers.iter().map(|_| vec![0f32; cache_len]).collect();
        let mut vc: Vec<Vec<f32>> = self.layers.iter().map(|_| vec![0f32; cache_len]).collect();
        let hidden = self.layers.first().map_or(0, |l| l.fc1.n);
        let out_w = self.proj_out.n;
        let (mut h, mut tmp, mut att) = (
            vec![0f32; rows * c],
            vec![0f32; rows * c],
            vec![0f32; rows * c],
        );
        let mut qkv = vec![0f32; rows * 3 * c];
        let mut mlp = vec![0f32; rows * hidden];
        let mut o = vec![0f32; rows * out_w];
        let mut xin = vec![0f32; rows * d];
        let mut scores = vec![0f32; t];
        let scale = 1.0 / (self.hd as f32).sqrt();
        let temp_u = opts.attn_temp as f32;
        for i in 0..t - 1 {
            for r in 0..rows {
                let src = r % n;
                xin[r * d..(r + 1) * d]
                    .copy_from_slice(&x[(src * t + i) * d..(src * t + i + 1) * d]);
            }
            self.proj_in.apply(&xin, rows, &mut h);
            // Position embeddings are stored in canonical order; this block sees them permuted.
            let pos = if self.flipped { t - 1 - i } else { i };
            for r in 0..rows {
                let hr = &mut h[r * c..(r + 1) * c];
                for (a, p) in hr.iter_mut().zip(&self.pos[pos * c..(pos + 1) * c]) {
                    *a += p;
                }
                if let Some(cls) = &self.cls {
                    let k = cls_row(r);
                    for (a, e) in hr.iter_mut().zip(&cls[k * c..(k + 1) * c]) {
                        *a += e;
                    }
                }
            }
            for (l, layer) in self.layers.iter().enumerate() {
                layer.ln1.apply(&h, &mut tmp);
                layer.qkv.apply(&tmp, rows, &mut qkv);
                let (kc, vc) = (&mut kc[l], &mut vc[l]);
                for r in 0..rows {
                    let q_all = &qkv[r * 3 * c..r * 3 * c + c];
                    let k_all = &qkv[r * 3 * c + c..r * 3 * c + 2 * c];
                    let v_all = &qkv[r * 3 * c + 2 * c..(r + 1) * 3 * c];
                    let sc = if r >= n { scale / temp_u } else { scale };
                    for hh in 0..self.heads {
                        let base = ((r * self.heads + hh) * t) * self.hd;
                        let at = base + i * self.hd;
                        kc[at..at + self.hd]
                            .copy_from_slice(&k_all[hh * self.hd..(hh + 1) * self.hd]);
                        vc[at..at + self.hd]
                            .copy_from_slice(&v_all[hh * self.hd..(hh + 1) * self.hd]);
                        let q = &q_all[hh * self.hd..(hh + 1) * self.hd];
                        let mut max = f32::NEG_INFINITY;
                        for (j, s) in scores[..=i].iter_mut().enumerate() {
                            let kj = &kc[base + j * self.hd..base + (j + 1) * self.hd];
                            *s = q.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() * sc;
                            max = max.max(*s);
                        }
                        let mut sum = 0.0;
                        for s in scores[..=i].iter_mut() {
                            *s = (*s - max).exp();
                            sum += *s;
                        }
                        let out = &mut att[r * c + hh * self.hd..r * c + (hh + 1) * self.hd];
                        out.fill(0.0);
                        for (j, s) in scores[..=i].iter().enumerate() {
                            let w = s / sum;
                            let vj = &vc[base + j * self.hd..base + (j + 1) * self.hd];
                            for (o, v) in out.iter_mut().zip(vj) {
                                *o += w * v;
                            }
                        }
                    }
                }
                layer.proj.apply(&att, rows, &mut tmp);
                for (a, b) in h.iter_mut().zip(&tmp) {
                    *a += b;
                }
                layer.ln2.apply(&h, &mut tmp);
                layer.fc1.apply(&tmp, rows, &mut mlp);
                gelu(&mut mlp);
                layer.fc2.apply(&mlp, rows, &mut tmp);
                for (a, b) in h.iter_mut().zip(&tmp) {
                    *a += b;
                }
            }
            self.proj_out.apply(&h, rows, &mut o);
            let g = if opts.annealed {
                (i + 1) as f32 / (t - 1) as f32 * opts.guidance as f32
            } else {
                opts.guidance as f32
            };
            for r in 0..n {
                let or = &o[r * out_w..(r + 1) * out_w];
                let ou = guided.then(|| &o[(n + r) * out_w..(n + r + 1) * out_w]);
                let next = &mut x[(r * t + i + 1) * d..(r * t + i + 2) * d];
                for e in 0..d {
                    let (mut a, mut m) = if self.nvp {
                        (or[e], or[d + e])
                    } else {
                        (0.0, or[e])
                    };
                    if let Some(u) = ou {
                        let (au, mu) = if self.nvp {
                            (u[e], u[d + e])
                        } else {
                            (0.0, u[e])
                        };
                        if opts.guide_what != GuideWhat::Mu {
                            a += (a - au) * g;
                        }
                        if opts.guide_what != GuideWhat::Alpha {
                            m += (m - mu) * g;
                        }
                    }
                    next[e] = next[e] * a.exp() + m;
                }
            }
        }
        self.reorder(&x, n) // back to canonical order
    }

    /// (n, T, D) tokens between canonical and this block's order (a flip is its own inverse).
    fn reorder(&self, x: &[f32], n: usize) -> Vec<f32> {
        if !self.flipped {
            return x.to_vec();
        }
        let (t, d) = (self.t, self.d);
        let mut out = vec![0f32; n * t * d];
        for r in 0..n {
            for i in 0..t {
                let src = (r * t + t - 1 - i) * d;
                out[(r * t + i) * d..(r * t + i + 1) * d].copy_from_slice(&x[src..src + d]);
            }
        }
        out
    }
}

impl std::fmt::Debug for FastBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FastBlock")
            .field("tokens", &self.t)
            .field("channels", &self.c)
            .field("layers", &self.layers.len())
            .finish()
    }
}
