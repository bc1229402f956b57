//! The fuzz harness, shared by the libFuzzer targets in `fuzz/` and by the regression test that
//! replays their committed inputs (`tests/fuzz_regressions.rs`). Each target reaches a parser
//! the way a user's file does, through a path: the input is written to a per-process file in
//! memory-backed /dev/shm first. A target may return an error; it must never panic, hang or
//! allocate what the file merely claims.

use candle_core::{DType, Device};
use std::path::PathBuf;
use std::sync::OnceLock;
use tarflow_flows::{Checkpoint, ModelConfig, TarFlow};

/// Every target: the parsers a user's file reaches.
pub const TARGETS: [&str; 9] = [
    "idx",
    "cifar",
    "npz",
    "image",
    "config",
    "checkpoint",
    "pth",
    "noise",
    "hdf5",
];

/// This process's scratch folder (memory-backed where /dev/shm exists).
fn scratch() -> PathBuf {
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    base.join(format!("tarflow-fuzz-{}", std::process::id()))
}

/// Deletes this process's scratch folder (a replay calls it when done).
pub fn remove_scratch() {
    let _ = std::fs::remove_dir_all(scratch());
}

/// Writes `data` to a file named `name` in this process's scratch folder and returns its path.
fn file_with(name: &str, data: &[u8]) -> std::io::Result<PathBuf> {
    let dir = scratch();
    std::fs::create_dir_all(&dir)?;
    let p = dir.join(name);
    std::fs::write(&p, data)?;
    Ok(p)
}

/// A small model config (1×28×28, 7×7 patches, 10 classes).
fn mnist_config() -> ModelConfig {
    ModelConfig::new(1, 28, 7, 64, 2, 1, 10)
}

/// Runs fuzz target `target` on one input; `false` for an unknown target name.
pub fn run(target: &str, data: &[u8]) -> bool {
    let cpu = Device::Cpu;
    let file = |name: &str| file_with(name, data).ok();
    match target {
        "idx" => {
            if let Some(p) = file("images-idx3-ubyte") {
                let _ = tarflow_datasets::idx::read_mnist(&p, None);
                let _ = tarflow_datasets::idx::parse_idx(data, &p);
            }
        }
        "cifar" => {
            if let Some(p) = file("data_batch_1.bin") {
                let _ = tarflow_datasets::cifar::read_cifar10(&p);
            }
        }
        "npz" => {
            if let Some(p) = file("train_data_batch_1.npz") {
                let _ = tarflow_datasets::npz::read_imagenet_batch(&p);
                let _ = tarflow_datasets::npz::parse_npy(data, "data", &p);
            }
        }
        "image" => {
            // The first byte picks the model shape and whether `--resize` is given.
            let Some((&mode, rest)) = data.split_first() else {
                return true;
            };
            let mut cfg = mnist_config();
            if mode & 2 != 0 {
                (cfg.in_channels, cfg.img_size, cfg.patch_size) = (3, 16, 4);
            }
            if let Ok(p) = file_with("input.png", rest) {
                let _ = tarflow_sample::score::load_for_model(&p, &cfg, mode & 1 != 0);
            }
        }
        "config" => {
            if let Ok(text) = std::str::from_utf8(data) {
                let _ = tarflow_train::TrainConfig::from_toml(text, "fuzz.toml", &[]);
                // The last line doubles as a `--set` override.
                if let Some(last) = text.lines().last() {
                    let sets = [last.to_string()];
                    let _ = tarflow_train::TrainConfig::from_toml(text, "fuzz.toml", &sets);
                }
            }
            if let Some(p) = file("experiment.toml") {
                let _ = crate::experiment::Experiment::load(&p);
            }
        }
        "checkpoint" => {
            if let Some(p) = file("model.safetensors") {
                if let Ok(ck) = Checkpoint::load(&p, &cpu) {
                    let _ = ck.model(&cpu, DType::F32);
                }
                if let Ok(ck) = Checkpoint::import(&p, 16, 4, None, &cpu) {
                    let _ = ck.model(&cpu, DType::F32);
                }
            }
        }
        "pth" => {
            let _ = tarflow_flows::pickle_guard::check_pickle(data);
            if let Some(p) = file("model.pth") {
                let _ = Checkpoint::import(&p, 8, 2, None, &cpu);
            }
        }
        "noise" => {
            static MODEL: OnceLock<Option<TarFlow>> = OnceLock::new();
            let model = MODEL.get_or_init(|| {
                Checkpoint::init(&mnist_config(), 0, &cpu)
                    .and_then(|c| c.model(&cpu, DType::F32))
                    .ok()
            });
            if let (Some(m), Some(p)) = (model, file("z.safetensors")) {
                let _ = tarflow_sample::generate::read_noise(&p, m);
            }
        }
        "hdf5" =>
        {
            #[cfg(feature = "hdf5")]
            if let Some(p) = file("images.h5") {
                let _ = tarflow_datasets::hdf5::read_hdf5(&p, &Default::default());
            }
        }
        _ => return false,
    }
    true
}
