//! MNIST / Fashion-MNIST IDX files (`*-idx3-ubyte` images, `*-idx1-ubyte` labels), raw or gzip.
//!
//! Format: big-endian magic `0x0000 08 NDIM` (type 0x08 = u8), NDIM big-endian u32 sizes, data.

use crate::error::{DataError, Result};
use crate::ImageSet;
use std::io::Read;
use std::path::Path;

/// Decompresses `bytes` when they start with the gzip magic; returns them unchanged otherwise.
fn maybe_gunzip(bytes: Vec<u8>, path: &Path) -> Result<Vec<u8>> {
    if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&bytes[..])
            .read_to_end(&mut out)
            .map_err(|e| DataError::format(path, format!("corrupt gzip stream: {e}")))?;
        Ok(out)
    } else {
        Ok(bytes)
    }
}

/// Parses an IDX u8 array: returns its dimensions and data.
pub fn parse_idx(bytes: &[u8], path: &Path) -> Result<(Vec<usize>, Vec<u8>)> {
    let err = |m: String| DataError::format(path, m);
    if bytes.len() < 4 {
        return Err(err(format!(
            "{} bytes: too short for an IDX header",
            bytes.len()
        )));
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(err(format!(
            "bad IDX magic {:02x}{:02x}{:02x}{:02x}: expected 0000 08 0N",
            bytes[0], bytes[1], bytes[2], bytes[3]
        )));
    }
    if bytes[2] != 0x08 {
        return Err(err(format!(
            "IDX element type 0x{:02x}: only unsigned bytes (0x08) are supported",
            bytes[2]
        )));
    }
    let ndim = bytes[3] as usize;
    let header = 4 + 4 * ndim;
    if ndim == 0 || bytes.len() < header {
        return Err(err(format!(
            "truncated IDX header ({ndim} dimensions, {} bytes)",
            bytes.len()
        )));
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|i| {
            u32::from_be_bytes([
                bytes[4 + 4 * i],
                bytes[5 + 4 * i],
                bytes[6 + 4 * i],
                bytes[7 + 4 * i],
            ]) as usize
        })
        .collect();
    let count = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    let data = &bytes[header..];
    match count {
        Some(c) if c == data.len() => Ok((dims, data.to_vec())),
        Some(c) => Err(err(format!(
            "IDX header {dims:?} promises {c} bytes of data, file has {}",
            data.len()
        ))),
        None => Err(err(format!("IDX dimensions {dims:?} overflow"))),
    }
}

/// Reads an IDX file (raw or gzip) from disk.
pub fn read_idx(path: &Path) -> Result<(Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.into(),
        source,
    })?;
    parse_idx(&maybe_gunzip(bytes, path)?, path)
}

/// Builds a 1-channel [`ImageSet`] from IDX image bytes and optional IDX label bytes.
pub fn image_set_from_bytes(
    images: Vec<u8>,
    images_path: &Path,
    labels: Option<(Vec<u8>, &Path)>,
) -> Result<ImageSet> {
    let (dims, pixels) = parse_idx(&maybe_gunzip(images, images_path)?, images_path)?;
    let [n, h, w] = dims[..] else {
        return Err(DataError::format(
            images_path,
            format!("IDX images have dimensions {dims:?}, expected (N, H, W)"),
        ));
    };
    let labels = match labels {
        Some((bytes, lpath)) => {
            let (ldims, l) = parse_idx(&maybe_gunzip(bytes, lpath)?, lpath)?;
            if ldims != [n] {
                return Err(DataError::format(
                    lpath,
                    format!(
                        "IDX labels have dimensions {ldims:?}, expected ({n}) to match {}",
                        images_path.display()
                    ),
                ));
            }
            Some(l.into_iter().map(i64::from).collect())
        }
        None => None,
    };
    Ok(ImageSet {
        channels: 1,
        height: h,
        width: w,
        pixels,
        labels,
        latents: None,
    })
}

/// Reads an MNIST-style pair of IDX files (images, optional labels), raw or gzip.
pub fn read_mnist(images: &Path, labels: Option<&Path>) -> Result<ImageSet> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| DataError::Io {
            path: p.into(),
            source,
        })
    };
    let l = match labels {
        Some(p) => Some((read(p)?, p)),
        None => None,
    };
    image_set_from_bytes(read(images)?, images, l)
}
