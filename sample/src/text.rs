//! Text conditioning from the command line: precomputed text embeddings in a safetensors file
//! (`y` (N, L, D), and optionally `y_null`, the unconditional prompt guidance contrasts them
//! with; zeros when absent), or random ones for benchmarks. Text encoders are not part of this
//! crate: embed the prompts with the model's encoder (flan-t5-xl for Apple's release) first.

use crate::error::{Result, SampleError};
use candle_core::Tensor;
use std::path::Path;
use tarflow_flows::cond::Text;
use tarflow_flows::{Cond, TarFlow};

/// Text embeddings on the model's device, one row per image.
#[derive(Debug, Clone)]
pub struct TextInput {
    /// The prompts (rows, L, D).
    pub y: Tensor,
    /// The unconditional prompt (1 or rows, L, D); zeros when none.
    pub null: Option<Tensor>,
}

impl TextInput {
    /// Reads `y` and the optional `y_null` from `path` and checks them against `model`.
    pub fn read(path: &Path, model: &TarFlow) -> Result<Self> {
        let map = crate::safetensors_file::read_file(path)?;
        let cfg = model.config();
        let (l, d) = (cfg.txt_size, cfg.txt_dim);
        if d == 0 {
            return Err(SampleError::file(
                path,
                "this model reads no text (txt_dim = 0); leave --text out",
            ));
        }
        let want = format!("(N, {l}, {d}) text embeddings");
        let y = crate::safetensors_file::named(&map, "y", path, &want)?;
        let fits = |t: &Tensor, rows: Option<usize>| match t.dims() {
            [n, ll, dd] => (*ll, *dd) == (l, d) && rows.is_none_or(|r| *n == 1 || *n == r),
            _ => false,
        };
        if !fits(y, None) || y.dim(0)? == 0 {
            return Err(SampleError::file(
                path,
                format!("`y` has shape {:?}, expected (N, {l}, {d}): N prompts of {l} embeddings of width {d}", y.dims()),
            ));
        }
        let n = y.dim(0)?;
        let null = match map.get("y_null") {
            Some(u) if !fits(u, Some(n)) => {
                return Err(SampleError::file(
                    path,
                    format!(
                        "`y_null` has shape {:?}, expected (1 or {n}, {l}, {d})",
                        u.dims()
                    ),
                ))
            }
            Some(u) => Some(u),
            None => None,
        };
        let up = |t: &Tensor| -> Result<Tensor> {
            Ok(tarflow_flows::device::upload(
                t,
                model.device(),
                model.dtype(),
            )?)
        };
        Ok(Self {
            y: up(y)?,
            null: null.map(up).transpose()?,
        })
    }

    /// `n` rows of N(0, 1) embeddings from `seed` (benchmarks without a text encoder).
    pub fn random(model: &TarFlow, n: usize, seed: u64) -> Result<Self> {
        let cfg = model.config();
        let mut rng = tarflow_flows::rng::seeded(seed);
        let y = tarflow_flows::rng::randn(
            &mut rng,
            (n, cfg.txt_size, cfg.txt_dim),
            1.0,
            model.device(),
        )?
        .to_dtype(model.dtype())?;
        Ok(Self { y, null: None })
    }

    /// The prompts cycled (with their unconditional rows) to `n` rows: row i reads prompt
    /// i mod N.
    pub fn rows(&self, n: usize) -> Result<Self> {
        let cycle = |t: &Tensor| -> Result<Tensor> {
            let have = t.dim(0)?;
            if have == n {
                return Ok(t.clone());
            }
            let idx: Vec<u32> = (0..n).map(|i| (i % have) as u32).collect();
            let idx = Tensor::from_vec(idx, n, t.device())?;
            Ok(t.index_select(&idx, 0)?)
        };
        Ok(Self {
            y: cycle(&self.y)?,
            null: self.null.as_ref().map(cycle).transpose()?,
        })
    }

    /// The prompts of `rows` (and their unconditional rows), in that order.
    pub fn select(&self, rows: &[usize]) -> Result<Self> {
        let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let pick = |t: &Tensor| -> Result<Tensor> {
            let i = Tensor::from_vec(idx.clone(), idx.len(), t.device())?;
            Ok(t.index_select(&i, 0)?)
        };
        Ok(Self {
            y: pick(&self.y)?,
            null: self.null.as_ref().map(pick).transpose()?,
        })
    }

    /// The same embeddings on the host (for the f64 recomputation, which runs there).
    pub fn to_host(&self) -> Result<Self> {
        let host = |t: &Tensor| -> Result<Tensor> { Ok(tarflow_flows::device::to_host(t)?) };
        Ok(Self {
            y: host(&self.y)?,
            null: self.null.as_ref().map(host).transpose()?,
        })
    }

    /// The conditioning of the pass over rows `from ..` of these embeddings.
    pub fn cond(&self, from: usize) -> Cond<'_> {
        Cond::Text(Text {
            y: &self.y,
            null: self.null.as_ref(),
            from,
        })
    }
}

/// Whether `model` needs text embeddings, and an error naming `--text` where none were given.
pub fn require(model: &TarFlow, text: Option<&TextInput>) -> Result<()> {
    let c = model.config();
    if c.txt_dim > 0 && text.is_none() {
        return Err(SampleError::Option(format!(
            "this model reads a text prefix ({} embeddings of width {}): give --text FILE.safetensors with `y` (N, {}, {})",
            c.txt_size, c.txt_dim, c.txt_size, c.txt_dim
        )));
    }
    Ok(())
}
