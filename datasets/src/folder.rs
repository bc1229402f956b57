//! A folder of image files (png, jpeg, bmp, webp; recursive), resized so the shorter side is S
//! and centre-cropped to S×S (torchvision's Resize + CenterCrop), optionally one class per
//! top-level sub-folder (ImageFolder). A top-level `val`/`valid`/`test` folder inside the
//! training root is never a class and is skipped.

use crate::error::{DataError, Result};
use crate::ImageSet;
use image::imageops::FilterType;
use rayon::prelude::*;
use std::path::{Path, PathBuf};

/// The image file extensions a folder is searched for (and `score` reads), lower case.
pub const EXTENSIONS: [&str; 7] = ["png", "jpg", "jpeg", "bmp", "webp", "gif", "jfif"];
const HELD_OUT: [&str; 3] = ["val", "valid", "test"];

/// How to read a folder. `None` infers, as torchvision's ImageFolder does.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FolderOptions {
    /// Output side S in pixels; `None`: the images' own size when they are all the same square
    /// size, else the least shorter side among them (resized and centre-cropped, with a note).
    pub size: Option<usize>,
    /// Output channels: 1 (grayscale) or 3 (RGB).
    pub channels: usize,
    /// Label each image by its top-level sub-folder (sorted names → 0, 1, …); `None`: when
    /// every image lies in a sub-folder.
    pub class_per_subdir: Option<bool>,
    /// Skip unreadable images (counted) instead of failing.
    pub skip_bad: bool,
}

/// What was read, with the number of images skipped as unreadable and the class names.
#[derive(Debug, Clone)]
pub struct FolderSet {
    /// The images.
    pub set: ImageSet,
    /// Unreadable images skipped (only with `skip_bad`).
    pub skipped: Vec<(PathBuf, String)>,
    /// Class names by label.
    pub classes: Vec<String>,
    /// What was inferred or changed (a resize, the classes), for the user to see.
    pub notes: Vec<String>,
}

fn is_image(p: &Path) -> bool {
    p.extension()
        .is_some_and(|e| EXTENSIONS.contains(&e.to_string_lossy().to_ascii_lowercase().as_str()))
}

/// Lists the image files under `root` once, sorted, with their top-level folder name.
fn list(root: &Path) -> Result<Vec<(PathBuf, Option<String>)>> {
    let mut out = Vec::new();
    let walker = walkdir::WalkDir::new(root)
        .follow_links(true)
        .sort_by_file_name();
    let mut it = walker.into_iter();
    while let Some(entry) = it.next() {
        let e = entry.map_err(|e| DataError::format(root, format!("cannot list: {e}")))?;
        if e.depth() == 1
            && e.file_type().is_dir()
            && HELD_OUT.contains(&e.file_name().to_string_lossy().as_ref())
        {
            it.skip_current_dir();
            continue;
        }
        if e.file_type().is_file() && is_image(e.path()) {
            let top = e
                .path()
                .strip_prefix(root)
                .ok()
                .and_then(|r| (r.components().count() > 1).then(|| r.components().next()))
                .flatten()
                .map(|c| c.as_os_str().to_string_lossy().into_owned());
            out.push((e.into_path(), top));
        }
    }
    Ok(out)
}

/// Decodes, resizes (shorter side → S) and centre-crops one image to planar C×S×S bytes.
pub fn load_image(
    path: &Path,
    size: usize,
    channels: usize,
) -> std::result::Result<Vec<u8>, String> {
    planar(decode(path).map_err(|e| e.to_string())?, size, channels)
}

/// Decodes one image file, its format guessed from its bytes.
pub fn decode(path: &Path) -> image::ImageResult<image::DynamicImage> {
    image::ImageReader::open(path)?
        .with_guessed_format()?
        .decode()
}

/// A decoded image resized (shorter side → S) and centre-cropped to planar C×S×S bytes.
pub fn planar(
    img: image::DynamicImage,
    size: usize,
    channels: usize,
) -> std::result::Result<Vec<u8>, String> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 {
        return Err("empty image".into());
    }
    let scale = size as f64 / w.min(h) as f64;
    let (nw, nh) = (
        ((w as f64 * scale).round() as u32).max(size as u32),
        ((h as f64 * scale).round() as u32).max(size as u32),
    );
    let img = if (nw as usize, nh as usize) == (w, h) {
        img
    } else {
        img.resize_exact(nw, nh, FilterType::Triangle)
    };
    let (x0, y0) = ((nw - size as u32) / 2, (nh - size as u32) / 2);
    let img = img.crop_imm(x0, y0, size as u32, size as u32);
    let n = size * size;
    Ok(if channels == 1 {
        img.to_luma8().into_raw()
    } else {
        let rgb = img.to_rgb8().into_raw();
        let mut planar = vec![0u8; 3 * n];
        for (i, px) in rgb.chunks_exact(3).enumerate() {
            for c in 0..3 {
                planar[c * n + i] = px[c];
            }
        }
        planar
    })
}

/// The side to read `files` at: `want`, or inferred from their headers (see [`FolderOptions`]).
fn pick_size(
    files: &[(PathBuf, Option<String>)],
    want: Option<usize>,
    notes: &mut Vec<String>,
) -> Result<usize> {
    let dims: Vec<Option<(u32, u32)>> = files
        .par_iter()
        .map(|(p, _)| {
            image::ImageReader::open(p)
                .ok()?
                .with_guessed_format()
                .ok()?
                .into_dimensions()
                .ok()
        })
        .collect();
    let mut sizes: Vec<(u32, u32)> = dims.iter().flatten().copied().collect();
    sizes.sort_unstable();
    sizes.dedup();
    let describe = |v: &[(u32, u32)]| {
        let shown: Vec<String> = v.iter().take(3).map(|(w, h)| format!("{w}×{h}")).collect();
        format!(
            "{}{}",
            shown.join(", "),
            if v.len() > 3 { ", …" } else { "" }
        )
    };
    match want {
        Some(s) => {
            if sizes
                .iter()
                .any(|&(w, h)| (w as usize, h as usize) != (s, s))
            {
                notes.push(format!(
                    "images of {} {} resized (shorter side) and centre-cropped to {s}×{s}",
                    if sizes.len() == 1 { "size" } else { "sizes" },
                    describe(&sizes)
                ));
            }
            Ok(s)
        }
        None => match sizes[..] {
            [] => Ok(0), // nothing decodable: the read below names the first bad file
            [(w, h)] if w == h => Ok(w as usize),
            _ => {
                let s = sizes.iter().map(|&(w, h)| w.min(h)).min().unwrap_or(0) as usize;
                notes.push(format!(
                    "images of {} sizes ({}): resized (shorter side) and centre-cropped to {s}×{s}, the least shorter side; pass --size (data inspect) or set img_size (training) to choose",
                    sizes.len(),
                    describe(&sizes)
                ));
                Ok(s)
            }
        },
    }
}

/// Reads every image under `root`.
pub fn read_folder(root: &Path, opts: &FolderOptions) -> Result<FolderSet> {
    if !(opts.channels == 1 || opts.channels == 3) || opts.size == Some(0) {
        return Err(DataError::format(
            root,
            format!(
                "folder source: channels must be 1 or 3 and size ≥ 1 (got {}, {:?})",
                opts.channels, opts.size
            ),
        ));
    }
    if !root.is_dir() {
        return Err(DataError::format(root, "not a folder"));
    }
    let files = list(root)?;
    if files.is_empty() {
        return Err(DataError::format(
            root,
            format!("no image files ({}) in this folder", EXTENSIONS.join(", ")),
        ));
    }
    let mut notes = Vec::new();
    let all_in_subdirs = files.iter().all(|(_, top)| top.is_some());
    let by_subdir = opts.class_per_subdir.unwrap_or(all_in_subdirs);
    let mut classes: Vec<String> = Vec::new();
    if by_subdir {
        if let Some((p, _)) = files.iter().find(|(_, top)| top.is_none()) {
            return Err(DataError::format(
                p,
                "image outside a class sub-folder (classes from sub-folders were asked for)",
            ));
        }
        classes = files.iter().filter_map(|(_, t)| t.clone()).collect();
        classes.dedup();
        if opts.class_per_subdir.is_none() {
            notes.push(format!(
                "{} classes from the sub-folders ({}{})",
                classes.len(),
                classes
                    .iter()
                    .take(5)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
                if classes.len() > 5 { ", …" } else { "" }
            ));
        }
    }
    let size = pick_size(&files, opts.size, &mut notes)?;
    let opts = &FolderOptions {
        size: Some(size),
        class_per_subdir: Some(by_subdir),
        ..opts.clone()
    };
    let size = size.max(1);
    let decoded: Vec<(usize, std::result::Result<Vec<u8>, String>)> = files
        .par_iter()
        .enumerate()
        .map(|(i, (p, _))| (i, load_image(p, size, opts.channels)))
        .collect();
    let mut pixels = Vec::with_capacity(files.len() * opts.channels * size * size);
    let mut labels = Vec::new();
    let mut skipped = Vec::new();
    for (i, res) in decoded {
        let (path, top) = &files[i];
        match res {
            Ok(px) => {
                pixels.extend_from_slice(&px);
                if let Some(t) = top.as_ref().filter(|_| by_subdir) {
                    labels.push(classes.binary_search(t).unwrap_or(0) as i64);
                }
            }
            Err(e) if opts.skip_bad => skipped.push((path.clone(), e)),
            Err(e) => {
                return Err(DataError::format(path, format!("image {i} of the folder is unreadable: {e} (to skip such files: data.skip_bad = true in a training config, `--skip-bad` for data inspect; score, ood and classify skip them unless --strict)")))
            }
        }
    }
    if pixels.is_empty() {
        return Err(DataError::format(
            root,
            format!("all {} images were unreadable", files.len()),
        ));
    }
    let set = ImageSet {
        channels: opts.channels,
        height: size,
        width: size,
        pixels,
        labels: by_subdir.then_some(labels),
        latents: None,
    };
    Ok(FolderSet {
        set,
        skipped,
        classes,
        notes,
    })
}
