//! Recycled f32 buffers for the kernels' activations and temporaries.
//!
//! A training step allocates the same few dozen large buffers every time. Fresh ones cost a
//! zeroing pass (`calloc` of reused memory) and, when the allocator has handed pages back,
//! a page fault per page. Buffers here go back to a process-wide pool when dropped and come out
//! again for a request of the same length, contents unspecified: every user overwrites what it
//! takes. The pool keeps at most [`CAP_BYTES`], dropping its oldest buffers beyond that.

use std::collections::VecDeque;
use std::ops::{Deref, DerefMut};
use std::sync::Mutex;

/// Most bytes the pool holds between uses.
pub const CAP_BYTES: usize = 2 << 30;

struct Pool {
    bufs: VecDeque<Vec<f32>>,
    bytes: usize,
}

static POOL: Mutex<Pool> = Mutex::new(Pool {
    bufs: VecDeque::new(),
    bytes: 0,
});

/// A buffer of f32 values that returns to the pool when dropped.
pub(crate) struct Buf(Vec<f32>);

/// A buffer of `n` values whose contents are unspecified (a recycled buffer of that length, or
/// zeros): the caller overwrites every value it reads.
pub(crate) fn take(n: usize) -> Buf {
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(i) = pool.bufs.iter().position(|b| b.len() == n) {
        if let Some(v) = pool.bufs.remove(i) {
            pool.bytes -= n * 4;
            return Buf(v);
        }
    }
    drop(pool);
    Buf(vec![0f32; n])
}

/// `dst ← src` on every thread (a step copies a few MiB per layer; one core would idle).
pub(crate) fn par_copy(dst: &mut [f32], src: &[f32]) {
    use rayon::prelude::*;
    dst.par_chunks_mut(64 * 1024)
        .zip(src.par_chunks(64 * 1024))
        .for_each(|(d, s)| d.copy_from_slice(s));
}

impl Buf {
    /// The values as a plain vector that leaves the pool for good (a candle op's output).
    pub(crate) fn into_vec(mut self) -> Vec<f32> {
        std::mem::take(&mut self.0)
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.0);
        let bytes = v.len() * 4;
        if bytes == 0 || bytes > CAP_BYTES {
            return;
        }
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        while pool.bytes + bytes > CAP_BYTES {
            match pool.bufs.pop_front() {
                Some(old) => pool.bytes -= old.len() * 4,
                None => break,
            }
        }
        pool.bytes += bytes;
        pool.bufs.push_back(v);
    }
}

impl Deref for Buf {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.0
    }
}

impl DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.0
    }
}
