//! Named tensors of a safetensors file given on the command line (`--noise`, `--tensors`,
//! `--text`, `vae --tensors`): read on the host, and a missing name is an error that lists what
//! the file holds.

use crate::error::{Result, SampleError};
use candle_core::Tensor;
use std::collections::HashMap;
use std::path::Path;

/// The tensors of a safetensors file, read on the host: the file may hold f64, which Metal
/// lacks, so callers cast before they upload.
pub fn read_file(path: &Path) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, &candle_core::Device::Cpu)
        .map_err(|e| SampleError::file(path, format!("not a readable safetensors file: {e}")))
}

/// Tensor `name` of `map` (read from `path`), or an error naming the tensors the file has and
/// what was `expected`.
pub fn named<'a>(
    map: &'a HashMap<String, Tensor>,
    name: &str,
    path: &Path,
    expected: &str,
) -> Result<&'a Tensor> {
    map.get(name).ok_or_else(|| {
        let mut keys: Vec<&String> = map.keys().collect();
        keys.sort();
        SampleError::file(
            path,
            format!("no tensor `{name}` (found {keys:?}); expected {expected}"),
        )
    })
}
