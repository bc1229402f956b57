//! The device and precision arguments shared by the commands that run a model.

use anyhow::Result;
use candle_core::{DType, Device};
use clap::{Args, ValueEnum};
use std::path::PathBuf;
use tarflow_flows::device::DeviceKind;
use tarflow_flows::TarFlow;
use tarflow_sample::resolve::Resolved;

/// Precision of the weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DTypeArg {
    /// 32-bit floats (the reference).
    F32,
    /// bfloat16 (LayerNorm statistics, exp of log-scales, log-dets and the NLL stay f32).
    Bf16,
    /// IEEE half precision (the same f32 islands as bf16).
    F16,
}

impl DTypeArg {
    /// The candle dtype.
    pub fn dtype(self) -> DType {
        match self {
            DTypeArg::F32 => DType::F32,
            DTypeArg::Bf16 => DType::BF16,
            DTypeArg::F16 => DType::F16,
        }
    }
}

/// `--device` and `--dtype`.
#[derive(Debug, Clone, Args)]
pub struct RuntimeArgs {
    /// Where the model runs (auto: cuda, then metal, then cpu; the choice is printed).
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceKind,
    /// Precision of the model: f32, bf16 or f16. Below f32 the model runs on candle's composed
    /// ops (the GPU path), also on the CPU.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DTypeArg,
}

impl RuntimeArgs {
    /// The selected device (saying on stderr which one `auto` picked) and dtype.
    pub fn select(&self) -> Result<(Device, DType)> {
        let (device, why) = tarflow_flows::device::select_explained(self.device.name())?;
        if self.device == DeviceKind::Auto {
            eprintln!("device: {why}");
        }
        Ok((device, self.dtype.dtype()))
    }
}

/// The model a command runs: `--checkpoint` (or the embedded default), `--no-ema`, `--device`,
/// `--dtype`; shared by `sample`, `score`, `ood` and `classify`.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// A run directory (its latest checkpoint), a checkpoint folder, a .safetensors file or a
    /// .gguf of `tarflow quantize`; default: the embedded MNIST likelihood model.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Use the trained weights even where the run kept an EMA.
    #[arg(long)]
    pub no_ema: bool,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

impl ModelArgs {
    /// Resolves the weights (saying on stderr which model answered) and builds the model.
    pub fn load(&self) -> Result<(Resolved, TarFlow)> {
        let (device, dtype) = self.runtime.select()?;
        let r = tarflow_sample::default_model::resolve_or_default(
            self.checkpoint.as_deref(),
            !self.no_ema,
            &device,
        )?;
        let model = r.checkpoint.model(&device, dtype)?;
        Ok((r, model))
    }
}
