//! Causal multi-head attention straight from the packed qkv projection (N·T rows of 3C) to the
//! heads-concatenated output (N·T rows of C): `softmax(QKᵀ·s + causal)V` per sample and head,
//! with no mask tensor and no transposed copies; and its backward from the saved probabilities
//! P: `dV = Pᵀ dO`, `dS = P ⊙ (dO Vᵀ − rowsum(P ⊙ dO Vᵀ))`, `dQ = s·dS K`, `dK = s·dSᵀ Q`.

use super::gemm_strided;
use rayon::prelude::*;

/// The attention's shape: heads of `hd` values, scores multiplied by `scale`, `t` positions.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Attn {
    /// Number of heads.
    pub heads: usize,
    /// Values per head.
    pub hd: usize,
    /// Score scale (1/√hd over the temperature).
    pub scale: f32,
    /// Sequence length.
    pub t: usize,
}

impl Attn {
    /// The causal products' row blocks, (first row, rows, columns), those with rows: the first
    /// half of the rows attends to the first half of the positions only, so its products stop
    /// there (a quarter of the attention's multiply-adds are above the diagonal). The split is
    /// a whole number of 16-value chunks, so that the softmax's chunks read only computed
    /// scores; up to T = 32 there is one block.
    fn blocks(&self) -> impl Iterator<Item = (usize, usize, usize)> {
        let t = self.t;
        let top = ((t / 2).div_ceil(16) * 16).min(t);
        [(0, top, top), (top, t - top, t)]
            .into_iter()
            .filter(|&(_, rows, _)| rows > 0)
    }

    /// `s = scale · X Yᵀ` (T×T, rows of T) on and below the diagonal's blocks, for X and Y
    /// rows of `hd` values `x_rs`/`y_rs` apart (QKᵀ, dO Vᵀ). The top block's rows are left as
    /// they were past its columns.
    ///
    /// # Safety
    /// X and Y hold T rows at their strides; `s` holds T×T values.
    unsafe fn scores(
        &self,
        (x, x_rs): (*const f32, usize),
        (y, y_rs): (*const f32, usize),
        s: *mut f32,
        scale: f32,
    ) {
        for (r0, rows, cols) in self.blocks() {
            gemm_strided(
                (rows, cols, self.hd),
                s.add(r0 * self.t),
                self.t,
                false,
                (x.add(r0 * x_rs), x_rs, 1),
                (y, 1, y_rs),
                scale,
                false,
            );
        }
    }

    /// `dst = scale · A B` for A (T×T) zero above the diagonal (P, dS) and B rows of `hd`
    /// values (PV, dS K): each row block reads B's rows up to its columns only.
    ///
    /// # Safety
    /// `a` holds T×T values, B and dst T rows of `hd` at their strides.
    unsafe fn lower_times(
        &self,
        a: *const f32,
        (b, b_rs): (*const f32, usize),
        (dst, dst_rs): (*mut f32, usize),
        scale: f32,
    ) {
        for (r0, rows, cols) in self.blocks() {
            gemm_strided(
                (rows, self.hd, cols),
                dst.add(r0 * dst_rs),
                dst_rs,
                false,
                (a.add(r0 * self.t), self.t, 1),
                (b, b_rs, 1),
                scale,
                false,
            );
        }
    }

    /// `dst = scale · Aᵀ B` for A (T×T) zero above the diagonal (Pᵀ dO, dSᵀ Q): the rows j0..
    /// of dst sum over positions j0.. only.
    ///
    /// # Safety
    /// As [`Self::lower_times`].
    unsafe fn lower_t_times(
        &self,
        a: *const f32,
        (b, b_rs): (*const f32, usize),
        (dst, dst_rs): (*mut f32, usize),
        scale: f32,
    ) {
        let t = self.t;
        for (j0, rows, _) in self.blocks() {
            gemm_strided(
                (rows, self.hd, t - j0),
                dst.add(j0 * dst_rs),
                dst_rs,
                false,
                (a.add(j0 * t + j0), 1, t),
                (b.add(j0 * b_rs), b_rs, 1),
                scale,
                false,
            );
        }
    }

    /// Causal softmax probabilities P (T×T) of one sample's head `h` into `p`.
    fn probs(&self, qkv: &[f32], h: usize, p: &mut [f32]) {
        let (c, t) = (self.heads * self.hd, self.t);
        let (q, k) = (h * self.hd, c + h * self.hd);
        // SAFETY: T rows of 3C hold Q and K at offsets q, k; P is T×T.
        unsafe {
            let qkv = qkv.as_ptr();
            self.scores(
                (qkv.add(q), 3 * c),
                (qkv.add(k), 3 * c),
                p.as_mut_ptr(),
                self.scale,
            );
        }
        // The top block's rows past column `top` are left as they were; the softmax selects
        // them away and writes zeros there.
        super::causal_softmax(&mut p[..t * t], t);
    }

    /// The attention of every sample of `qkv` into `out`, one sample per task; the
    /// probabilities are kept in `probs` (N·heads·T·T, sample-major) when given. With `bias`
    /// (3C), `qkv` is a product without its bias, which each task adds to its sample's rows
    /// first: they are then in cache for its products, where a fill before the product would
    /// stream the whole of qkv through memory once more.
    pub(crate) fn forward(
        &self,
        qkv: &mut [f32],
        bias: Option<&[f32]>,
        out: &mut [f32],
        probs: Option<&mut [f32]>,
    ) {
        self.forward_into(qkv, bias, (out, self.heads * self.hd), probs)
    }

    /// [`Self::forward`] into rows `out_rs` ≥ C apart, whose values past C are left as they
    /// are (the trunk keeps a column of ones there for the next product's bias).
    pub(crate) fn forward_into(
        &self,
        qkv: &mut [f32],
        bias: Option<&[f32]>,
        (out, out_rs): (&mut [f32], usize),
        probs: Option<&mut [f32]>,
    ) {
        let (c, t) = (self.heads * self.hd, self.t);
        let tt = t * t;
        let one = |((o, qkv), p): ((&mut [f32], &mut [f32]), &mut [f32])| {
            if let Some(b) = bias {
                super::add_to_rows(qkv, b);
            }
            let qkv = &*qkv;
            for h in 0..self.heads {
                let p = &mut p[h * tt..(h + 1) * tt];
                self.probs(qkv, h, p);
                let v = 2 * c + h * self.hd;
                // SAFETY: O rows of out_rs at the head's offset, V rows of 3C at offset v, P
                // T×T, all inside the sample's T rows.
                unsafe {
                    let dst = o.as_mut_ptr().add(h * self.hd);
                    self.lower_times(p.as_ptr(), (qkv.as_ptr().add(v), 3 * c), (dst, out_rs), 1.0);
                }
            }
        };
        let tasks = out
            .par_chunks_mut(t * out_rs)
            .zip(qkv.par_chunks_mut(t * 3 * c));
        match probs {
            Some(p) => tasks
                .zip(p.par_chunks_mut(self.heads * tt))
                .for_each(|((o, q), p)| one(((o, q), p))),
            None => tasks.for_each(|(o, q)| one(((o, q), &mut vec![0f32; self.heads * tt]))),
        }
    }

    /// Whether [`Self::forward`] should keep the probabilities for the backward: when they take
    /// no more memory than qkv (T ≤ 3·hd), else the backward recomputes them (long sequences:
    /// T = 1024 would keep N·heads·4 MiB per layer).
    pub(crate) fn keeps_probs(&self) -> bool {
        self.t <= 3 * self.hd
    }

    /// The gradient `d` (N·T rows of 3C, overwritten) of the packed projection for the output
    /// gradient `g`, from the probabilities [`Self::forward`] kept (recomputed when `None`);
    /// `db` (3C) receives the column sums of `d`, the projection bias's gradient, summed by
    /// each sample's task while its rows are in cache and added in sample order.
    pub(crate) fn backward(
        &self,
        qkv: &[f32],
        probs: Option<&[f32]>,
        g: &[f32],
        d: &mut [f32],
        db: &mut [f32],
    ) {
        let (c, t, hd) = (self.heads * self.hd, self.t, self.hd);
        let (c3, tt) = (3 * c, t * t);
        let partial: Vec<Vec<f32>> = d
            .par_chunks_mut(t * c3)
            .zip(qkv.par_chunks(t * c3).zip(g.par_chunks(t * c)))
            .enumerate()
            .map(|(i, (d, (qkv, g)))| {
                let mut dp = vec![0f32; tt];
                let mut own = Vec::new();
                for h in 0..self.heads {
                    let p: &[f32] = match probs {
                        Some(all) => &all[(i * self.heads + h) * tt..(i * self.heads + h + 1) * tt],
                        None => {
                            own.resize(tt, 0.0);
                            self.probs(qkv, h, &mut own);
                            &own
                        }
                    };
                    let (qo, ko, vo, go) = (h * hd, c + h * hd, 2 * c + h * hd, h * hd);
                    // SAFETY (all products): T rows of hd values at the given offsets of rows
                    // of 3C (qkv, d) or C (g); P and dP are T×T.
                    unsafe {
                        let (q, g, dp, d) =
                            (qkv.as_ptr(), g.as_ptr(), dp.as_mut_ptr(), d.as_mut_ptr());
                        // dP = dO Vᵀ, dV = Pᵀ dO
                        self.scores((g.add(go), c), (q.add(vo), c3), dp, 1.0);
                        self.lower_t_times(p.as_ptr(), (g.add(go), c), (d.add(vo), c3), 1.0);
                    }
                    softmax_backward(p, &mut dp, t);
                    unsafe {
                        let (q, dp, d) = (qkv.as_ptr(), dp.as_ptr(), d.as_mut_ptr());
                        // dQ = s·dS K, dK = s·dSᵀ Q
                        self.lower_times(dp, (q.add(ko), c3), (d.add(qo), c3), self.scale);
                        self.lower_t_times(dp, (q.add(qo), c3), (d.add(ko), c3), self.scale);
                    }
                }
                let mut acc = vec![0f32; c3];
                super::sum_rows_into(d, &mut acc);
                acc
            })
            .collect();
        super::sum_partials(partial, db);
    }
}

crate::kernels::simd_clones! {
/// dS = P ⊙ (dP − rowsum(P ⊙ dP)) in place of dP, for causal T×T rows: zero above the
/// diagonal, where P is, written without reading dP there (its products stop at the blocks).
fn softmax_backward(p: &[f32], dp: &mut [f32], t: usize) {
    for (i, (pr, dr)) in p.chunks_exact(t).zip(dp.chunks_exact_mut(t)).enumerate() {
        let (dr, above) = dr.split_at_mut(i + 1);
        let dot = super::dot16(&pr[..=i], dr);
        for (d, &p) in dr.iter_mut().zip(pr) {
            *d = p * (*d - dot);
        }
        above.fill(0.0);
    }
}
}
