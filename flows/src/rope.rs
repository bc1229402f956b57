//! Rotary position embeddings as ml-starflow builds them: each query and key head is rotated
//! pairwise by angles that depend on its sequence position's (row, column) in the token grid
//! and, when the model reads text, a third "text position" axis.
//!
//! Head width hd: without text, the hd/2 angles are hd/4 row frequencies then hd/4 column
//! frequencies, `f_i = 10000^(−2i/(hd/2))`; with text, hd/2 − 8 of them share the two image
//! axes the same way and the last 8, `g_j = 10000^(−j/8)`, rotate by text position. Text rows
//! sit at (0, 0, j·S/L) and image token t at (t / S, t mod S, 0), S the grid side. The angles
//! follow the *sequence* position, not the token's place in the image: a reversed block
//! rotates its first token as raster position 0, as upstream does.

use crate::config::ModelConfig;
use crate::error::Result;
use candle_core::{DType, Device, Tensor, D};

/// Rotation tables of one block: `cos` and `sin` (S, hd/2) for its S = L + T positions.
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
    /// Pairs (d, d + hd/2) instead of (2i, 2i + 1).
    halves: bool,
    /// The host tables of [`Self::rotation`], made once: every training step's fused layers
    /// read them.
    host: std::sync::OnceLock<std::sync::Arc<crate::kernels::rope::Rotation>>,
}

/// `10000^(−e)` in f32, as upstream computes its frequencies.
fn inv_freq(e: f32) -> f32 {
    1.0 / 10000f32.powf(e)
}

impl Rope {
    /// The tables of a block of `cfg` that reads `text` rows of text before its tokens.
    pub fn new(cfg: &ModelConfig, text: usize, device: &Device, dtype: DType) -> Result<Self> {
        let side = cfg.img_size / cfg.patch_size.max(1);
        let half = cfg.head_dim / 2;
        let with_text_axis = cfg.txt_size > 0;
        let img = if with_text_axis { half - 8 } else { half };
        let f: Vec<f32> = (0..img / 2)
            .map(|i| inv_freq((2 * i) as f32 / img as f32))
            .collect();
        let g: Vec<f32> = (0..8).map(|j| inv_freq(j as f32 / 8.0)).collect();
        // Upstream scales grid positions by pt_seq_len / mean side, both S here, in f32.
        let (s, l) = (side as f32, text.max(1) as f32);
        let grid = |i: usize| i as f32 / s * s;
        let mut angles = Vec::with_capacity((text + side * side) * half);
        let mut push = |px: f32, py: f32, pt: f32| {
            angles.extend(f.iter().map(|f| px * f));
            angles.extend(f.iter().map(|f| py * f));
            if with_text_axis {
                angles.extend(g.iter().map(|g| pt * g));
            }
        };
        for j in 0..text {
            push(0.0, 0.0, j as f32 / l * s);
        }
        for t in 0..side * side {
            push(grid(t / side), grid(t % side), 0.0);
        }
        let rows = text + side * side;
        let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
        let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
        let table = |v: Vec<f32>| -> Result<Tensor> {
            crate::device::upload_vec(v, (rows, half), device, dtype)
        };
        Ok(Self {
            cos: table(cos)?,
            sin: table(sin)?,
            halves: cfg.hf_style_rope,
            host: Default::default(),
        })
    }

    /// `x` (N, H, S', hd) rotated as sequence positions `from .. from + S'`.
    pub fn apply(&self, x: &Tensor, from: usize) -> Result<Tensor> {
        let s = x.dim(2)?;
        let cos = self.cos.narrow(0, from, s)?.to_dtype(x.dtype())?;
        let sin = self.sin.narrow(0, from, s)?.to_dtype(x.dtype())?;
        let x = x.contiguous()?;
        // candle's fused kernels have no backward; training takes the composed form.
        Ok(match (self.halves, x.track_op()) {
            (false, false) => {
                candle_nn::rotary_emb::rope_i(&x, &cos.contiguous()?, &sin.contiguous()?)?
            }
            (true, false) => {
                candle_nn::rotary_emb::rope(&x, &cos.contiguous()?, &sin.contiguous()?)?
            }
            (false, true) => candle_nn::rotary_emb::rope_i_slow(&x, &cos, &sin)?,
            (true, true) => halves_slow(&x, &cos, &sin)?,
        })
    }
}

impl Rope {
    /// The tables on the host, for the CPU engine, shared.
    pub fn shared_rotation(&self) -> Result<std::sync::Arc<crate::kernels::rope::Rotation>> {
        if let Some(r) = self.host.get() {
            return Ok(r.clone());
        }
        let r = std::sync::Arc::new(self.rotation()?);
        Ok(self.host.get_or_init(|| r).clone())
    }

    /// The tables on the host, for the CPU engine.
    pub fn rotation(&self) -> Result<crate::kernels::rope::Rotation> {
        let host = |t: &Tensor| -> Result<Vec<f32>> {
            Ok(crate::device::to_host(t)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?)
        };
        let half = self.cos.dim(1)?;
        Ok(crate::kernels::rope::Rotation::new(
            host(&self.cos)?,
            host(&self.sin)?,
            half,
            self.halves,
        ))
    }
}

/// Hugging Face's rotation `x·cos + rotate_half(x)·sin` from differentiable ops.
fn halves_slow(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let hd = x.dim(D::Minus1)?;
    let (a, b) = (
        x.narrow(D::Minus1, 0, hd / 2)?,
        x.narrow(D::Minus1, hd / 2, hd / 2)?,
    );
    let ya = (a.broadcast_mul(cos)? - b.broadcast_mul(sin)?)?;
    let yb = (b.broadcast_mul(cos)? + a.broadcast_mul(sin)?)?;
    Ok(Tensor::cat(&[ya, yb], D::Minus1)?)
}
