//! The encoder and decoder of diffusers' `AutoencoderKL`, from candle-transformers' public
//! stable-diffusion blocks (ResNet, down- and up-sampling levels) and an attention of our own.
//!
//! Why not candle-transformers' `AutoEncoderKL` whole: its `encode` returns only a distribution
//! to draw from (the flow's data needs the mean and std), and its VAE attention applies `Linear`
//! to a transposed (N, HW, C) view, which candle 0.11's CPU matmul computes wrongly when the
//! weight is broadcast over the batch (huggingface/candle#3744): its outputs were off by 0.14
//! against diffusers. The attention here makes the view contiguous first.

use super::AutoencoderConfig;
use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, GroupNorm, Linear, VarBuilder};
use candle_transformers::models::stable_diffusion::resnet::{ResnetBlock2D, ResnetBlock2DConfig};
use candle_transformers::models::stable_diffusion::unet_2d_blocks::{
    DownEncoderBlock2D, DownEncoderBlock2DConfig, UpDecoderBlock2D, UpDecoderBlock2DConfig,
};

/// diffusers' epsilon of every GroupNorm of the autoencoder.
const EPS: f64 = 1e-6;

fn pad1() -> Conv2dConfig {
    Conv2dConfig {
        padding: 1,
        ..Default::default()
    }
}

/// One-head self-attention over the pixels of a (N, C, H, W) map, with its residual. Reads
/// both namings of its projections: `to_q/to_k/to_v/to_out.0` and the older
/// `query/key/value/proj_attn`.
struct Attention {
    norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
}

impl Attention {
    fn new(c: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        let names = match vb.contains_tensor("to_q.weight") {
            true => ["to_q", "to_k", "to_v", "to_out.0"],
            false => ["query", "key", "value", "proj_attn"],
        };
        let lin = |n: &str| candle_nn::linear(c, c, vb.pp(n));
        Ok(Attention {
            norm: candle_nn::group_norm(groups, c, EPS, vb.pp("group_norm"))?,
            q: lin(names[0])?,
            k: lin(names[1])?,
            v: lin(names[2])?,
            out: lin(names[3])?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        // (N, C, H, W) → (N, HW, C), contiguous (see the module's note).
        let t = self
            .norm
            .forward(x)?
            .reshape((n, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let (q, k, v) = (
            self.q.forward(&t)?,
            self.k.forward(&t)?,
            self.v.forward(&t)?,
        );
        let s = (q.matmul(&k.t()?)? / (c as f64).sqrt())?;
        let a = candle_nn::ops::softmax_last_dim(&s)?.matmul(&v)?;
        let o = self
            .out
            .forward(&a)?
            .transpose(1, 2)?
            .reshape((n, c, h, w))?;
        o + x
    }
}

/// ResNet, attention, ResNet at the lowest resolution.
struct MidBlock {
    res0: ResnetBlock2D,
    attn: Attention,
    res1: ResnetBlock2D,
}

impl MidBlock {
    fn new(c: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        let cfg = ResnetBlock2DConfig {
            eps: EPS,
            groups,
            output_scale_factor: 1.0,
            temb_channels: None,
            ..Default::default()
        };
        Ok(MidBlock {
            res0: ResnetBlock2D::new(vb.pp("resnets.0"), c, cfg)?,
            attn: Attention::new(c, groups, vb.pp("attentions.0"))?,
            res1: ResnetBlock2D::new(vb.pp("resnets.1"), c, cfg)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.res0.forward(x, None)?;
        self.res1.forward(&self.attn.forward(&h)?, None)
    }
}

/// Images → the posterior's (mean, log-variance) stacked on the channels, `quant_conv`
/// included.
pub(super) struct Encoder {
    conv_in: Conv2d,
    down: Vec<DownEncoderBlock2D>,
    mid: MidBlock,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    quant_conv: Option<Conv2d>,
}

impl Encoder {
    pub(super) fn new(cfg: &AutoencoderConfig, vb: VarBuilder) -> Result<Self> {
        let (w, groups) = (&cfg.block_out_channels, cfg.norm_num_groups);
        let enc = vb.pp("encoder");
        let down = (0..w.len())
            .map(|i| {
                let block = DownEncoderBlock2DConfig {
                    num_layers: cfg.layers_per_block,
                    resnet_eps: EPS,
                    resnet_groups: groups,
                    add_downsample: i + 1 < w.len(),
                    downsample_padding: 0,
                    ..Default::default()
                };
                let from = w[i.saturating_sub(1)];
                DownEncoderBlock2D::new(enc.pp(format!("down_blocks.{i}")), from, w[i], block)
            })
            .collect::<Result<_>>()?;
        let (last, lat2) = (w[w.len() - 1], 2 * cfg.latent_channels);
        Ok(Encoder {
            conv_in: candle_nn::conv2d(cfg.in_channels, w[0], 3, pad1(), enc.pp("conv_in"))?,
            down,
            mid: MidBlock::new(last, groups, enc.pp("mid_block"))?,
            norm_out: candle_nn::group_norm(groups, last, EPS, enc.pp("conv_norm_out"))?,
            conv_out: candle_nn::conv2d(last, lat2, 3, pad1(), enc.pp("conv_out"))?,
            quant_conv: match cfg.use_quant_conv {
                true => Some(candle_nn::conv2d(
                    lat2,
                    lat2,
                    1,
                    Default::default(),
                    vb.pp("quant_conv"),
                )?),
                false => None,
            },
        })
    }

    /// (N, C, S, S) → (N, 2·latent, S/f, S/f).
    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for b in &self.down {
            h = b.forward(&h)?;
        }
        let h = self.norm_out.forward(&self.mid.forward(&h)?)?;
        let h = self.conv_out.forward(&candle_nn::ops::silu(&h)?)?;
        match &self.quant_conv {
            Some(q) => q.forward(&h),
            None => Ok(h),
        }
    }
}

/// Latents → images, `post_quant_conv` included.
pub(super) struct Decoder {
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid: MidBlock,
    up: Vec<UpDecoderBlock2D>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    pub(super) fn new(cfg: &AutoencoderConfig, vb: VarBuilder) -> Result<Self> {
        let groups = cfg.norm_num_groups;
        let w: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let (dec, lat) = (vb.pp("decoder"), cfg.latent_channels);
        let up = (0..w.len())
            .map(|i| {
                let block = UpDecoderBlock2DConfig {
                    num_layers: cfg.layers_per_block + 1,
                    resnet_eps: EPS,
                    resnet_groups: groups,
                    add_upsample: i + 1 < w.len(),
                    ..Default::default()
                };
                let from = w[i.saturating_sub(1)];
                UpDecoderBlock2D::new(dec.pp(format!("up_blocks.{i}")), from, w[i], block)
            })
            .collect::<Result<_>>()?;
        let first = w[w.len() - 1];
        Ok(Decoder {
            post_quant_conv: match cfg.use_post_quant_conv {
                true => Some(candle_nn::conv2d(
                    lat,
                    lat,
                    1,
                    Default::default(),
                    vb.pp("post_quant_conv"),
                )?),
                false => None,
            },
            conv_in: candle_nn::conv2d(lat, w[0], 3, pad1(), dec.pp("conv_in"))?,
            mid: MidBlock::new(w[0], groups, dec.pp("mid_block"))?,
            up,
            norm_out: candle_nn::group_norm(groups, first, EPS, dec.pp("conv_norm_out"))?,
            conv_out: candle_nn::conv2d(first, cfg.out_channels, 3, pad1(), dec.pp("conv_out"))?,
        })
    }

    /// (N, latent, s, s) → (N, C, s·f, s·f).
    pub(super) fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(p) => p.forward(z)?,
            None => z.clone(),
        };
        let mut h = self.mid.forward(&self.conv_in.forward(&z)?)?;
        for b in &self.up {
            h = b.forward(&h)?;
        }
        let h = self.norm_out.forward(&h)?;
        self.conv_out.forward(&candle_nn::ops::silu(&h)?)
    }
}
