//! The CPU engine: fused kernels over slices, under the model. This is a leaf: it reads rows
//! of f32 and weights in its own layouts ([`LayerParts`], [`train::TrunkParts`],
//! [`step::StepParts`]) and imports nothing of the model, whose flow (token order, shift,
//! affine map, log-det, loss) the model writes once (`crate::affine`). It declares the model
//! options it runs ([`COVERS`], [`TRAIN_COVERS`]); a block using any other runs composed.
//!
//! For training: a block's transformer forward and backward with no autograd tape ([`train`]),
//! and, where the model trains through candle's tape, a whole transformer layer as one autograd
//! node with a hand-written backward ([`layer`]) and the Linear op of the embeddings and heads
//! ([`linear`]). For gradient-free passes: the trunk ([`trunk`]) and the step engine ([`step`])
//! of inference. LayerNorm, causal attention and GELU ([`gelu`]) are slice functions they share.
//!
//! Composed candle ops materialise every intermediate on the autograd tape, and candle's
//! backward gives each a zeroed gradient and an add: the training step spent most of its time
//! outside its products. The kernels apply to f32 tensors on the CPU; elsewhere (CUDA, Metal,
//! bf16/f16), or when switched off, the model runs on candle's composed ops, which remain the
//! reference (tests hold the two equal in values and gradients).
//!
//! One switch, process-wide, chooses: [`set_enabled`] from code, `TARFLOW_CPU_KERNELS=0` in
//! the environment, or the command line's `--composed`. Off, the CPU runs exactly the ops a GPU
//! runs, so the GPU path is testable on any machine.

pub(crate) mod attention;
pub mod gelu;
pub mod layer;
pub(crate) mod layer_norm;
pub mod linear;
pub(crate) mod pool;
pub mod rope;
pub mod step;
pub mod train;
pub mod trunk;

pub use layer::LayerParts;

use candle_core::{CpuStorage, DType, Layout, Tensor};
use std::sync::atomic::{AtomicU8, Ordering};

/// The model options (config keys beyond its sizes) the engine runs: the class embedding, the
/// affine or volume-preserving head, any token order, the soft-clipped softplus head, the start
/// token and the final norm. A block using any other option runs on candle's composed ops.
pub const COVERS: &[&str] = &[
    "num_classes",
    "nvp",
    "permutation",
    "cond_deep_only",
    "scale",
    "sos",
    "final_norm",
    "soft_clip",
    "patch_channels_last",
    "denoiser_layers",
    "rope",
    "hf_style_rope",
    "txt_size",
    "txt_dim",
];

/// The options the tape-free training pass ([`train`] and the model's pass around it) covers:
/// TarFlow's block. With others a model trains through candle's tape, on the fused layers.
pub const TRAIN_COVERS: &[&str] = &[
    "num_classes",
    "nvp",
    "permutation",
    "cond_deep_only",
    "patch_channels_last",
    "denoiser_layers",
];

/// 0: not yet read from the environment; 1: on; 2: off.
static STATE: AtomicU8 = AtomicU8::new(0);

/// The environment variable that turns the CPU kernels off (`0`, `off`, `false`, `no`).
pub const ENV_VAR: &str = "TARFLOW_CPU_KERNELS";

/// Turns the CPU kernels (training ops, trunk, step engine) on (default) or off, process-wide; this
/// overrides `TARFLOW_CPU_KERNELS`.
pub fn set_enabled(on: bool) {
    STATE.store(if on { 1 } else { 2 }, Ordering::SeqCst);
}

/// Whether the CPU kernels are on.
pub fn enabled() -> bool {
    match STATE.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let off = std::env::var(ENV_VAR).is_ok_and(|v| {
                matches!(
                    v.trim().to_ascii_lowercase().as_str(),
                    "0" | "off" | "false" | "no"
                )
            });
            // A racing set_enabled wins over the environment.
            let _ = STATE.compare_exchange(
                0,
                if off { 2 } else { 1 },
                Ordering::SeqCst,
                Ordering::SeqCst,
            );
            STATE.load(Ordering::SeqCst) == 1
        }
    }
}

/// Whether the kernels apply to `x`: switched on, f32, on the CPU.
pub fn applies(x: &Tensor) -> bool {
    applies_to(x.dtype(), x.device())
}

/// Whether the kernels apply to tensors of `dtype` on `device`.
pub fn applies_to(dtype: DType, device: &candle_core::Device) -> bool {
    enabled() && dtype == DType::F32 && device.is_cpu()
}

/// `f` over the f32 values of `t`, read in place where `t` is a contiguous f32 CPU tensor (a
/// copy otherwise): a pass over rows need not first copy its input out of the tensor.
pub fn with_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    {
        let (storage, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) =
            (&*storage, layout.contiguous_offsets())
        {
            return Ok(f(&v[a..b]));
        }
    }
    Ok(f(&t.flatten_all()?.to_vec1::<f32>()?))
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

thread_local! {
    /// How many passes run side by side with this thread's (1 outside [`as_one_of`]).
    static SIDE_BY_SIDE: std::cell::Cell<usize> = const { std::cell::Cell::new(1) };
}

/// Runs `f` as one of `passes` passes that run at once (training's `cpu_streams`, scoring's
/// two halves), so that its products take their share of the threads. With all of them, each
/// product would split its work between threads the other pass keeps busy: its halves would
/// run one after the other on one core, each packing the left operand again.
pub fn as_one_of<R>(passes: usize, f: impl FnOnce() -> R) -> R {
    struct Restore(usize);
    impl Drop for Restore {
        fn drop(&mut self) {
            SIDE_BY_SIDE.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(SIDE_BY_SIDE.with(|c| c.replace(passes.max(1))));
    f()
}

/// `dst (m×n, rows `dst_rs` apart) = [dst +] scale · lhs (m×k) · rhs (k×n)` over strided f32
/// buffers (strides in elements), when `parallel` on this pass's share of the rayon threads
/// ([`as_one_of`]).
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
    let share = rayon::current_num_threads() / SIDE_BY_SIDE.with(|c| c.get());
    let par = match share {
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

/// `out` = the sum of `partials` (per-task column sums), added in the order given: a fixed
/// order, so a reduction split over threads gives the same values on any thread count.
pub(crate) fn sum_partials(partials: Vec<Vec<f32>>, out: &mut [f32]) {
    out.fill(0.0);
    for p in partials {
        out.iter_mut().zip(p).for_each(|(o, v)| *o += v);
    }
}

/// eˣ for f32 without a libm call, so that loops using it vectorise (libm's `expf` is a scalar
/// call, which kept the GELU backward and the softmax scalar): Cody–Waite reduction
/// `x = n·ln2 + r` and a degree-6 polynomial for eʳ on |r| ≤ ln2/2 (Cephes' coefficients),
/// scaled by 2ⁿ through the exponent bits, its Horner steps fused (see [`crate::gelu`]).
/// Relative error ≤ 2e-7 on [−87, 88]; below, 0.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.7);
    // Round to nearest by adding and removing 1.5·2²³ (SSE2 has no rounding instruction, and
    // `round` would be a libm call again).
    const MAGIC: f32 = 12_582_912.0;
    let shifted = x * std::f32::consts::LOG2_E + MAGIC;
    let n = shifted - MAGIC;
    // n as an integer, read from the mantissa of `shifted`: `n as i32` saturates, which the
    // compiler does one lane at a time.
    let ni = shifted.to_bits() as i32 - MAGIC.to_bits() as i32;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    for c in [1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
        p = p.mul_add(r, c);
    }
    let e = p * r * r + r + 1.0;
    // 2ⁿ for n in [−126, 127]; n = −127 only at the clamp, where e·2ⁿ underflows anyway.
    let ni = ni.max(-126);
    e * f32::from_bits(((ni + 127) as u32) << 23)
}

/// Compiles a row-wise kernel for the CPU's widest SIMD, chosen at run time: AVX-512 or AVX2
/// on x86_64 (whose default target is SSE2), NEON on aarch64. The clones compute the same
/// values: Rust never reorders float operations or fuses them on its own (the kernels' explicit
/// `mul_add` rounds once on every target), so each lane count gives the same results.
macro_rules! simd_clones {
    ($($item:item)*) => {$(
        #[multiversion::multiversion(targets(
            "x86_64+avx512f+avx512vl+avx2+fma",
            "x86_64+avx2+fma",
            "aarch64+neon"
        ))]
        $item
    )*};
}
pub(crate) use simd_clones;

/// The sum of sixteen lanes, halved pairwise (lane l + lane l + 8, then + 4, + 2, + 1): a
/// fixed order in four vector adds. Added one after another, the sixteen were a chain of
/// scalar adds that cost a LayerNorm row or a softmax row more than its vector work.
#[inline(always)]
pub(crate) fn hsum16(acc: [f32; 16]) -> f32 {
    halve16(acc, |a, b| a + b)
}

/// The largest of sixteen lanes that hold no NaN, halved pairwise as in [`hsum16`] (with
/// `>`: `f32::max`'s NaN rule compiles to three scalar instructions a lane).
#[inline(always)]
pub(crate) fn hmax16(acc: [f32; 16]) -> f32 {
    halve16(acc, |a, b| if b > a { b } else { a })
}

/// Sixteen lanes folded by `f` pairwise: lane l with lane l + 8, then + 4, + 2, + 1.
/// - Each step has arrays of its own width, so every index is a constant. One loop over the
///   widths, with a variable bound, compiled to scalar code with bounds checks.
/// - The lanes pass through `black_box` first. Without it, LLVM's SLP vectoriser fuses the
///   caller's accumulating loop with this tree and runs both two lanes wide: a LayerNorm row
///   took eight adds a chunk where one does.
#[inline(always)]
fn halve16(acc: [f32; 16], f: impl Fn(f32, f32) -> f32) -> f32 {
    let acc = std::hint::black_box(acc);
    let a8: [f32; 8] = std::array::from_fn(|l| f(acc[l], acc[l + 8]));
    let a4: [f32; 4] = std::array::from_fn(|l| f(a8[l], a8[l + 4]));
    let a2: [f32; 2] = std::array::from_fn(|l| f(a4[l], a4[l + 2]));
    f(a2[0], a2[1])
}

/// Σ a·b in sixteen interleaved partial sums: a fixed order that vectorises.
#[inline(always)]
pub(crate) fn dot16(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (mut ia, mut ib) = (a.chunks_exact(16), b.chunks_exact(16));
    for (ca, cb) in (&mut ia).zip(&mut ib) {
        for l in 0..16 {
            acc[l] = ca[l].mul_add(cb[l], acc[l]);
        }
    }
    let tail: f32 = ia
        .remainder()
        .iter()
        .zip(ib.remainder())
        .map(|(x, y)| x * y)
        .sum();
    hsum16(acc) + tail
}

simd_clones! {
/// `x += b` for every row of `x` (rows of `b.len()`).
pub(crate) fn add_to_rows(x: &mut [f32], b: &[f32]) {
    for r in x.chunks_exact_mut(b.len()) {
        for (v, b) in r.iter_mut().zip(b) {
            *v += b;
        }
    }
}

/// `acc += ` each row of `x` (rows of `acc.len()`), in order.
pub(crate) fn sum_rows_into(x: &[f32], acc: &mut [f32]) {
    for r in x.chunks_exact(acc.len()) {
        for (a, v) in acc.iter_mut().zip(r) {
            *a += v;
        }
    }
}

/// The causal softmax of a T×T score matrix in place: row i over its first i + 1 values, zeros
/// after. One call per matrix, so the rows inline into one loop (a call per row took half of
/// the attention's non-product time).
pub(crate) fn causal_softmax(p: &mut [f32], t: usize) {
    for (i, row) in p.chunks_exact_mut(t).enumerate() {
        softmax_row(row, i + 1);
    }
}
}

/// Softmax over the first `len` values of `row` in place; the rest become 0 (a causal row).
/// Whole 16-value chunks are computed even where they pass `len` (those lanes become 0 by
/// selection, never by arithmetic on them: past a causal product's written columns they may
/// hold anything), so that short rows take no scalar tail. Inlined into SIMD clones only
/// ([`causal_softmax`], the step's attention), which compile it for their lanes.
#[inline(always)]
pub(crate) fn softmax_row(row: &mut [f32], len: usize) {
    let whole = (len.div_ceil(16) * 16).min(row.len() / 16 * 16);
    let mut lanes = [f32::NEG_INFINITY; 16];
    // The chunks wholly inside the row's `len`, then the one that crosses it (its lanes past
    // `len` read −∞). Apart, both loops compile to vector maxes; one loop with a per-lane
    // test stayed scalar. `>` passes a NaN over as `f32::max` does.
    let full = (len / 16 * 16).min(whole);
    for ch in row[..full].chunks_exact(16) {
        for l in 0..16 {
            lanes[l] = if ch[l] > lanes[l] { ch[l] } else { lanes[l] };
        }
    }
    if let Some(ch) = row[full..whole].chunks_exact(16).next() {
        for l in 0..16 {
            let v = if full + l < len {
                ch[l]
            } else {
                f32::NEG_INFINITY
            };
            lanes[l] = if v > lanes[l] { v } else { lanes[l] };
        }
    }
    let tail = whole.min(len)..len;
    let max = row[tail.clone()]
        .iter()
        .fold(hmax16(lanes), |a, &v| a.max(v));
    let mut acc = [0f32; 16];
    for (j, ch) in row[..whole].chunks_exact_mut(16).enumerate() {
        for l in 0..16 {
            let e = exp_f32(ch[l] - max);
            ch[l] = if j * 16 + l < len { e } else { 0.0 };
            acc[l] += ch[l];
        }
    }
    let mut sum = hsum16(acc);
    for v in row[tail.clone()].iter_mut() {
        *v = exp_f32(*v - max);
        sum += *v;
    }
    let inv = 1.0 / sum;
    // The whole chunks' zeros stay zero, so they are scaled with the rest, unmasked.
    for ch in row[..whole].chunks_exact_mut(16) {
        for v in ch {
            *v *= inv;
        }
    }
    for v in row[tail].iter_mut() {
        *v *= inv;
    }
    row[whole.max(len)..].fill(0.0);
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_f32_is_within_2e7_relative_of_f64_exp() {
        let mut worst = 0f64;
        for i in -87_000..=88_000 {
            let x = i as f32 * 1e-3 + 3.7e-4;
            let want = (x as f64).exp();
            let got = super::exp_f32(x) as f64;
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 2e-7, "max relative error {worst}");
        assert_eq!(super::exp_f32(0.0), 1.0);
        assert!(super::exp_f32(-200.0) < 1e-37);
    }
}
