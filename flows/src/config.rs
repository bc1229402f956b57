//! Model configuration (serde), mirroring `transformer_flow.Model`'s constructor.

use crate::error::{FlowError, Result};
use serde::{Deserialize, Serialize};

fn default_head_dim() -> usize {
    64
}
fn default_mlp_ratio() -> usize {
    4
}
fn default_true() -> bool {
    true
}

/// Token order of each block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Permutation {
    /// TarFlow: even blocks raster order, odd blocks reversed.
    #[default]
    Alternate,
    /// STARFlow (`seq_order = L2R`): the deep last block in raster order, shallow block i
    /// reversed when i is even.
    Starflow,
    /// Every block in raster order (an ablation).
    None,
    /// ml-starflow's `seq_order = "L2R"`: block k reversed when k is even, the deep block
    /// included (equal to `starflow` when `num_blocks` is even). Its `"R2L"` is `alternate`.
    L2r,
}

/// How the head's first half becomes the log-scale α.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScaleHead {
    /// TarFlow: α is the raw output, `z = (x − μ)·exp(−α)`.
    #[default]
    Exp,
    /// STARFlow: `σ = softplus(a + 0.5413)`, `z = (x − μ)/σ` (α = ln σ); the head output is
    /// soft-clipped at 4 unless `soft_clip` says otherwise.
    Softplus,
}

/// The norm before each attention and MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NormKind {
    /// LayerNorm with scale and shift (ml-tarflow).
    #[default]
    LayerNorm,
    /// RMSNorm `x·rsqrt(mean(x²) + 1e-6)·(1 + w)` (ml-starflow `norm_type = "rms_norm"`).
    RmsNorm,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// Shape and options of a TarFlow model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Image channels C (3 for RGB, 1 for MNIST).
    pub in_channels: usize,
    /// Square image side S in pixels.
    pub img_size: usize,
    /// Square patch side p; S must be a multiple of p.
    pub patch_size: usize,
    /// Transformer width (ml-tarflow's `channels`); a multiple of `head_dim`.
    pub channels: usize,
    /// Number of flow blocks K.
    pub num_blocks: usize,
    /// Transformer layers in every block (ignored when `layers` is given).
    #[serde(default)]
    pub layers_per_block: usize,
    /// Per-block layer counts in x→z order (STARFlow deep-shallow: `[2,2,2,18]`); overrides `layers_per_block`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers: Option<Vec<usize>>,
    /// Attention head width.
    #[serde(default = "default_head_dim")]
    pub head_dim: usize,
    /// MLP hidden width as a multiple of `channels`.
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: usize,
    /// Number of classes; 0 for an unconditional model.
    #[serde(default)]
    pub num_classes: usize,
    /// Affine (true) or volume-preserving shift-only (false) coupling.
    #[serde(default = "default_true")]
    pub nvp: bool,
    /// Token order of each block (STARFlow: `starflow`).
    #[serde(default, skip_serializing_if = "is_default")]
    pub permutation: Permutation,
    /// Scale parameterisation (STARFlow: `softplus`).
    #[serde(default, skip_serializing_if = "is_default")]
    pub scale: ScaleHead,
    /// A learned start-of-sequence token in input space instead of TarFlow's zero shift, so
    /// that the first token is transformed too (STARFlow `sos`; key `blocks.{k}.sos_embed`).
    #[serde(default, skip_serializing_if = "is_default")]
    pub sos: bool,
    /// RMSNorm `x·rsqrt(mean(x²) + 1e-6)·(1 + w)` before the output projection
    /// (key `blocks.{k}.final_norm.weight`, w = 0 at init).
    #[serde(default, skip_serializing_if = "is_default")]
    pub final_norm: bool,
    /// Class or text conditioning only in the deep (last) block; shallow blocks are
    /// unconditional (ml-starflow `cond_top_only`).
    #[serde(default, skip_serializing_if = "is_default")]
    pub cond_deep_only: bool,
    /// Rotary position embeddings on queries and keys in place of the learned `pos_embed`
    /// (ml-starflow `rope`): 2-D (row, column), plus a text axis when `txt_size > 0`.
    #[serde(default, skip_serializing_if = "is_default")]
    pub rope: bool,
    /// Rotate dimension d with d + head_dim/2 (Hugging Face's pairing) instead of 2i with
    /// 2i + 1 (ml-starflow `hf_style_rope`).
    #[serde(default, skip_serializing_if = "is_default")]
    pub hf_style_rope: bool,
    /// Text-prefix tokens per row (ml-starflow `txt_size`); 0: no text.
    #[serde(default, skip_serializing_if = "is_default")]
    pub txt_size: usize,
    /// Width of the text embeddings, projected to `channels` by `blocks.{k}.proj_txt`
    /// (ml-starflow `txt_dim`).
    #[serde(default, skip_serializing_if = "is_default")]
    pub txt_dim: usize,
    /// `o ← c·tanh(o/c)` on `proj_out`'s output (ml-starflow `soft_clip`); unset: 4 with the
    /// softplus head, off with exp. 0 turns it off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soft_clip: Option<f64>,
    /// The norm before each attention and MLP (ml-starflow `norm_type`).
    #[serde(default, skip_serializing_if = "is_default")]
    pub norm: NormKind,
    /// The MLP as `down(GELU_tanh(gate(x)) · up(x))` (ml-starflow `use_swiglu`).
    #[serde(default, skip_serializing_if = "is_default")]
    pub swiglu: bool,
    /// RMSNorm of each query and key head before the rotation (ml-starflow `use_qk_norm`).
    #[serde(default, skip_serializing_if = "is_default")]
    pub qk_norm: bool,
    /// RMSNorm of the attention's and the MLP's outputs before the residual add
    /// (ml-starflow `use_post_norm`).
    #[serde(default, skip_serializing_if = "is_default")]
    pub post_norm: bool,
    /// Query heads (ml-starflow `num_heads`); unset: `channels / head_dim`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_heads: Option<usize>,
    /// Key and value heads, each shared by `num_heads / num_kv_heads` query heads
    /// (grouped-query attention, ml-starflow `num_kv_heads`); unset: one per query head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_kv_heads: Option<usize>,
    /// Linear layers of the transformer without biases (ml-starflow `use_bias = False`).
    #[serde(default, skip_serializing_if = "is_default")]
    pub no_bias: bool,
    /// A patch's features as (row, col, channel), ml-starflow's layout, instead of ml-tarflow's
    /// (channel, row, col). Only the order of a token's dimensions changes.
    #[serde(default, skip_serializing_if = "is_default")]
    pub patch_channels_last: bool,
    /// Layers of the learnable self-denoiser (`learnable_self_denoiser.*`, a non-causal
    /// transformer predicting the scaled score; ml-starflow builds 8); 0: none.
    #[serde(default, skip_serializing_if = "is_default")]
    pub denoiser_layers: usize,
}

impl ModelConfig {
    /// The config of ml-tarflow's `Model(...)` with a uniform depth.
    pub fn new(
        in_channels: usize,
        img_size: usize,
        patch_size: usize,
        channels: usize,
        num_blocks: usize,
        layers_per_block: usize,
        num_classes: usize,
    ) -> Self {
        Self {
            in_channels,
            img_size,
            patch_size,
            channels,
            num_blocks,
            layers_per_block,
            layers: None,
            head_dim: 64,
            mlp_ratio: 4,
            num_classes,
            nvp: true,
            permutation: Permutation::Alternate,
            scale: ScaleHead::Exp,
            sos: false,
            final_norm: false,
            cond_deep_only: false,
            rope: false,
            hf_style_rope: false,
            txt_size: 0,
            txt_dim: 0,
            soft_clip: None,
            norm: NormKind::LayerNorm,
            swiglu: false,
            qk_norm: false,
            post_norm: false,
            num_heads: None,
            num_kv_heads: None,
            no_bias: false,
            patch_channels_last: false,
            denoiser_layers: 0,
        }
    }

    /// Checks every constraint; the error names the key and what was expected.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(FlowError::Config(m));
        if self.in_channels == 0 {
            return bad("in_channels must be ≥ 1".into());
        }
        if self.patch_size == 0
            || self.img_size == 0
            || !self.img_size.is_multiple_of(self.patch_size)
        {
            return bad(format!(
                "img_size ({}) must be a positive multiple of patch_size ({})",
                self.img_size, self.patch_size
            ));
        }
        if self.num_tokens() < 2 {
            return bad("img_size/patch_size must give at least 2 patches".into());
        }
        if self.head_dim == 0 || self.channels == 0 || !self.channels.is_multiple_of(self.head_dim)
        {
            return bad(format!(
                "channels ({}) must be a positive multiple of head_dim ({})",
                self.channels, self.head_dim
            ));
        }
        if self.mlp_ratio == 0 {
            return bad("mlp_ratio must be ≥ 1".into());
        }
        if self.num_blocks == 0 {
            return bad("num_blocks must be ≥ 1".into());
        }
        // Far beyond any real model; a config (or a checkpoint's metadata) claiming more is
        // corrupt, and must not make us enumerate or allocate what it claims.
        for (key, v, max) in [
            ("in_channels", self.in_channels, 64),
            ("img_size", self.img_size, 8192),
            ("channels", self.channels, 1 << 16),
            ("num_blocks", self.num_blocks, 1024),
            ("layers_per_block", self.layers_per_block, 1024),
            ("mlp_ratio", self.mlp_ratio, 64),
            ("num_classes", self.num_classes, 1 << 20),
            ("denoiser_layers", self.denoiser_layers, 1024),
        ] {
            if v > max {
                return bad(format!(
                    "{key} = {v} is beyond any real model; expected ≤ {max}"
                ));
            }
        }
        if let Some(l) = self
            .layers
            .as_ref()
            .and_then(|l| l.iter().find(|&&n| n > 1024))
        {
            return bad(format!("layers has an entry {l}; expected ≤ 1024"));
        }
        if let Some(c) = self.soft_clip {
            if !(c.is_finite() && c >= 0.0) {
                return bad(format!(
                    "soft_clip = {c}; expected a finite value ≥ 0 (0: off)"
                ));
            }
        }
        if (self.txt_size > 0) != (self.txt_dim > 0) {
            return bad(format!(
                "txt_size ({}) and txt_dim ({}) must both be 0 (no text) or both ≥ 1",
                self.txt_size, self.txt_dim
            ));
        }
        if self.txt_size > 4096 || self.txt_dim > 1 << 16 {
            return bad(format!(
                "txt_size = {}, txt_dim = {} are beyond any real model; expected ≤ 4096 and ≤ 65536",
                self.txt_size, self.txt_dim
            ));
        }
        if self.rope && !self.head_dim.is_multiple_of(4) {
            return bad(format!(
                "rope needs head_dim ({}) to be a multiple of 4 (two image axes of rotary pairs)",
                self.head_dim
            ));
        }
        if self.rope && self.txt_size > 0 && self.head_dim < 16 {
            return bad(format!(
                "rope with text needs head_dim ({}) ≥ 16: 16 of its dimensions rotate by text position",
                self.head_dim
            ));
        }
        let (h, kv) = (self.num_heads(), self.num_kv_heads());
        if h == 0 || h > 4096 || kv == 0 || !h.is_multiple_of(kv) {
            return bad(format!(
                "num_heads ({h}) must be a positive multiple of num_kv_heads ({kv}), at most 4096"
            ));
        }
        if self.hf_style_rope && !self.rope {
            return bad("hf_style_rope needs rope = true".into());
        }
        match &self.layers {
            Some(l) if l.len() != self.num_blocks => bad(format!(
                "layers has {} entries but num_blocks is {}",
                l.len(),
                self.num_blocks
            )),
            Some(l) if l.contains(&0) => bad("every entry of layers must be ≥ 1".into()),
            None if self.layers_per_block == 0 => {
                bad("layers_per_block must be ≥ 1 (or give a per-block `layers` list)".into())
            }
            _ => Ok(()),
        }
    }

    /// Parameter count from the shapes alone (arithmetic, so a huge claimed model costs
    /// nothing to size); within a few per cent of [`crate::params::count_params`].
    pub fn approx_params(&self) -> f64 {
        let (t, c, d) = (
            self.num_tokens() as f64,
            self.channels as f64,
            self.patch_dim() as f64,
        );
        let layers: f64 = (0..self.num_blocks)
            .map(|k| self.block_layers(k) as f64)
            .sum();
        let hd = self.head_dim as f64;
        let (q, kv) = (
            self.num_heads() as f64 * hd,
            self.num_kv_heads() as f64 * hd,
        );
        let mlp_mats = if self.swiglu { 3.0 } else { 2.0 };
        let per_layer = (q + 2.0 * kv) * c + q * c + mlp_mats * self.mlp_ratio as f64 * c * c;
        let pos = if self.rope { 0.0 } else { t * c };
        let per_block = pos + c * d + 2.0 * d * c + self.num_classes as f64 * c;
        let text = (0..self.num_blocks).filter(|&k| self.block_text(k)).count() as f64
            * self.txt_dim as f64
            * c;
        let denoiser = self.denoiser_layers as f64 * per_layer + 2.0 * c * d;
        layers * per_layer + self.num_blocks as f64 * per_block + text + denoiser
    }

    /// Number of tokens T = (S/p)².
    pub fn num_tokens(&self) -> usize {
        let g = self.img_size / self.patch_size.max(1);
        g * g
    }

    /// Patch vector width D = C·p².
    pub fn patch_dim(&self) -> usize {
        self.in_channels * self.patch_size * self.patch_size
    }

    /// Attention (query) heads per layer.
    pub fn num_heads(&self) -> usize {
        self.num_heads
            .unwrap_or(self.channels / self.head_dim.max(1))
    }

    /// Key and value heads per layer.
    pub fn num_kv_heads(&self) -> usize {
        self.num_kv_heads.unwrap_or(self.num_heads())
    }

    /// Whether every transformer layer is ml-tarflow's (LayerNorm, GELU MLP, biases, one key
    /// head per query head): the layout the CPU engine and the packed training variables have.
    pub fn plain_layers(&self) -> bool {
        self.norm == NormKind::LayerNorm
            && !(self.swiglu || self.qk_norm || self.post_norm || self.no_bias)
            && self.num_heads() * self.head_dim == self.channels
            && self.num_kv_heads() == self.num_heads()
    }

    /// Number of scalar dimensions of one image, n = C·S².
    pub fn dims_per_image(&self) -> usize {
        self.in_channels * self.img_size * self.img_size
    }

    /// Whether block k reads its tokens in reverse order.
    pub fn block_flipped(&self, k: usize) -> bool {
        match self.permutation {
            Permutation::Alternate => k % 2 == 1,
            Permutation::Starflow => k + 1 < self.num_blocks && k.is_multiple_of(2),
            Permutation::None => false,
            Permutation::L2r => k.is_multiple_of(2),
        }
    }

    /// Whether block k reads the text prefix.
    pub fn block_text(&self, k: usize) -> bool {
        self.txt_dim > 0 && (!self.cond_deep_only || k + 1 == self.num_blocks)
    }

    /// The soft clip constant of the head output (0: none).
    pub fn soft_clip(&self) -> f64 {
        match (self.soft_clip, self.scale) {
            (Some(c), _) => c,
            (None, ScaleHead::Softplus) => 4.0,
            (None, ScaleHead::Exp) => 0.0,
        }
    }

    /// Whether block k receives the class embedding.
    pub fn block_conditional(&self, k: usize) -> bool {
        self.num_classes > 0 && (!self.cond_deep_only || k + 1 == self.num_blocks)
    }

    /// Transformer depth of block k (x→z order).
    pub fn block_layers(&self, k: usize) -> usize {
        match &self.layers {
            Some(l) => l.get(k).copied().unwrap_or(0),
            None => self.layers_per_block,
        }
    }
}
