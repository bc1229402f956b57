//! Image files as the input of `score`: what could be read, and what could not and why. One bad
//! file among many is reported and skipped, not allowed to stop a whole run.

use crate::error::{Result, SampleError};
use std::path::{Path, PathBuf};
use tarflow_datasets::folder::EXTENSIONS;
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

/// Expands files and folders (recursively, sorted) into image files.
pub fn collect_paths(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in inputs {
        if p.is_dir() {
            let mut found: Vec<PathBuf> = walkdir::WalkDir::new(p)
                .sort_by_file_name()
                .into_iter()
                .filter_map(|e| e.ok())
                .map(|e| e.into_path())
                .filter(|f| {
                    f.is_file()
                        && f.extension().is_some_and(|x| {
                            EXTENSIONS.contains(&x.to_string_lossy().to_lowercase().as_str())
                        })
                })
                .collect();
            if found.is_empty() {
                return Err(SampleError::file(p, "folder holds no image file"));
            }
            out.append(&mut found);
        } else if p
            .extension()
            .is_some_and(|x| x == "gguf" || x == "safetensors" || x == "pth")
        {
            // A model given where images go (`score model.gguf`): say where it belongs.
            return Err(SampleError::file(
                p,
                "is a model file, not an image: pass it with --checkpoint",
            ));
        } else if p.is_file() {
            out.push(p.clone());
        } else {
            return Err(SampleError::file(p, "no such file or directory"));
        }
    }
    Ok(out)
}

/// Why `path` could not be decoded, in words: the image crate's message for an unknown
/// extension quotes it oddly (`` `."csv"` ``), so that case is said here.
fn decode_error(path: &Path, e: &image::ImageError) -> String {
    match e {
        image::ImageError::Unsupported(_) => format!(
            "not an image format tarflow reads ({}): expected {}",
            path.extension().map_or("no extension".into(), |x| format!(
                ".{}",
                x.to_string_lossy()
            )),
            EXTENSIONS.join(", ")
        ),
        other => format!("cannot decode: {other}"),
    }
}

/// Decodes an image into planar C×S×S bytes for `cfg`; a size or channel mismatch is an
/// error unless `resize` (shorter side → S, centre crop, channel conversion).
pub fn load_for_model(path: &Path, cfg: &ModelConfig, resize: bool) -> Result<Vec<u8>> {
    let (s, c) = (cfg.img_size, cfg.in_channels);
    let img = tarflow_datasets::folder::decode(path)
        .map_err(|e| SampleError::file(path, decode_error(path, &e)))?;
    let planar = |img| {
        tarflow_datasets::folder::planar(img, s, c)
            .map_err(|e| SampleError::file(path, format!("cannot decode: {e}")))
    };
    if resize {
        return planar(img);
    }
    let (w, h) = (img.width() as usize, img.height() as usize);
    let have = img.color().channel_count() as usize;
    let fits_channels = match c {
        1 => have <= 2,              // gray, gray + alpha
        3 => have == 3 || have == 4, // RGB, RGBA
        _ => false,
    };
    let want = format!(
        "the model expects {s}×{s} {}",
        if c == 1 { "grayscale" } else { "RGB" }
    );
    if (w, h) != (s, s) || !fits_channels {
        return Err(SampleError::file(
            path,
            format!(
                "image is {w}×{h} with {have} channel(s); {want} (use --resize to resize, centre-crop and convert)"
            ),
        ));
    }
    planar(img)
}
