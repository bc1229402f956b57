//! Which engine runs a block: candle's composed ops (every device, every option: the model as
//! written) or the CPU engine ([`crate::kernels`]: f32 on the CPU, the options it declares).
//!
//! A block decides once, when it is built, whether the CPU engine may run it: the device and
//! dtype, and every model option it uses against the engine's [`kernels::COVERS`]. An option
//! is any config key beyond the model's sizes that the config writes out, which a new option
//! does as soon as it is set (`skip_serializing_if = "is_default"`), so an option the engine
//! has never heard of runs composed, correct and slower, with one line on stderr naming the
//! block and the option. The process-wide switch ([`kernels::enabled`]: `--composed`,
//! `TARFLOW_CPU_KERNELS=0`) then picks between the two for each pass.

use crate::config::ModelConfig;
use crate::kernels;
use candle_core::{DType, Device};

/// The engine that runs a block's passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// candle's composed ops: the path GPUs run, and the reference.
    Composed,
    /// The CPU engine: fused kernels over slices for the transformer, the flow's map on rows.
    Cpu,
}

/// The config keys that size a model: every engine runs any value of them.
const SIZES: [&str; 9] = [
    "in_channels",
    "img_size",
    "patch_size",
    "channels",
    "num_blocks",
    "layers_per_block",
    "layers",
    "head_dim",
    "mlp_ratio",
];

/// The options `cfg` uses: the keys its serialised form holds beyond the sizes (class count,
/// `nvp` and every option that is set).
pub fn options(cfg: &ModelConfig) -> Vec<String> {
    let table = match toml::Value::try_from(cfg) {
        Ok(toml::Value::Table(t)) => t,
        // A config that does not serialise claims every option: the composed path runs it.
        _ => return vec!["(config)".into()],
    };
    table
        .into_iter()
        .filter(|(k, _)| !SIZES.contains(&k.as_str()))
        .map(|(k, _)| k)
        .collect()
}

/// The first of `cfg`'s options that `covers` does not name.
pub fn uncovered(cfg: &ModelConfig, covers: &[&str]) -> Option<String> {
    options(cfg)
        .into_iter()
        .find(|o| !covers.contains(&o.as_str()))
}

/// Whether the CPU engine may run block `index` of `cfg` on `device` in `dtype`; where an
/// option it uses is not covered, says so on stderr (only where the CPU engine would otherwise
/// have run it).
pub fn cpu_may_run(cfg: &ModelConfig, index: usize, device: &Device, dtype: DType) -> bool {
    cpu_may_run_covering(cfg, index, device, dtype, kernels::COVERS)
}

/// [`cpu_may_run`] for an engine that declares `covers`.
pub fn cpu_may_run_covering(
    cfg: &ModelConfig,
    index: usize,
    device: &Device,
    dtype: DType,
    covers: &[&str],
) -> bool {
    if !device.is_cpu() || dtype != DType::F32 {
        return false;
    }
    match uncovered(cfg, covers) {
        None => true,
        Some(option) => {
            if kernels::enabled() {
                eprintln!(
                    "block {index}: the CPU engine does not cover the option `{option}`; the block runs on candle's composed ops (correct, slower)"
                );
            }
            false
        }
    }
}

/// Says once per process that training takes candle's tape because the CPU engine's
/// tape-free pass does not cover `option` (the model's fused layers still run).
pub fn say_training_composed(option: &str) {
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| {
        eprintln!(
            "training: the CPU engine's training pass does not cover the option `{option}`; the loss and gradients come from candle's composed ops and tape (correct, slower)"
        )
    });
}
