//! The KV-cached inverse of one block in plain f32 on the CPU, with every buffer allocated
//! once per block: the sequential sampler runs T steps of a few tiny matrix products, where
//! candle's per-op dispatch and allocation cost more than the arithmetic.
//!
//! Guidance runs the conditional and unconditional rows as one batch of 2N rows. The
//! composed-op path of [`crate::model::TarFlow`] stays the reference (and the path on other
//! devices and dtypes); tests hold the two equal.

use crate::block::MetaBlock;
use crate::error::Result;
use crate::gelu::erf_f32;
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

    /// `out (rows × n) = x (rows × k) · W + b`.
    fn apply(&self, x: &[f32], rows: usize, out: &mut [f32]) {
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
                gemm::Parallelism::None,
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
        let p = block.parts();
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
            let a = l.parts();
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
        // Tokens in this block's order.
        let mut x = vec![0f32; n * t * d];
        for r in 0..n {
            for i in 0..t {
                let src = if self.flipped { t - 1 - i } else { i };
                x[(r * t + i) * d..(r * t + i + 1) * d]
                    .copy_from_slice(&s[(r * t + src) * d..(r * t + src + 1) * d]);
            }
        }
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
                for v in mlp.iter_mut() {
                    *v = 0.5 * *v * (1.0 + erf_f32(*v * std::f32::consts::FRAC_1_SQRT_2));
                }
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
        // Back to canonical order.
        let mut out = vec![0f32; n * t * d];
        for r in 0..n {
            for i in 0..t {
                let dst = if self.flipped { t - 1 - i } else { i };
                out[(r * t + dst) * d..(r * t + dst + 1) * d]
                    .copy_from_slice(&x[(r * t + i) * d..(r * t + i + 1) * d]);
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
