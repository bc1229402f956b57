//! The CPU step engine of the sequential inverse: "the head output for position i of these
//! rows", from the input token through `proj_in`, the position and class embeddings, the trunk
//! ([`super::trunk`]), the final norm and `proj_out`, on buffers kept for the whole inverse. What
//! the head output means (α, μ, guidance, the affine update) is the caller's (`MetaBlock` and
//! the model's inverse), exactly as for candle's KV-cache step.

use super::rope::Rotation;
use super::trunk::{DenseT, Trunk, TrunkStep};
use super::LayerParts;
use crate::error::Result;
use candle_core::Tensor;

/// What a block adds around its trunk, for one inverse of `rows` rows.
pub struct StepParts<'a> {
    /// The block's weights in the engine's layout.
    pub weights: std::sync::Arc<StepWeights>,
    /// Position embeddings (T, C) in canonical order, unless positions are rotary.
    pub pos: Option<&'a Tensor>,
    /// The projected text rows before the tokens (rows, L, C), where the block reads text.
    pub text: Option<&'a Tensor>,
    /// Whether the block reads the tokens reversed.
    pub flipped: bool,
    /// Class embedding per row (rows, 1, C).
    pub cls: Option<&'a Tensor>,
    /// STARFlow's final RMSNorm weight w (the scale is 1 + w).
    pub final_norm: Option<&'a Tensor>,
}

/// A block's weights laid out for the CPU engine (its trunk and projections as Wᵀ), made once
/// per model where its weights are frozen.
pub struct StepWeights {
    trunk: Trunk,
    proj_in: DenseT,
    proj_out: DenseT,
    rot: Option<Rotation>,
}

impl StepWeights {
    /// Lays out a block's transformer `layers` and its projections, with the rotary tables of
    /// its positions where it has them.
    pub fn new(
        layers: &[LayerParts],
        proj_in: (&Tensor, &Tensor),
        proj_out: (&Tensor, &Tensor),
        rot: Option<Rotation>,
    ) -> Result<Self> {
        Ok(Self {
            trunk: Trunk::new(layers)?,
            proj_in: DenseT::new(proj_in)?,
            proj_out: DenseT::new(proj_out)?,
            rot,
        })
    }
}

impl std::fmt::Debug for StepWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepWeights")
            .field("inputs", &self.proj_in.k())
            .finish()
    }
}

/// The step engine's state: caches and buffers, and the weights it reads.
pub struct StepKernel {
    trunk: TrunkStep,
    weights: std::sync::Arc<StepWeights>,
    /// Empty with rotary positions.
    pos: Vec<f32>,
    /// Text rows in the caches before the tokens.
    text_len: usize,
    flipped: bool,
    cls: Option<Vec<f32>>,
    rms: Option<Vec<f32>>,
    rows: usize,
    t: usize,
    c: usize,
    h: Vec<f32>,
}

impl StepKernel {
    /// The engine for `rows` rows of `t` tokens; row r's attention scores are divided by
    /// `temps[r]`. The text rows, where there are some, fill the caches first.
    pub fn new(p: StepParts, rows: usize, t: usize, temps: &[f64]) -> Result<Self> {
        let c = p.weights.proj_out.k();
        let text_len = match p.text {
            Some(y) => y.dim(1)?,
            None => 0,
        };
        let mut trunk = p.weights.trunk.stepper(rows, text_len + t, temps);
        if let Some(y) = p.text {
            let y = y.to_dtype(candle_core::DType::F32)?;
            for j in 0..text_len {
                let mut hj = y.narrow(1, j, 1)?.flatten_all()?.to_vec1::<f32>()?;
                p.weights
                    .trunk
                    .step(&mut trunk, &mut hj, j, p.weights.rot.as_ref())?;
            }
        }
        Ok(Self {
            trunk,
            pos: match p.pos {
                Some(pe) => pe.flatten_all()?.to_vec1()?,
                None => Vec::new(),
            },
            weights: p.weights,
            text_len,
            flipped: p.flipped,
            cls: p.cls.map(|c| c.flatten_all()?.to_vec1()).transpose()?,
            rms: p.final_norm.map(|w| (w + 1.0)?.to_vec1()).transpose()?,
            rows,
            t,
            c,
            h: vec![0f32; rows * c],
        })
    }

    /// The head output (rows × W) for position `i`, given the rows' input tokens `x` (rows × D).
    pub fn step(&mut self, x: &[f32], i: usize) -> Result<Vec<f32>> {
        let (rows, c) = (self.rows, self.c);
        let w = self.weights.clone();
        let k = w.proj_in.k();
        if x.len() != rows * k {
            return Err(crate::error::FlowError::Input(format!(
                "step {i}: {} input values for {rows} rows of {k}",
                x.len()
            )));
        }
        w.proj_in.apply(x, rows, &mut self.h, false);
        let p = if self.flipped { self.t - 1 - i } else { i };
        let pos = self.pos.get(p * c..(p + 1) * c).unwrap_or(&[]);
        for (r, hr) in self.h.chunks_exact_mut(c).enumerate() {
            add_embeddings(hr, pos, self.cls.as_deref(), r);
        }
        let at = self.text_len + i;
        w.trunk
            .step(&mut self.trunk, &mut self.h, at, w.rot.as_ref())?;
        if let Some(g) = &self.rms {
            rms_norm(&mut self.h, g);
        }
        let mut out = vec![0f32; rows * w.proj_out.b.len()];
        w.proj_out.apply(&self.h, rows, &mut out, false);
        Ok(out)
    }
}

/// Adds a position embedding (none where `pos` is empty: rotary positions) and the class
/// embedding of row `r` (one shared row when `cls` holds a single one) to the hidden vector `h`.
fn add_embeddings(h: &mut [f32], pos: &[f32], cls: Option<&[f32]>, r: usize) {
    h.iter_mut().zip(pos).for_each(|(a, e)| *a += e);
    if let Some(cls) = cls {
        let c = h.len();
        let k = if cls.len() > c { r } else { 0 };
        h.iter_mut()
            .zip(&cls[k * c..(k + 1) * c])
            .for_each(|(a, e)| *a += e);
    }
}

/// STARFlow's final RMSNorm `x·rsqrt(mean(x²) + 1e-6)·g` (g = 1 + w) of each row, in place.
fn rms_norm(h: &mut [f32], g: &[f32]) {
    let c = g.len();
    for hr in h.chunks_exact_mut(c) {
        let ms = hr.iter().map(|v| v * v).sum::<f32>() / c as f32;
        let inv = 1.0 / (ms + 1e-6).sqrt();
        hr.iter_mut().zip(g).for_each(|(v, g)| *v *= inv * g);
    }
}

/// The head output (N·T × W) of every position of `x` (N·T × D, block order) in one causal
/// pass: what the step engine answers position by position, for the forward pass.
pub fn heads(p: &StepParts, x: &[f32], (n, t): (usize, usize), temp: f64) -> Result<Vec<f32>> {
    use rayon::prelude::*;
    let w = &p.weights;
    let c = w.proj_out.k();
    let mut h = super::pool::take(n * t * c);
    w.proj_in.apply(x, n * t, &mut h, true);
    let pos = match p.pos {
        Some(pe) => pe.flatten_all()?.to_vec1::<f32>()?,
        None => Vec::new(),
    };
    let cls = p
        .cls
        .map(|c| c.flatten_all()?.to_vec1::<f32>())
        .transpose()?;
    let total = pos.len() / c;
    h.par_chunks_mut(t * c).enumerate().for_each(|(r, hr)| {
        for (i, hi) in hr.chunks_exact_mut(c).enumerate() {
            let q = if p.flipped {
                total.saturating_sub(1 + i)
            } else {
                i
            };
            add_embeddings(
                hi,
                pos.get(q * c..(q + 1) * c).unwrap_or(&[]),
                cls.as_deref(),
                r,
            );
        }
    });
    let mut h = match p.text {
        // Each sample's text rows, then its tokens: one sequence of L + T.
        Some(y) => {
            let l = y.dim(1)?;
            let y = y
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let mut joined = super::pool::take(n * (l + t) * c);
            joined
                .par_chunks_mut((l + t) * c)
                .zip(h.par_chunks(t * c))
                .zip(y.par_chunks(l * c))
                .for_each(|((s, hs), ys)| {
                    s[..l * c].copy_from_slice(ys);
                    s[l * c..].copy_from_slice(hs);
                });
            w.trunk.forward(&mut joined, n, l + t, temp, w.rot.as_ref());
            h.par_chunks_mut(t * c)
                .zip(joined.par_chunks((l + t) * c))
                .for_each(|(hs, s)| hs.copy_from_slice(&s[l * c..]));
            h
        }
        None => {
            w.trunk.forward(&mut h, n, t, temp, w.rot.as_ref());
            h
        }
    };
    if let Some(g) = p.final_norm {
        rms_norm(&mut h, &(g + 1.0)?.to_vec1::<f32>()?);
    }
    let mut out = vec![0f32; n * t * w.proj_out.b.len()];
    w.proj_out.apply(&h, n * t, &mut out, true);
    Ok(out)
}
