//! `y = x Wᵀ + b` with PyTorch's (out, in) weight layout, dense or in reduced precision, the bias
//! optional (ml-starflow's `use_bias = False`).

use crate::error::Result;
use crate::quant::QuantWeights;
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

/// A Linear layer's (out, in) weight: dense, or in reduced precision (a `tarflow quantize` file).
#[derive(Debug, Clone)]
enum Weight {
    Dense(Tensor),
    Quantised(std::sync::Arc<QTensor>),
}

/// `y = x Wᵀ + b` with PyTorch's (out, in) weight layout.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
}

impl Linear {
    /// Loads `weight` (out, in) and `bias` (out) under `vb`.
    pub fn new(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        Self::load(in_dim, out_dim, vb, None)
    }

    /// [`Self::new`], taking the weight from `quant` where it holds `{prefix}.weight`.
    pub fn load(
        in_dim: usize,
        out_dim: usize,
        vb: VarBuilder,
        quant: Option<&QuantWeights>,
    ) -> Result<Self> {
        Self::load_with_bias(in_dim, out_dim, true, vb, quant)
    }

    /// [`Self::load`] of a layer with a bias or (`bias` false) without one.
    pub fn load_with_bias(
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        vb: VarBuilder,
        quant: Option<&QuantWeights>,
    ) -> Result<Self> {
        let key = format!("{}.weight", vb.prefix());
        let bias = match bias {
            true => Some(vb.get(out_dim, "bias")?),
            false => None,
        };
        let weight = match quant.and_then(|q| q.tensors.get(&key)) {
            None => Weight::Dense(vb.get((out_dim, in_dim), "weight")?),
            Some(qt) if qt.shape().dims() != [out_dim, in_dim] => {
                return Err(crate::error::FlowError::Config(format!(
                    "quantised `{key}` has shape {:?}, expected [{out_dim}, {in_dim}]",
                    qt.shape().dims()
                )))
            }
            Some(qt) => Weight::Quantised(crate::quant::to_device(qt, vb.device())?),
        };
        Ok(Self { weight, bias })
    }

    /// The (out, in) weight and the bias; an error for a quantised layer (no dense weight)
    /// or one without a bias (the CPU engine's layouts have one).
    pub fn parts(&self) -> Result<(&Tensor, &Tensor)> {
        let no = |m: &str| Err(crate::error::FlowError::Config(m.into()));
        match (&self.weight, &self.bias) {
            (Weight::Dense(w), Some(b)) => Ok((w, b)),
            (Weight::Dense(_), None) => no("a bias-free layer has no bias for the CPU engine"),
            (Weight::Quantised(_), _) => no("a quantised layer has no dense weight"),
        }
    }

    /// Whether the weight is stored in reduced precision (expanded for each call).
    pub fn is_quantised(&self) -> bool {
        matches!(self.weight, Weight::Quantised(_))
    }

    /// The layer with its quantised weight expanded to a dense one (the same values the
    /// weights-only path computes with).
    pub fn expanded(&self) -> Result<Self> {
        Ok(match &self.weight {
            Weight::Quantised(q) => {
                let (device, dtype) = self.home();
                Self {
                    weight: Weight::Dense(q.dequantize(&device)?.to_dtype(dtype)?),
                    bias: self.bias.clone(),
                }
            }
            Weight::Dense(_) => self.clone(),
        })
    }

    /// The device and dtype of the layer's dense tensors (a quantised weight's bias, or f32 on
    /// the weight's device where it has none).
    fn home(&self) -> (Device, DType) {
        match (&self.bias, &self.weight) {
            (Some(b), _) => (b.device().clone(), b.dtype()),
            (None, Weight::Dense(w)) => (w.device().clone(), w.dtype()),
            (None, Weight::Quantised(q)) => (q.device(), DType::F32),
        }
    }

    /// Applies the layer to the last dimension of `x` (any rank ≥ 2).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let q = match &self.weight {
            Weight::Dense(w) => return dense(x, w, self.bias.as_ref()),
            Weight::Quantised(q) => q,
        };
        if crate::quant::native_matmul() {
            // candle's integer matmul quantises the activations too (f32 in, its dot type inside).
            let dtype = x.dtype();
            let m = QMatMul::from_arc(q.clone())?;
            let y = m
                .forward(&x.to_dtype(DType::F32)?.contiguous()?)?
                .to_dtype(dtype)?;
            return Ok(match &self.bias {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            });
        }
        // Weights-only: the layer's blocks are expanded for this call and dropped after it, so the
        // model stays small in memory, the map stays continuous in x (exactly invertible), and
        // the GEMM is the dense one.
        let w = q.dequantize(x.device())?.to_dtype(x.dtype())?;
        dense(x, &w, self.bias.as_ref())
    }
}

/// `x Wᵀ + b` over the last dimension of `x` with a dense (out, in) weight.
fn dense(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    if let Some(b) = bias {
        if crate::kernels::applies(x) && weight.dtype() == DType::F32 {
            return Ok(crate::kernels::linear::linear(x, weight, b)?);
        }
    }
    let dims = x.dims().to_vec();
    let in_dim = dims[dims.len() - 1];
    let rows = x.elem_count() / in_dim.max(1);
    // One large GEMM over all tokens is much faster than a batched one.
    let y = x.reshape((rows, in_dim))?.matmul(&weight.t()?)?;
    let y = match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out_dims = dims;
    let last = out_dims.len() - 1;
    out_dims[last] = weight.dim(0)?;
    Ok(y.reshape(out_dims)?)
}
