//! Downsampled ImageNet in its official npz batches (`train_data_batch_1..10.npz`, `val_data.npz`):
//! arrays `data` (N, 3·S·S) u8, each row 3 planes R, G, B of S×S, and `labels` 1-based
//! (`map_clsloc.txt` order); we return 0-based labels.

use crate::error::{DataError, Result};
use crate::ImageSet;
use std::io::Read;
use std::path::{Path, PathBuf};

/// One array of an `.npy` member: little-endian element bytes in C order.
#[derive(Debug)]
pub struct NpyArray {
    /// numpy dtype string, e.g. `|u1`, `<i8`.
    pub descr: String,
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Raw element bytes.
    pub data: Vec<u8>,
}

fn header_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let start = header.find(&format!("'{key}'"))? + key.len() + 2;
    let rest = header[start..].trim_start().strip_prefix(':')?.trim_start();
    Some(rest)
}

/// Parses an `.npy` byte stream (format versions 1–3).
pub fn parse_npy(bytes: &[u8], what: &str, path: &Path) -> Result<NpyArray> {
    let err = |m: String| DataError::format(path, format!("array `{what}`: {m}"));
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(err("not an .npy array (bad magic)".into()));
    }
    let (hlen, hstart) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(err(format!("unsupported .npy version {v}"))),
    };
    let header = bytes
        .get(hstart..hstart + hlen)
        .ok_or_else(|| err("truncated header".into()))?;
    let header = String::from_utf8_lossy(header);
    let descr = header_value(&header, "descr")
        .and_then(|v| v.strip_prefix('\''))
        .and_then(|v| v.split('\'').next())
        .ok_or_else(|| err(format!("no dtype in header {header:?}")))?
        .to_string();
    if header_value(&header, "fortran_order").is_some_and(|v| v.starts_with("True")) {
        return Err(err(
            "Fortran-ordered arrays are not supported; expected C order".into(),
        ));
    }
    let shape_str = header_value(&header, "shape")
        .and_then(|v| v.strip_prefix('('))
        .and_then(|v| v.split(')').next())
        .ok_or_else(|| err(format!("no shape in header {header:?}")))?;
    let shape = shape_str
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| err(format!("bad shape ({shape_str})")))
        })
        .collect::<Result<Vec<_>>>()?;
    let elem = element_size(&descr).ok_or_else(|| err(format!("unsupported dtype {descr}")))?;
    let want = shape
        .iter()
        .try_fold(elem, |a, &d| a.checked_mul(d))
        .ok_or_else(|| err(format!("shape {shape:?} overflows")))?;
    let data = &bytes[hstart + hlen..];
    if data.len() != want {
        return Err(err(format!(
            "shape {shape:?} of {descr} needs {want} bytes, found {}",
            data.len()
        )));
    }
    Ok(NpyArray {
        descr,
        shape,
        data: data.to_vec(),
    })
}

fn element_size(descr: &str) -> Option<usize> {
    match descr {
        "|u1" | "|i1" | "<u1" => Some(1),
        "<u2" | "<i2" => Some(2),
        "<u4" | "<i4" | "<f4" => Some(4),
        "<u8" | "<i8" | "<f8" => Some(8),
        _ => None,
    }
}

impl NpyArray {
    /// Elements as i64 (integer dtypes only).
    pub fn to_i64(&self) -> Option<Vec<i64>> {
        let d = &self.data;
        Some(match self.descr.as_str() {
            "|u1" | "<u1" => d.iter().map(|&v| v as i64).collect(),
            "|i1" => d.iter().map(|&v| v as i8 as i64).collect(),
            "<u2" => d
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]) as i64)
                .collect(),
            "<i2" => d
                .chunks_exact(2)
                .map(|c| i16::from_le_bytes([c[0], c[1]]) as i64)
                .collect(),
            "<u4" => d
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                .collect(),
            "<i4" => d
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                .collect(),
            "<i8" | "<u8" => d
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect(),
            _ => return None,
        })
    }
}

/// Reads array `name` (member `name.npy`) of an `.npz` file; `Ok(None)` when absent.
pub fn read_npz_array(path: &Path, name: &str) -> Result<Option<NpyArray>> {
    let file = std::fs::File::open(path).map_err(|source| DataError::Io {
        path: path.into(),
        source,
    })?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| DataError::format(path, format!("not an npz (zip) archive: {e}")))?;
    let member = format!("{name}.npy");
    let mut f = match zip.by_name(&member) {
        Ok(f) => f,
        Err(zip::result::ZipError::FileNotFound) => return Ok(None),
        Err(e) => return Err(DataError::format(path, format!("member {member}: {e}"))),
    };
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes)
        .map_err(|e| DataError::format(path, format!("member {member} unreadable: {e}")))?;
    parse_npy(&bytes, name, path).map(Some)
}

/// Reads one downsampled-ImageNet batch: RGB S×S images and 0-based labels.
pub fn read_imagenet_batch(path: &Path) -> Result<ImageSet> {
    let data = read_npz_array(path, "data")?.ok_or_else(|| {
        DataError::format(
            path,
            "no array `data`: expected the downsampled-ImageNet npz layout",
        )
    })?;
    let [n, row] = data.shape[..] else {
        return Err(DataError::format(
            path,
            format!(
                "array `data` has shape {:?}, expected (N, 3·S·S)",
                data.shape
            ),
        ));
    };
    let side = ((row / 3) as f64).sqrt().round() as usize;
    if data.descr != "|u1" || 3 * side * side != row {
        return Err(DataError::format(
            path,
            format!(
                "array `data` is {} of width {row}, expected u8 rows of 3·S·S",
                data.descr
            ),
        ));
    }
    let labels = match read_npz_array(path, "labels")? {
        Some(l) => {
            let v = l.to_i64().ok_or_else(|| {
                DataError::format(
                    path,
                    format!("array `labels` has dtype {}, expected integers", l.descr),
                )
            })?;
            if v.len() != n {
                return Err(DataError::format(
                    path,
                    format!("{} labels for {n} images", v.len()),
                ));
            }
            if let Some((i, bad)) = v
                .iter()
                .enumerate()
                .find(|(_, &x)| !(1..=1000).contains(&x))
            {
                return Err(DataError::format(
                    path,
                    format!("label {bad} at index {i}: expected 1-based ids 1..=1000"),
                ));
            }
            Some(v.into_iter().map(|x| x - 1).collect())
        }
        None => None,
    };
    Ok(ImageSet {
        channels: 3,
        height: side,
        width: side,
        pixels: data.data,
        labels,
        latents: None,
    })
}

/// The npz batches under `dir` in numeric order (`train_data_batch_1..10`, or `val_data`),
/// or `dir` itself when it is a file.
pub fn batch_files(dir: &Path) -> Result<Vec<PathBuf>> {
    if dir.is_file() {
        return Ok(vec![dir.to_path_buf()]);
    }
    let entries = std::fs::read_dir(dir).map_err(|source| DataError::Io {
        path: dir.into(),
        source,
    })?;
    let mut files: Vec<(u64, PathBuf)> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "npz"))
        .map(|p| {
            let stem = p
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let num = stem
                .rsplit('_')
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            (num, p)
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(DataError::format(dir, "no .npz batches found"));
    }
    Ok(files.into_iter().map(|(_, p)| p).collect())
}

/// Reads and concatenates every batch of a downsampled-ImageNet folder (or one file).
pub fn read_imagenet(dir: &Path) -> Result<ImageSet> {
    let mut all: Option<ImageSet> = None;
    for f in batch_files(dir)? {
        let b = read_imagenet_batch(&f)?;
        match all.as_mut() {
            None => all = Some(b),
            Some(a) => a.append(b, &f)?,
        }
    }
    all.ok_or_else(|| DataError::format(dir, "no .npz batches found"))
}
