//! CIFAR-10 binary batches (`data_batch_1.bin` … `data_batch_5.bin`, `test_batch.bin`):
//! records of 1 label byte then 3072 pixel bytes (1024 R, 1024 G, 1024 B of a 32×32 image).

use crate::error::{DataError, Result};
use crate::ImageSet;
use std::path::{Path, PathBuf};

const RECORD: usize = 1 + 3 * 32 * 32;

/// Parses one CIFAR-10 binary batch held in memory.
pub fn parse_cifar10(bytes: &[u8], path: &Path) -> Result<ImageSet> {
    if bytes.is_empty() || !bytes.len().is_multiple_of(RECORD) {
        return Err(DataError::format(
            path,
            format!(
                "{} bytes is not a whole number of {RECORD}-byte CIFAR-10 records",
                bytes.len()
            ),
        ));
    }
    let n = bytes.len() / RECORD;
    let mut pixels = Vec::with_capacity(n * (RECORD - 1));
    let mut labels = Vec::with_capacity(n);
    for (i, rec) in bytes.chunks_exact(RECORD).enumerate() {
        if rec[0] > 9 {
            return Err(DataError::format(
                path,
                format!("record {i} has label {}, expected 0..=9", rec[0]),
            ));
        }
        labels.push(rec[0] as i64);
        pixels.extend_from_slice(&rec[1..]);
    }
    Ok(ImageSet {
        channels: 3,
        height: 32,
        width: 32,
        pixels,
        labels: Some(labels),
        latents: None,
    })
}

/// `set` (3×32×32, labels 0..=9) as CIFAR-10 binary records, the bytes of one batch file.
pub fn to_records(set: &ImageSet, path: &Path) -> Result<Vec<u8>> {
    if (set.channels, set.height, set.width) != (3, 32, 32) {
        return Err(DataError::format(
            path,
            format!(
                "CIFAR-10 records hold 3×32×32 images, not {}×{}×{}",
                set.channels, set.height, set.width
            ),
        ));
    }
    let mut out = Vec::with_capacity(set.len() * RECORD);
    for (i, img) in set.images().iter().enumerate() {
        let label = set.label(i).unwrap_or(0);
        if !(0..=9).contains(&label) {
            return Err(DataError::format(
                path,
                format!("label {label} is not 0..=9"),
            ));
        }
        out.push(label as u8);
        out.extend_from_slice(img);
    }
    Ok(out)
}

/// Reads the `.bin` batches of a CIFAR-10 folder in name order (or one file).
pub fn read_cifar10(path: &Path) -> Result<ImageSet> {
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut f: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|source| DataError::Io {
                path: path.into(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "bin"))
            .collect();
        f.sort();
        f
    } else {
        vec![path.to_path_buf()]
    };
    let mut out: Option<ImageSet> = None;
    for f in &files {
        let bytes = std::fs::read(f).map_err(|source| DataError::Io {
            path: f.clone(),
            source,
        })?;
        let b = parse_cifar10(&bytes, f)?;
        match out.as_mut() {
            None => out = Some(b),
            Some(a) => a.append(b, f)?,
        }
    }
    out.ok_or_else(|| DataError::format(path, "no CIFAR-10 .bin batches found"))
}
