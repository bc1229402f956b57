//! Fused CPU kernels with hand-written backward passes, as candle custom ops: LayerNorm,
//! causal attention on the packed qkv projection, and the exact GELU.
//!
//! Composed candle ops materialise every intermediate on the autograd tape (the training step
//! spent ~20 % of its time zeroing fresh pages); each kernel here keeps only its inputs and
//! recomputes what its backward needs. They apply to f32 tensors on the CPU; elsewhere, or
//! when switched off with [`set_enabled`], the model uses the composed ops, which remain the
//! reference (tests hold the two equal in values and gradients).

pub mod attention;
pub mod gelu;
pub mod layer_norm;
pub mod linear;

use candle_core::{CpuStorage, DType, Layout, Tensor};
use std::sync::atomic::{AtomicBool, Ordering};

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns the fused kernels on (default) or off process-wide.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::SeqCst);
}

/// Whether the fused kernels are on.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::SeqCst)
}

/// Whether the kernels apply to `x`: switched on, f32, on the CPU.
pub fn applies(x: &Tensor) -> bool {
    enabled() && x.dtype() == DType::F32 && x.device().is_cpu()
}

/// The contiguous f32 data of a custom op's argument.
pub(crate) fn slice<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: input must be contiguous")))?;
    Ok(&s.as_slice::<f32>()?[a..b])
}

/// `dst (m×n, rows `dst_rs` apart) = [dst +] scale · lhs (m×k) · rhs (k×n)` over strided f32
/// buffers (strides in elements), on all rayon threads when `parallel`.
///
/// # Safety
/// Every element the sizes and strides address must lie inside the buffers.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_strided(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    (lhs, lhs_rs, lhs_cs): (*const f32, usize, usize),
    (rhs, rhs_rs, rhs_cs): (*const f32, usize, usize),
    scale: f32,
    parallel: bool,
) {
    let par = match rayon::current_num_threads() {
        t if parallel && t > 1 => gemm::Parallelism::Rayon(t),
        _ => gemm::Parallelism::None,
    };
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        1.0f32,
        scale,
        false,
        false,
        false,
        par,
    )
}
