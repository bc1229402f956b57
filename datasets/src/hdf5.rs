//! HDF5 image files (feature `hdf5`, links the system libhdf5). Dataset names and the
//! NCHW / NHWC layout are configuration; images are read in chunks, not all at once.
//!
//! libhdf5 is C and crashes (SIGSEGV) on some corrupt files, which fuzzing found; on Unix the
//! file is therefore read in a forked child process, so a crash there becomes an error here.

use crate::error::{DataError, Result};
use crate::ImageSet;
use ndarray::{s, Ix4};
use std::path::Path;

/// Pixel layout of the image dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// (N, C, H, W), e.g. Fuel's `image_data`.
    Nchw,
    /// (N, H, W, C), e.g. `images` written from numpy HWC arrays.
    Nhwc,
}

/// How to read an HDF5 file.
#[derive(Debug, Clone, PartialEq)]
pub struct Hdf5Options {
    /// Image dataset name; `None` tries `images`, `image_data`, `data`, `x`.
    pub images: Option<String>,
    /// Label dataset name; `None` uses `labels` or `y` when present.
    pub labels: Option<String>,
    /// Layout; `None` infers NHWC when the last axis is 1 or 3 and axis 1 is not.
    pub layout: Option<Layout>,
    /// Images read per chunk.
    pub chunk: usize,
}

impl Default for Hdf5Options {
    fn default() -> Self {
        Self {
            images: None,
            labels: None,
            layout: None,
            chunk: 1024,
        }
    }
}

/// How far a dataset's pixels may outnumber the bytes the file stores for them (compression).
const MAX_EXPANSION: usize = 1024;

/// Reads images (u8) and optional integer labels from `path`; a file that crashes libhdf5 is
/// an error naming it.
pub fn read_hdf5(path: &Path, opts: &Hdf5Options) -> Result<ImageSet> {
    #[cfg(unix)]
    return isolated::run(path, || read_in_process(path, opts));
    #[cfg(not(unix))]
    read_in_process(path, opts)
}

/// Reads the file in this process.
fn read_in_process(path: &Path, opts: &Hdf5Options) -> Result<ImageSet> {
    let err = |m: String| DataError::format(path, m);
    let file = hdf5::File::open(path).map_err(|e| err(format!("not a readable HDF5 file: {e}")))?;
    let name = match &opts.images {
        Some(n) => n.clone(),
        None => ["images", "image_data", "data", "x"]
            .into_iter()
            .find(|n| file.link_exists(n))
            .map(str::to_string)
            .ok_or_else(|| {
                err(
                    "no image dataset (tried images, image_data, data, x); name it in the config"
                        .into(),
                )
            })?,
    };
    let ds = file
        .dataset(&name)
        .map_err(|e| err(format!("no dataset `{name}`: {e}")))?;
    let shape = ds.shape();
    let [n, a, b, c] = shape[..] else {
        return Err(err(format!(
            "dataset `{name}` has shape {shape:?}, expected 4 axes (NCHW or NHWC)"
        )));
    };
    let layout = opts
        .layout
        .unwrap_or(if (c == 1 || c == 3) && !(a == 1 || a == 3) {
            Layout::Nhwc
        } else {
            Layout::Nchw
        });
    let (ch, h, w) = match layout {
        Layout::Nchw => (a, b, c),
        Layout::Nhwc => (c, a, b),
    };
    if ch == 0 || h == 0 || w == 0 {
        return Err(err(format!(
            "dataset `{name}` has shape {shape:?}: images of zero pixels"
        )));
    }
    // The pixels come from the chunks the file stores (perhaps compressed). A shape far beyond
    // them is a corrupt or hostile header and must not make us allocate what it claims.
    let claimed = [n, ch, h, w]
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| err(format!("dataset `{name}` shape {shape:?} overflows")))?;
    // What the dataset says it stores is itself a header field: the file's length bounds it.
    let file_len = std::fs::metadata(path).map_or(0, |m| m.len());
    let stored = usize::try_from(ds.storage_size().min(file_len)).unwrap_or(usize::MAX);
    if claimed > stored.saturating_mul(MAX_EXPANSION).max(1 << 20) {
        return Err(err(format!(
            "dataset `{name}` claims {claimed} pixels of shape {shape:?} but stores only {stored} bytes; the file is corrupt"
        )));
    }
    // Grown as chunks arrive rather than reserved from the claim.
    let mut pixels = Vec::with_capacity(claimed.min(64 << 20));
    let step = opts.chunk.max(1);
    for start in (0..n).step_by(step) {
        let end = (start + step).min(n);
        let block = ds
            .read_slice::<u8, _, Ix4>(s![start..end, .., .., ..])
            .map_err(|e| {
                err(format!(
                    "dataset `{name}` images {start}..{end}: {e} (expected u8 pixels)"
                ))
            })?;
        match layout {
            Layout::Nchw => pixels.extend(block.iter().copied()),
            Layout::Nhwc => pixels.extend(block.permuted_axes([0, 3, 1, 2]).iter().copied()),
        }
    }
    let label_name = match &opts.labels {
        Some(l) => Some(l.clone()),
        None => ["labels", "y"]
            .into_iter()
            .find(|l| file.link_exists(l))
            .map(str::to_string),
    };
    let labels = match label_name {
        Some(l) => {
            let d = file
                .dataset(&l)
                .map_err(|e| err(format!("label dataset `{l}`: {e}")))?;
            if d.size() != n {
                return Err(err(format!(
                    "label dataset `{l}` has {} entries for {n} images",
                    d.size()
                )));
            }
            let v = d
                .read_raw::<i64>()
                .map_err(|e| err(format!("label dataset `{l}`: {e}")))?;
            if v.len() != n {
                return Err(err(format!(
                    "label dataset `{l}` has {} entries for {n} images",
                    v.len()
                )));
            }
            Some(v)
        }
        None => None,
    };
    Ok(ImageSet {
        channels: ch,
        height: h,
        width: w,
        pixels,
        labels,
        latents: None,
    })
}

#[cfg(unix)]
mod isolated {
    //! One read in a forked child: the child sends the image set (or its error) through a pipe
    //! and exits; the parent reports a child killed by a signal as a corrupt file.

    use crate::error::{DataError, Result};
    use crate::ImageSet;
    use std::fs::File;
    use std::io::{Read, Write};
    use std::os::fd::FromRawFd;
    use std::path::Path;

    /// One isolated read at a time: a child forked while another read's pipe is open would
    /// inherit its write end and keep that read from ever seeing the end of its data.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

    pub(super) fn run(path: &Path, read: impl FnOnce() -> Result<ImageSet>) -> Result<ImageSet> {
        let _one = ONE_AT_A_TIME
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let io = |e: std::io::Error| DataError::Io {
            path: path.into(),
            source: e,
        };
        let mut fds = [0i32; 2];
        // SAFETY: pipe writes two new descriptors into the array.
        if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
            return Err(io(std::io::Error::last_os_error()));
        }
        // Fork while holding libhdf5's global (reentrant) lock: a fork while another thread
        // holds it would leave the child waiting on it forever. The child's thread owns the
        // inherited lock, so its own libhdf5 calls re-enter it.
        // SAFETY: the child only reads the file, writes the pipe and `_exit`s.
        let pid = hdf5::sync::sync(|| unsafe { libc::fork() });
        if pid < 0 {
            let e = std::io::Error::last_os_error();
            // SAFETY: both descriptors are ours and still open.
            unsafe {
                libc::close(fds[0]);
                libc::close(fds[1]);
            }
            return Err(io(e));
        }
        if pid == 0 {
            // SAFETY: in the child; a crash must kill it with the signal, not run a handler
            // inherited from the parent (a fuzzer's, say).
            unsafe {
                libc::close(fds[0]);
                for sig in [
                    libc::SIGSEGV,
                    libc::SIGBUS,
                    libc::SIGABRT,
                    libc::SIGFPE,
                    libc::SIGILL,
                ] {
                    libc::signal(sig, libc::SIG_DFL);
                }
            }
            let bytes = encode(read(), path);
            // SAFETY: fds[1] is the child's open write end.
            let mut out = unsafe { File::from_raw_fd(fds[1]) };
            let ok = out.write_all(&bytes).is_ok();
            drop(out);
            // SAFETY: leave without running the parent's destructors or atexit handlers.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) }
        }
        // SAFETY: in the parent; fds[1] is the child's end, fds[0] ours.
        unsafe { libc::close(fds[1]) };
        let mut input = unsafe { File::from_raw_fd(fds[0]) };
        let mut buf = Vec::new();
        let read_res = input.read_to_end(&mut buf);
        let mut status = 0;
        // SAFETY: waits for our own child; a signal (a timer, say) interrupting the wait must
        // not leave the child a zombie or its status unread.
        while unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {
            if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                break;
            }
        }
        if libc::WIFSIGNALED(status) {
            return Err(DataError::format(
                path,
                format!(
                    "libhdf5 crashed reading this file (signal {}); the file is corrupt",
                    libc::WTERMSIG(status)
                ),
            ));
        }
        read_res.map_err(io)?;
        decode(&buf, path)
    }

    /// Tag 0 + channels, height, width, image count, label flag, pixels, labels; or tag 1 +
    /// the error message.
    fn encode(r: Result<ImageSet>, path: &Path) -> Vec<u8> {
        match r {
            Ok(s) => {
                let mut b = vec![0u8];
                let n = s.len() as u64;
                for v in [s.channels as u64, s.height as u64, s.width as u64, n] {
                    b.extend(v.to_le_bytes());
                }
                b.push(s.labels.is_some() as u8);
                b.extend(&s.pixels);
                for l in s.labels.iter().flatten() {
                    b.extend(l.to_le_bytes());
                }
                b
            }
            Err(e) => {
                let msg = e.to_string();
                let prefix = format!("{}: ", path.display());
                let mut b = vec![1u8];
                b.extend(msg.strip_prefix(&prefix).unwrap_or(&msg).as_bytes());
                b
            }
        }
    }

    fn decode(b: &[u8], path: &Path) -> Result<ImageSet> {
        let bad = || DataError::format(path, "the HDF5 reader process ended without a result");
        let (&tag, rest) = b.split_first().ok_or_else(bad)?;
        if tag == 1 {
            return Err(DataError::format(path, String::from_utf8_lossy(rest)));
        }
        let word = |i: usize| -> Result<usize> {
            let w = rest.get(i * 8..i * 8 + 8).ok_or_else(bad)?;
            let mut a = [0u8; 8];
            a.copy_from_slice(w);
            usize::try_from(u64::from_le_bytes(a)).map_err(|_| bad())
        };
        let (c, h, w, n) = (word(0)?, word(1)?, word(2)?, word(3)?);
        let has_labels = *rest.get(32).ok_or_else(bad)? == 1;
        let len = [c, h, w, n]
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(bad)?;
        let pixels = rest.get(33..33 + len).ok_or_else(bad)?.to_vec();
        let labels = if has_labels {
            let end = n.checked_mul(8).and_then(|b| b.checked_add(33 + len));
            let raw = end.and_then(|e| rest.get(33 + len..e)).ok_or_else(bad)?;
            Some(
                raw.chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                    .collect(),
            )
        } else {
            None
        };
        Ok(ImageSet {
            channels: c,
            height: h,
            width: w,
            pixels,
            labels,
            latents: None,
        })
    }
}
