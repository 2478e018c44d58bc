//! CPU kernels with hand-written backward passes, for training and inference.
//!
//! candle's autograd differentiates composed ops one at a time: LayerNorm as eleven of them,
//! softmax as five, each allocating its output and, in the backward pass, a zeroed gradient
//! buffer per input plus the gradients of inputs that need none (a dropout mask, a padding
//! bias). On BERT's largest tensors (`[batch, heads, seq, seq]` attention scores) that
//! dominated a training step. Each kernel here is one [`CustomOp1`]/[`CustomOp2`]/[`CustomOp3`]
//! whose backward is one more kernel and returns gradients only for inputs that track one.
//! Rows are spread over rayon's threads.
//!
//! Kernels take f32 and f64 (and, for LayerNorm, f16/bf16 through f64 accumulation); other
//! dtypes and devices use the composed ops in `nn`.
//!
//! One file per op (`layer_norm`, `softmax`, `gelu`, `dropout`, `linear`, `attention`,
//! `embedding`); this one holds what they share: the float trait, lane reductions, SIMD
//! dispatch, row and element loops.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// Floats the kernels compute in.
pub(crate) trait Real:
    WithDType + num_traits::Float + std::ops::AddAssign + std::ops::MulAssign + Send + Sync
{
    fn erf(self) -> Self;
    /// `e^x`, in a form the compiler vectorises (no libm call per element).
    fn exp_fast(self) -> Self;
    /// Keeps attention probabilities of this dtype for the backward pass.
    fn save(probs: Vec<Self>) -> SavedProbs;
    /// The kept probabilities, if they are of this dtype.
    fn saved(saved: &SavedProbs) -> Option<&[Self]>;
}

/// Cephes' `expf` (the portable `exp_fast` and the AVX-512 `exp` share these): arguments
/// are clamped to `[EXP_LO, EXP_HI]`, reduced by `n ln 2` in two parts (`EXP_LN2_HI` exact in
/// few bits, `EXP_LN2_LO` the rest), and `e^r = 1 + r + r^2 (c0 r^5 + ... + c5)`.
pub(crate) const EXP_HI: f32 = 88.376_26;
/// See [`EXP_HI`].
pub(crate) const EXP_LO: f32 = -87.336_55;
/// See [`EXP_HI`].
pub(crate) const EXP_LN2_HI: f32 = 0.693_359_4;
/// See [`EXP_HI`].
pub(crate) const EXP_LN2_LO: f32 = -2.121_944_4e-4;
/// See [`EXP_HI`]: the polynomial's coefficients, highest degree first.
pub(crate) const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];

/// Abramowitz & Stegun 7.1.26: `erf(x) = 1 - t (a1 + t (a2 + ...)) e^(-x^2)` with
/// `t = 1 / (1 + p x)`, `x >= 0`; shared by the portable and the AVX-512 GELU.
pub(crate) const ERF_P: f32 = 0.327_591_1;
/// The coefficients `a1..a5` of [`ERF_P`]'s formula.
pub(crate) const ERF_A: [f32; 5] = [
    0.254_829_6,
    -0.284_496_74,
    1.421_413_7,
    -1.453_152,
    1.061_405_4,
];

impl Real for f32 {
    fn save(probs: Vec<Self>) -> SavedProbs {
        SavedProbs::F32(probs)
    }

    fn saved(saved: &SavedProbs) -> Option<&[Self]> {
        match saved {
            SavedProbs::F32(p) => Some(p),
            SavedProbs::F64(_) => None,
        }
    }

    /// Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7, an f32 ulp of 1), the formula
    /// PyTorch's vectorised CPU `erf` uses too; 4x faster than libm's `erff`, which held GELU
    /// at 5% of a training step.
    #[inline(always)]
    fn erf(self) -> Self {
        const P: f32 = ERF_P;
        const A: [f32; 5] = ERF_A;
        let x = self.abs();
        let t = 1.0 / (1.0 + P * x);
        let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
        let y = 1.0 - poly * (-x * x).exp_fast();
        y.copysign(self)
    }

    /// Cephes' `expf`: `2^n e^r` with `n = round(x / ln 2)` and a degree-7 polynomial for
    /// `e^r`, `|r| <= ln 2 / 2`; relative error within 2 ulp. libm's `expf` is a call per
    /// element that the compiler cannot vectorise: softmax and GELU spent 6% of a training step
    /// in it. Above 88.376 (within 0.35 of where f32's `exp` overflows) it returns +inf, below
    /// -87.337 zero; the kernels only take it of arguments <= 0.
    #[inline(always)]
    fn exp_fast(self) -> Self {
        const HI: f32 = EXP_HI;
        const LO: f32 = EXP_LO;
        const C: [f32; 6] = EXP_POLY;
        // Rounds to nearest: adding 1.5 * 2^23 pushes the fraction bits out.
        const ROUND: f32 = 12_582_912.0;
        let x = self.clamp(LO, HI);
        let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
        let r = (x - n * EXP_LN2_HI) - n * EXP_LN2_LO;
        let poly = ((((C[0] * r + C[1]) * r + C[2]) * r + C[3]) * r + C[4]) * r + C[5];
        let e = poly * r * r + r + 1.0;
        // 2^n from bits, n in [-126, 127] after the clamp (a normal power of two): n + 127 is
        // exact in the low mantissa bits of n + 127 + 1.5 * 2^23, and moves to the exponent
        // field. Integer lanes only: `n as i32` (a saturating conversion) and a `match` kept
        // this function scalar, 13% of an inference forward pass in softmax and GELU.
        let biased = (n + (ROUND + 127.0))
            .to_bits()
            .wrapping_sub(ROUND.to_bits());
        let y = e * f32::from_bits(biased << 23);
        let y = if self < LO { 0.0 } else { y };
        if self > HI {
            f32::INFINITY
        } else {
            y
        }
    }
}

impl Real for f64 {
    fn save(probs: Vec<Self>) -> SavedProbs {
        SavedProbs::F64(probs)
    }

    fn saved(saved: &SavedProbs) -> Option<&[Self]> {
        match saved {
            SavedProbs::F64(p) => Some(p),
            SavedProbs::F32(_) => None,
        }
    }

    #[inline(always)]
    fn erf(self) -> Self {
        libm::erf(self)
    }

    #[inline(always)]
    fn exp_fast(self) -> Self {
        self.exp()
    }
}

/// Independent accumulators of the row reductions below: a sequential `fold` over floats is
/// one dependent add per element (the compiler may not reorder it); eight lanes fill a vector
/// register and hide the add latency.
const LANES: usize = 8;

/// Reduces `f(j)` over `0..n` with `combine`, in [`LANES`] interleaved accumulators.
#[inline(always)]
fn reduce_lanes<T: Real>(
    n: usize,
    init: T,
    f: impl Fn(usize) -> T,
    combine: impl Fn(T, T) -> T,
) -> T {
    let mut acc = [init; LANES];
    let full = n - n % LANES;
    for base in (0..full).step_by(LANES) {
        for (lane, a) in acc.iter_mut().enumerate() {
            *a = combine(*a, f(base + lane));
        }
    }
    let mut total = acc.into_iter().fold(init, &combine);
    for j in full..n {
        total = combine(total, f(j));
    }
    total
}

/// `sum_j a[j] * b[j]`.
#[inline(always)]
fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    let n = a.len().min(b.len());
    reduce_lanes(n, T::zero(), |j| a[j] * b[j], |x, y| x + y)
}

/// Softmax of `row` in place; `row` holds the (scaled, biased) scores.
#[inline(always)]
fn softmax_in_place<T: Real>(row: &mut [T]) {
    // A plain comparison, which compiles to vector max instructions; `Float::max`'s NaN rule
    // (return the other operand) kept this loop scalar. A NaN score makes the row NaN either
    // way (through `v - max` or the sum).
    let max = reduce_lanes(
        row.len(),
        T::neg_infinity(),
        |j| row[j],
        #[inline(always)]
        |a, b| if a > b { a } else { b },
    );
    for v in row.iter_mut() {
        *v = (*v - max).exp_fast();
    }
    let inv = T::one() / reduce_lanes(row.len(), T::zero(), |j| row[j], |x, y| x + y);
    row.iter_mut().for_each(|v| *v *= inv);
}

/// `row = softmax(row * scale + bias)` in place, the portable form of the attention's row step
/// (`vector_math::scaled_softmax` is its AVX-512 / AVX2 f32 counterpart and falls back to it).
#[inline(always)]
pub(crate) fn scaled_softmax_in_place<T: Real>(row: &mut [T], scale: T, bias: Option<&[T]>) {
    match bias {
        Some(bias) => row
            .iter_mut()
            .zip(bias)
            .for_each(|(s, &bias)| *s = *s * scale + bias),
        None => row.iter_mut().for_each(|s| *s *= scale),
    }
    softmax_in_place(row);
}

/// `n` copies of `value`, written rather than `calloc`ed: a fresh zeroed allocation maps the
/// shared zero page, and the first write to each page after a read (GEMM destinations are
/// read) then faults and flushes the TLB of every core, which `perf` showed costing 7% of a
/// training step.
fn filled<T: Copy>(n: usize, value: T) -> Vec<T> {
    let mut out = Vec::with_capacity(n);
    out.resize(n, value);
    out
}

/// Whether packed sequences' first rows (`starts`, then the row count) cover `rows` rows in
/// runs of at least one: what the kernels taking packed rows index by.
fn starts_cover(starts: &[usize], rows: usize) -> bool {
    starts.first() == Some(&0)
        && starts.last() == Some(&rows)
        && starts.windows(2).all(|w| w[0] < w[1])
}

/// A `len`-float output written by `tasks` parallel tasks over consecutive ranges that cover it
/// (`ranges(i)` for task `i`, in order: checked), each range zeroed on its own task's thread
/// just before `fill` gets it. Zero-filling the whole output on the calling thread first
/// ([`filled`]) left the other threads waiting: 12 x 6 MB per MiniLM pass at 32 x 128, 1%.
fn written_by_tasks<S>(
    len: usize,
    tasks: usize,
    ranges: impl Fn(usize) -> std::ops::Range<usize>,
    init: impl Fn() -> S + Sync + Send,
    fill: impl Fn(&mut S, usize, &mut [f32]) + Sync + Send,
) -> Vec<f32> {
    // Taken once, so that what is checked is what the tasks get.
    let ranges: Vec<std::ops::Range<usize>> = (0..tasks).map(ranges).collect();
    let mut end = 0;
    for (i, range) in ranges.iter().enumerate() {
        assert!(
            range.start == end && range.end >= end,
            "written_by_tasks: task {i}'s range {range:?} does not follow {end}"
        );
        end = range.end;
    }
    assert_eq!(
        end, len,
        "written_by_tasks: the ranges end at {end}, not {len}"
    );
    let mut out: Vec<f32> = Vec::with_capacity(len);
    let base = SharedMut(out.as_mut_ptr());
    crate::team::parallel_for_init(tasks, init, |state, i| {
        let range = ranges[i].clone();
        // SAFETY: the ranges are disjoint and within the capacity (checked above), so this
        // task alone touches these floats; they are initialised (zeroed) before the slice
        // over them is made.
        let region = unsafe {
            let start = base.get().add(range.start);
            std::ptr::write_bytes(start, 0, range.len());
            std::slice::from_raw_parts_mut(start, range.len())
        };
        fill(state, i, region);
    });
    // SAFETY: the ranges cover 0..len (checked above) and every task has run (a panic would
    // have unwound past this), so every float is initialised.
    unsafe { out.set_len(len) };
    out
}

/// Runs `f` in a function compiled for AVX-512 or AVX2 + FMA when the CPU has them (checked
/// at run time, once per process by std's cache): `f` is inlined there, so its loops
/// vectorise at that width. The build targets baseline x86-64 (SSE2), where the compiler keeps
/// `exp`-heavy element loops scalar; those loops held 15% of a training step.
#[inline(always)]
pub(crate) fn with_simd<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX-512F, AVX2 and FMA, checked just above.
            return unsafe { simd_avx512(f) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA, checked just above.
            return unsafe { simd_avx2(f) };
        }
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn simd_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn simd_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// Binds each `$v` to the contiguous slice of its CPU storage when all inputs hold the same
/// dtype among `[$ty, ..]`, evaluates `$body` (generic code, instantiated per dtype) and wraps
/// the `Vec` it returns back into that dtype's storage; any other mix is an error naming `$name`.
macro_rules! per_float {
    ($name:expr, [$($ty:ident),+], $inputs:tt, $body:expr) => {
        'dispatch: {
            $(per_float!(@arm 'dispatch, $ty, $name, $inputs, $body);)+
            candle_core::bail!(
                "{}: inputs need one dtype among {}",
                $name,
                stringify!($($ty),+)
            )
        }
    };
    (@arm $label:lifetime, $ty:ident, $name:expr, ($($s:expr => $v:ident @ $l:expr),+), $body:expr) => {
        if let ($(CpuStorage::$ty($v),)+) = ($($s,)+) {
            $(let $v = contiguous($v, $l, $name)?;)+
            break $label CpuStorage::$ty($body);
        }
    };
}

/// The CPU storage of a tensor the kernels read directly.
fn cpu_storage<'a>(
    storage: &'a candle_core::Storage,
    op: &str,
) -> candle_core::Result<&'a CpuStorage> {
    match storage {
        candle_core::Storage::Cpu(c) => Ok(c),
        _ => candle_core::bail!("{op}: CPU tensors expected"),
    }
}

/// Rows smaller than this many elements in total are not worth a thread hand-off.
const PARALLEL_MIN_ELEMENTS: usize = 1 << 14;

fn contiguous<'a, T>(data: &'a [T], layout: &Layout, op: &str) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// Runs `f(row_index, input_rows..., out_row)` over rows of `dim` (each zeroed first), in
/// parallel when large.
fn for_rows<T: Send + Sync + Copy + Default>(
    rows: usize,
    dim: usize,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) -> Vec<T> {
    rows_init(rows, PARALLEL_MIN_ELEMENTS, &vec![T::default(); dim], f)
}

/// `rows` rows of `start.len()` elements, each handed to `f(row_index, row)` right after it
/// is set to a copy of `start`, on the thread that then writes it and while it is in L1: no
/// serial fill of the whole buffer first (a 25 MB output filled on the calling thread kept
/// the other core idle for ~1 ms), and no zeroing of rows that start from something else (a
/// linear layer's bias). In parallel from `parallel_from` elements.
fn rows_init<T: Send + Sync + Copy>(
    rows: usize,
    parallel_from: usize,
    start: &[T],
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) -> Vec<T> {
    let dim = start.len();
    let n = rows * dim;
    let mut out: Vec<T> = Vec::with_capacity(n);
    if n == 0 {
        return out;
    }
    let init = |(r, row): (usize, &mut [std::mem::MaybeUninit<T>])| {
        for (v, &x) in row.iter_mut().zip(start) {
            v.write(x);
        }
        // SAFETY: every element of `row` (as long as `start`) was written just above.
        let row = unsafe { &mut *(row as *mut [std::mem::MaybeUninit<T>] as *mut [T]) };
        with_simd(
            #[inline(always)]
            || f(r, row),
        )
    };
    let spare = &mut out.spare_capacity_mut()[..n];
    if n >= parallel_from {
        crate::team::parallel_chunks_mut(spare, dim, |r, row| init((r, row)));
    } else {
        spare.chunks_mut(dim).enumerate().for_each(init);
    }
    // SAFETY: the rows above cover the first `n` elements, each written.
    unsafe { out.set_len(n) };
    out
}

/// `out[k] = f(x[k], y[k])` for equal-length `x` and `y`, in parallel chunks when large, each
/// chunk compiled for the CPU's widest vectors ([`with_simd`]) so the element function
/// (GELU's `erf` and `exp`, a dropout select) runs 8 or 16 lanes at a time. The output is
/// written once, never zero-filled first.
fn map_elements<T: Copy + Send + Sync, U: Copy + Sync>(
    x: &[T],
    y: &[U],
    f: impl Fn(T, U) -> T + Sync + Send,
) -> Vec<T> {
    const CHUNK: usize = 1 << 12;
    debug_assert_eq!(x.len(), y.len(), "callers check that the inputs agree");
    let n = x.len().min(y.len());
    let mut out: Vec<T> = Vec::with_capacity(n);
    let map_chunk = |(c, chunk): (usize, &mut [std::mem::MaybeUninit<T>])| {
        let start = c * CHUNK;
        let (xs, ys) = (
            &x[start..start + chunk.len()],
            &y[start..start + chunk.len()],
        );
        with_simd(
            #[inline(always)]
            || {
                for ((o, &a), &b) in chunk.iter_mut().zip(xs).zip(ys) {
                    o.write(f(a, b));
                }
            },
        )
    };
    let spare = &mut out.spare_capacity_mut()[..n];
    if n >= PARALLEL_MIN_ELEMENTS {
        crate::team::parallel_chunks_mut(spare, CHUNK, |c, chunk| map_chunk((c, chunk)));
    } else {
        spare.chunks_mut(CHUNK).enumerate().for_each(map_chunk);
    }
    // SAFETY: every one of the first n elements was written above.
    unsafe { out.set_len(n) };
    out
}

/// `x` as f32 when `T` is f32.
fn as_f32<T: 'static>(x: &[T]) -> Option<&[f32]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        // SAFETY: T is f32 (same type, so same size and alignment).
        .then(|| unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<f32>(), x.len()) })
}

/// `y` as f32 when `T` is f32.
fn as_f32_mut<T: 'static>(y: &mut [T]) -> Option<&mut [f32]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        // SAFETY: T is f32 (same type, so same size and alignment).
        .then(|| unsafe { std::slice::from_raw_parts_mut(y.as_mut_ptr().cast::<f32>(), y.len()) })
}

/// Rows per partial sum in [`ordered_row_sums`].
const ROWS_PER_PARTIAL: usize = 64;

/// `width` sums over `rows`, `add_row(r, acc)` adding row `r`'s terms into `acc`: blocks of
/// [`ROWS_PER_PARTIAL`] rows summed in parallel, then the block sums added in block order, so
/// the rounding is the same on every run and thread count. (Rayon's `fold`/`reduce` groups rows
/// by work stealing: the last bits of gradients changed from run to run, and a resumed run no
/// longer matched the uninterrupted one.)
fn ordered_row_sums<A: Copy + Default + std::ops::AddAssign + Send + Sync>(
    rows: usize,
    width: usize,
    add_row: impl Fn(usize, &mut [A]) + Sync + Send,
) -> Vec<A> {
    let partials: Vec<Vec<A>> = (0..rows.div_ceil(ROWS_PER_PARTIAL))
        .into_par_iter()
        .map(|block| {
            let mut acc = vec![A::default(); width];
            let end = ((block + 1) * ROWS_PER_PARTIAL).min(rows);
            for r in block * ROWS_PER_PARTIAL..end {
                add_row(r, &mut acc);
            }
            acc
        })
        .collect();
    let mut total = vec![A::default(); width];
    for partial in partials {
        total.iter_mut().zip(partial).for_each(|(t, p)| *t += p);
    }
    total
}

mod attention;
#[cfg(target_arch = "x86_64")]
mod attention_block;
mod dropout;
mod embedding;
mod feed_forward;
mod gelu;
mod layer_norm;
mod linear;
mod softmax;
#[cfg(test)]
mod tests;

pub(crate) use attention::{AttentionOp, PackedAttentionOp, SavedAttention, SavedProbs, SharedMut};
#[cfg(target_arch = "x86_64")]
pub(crate) use attention_block::AttentionBlockOp;
pub(crate) use dropout::DropoutOp;
pub(crate) use embedding::EmbeddingOp;
pub(crate) use feed_forward::{FeedForwardOp, OutputNorm};
pub(crate) use gelu::GeluErfOp;
pub(crate) use layer_norm::LayerNormOp;
pub(crate) use linear::{merge_low_rank_transposed, LinearOp, WeightLayout};
pub(crate) use softmax::AttentionSoftmaxOp;
