//! Device selection by name (`cpu`, `cuda`, `metal`, `auto`).

use crate::error::{FlowError, Result};
use candle_core::{DType, Device, Tensor};

/// The devices a command line or config can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum DeviceKind {
    /// The CPU.
    #[default]
    Cpu,
    /// The first CUDA GPU (build with `--features cuda`).
    Cuda,
    /// The Apple GPU (build with `--features metal`).
    Metal,
    /// CUDA, then Metal, then the CPU (the choice is printed).
    Auto,
}

impl DeviceKind {
    /// The name `select` takes.
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
            DeviceKind::Metal => "metal",
            DeviceKind::Auto => "auto",
        }
    }
}

/// Returns the device called `name`; `auto` picks CUDA, then Metal, then the CPU.
pub fn select(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Device::new_cuda(0).map_err(|e| {
            FlowError::Config(format!("--device cuda: {e} (build with `--features cuda`)"))
        }),
        "metal" => Device::new_metal(0).map_err(|e| {
            FlowError::Config(format!(
                "--device metal: {e} (build with `--features metal`)"
            ))
        }),
        "auto" => Ok(Device::cuda_if_available(0)
            .ok()
            .filter(|d| d.is_cuda())
            .or_else(|| Device::new_metal(0).ok())
            .unwrap_or(Device::Cpu)),
        other => Err(FlowError::Config(format!(
            "unknown device {other:?}: expected cpu, cuda, metal or auto"
        ))),
    }
}

/// A short name of `device`: `cpu`, `cuda:N` or `metal:N`.
pub fn describe(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// `t` copied to the host and widened to f64, for read-outs. The copy comes first: Metal has no
/// f64, so a cast on the device would fail there.
pub fn host_f64(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F64)?)
}
