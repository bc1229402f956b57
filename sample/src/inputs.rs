//! Image files as the input of `score`: what could be read, and what could not and why. One bad
//! file among many is reported and skipped, not allowed to stop a whole run.

use crate::error::{Result, SampleError};
use crate::score::{collect_paths, load_for_model};
use std::path::PathBuf;
use tarflow_flows::ModelConfig;

/// The readable images of a list of files and folders, and the files that were not.
#[derive(Debug, Default)]
pub struct Inputs {
    /// The images read, in order.
    pub paths: Vec<PathBuf>,
    /// Their planar C×S×S bytes.
    pub pixels: Vec<Vec<u8>>,
    /// Files that could not be read at the model's size: path and reason.
    pub skipped: Vec<(PathBuf, String)>,
}

/// Reads every image of `inputs` (files, or folders searched recursively) for `cfg`. A missing
/// path or a model file given as an image is an error; an unreadable image is skipped with its
/// reason, or (`strict`) an error. Nothing readable at all is an error naming the count.
pub fn load_files(
    inputs: &[PathBuf],
    cfg: &ModelConfig,
    resize: bool,
    strict: bool,
) -> Result<Inputs> {
    let mut out = Inputs::default();
    for p in collect_paths(inputs)? {
        match load_for_model(&p, cfg, resize) {
            Ok(px) => {
                out.paths.push(p);
                out.pixels.push(px);
            }
            Err(e) if strict => return Err(e),
            Err(e) => {
                let reason = match e {
                    SampleError::File { msg, .. } => msg,
                    other => other.to_string(),
                };
                out.skipped.push((p, reason));
            }
        }
    }
    if out.paths.is_empty() {
        return Err(SampleError::Option(format!(
            "none of the {} image file(s) could be read: {}",
            out.skipped.len(),
            out.skipped
                .iter()
                .map(|(p, r)| format!("{}: {r}", p.display()))
                .collect::<Vec<_>>()
                .join("; ")
        )));
    }
    Ok(out)
}
