//! Device selection by name (`cpu`, `cuda`, `metal`, `auto`), and the one way tensors cross
//! between the host and a device.
//!
//! Rules that only Apple's GPUs enforce, kept here so that the CPU and CUDA follow them too:
//! - A device is opened once per process ([`select`] hands every later caller the same one):
//!   every `Device::new_metal` is a new device id, and candle's Metal back-end refuses an op
//!   whose operands sit on two ids and cannot move a tensor from one id to another.
//! - Nothing f64 (or i64) is ever made on a GPU: Metal has no f64 kernels at all. Host data is
//!   cast on the host first, then uploaded ([`upload`]); read-outs come back before they widen
//!   ([`host_f64`]).
//! - `Tensor::copy` shares the buffer on Metal (`try_clone` is a reference there): a tensor that
//!   must own its values is made by [`fresh`].

use crate::error::{FlowError, Result};
use candle_core::{DType, Device, Tensor};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

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

/// Calls of [`select`] in this process, numbering the lines `TARFLOW_TRACE_DEVICE=1` prints
/// (the CLI's tests hold that a command selects once).
static SELECTIONS: AtomicUsize = AtomicUsize::new(0);

/// The GPUs opened so far, by (kind, ordinal): a second `select` of the same GPU returns the
/// device the first opened, never a new id.
static OPENED: Mutex<Vec<(String, usize, Device)>> = Mutex::new(Vec::new());

/// Returns the device called `name`; `auto` picks CUDA, then Metal, then the CPU.
pub fn select(name: &str) -> Result<Device> {
    Ok(select_explained(name)?.0)
}

/// [`select`], with a line saying what `auto` found (or why it fell back to the CPU).
pub fn select_explained(name: &str) -> Result<(Device, String)> {
    let n = SELECTIONS.fetch_add(1, Ordering::SeqCst) + 1;
    let (device, why) = match name {
        "cpu" => (Device::Cpu, "cpu".to_string()),
        "cuda" => (open_gpu("cuda", 0)?, "cuda".into()),
        "metal" => (open_gpu("metal", 0)?, "metal".into()),
        "auto" => auto(),
        other => {
            return Err(FlowError::Config(format!(
                "unknown device {other:?}: expected cpu, cuda, metal or auto"
            )))
        }
    };
    if std::env::var_os("TARFLOW_TRACE_DEVICE").is_some() {
        eprintln!("device selection #{n}: {name} -> {}", describe(&device));
    }
    Ok((device, why))
}

/// Whether this build can open a GPU at all (`--features cuda` or `metal`).
pub fn gpu_built() -> bool {
    cfg!(any(feature = "cuda", feature = "metal"))
}

fn auto() -> (Device, String) {
    if !gpu_built() {
        return (
            Device::Cpu,
            "cpu (auto: built without --features cuda or metal)".into(),
        );
    }
    let mut tried = Vec::new();
    for kind in ["cuda", "metal"] {
        match open_gpu(kind, 0) {
            Ok(d) => {
                let why = format!("{} (auto)", describe(&d));
                return (d, why);
            }
            Err(e) => tried.push(format!("{kind}: {e}")),
        }
    }
    (
        Device::Cpu,
        format!("cpu (auto: no usable GPU; {})", tried.join("; ")),
    )
}

/// The GPU `kind` number `ordinal`, opened once per process; a panic inside candle (its Metal
/// back-end indexes the device list without checking it is not empty) becomes an error.
pub fn open_gpu(kind: &str, ordinal: usize) -> Result<Device> {
    let mut opened = OPENED
        .lock()
        .map_err(|_| FlowError::Device("the device table is poisoned".into()))?;
    if let Some((_, _, d)) = opened.iter().find(|(k, o, _)| k == kind && *o == ordinal) {
        return Ok(d.clone());
    }
    let open = || match kind {
        "cuda" => Device::new_cuda(ordinal),
        _ => Device::new_metal(ordinal),
    };
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let got = std::panic::catch_unwind(std::panic::AssertUnwindSafe(open));
    std::panic::set_hook(hook);
    let feature = format!("build with `--features {kind}`");
    let device = match got {
        Ok(Ok(d)) => d,
        Ok(Err(e)) => {
            return Err(FlowError::Device(format!(
                "--device {kind}: {e} ({feature}, or use --device cpu)"
            )))
        }
        Err(_) => {
            return Err(FlowError::Device(format!(
                "--device {kind}: no {kind} device {ordinal} on this machine (use --device cpu)"
            )))
        }
    };
    probe(&device, DType::F32).map_err(|e| {
        FlowError::Device(format!(
            "--device {kind}: a float32 matrix product failed on {}: {e}. candle's Metal \
             kernels need macOS 14 or newer (Metal Shading Language 3.1); use --device cpu",
            describe(&device)
        ))
    })?;
    opened.push((kind.to_string(), ordinal, device.clone()));
    Ok(device)
}

/// A matrix–vector and a matrix–matrix product in `dtype`, read on the host: the kernels every
/// model runs, compiled at first use (an old macOS fails here, not mid-run).
fn probe(device: &Device, dtype: DType) -> Result<()> {
    let run = || -> Result<f32> {
        let a = upload(
            &Tensor::ones((4, 8), DType::F32, &Device::Cpu)?,
            device,
            dtype,
        )?;
        let v = upload(
            &Tensor::ones((8, 1), DType::F32, &Device::Cpu)?,
            device,
            dtype,
        )?;
        let mv = a.matmul(&v)?; // (4, 1): the gemv path
        let mm = a.matmul(&a.t()?)?; // (4, 4)
        let s = (mv.sum_all()?.to_dtype(DType::F32)? + mm.sum_all()?.to_dtype(DType::F32)?)?;
        Ok(to_host(&s)?.to_scalar::<f32>()?)
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
        Ok(Ok(s)) if s == 4.0 * 8.0 + 16.0 * 8.0 => Ok(()),
        Ok(Ok(s)) => Err(FlowError::Device(format!(
            "{dtype:?} probe product gave {s}, expected 160"
        ))),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(FlowError::Device(format!(
            "{dtype:?} probe product panicked"
        ))),
    }
}

/// The dtype `train.dtype = "auto"` means on `device`: f32 on the CPU; bf16 on a GPU whose
/// kernels run it, else f32 with the reason (Metal's bf16 needs macOS 14).
pub fn auto_dtype(device: &Device) -> (DType, Option<String>) {
    if device.is_cpu() {
        return (DType::F32, None);
    }
    match probe(device, DType::BF16) {
        Ok(()) => (DType::BF16, None),
        Err(e) => (
            DType::F32,
            Some(format!(
                "bf16 is unavailable on {} ({e}); training in f32 (Metal's bf16 needs macOS 14 \
                 or newer)",
                describe(device)
            )),
        ),
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

/// `t` on `device` in `dtype`: the one way a tensor reaches a device. A host tensor is cast on
/// the host first (so f64 and i64 never reach a GPU); a tensor already on `device` is cast there
/// (between float types a GPU has); asking a GPU for f64 or i64 is an error.
pub fn upload(t: &Tensor, device: &Device, dtype: DType) -> Result<Tensor> {
    let gpu = !device.is_cpu();
    if gpu && matches!(dtype, DType::F64 | DType::I64) {
        return Err(FlowError::Device(format!(
            "{dtype:?} tensors cannot live on {} (Metal has no {dtype:?}); keep them on the CPU",
            describe(device)
        )));
    }
    if t.device().same_device(device) {
        return Ok(t.to_dtype(dtype)?);
    }
    let host = to_host(t)?.to_dtype(dtype)?;
    #[allow(clippy::disallowed_methods)] // the one host → device move
    let on_device = host.to_device(device)?;
    Ok(on_device)
}

/// A file's tensor on `device`: as read on the CPU; on a GPU in f32, cast on the host first
/// (a checkpoint may hold f64, f16 or bf16 tensors, and Metal has no f64).
pub fn from_file(t: &Tensor, device: &Device) -> Result<Tensor> {
    match device.is_cpu() {
        true => Ok(t.clone()),
        false => upload(t, device, DType::F32),
    }
}

/// A host vector of `shape` on `device` in `dtype` ([`upload`] of `Tensor::from_vec`).
pub fn upload_vec<S: Into<candle_core::Shape>>(
    v: Vec<f32>,
    shape: S,
    device: &Device,
    dtype: DType,
) -> Result<Tensor> {
    upload(&Tensor::from_vec(v, shape, &Device::Cpu)?, device, dtype)
}

/// `t` on the host, as it is (no cast).
pub fn to_host(t: &Tensor) -> Result<Tensor> {
    if t.device().is_cpu() {
        return Ok(t.clone());
    }
    #[allow(clippy::disallowed_methods)] // the one device → host move
    let host = t.to_device(&Device::Cpu)?;
    Ok(host)
}

/// `t` copied to the host and widened to f64, for read-outs. The copy comes first: Metal has no
/// f64, so a cast on the device would fail there.
pub fn host_f64(t: &Tensor) -> Result<Tensor> {
    Ok(to_host(t)?.to_dtype(DType::F64)?)
}

/// Whether `t` holds a NaN or ±∞, decided where that is reliable: on the host values (CPU), or
/// from a sum read on the host (GPU: NaN and ∞ propagate through a sum, while a device-side
/// self-comparison or `0·x` can be folded away by fast-math kernels, candle's Metal default).
pub fn has_non_finite(t: &Tensor) -> Result<bool> {
    if t.device().is_cpu() {
        return Ok(non_finite_rows(&t.flatten_all()?.unsqueeze(0)?)?[0]);
    }
    let s = to_host(&t.to_dtype(DType::F32)?.sum_all()?)?.to_scalar::<f32>()?;
    Ok(!s.is_finite())
}

/// For each row of `t` (its first dimension), whether it holds a NaN or ±∞, tested on the host
/// copy's values: f64 as they are, anything narrower as f32 (one copy, no widening).
pub fn non_finite_rows(t: &Tensor) -> Result<Vec<bool>> {
    let t = to_host(t)?.flatten_from(1)?;
    Ok(match t.dtype() {
        DType::F64 => t
            .to_vec2::<f64>()?
            .iter()
            .map(|r| r.iter().any(|v| !v.is_finite()))
            .collect(),
        _ => t
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?
            .iter()
            .map(|r| r.iter().any(|v| !v.is_finite()))
            .collect(),
    })
}

/// A detached copy of `t` in a buffer of its own on every back-end (`Tensor::copy` shares the
/// buffer on Metal, so a later `Var::set` of the original would change it).
pub fn fresh(t: &Tensor) -> Result<Tensor> {
    Ok(t.detach().force_contiguous()?.detach())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_owns_its_buffer() {
        let v = candle_core::Var::new(&[1f32, 2.0, 3.0], &Device::Cpu).unwrap();
        let kept = fresh(v.as_tensor()).unwrap();
        v.set(&Tensor::new(&[7f32, 8.0, 9.0], &Device::Cpu).unwrap())
            .unwrap();
        assert_eq!(kept.to_vec1::<f32>().unwrap(), [1.0, 2.0, 3.0]);
        assert!(!kept.track_op());
        // A strided view is copied into row-major order.
        let m = Tensor::arange(0f32, 6.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let t = fresh(&m.t().unwrap()).unwrap();
        assert!(t.is_contiguous());
        assert_eq!(
            t.to_vec2::<f32>().unwrap(),
            [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]
        );
    }

    #[test]
    fn upload_casts_on_the_host_and_refuses_nothing_on_the_cpu() {
        let t = Tensor::new(&[1.5f64, -2.0], &Device::Cpu).unwrap();
        let u = upload(&t, &Device::Cpu, DType::BF16).unwrap();
        assert_eq!(u.dtype(), DType::BF16);
        assert_eq!(
            u.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(),
            [1.5, -2.0]
        );
        assert_eq!(
            upload(&t, &Device::Cpu, DType::F64).unwrap().dtype(),
            DType::F64
        );
    }

    #[test]
    fn unknown_names_and_missing_gpus_are_errors_not_panics() {
        assert!(select("tpu")
            .unwrap_err()
            .to_string()
            .contains("cpu, cuda, metal"));
        // This build has no GPU feature (or no GPU): an error, and `auto` falls back saying why.
        if !cfg!(any(feature = "cuda", feature = "metal")) {
            assert!(select("metal").is_err());
            assert!(select("cuda").is_err());
            let (d, why) = select_explained("auto").unwrap();
            assert!(d.is_cpu());
            assert!(why.starts_with("cpu (auto: built without"), "{why}");
        }
        assert_eq!(auto_dtype(&Device::Cpu).0, DType::F32);
    }
}
