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

// ---------------------------------------------------------------------------------------------
// LayerNorm

/// LayerNorm over the last dimension, two-pass with f64 accumulation (candle's fused kernel
/// takes `E[x^2] - mean^2` in f32, which cancels on BERT's large-offset residual streams).
/// Inputs: `x` (contiguous), `weight`, `bias` (`[dim]`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct LayerNormOp {
    pub eps: f64,
}

/// Mean and `1 / sqrt(variance + eps)` of `row`, summed in f64 over [`LANES`] interleaved
/// accumulators (a plain `sum` is one dependent add per element: 5% of a forward pass).
#[inline(always)]
fn row_stats<T: WithDType>(row: &[T], eps: f64) -> (f64, f64) {
    let n = row.len();
    let add = |a: f64, b: f64| a + b;
    let mean = reduce_lanes(n, 0.0, |j| row[j].to_f64(), add) / n as f64;
    let variance = reduce_lanes(
        n,
        0.0,
        |j| {
            let centred = row[j].to_f64() - mean;
            centred * centred
        },
        add,
    ) / n as f64;
    (mean, 1.0 / (variance + eps).sqrt())
}

impl LayerNormOp {
    fn forward<T: WithDType + Default>(&self, x: &[T], w: &[T], b: &[T]) -> Vec<T> {
        let dim = w.len();
        let rows = x.len() / dim.max(1);
        let f32_params = as_f32(w).zip(as_f32(b));
        for_rows(rows, dim, |r, out| {
            let row = &x[r * dim..(r + 1) * dim];
            if let (Some(row), Some((w, b)), Some(out)) = (as_f32(row), f32_params, as_f32_mut(out))
            {
                if crate::vector_math::layer_norm_row(row, w, b, self.eps, out).is_some() {
                    return;
                }
            }
            // Compiled for AVX2 / AVX-512 where present (the f32 row above covers AVX-512).
            with_simd(
                #[inline(always)]
                || {
                    let (mean, rstd) = row_stats(row, self.eps);
                    for (j, o) in out.iter_mut().enumerate() {
                        let normed = (row[j].to_f64() - mean) * rstd;
                        *o = T::from_f64(normed * w[j].to_f64() + b[j].to_f64());
                    }
                },
            )
        })
    }

    /// `[rows + 2, dim]`: `dx` rows, then `dw`, then `db`.
    fn backward<T: WithDType + Default>(&self, x: &[T], w: &[T], dy: &[T]) -> Vec<T> {
        let dim = w.len();
        let rows = x.len() / dim.max(1);
        // Each row's statistics once, for both dx and the dw/db sums.
        let stats: Vec<(f64, f64)> = (0..rows)
            .into_par_iter()
            .with_min_len(64)
            .map(|r| row_stats(&x[r * dim..(r + 1) * dim], self.eps))
            .collect();
        let mut out = for_rows(rows + 2, dim, |r, dx| {
            if r >= rows {
                return;
            }
            let row = &x[r * dim..(r + 1) * dim];
            let grad = &dy[r * dim..(r + 1) * dim];
            let (mean, rstd) = stats[r];
            let (mut mean_g, mut mean_g_xhat) = (0f64, 0f64);
            for j in 0..dim {
                let xhat = (row[j].to_f64() - mean) * rstd;
                let g = grad[j].to_f64() * w[j].to_f64();
                mean_g += g;
                mean_g_xhat += g * xhat;
            }
            mean_g /= dim as f64;
            mean_g_xhat /= dim as f64;
            for j in 0..dim {
                let xhat = (row[j].to_f64() - mean) * rstd;
                let g = grad[j].to_f64() * w[j].to_f64();
                dx[j] = T::from_f64(rstd * (g - mean_g - xhat * mean_g_xhat));
            }
        });
        // dw = sum over rows of dy * xhat, db = sum of dy, side by side in one set of sums.
        let sums = ordered_row_sums(rows, 2 * dim, |r, acc: &mut [f64]| {
            let row = &x[r * dim..(r + 1) * dim];
            let grad = &dy[r * dim..(r + 1) * dim];
            let (mean, rstd) = stats[r];
            let (dw, db) = acc.split_at_mut(dim);
            for j in 0..dim {
                let g = grad[j].to_f64();
                dw[j] += g * (row[j].to_f64() - mean) * rstd;
                db[j] += g;
            }
        });
        let (dw, db) = sums.split_at(dim);
        for j in 0..dim {
            out[rows * dim + j] = T::from_f64(dw[j]);
            out[(rows + 1) * dim + j] = T::from_f64(db[j]);
        }
        out
    }
}

fn check_norm_params(op: &str, x: &Layout, w: &Layout, b: &Layout) -> candle_core::Result<usize> {
    let dim = x.dims().last().copied().unwrap_or(0);
    if w.dims() != [dim] || b.dims() != [dim] {
        candle_core::bail!(
            "{op}: input {:?} with parameters {:?} and {:?}",
            x.dims(),
            w.dims(),
            b.dims()
        )
    }
    Ok(dim)
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "bert-layer-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        check_norm_params(self.name(), xl, wl, bl)?;
        let name = self.name();
        let out = per_float!(name, [F32, F64, F16, BF16], (x => x @ xl, w => w @ wl, b => b @ bl), self.forward(x, w, b));
        Ok((out, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dim = w.elem_count();
        let rows = x.elem_count() / dim.max(1);
        let grad = grad.contiguous()?;
        let packed = x.apply_op3_no_bwd(w, &grad, &LayerNormBackward(*self))?;
        let dx = x
            .track_op()
            .then(|| packed.narrow(0, 0, rows)?.reshape(x.shape()))
            .transpose()?;
        let dw = w
            .track_op()
            .then(|| packed.narrow(0, rows, 1)?.reshape(dim))
            .transpose()?;
        let db = b
            .track_op()
            .then(|| packed.narrow(0, rows + 1, 1)?.reshape(dim))
            .transpose()?;
        Ok((dx, dw, db))
    }
}

/// The backward kernel of [`LayerNormOp`]: inputs `x`, `weight`, `dy`; output `[rows + 2, dim]`.
struct LayerNormBackward(LayerNormOp);

impl CustomOp3 for LayerNormBackward {
    fn name(&self) -> &'static str {
        "bert-layer-norm-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        dy: &CpuStorage,
        dyl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dim = wl.dims().iter().product::<usize>();
        let rows = xl.shape().elem_count() / dim.max(1);
        let name = self.name();
        let out = per_float!(name, [F32, F64, F16, BF16], (x => x @ xl, w => w @ wl, dy => dy @ dyl), self.0.backward(x, w, dy));
        Ok((out, Shape::from((rows + 2, dim))))
    }
}

// ---------------------------------------------------------------------------------------------
// Attention softmax

/// `softmax(scale * scores + bias)` over the last dimension, where `scores` is a contiguous
/// `[batch, heads, queries, keys]` and `bias` a contiguous `[batch, keys]` additive mask (one
/// row per sequence, shared by its heads and queries). The bias takes no gradient.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttentionSoftmaxOp {
    pub scale: f64,
}

impl AttentionSoftmaxOp {
    fn forward<T: Real + Default>(&self, x: &[T], bias: &[T], keys: usize) -> Vec<T> {
        let rows = x.len() / keys.max(1);
        let batch = bias.len() / keys.max(1);
        let rows_per_sequence = rows / batch.max(1);
        let scale = T::from_f64(self.scale);
        for_rows(rows, keys, |r, out| {
            let row = &x[r * keys..(r + 1) * keys];
            let bias = &bias[(r / rows_per_sequence) * keys..][..keys];
            for j in 0..keys {
                out[j] = row[j] * scale + bias[j];
            }
            softmax_in_place(out);
        })
    }

    /// `dx = scale * y * (dy - sum(dy * y))`.
    fn backward<T: Real + Default>(&self, y: &[T], dy: &[T], keys: usize) -> Vec<T> {
        let rows = y.len() / keys.max(1);
        let scale = T::from_f64(self.scale);
        for_rows(rows, keys, |r, dx| {
            let y = &y[r * keys..(r + 1) * keys];
            let dy = &dy[r * keys..(r + 1) * keys];
            let dot = dot(y, dy);
            for j in 0..keys {
                dx[j] = scale * y[j] * (dy[j] - dot);
            }
        })
    }
}

impl CustomOp2 for AttentionSoftmaxOp {
    fn name(&self) -> &'static str {
        "bert-attention-softmax"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        bias: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let keys = xl.dims().last().copied().unwrap_or(0);
        let (batch, bias_keys) = match bl.dims() {
            [b, k] => (*b, *k),
            other => {
                candle_core::bail!("{}: bias must be [batch, keys], got {other:?}", self.name())
            }
        };
        if bias_keys != keys || xl.dims().first() != Some(&batch) {
            candle_core::bail!(
                "{}: scores {:?} do not match bias {:?}",
                self.name(),
                xl.dims(),
                bl.dims()
            )
        }
        let name = self.name();
        let out =
            per_float!(name, [F32, F64], (x => x @ xl, bias => b @ bl), self.forward(x, b, keys));
        Ok((out, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        if !x.track_op() {
            return Ok((None, None));
        }
        let dx = res.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBackward(*self))?;
        Ok((Some(dx), None))
    }
}

struct SoftmaxBackward(AttentionSoftmaxOp);

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "bert-attention-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        y: &CpuStorage,
        yl: &Layout,
        dy: &CpuStorage,
        dyl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let keys = yl.dims().last().copied().unwrap_or(0);
        let name = self.name();
        let out = per_float!(name, [F32, F64], (y => y @ yl, dy => dy @ dyl), self.0.backward(y, dy, keys));
        Ok((out, yl.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// GELU (erf)

/// `x * Phi(x)` with the exact normal CDF (`0.5 * (1 + erf(x / sqrt 2))`), HF's `gelu`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GeluErfOp;

const FRAC_1_SQRT_2: f64 = std::f64::consts::FRAC_1_SQRT_2;
/// `1 / sqrt(2 pi)`.
const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

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

#[inline(always)]
fn gelu<T: Real>(v: T) -> T {
    let half = T::from_f64(0.5);
    v * half * (T::one() + (v * T::from_f64(FRAC_1_SQRT_2)).erf())
}

/// d gelu / dx = Phi(x) + x phi(x).
#[inline(always)]
fn gelu_grad<T: Real>(v: T) -> T {
    let half = T::from_f64(0.5);
    let cdf = half * (T::one() + (v * T::from_f64(FRAC_1_SQRT_2)).erf());
    let pdf = T::from_f64(FRAC_1_SQRT_2PI) * (-(v * v) * half).exp_fast();
    cdf + v * pdf
}

impl CustomOp1 for GeluErfOp {
    fn name(&self) -> &'static str {
        "bert-gelu-erf"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = self.name();
        let out = per_float!(name, [F32, F64], (x => x @ xl), map_elements(x, x, #[inline(always)] |v, _| gelu(v)));
        Ok((out, xl.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(
            x.apply_op2_no_bwd(&grad.contiguous()?, &GeluErfBackward)?,
        ))
    }
}

struct GeluErfBackward;

impl CustomOp2 for GeluErfBackward {
    fn name(&self) -> &'static str {
        "bert-gelu-erf-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        dy: &CpuStorage,
        dyl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = self.name();
        // map_elements pairs elements up to the shorter input: the shapes must agree.
        if xl.dims() != dyl.dims() {
            candle_core::bail!("{name}: x {:?} with gradient {:?}", xl.dims(), dyl.dims())
        }
        let out = per_float!(name, [F32, F64], (x => x @ xl, dy => dy @ dyl), map_elements(x, dy, #[inline(always)] |v, g| gelu_grad(v) * g));
        Ok((out, xl.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// Dropout

/// Multiplies by a fixed keep-mask scaled by `1 / (1 - p)`; the backward applies the same mask
/// to the gradient. The mask is drawn by the caller (seeded) and shared with the backward.
#[derive(Debug, Clone)]
pub(crate) struct DropoutOp {
    pub keep: Arc<Vec<bool>>,
    pub scale: f64,
}

impl DropoutOp {
    fn apply<T: Real + Default>(&self, x: &[T]) -> Vec<T> {
        let scale = T::from_f64(self.scale);
        let keep = &self.keep[..];
        map_elements(
            x,
            keep,
            #[inline(always)]
            |v, kept| if kept { v * scale } else { T::zero() },
        )
    }
}

impl CustomOp1 for DropoutOp {
    fn name(&self) -> &'static str {
        "bert-dropout"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        if xl.shape().elem_count() != self.keep.len() {
            candle_core::bail!(
                "{}: mask of {} for {:?}",
                self.name(),
                self.keep.len(),
                xl.dims()
            )
        }
        let name = self.name();
        let out = per_float!(name, [F32, F64], (x => x @ xl), self.apply(x));
        Ok((out, xl.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(self)?))
    }
}

// ---------------------------------------------------------------------------------------------
// Linear

/// `y = dropout(x W^T + b)` for a contiguous `x: [.., in]`, `W: [out, in]`, `b: [out]`: one
/// GEMM that accumulates onto rows pre-filled with the bias, then the optional dropout mask,
/// with the leading dimensions kept (no reshape nodes in the graph). Its backward computes
/// only the gradients that are tracked (a frozen weight costs no `x^T dy` product), each
/// straight into its own buffer, where the composed ops (reshape, matmul, transpose, broadcast
/// add, dropout multiply) allocated and zero-filled one per op.
#[derive(Debug, Clone)]
pub(crate) struct LinearOp {
    /// Keep-mask over the output and its `1 / (1 - p)` scale, in training.
    pub dropout: Option<(Arc<Vec<bool>>, f64)>,
    /// Apply the erf GELU to the output in place (inference: the op then has no backward,
    /// which would need the pre-activation values).
    pub gelu: bool,
    /// The same weight packed into panels: f32 products over the rows it covers
    /// (`PanelWeights::covers`) use it instead of the general GEMM.
    pub panels: Option<Arc<crate::panel_gemm::PanelWeights>>,
    /// A contiguous `[.., out]` tensor of the output's shape added to the product (inference:
    /// BERT's residual connection), by starting the GEMM from `bias + residual` instead of
    /// `bias`: no separate pass and tensor for the sum. No backward.
    pub residual: Option<Tensor>,
}

/// How a `[out, in]` weight lies in memory: as checkpoints store it (rows of `in`), or
/// transposed (`[in, out]` contiguous, viewed as `[out, in]`; see `Linear::use_inference_layout`).
/// In the second layout the GEMM reads the weight along output columns, which it can use in
/// place; in the first it repacks (transposes) the whole weight on every call, which dominated
/// small batches (66% of a 1 x 16 forward pass).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WeightLayout {
    OutByIn,
    InByOut,
}

impl WeightLayout {
    /// The layout of a 2-D weight tensor and the contiguous layout of the storage it covers,
    /// or `None` for any other striding.
    pub(crate) fn of(layout: &Layout) -> Option<(Self, Layout)> {
        let (out_dim, in_dim) = layout.shape().dims2().ok()?;
        if layout.is_contiguous() {
            return Some((Self::OutByIn, layout.clone()));
        }
        (layout.stride() == [1, out_dim]).then(|| {
            (
                Self::InByOut,
                Layout::contiguous_with_offset((in_dim, out_dim), layout.start_offset()),
            )
        })
    }
}

impl LinearOp {
    #[allow(clippy::too_many_arguments)]
    fn forward<T: Real + Default + 'static>(
        &self,
        x: &[T],
        w: &[T],
        w_layout: WeightLayout,
        b: &[T],
        residual: Option<&[T]>,
        rows: usize,
        in_dim: usize,
        out_dim: usize,
    ) -> Vec<T> {
        // The GEMM accumulates onto `bias (+ residual)`.
        let fill = |r: usize, row: &mut [T]| {
            if let Some(residual) = residual {
                let residual = &residual[r * out_dim..(r + 1) * out_dim];
                row.iter_mut().zip(residual).for_each(|(y, &x)| *y += x);
            }
        };
        // The weight as the GEMM's right-hand side, `[in, out]`: (column, row) strides.
        let (w_cs, w_rs) = match w_layout {
            WeightLayout::OutByIn => (in_dim as isize, 1),
            WeightLayout::InByOut => (1, out_dim as isize),
        };
        let threads = candle_core::utils::get_num_threads();
        let panels = self
            .panels
            .as_deref()
            .filter(|p| p.covers(rows) && p.fits(in_dim, out_dim) && as_f32(x).is_some());
        // A GELU layer (inference, no residual) on the general GEMM has the product written
        // without the output being read (no bias-filled rows to start from) and the bias
        // added in the GELU pass: one pass less over its `rows x 4 hidden` output.
        let bias_in_finish = self.gelu && residual.is_none() && panels.is_none() && in_dim > 0;
        let mut y = if bias_in_finish {
            Vec::with_capacity(rows * out_dim)
        } else {
            rows_init(rows, 1 << 16, b, fill)
        };
        if let Some(panels) = panels {
            if let (Some(x32), Some(y32)) = (as_f32(x), as_f32_mut(&mut y)) {
                panels.multiply_add(x32, rows, y32);
                self.finish(&mut y, None);
                return y;
            }
        }
        let parallelism = if threads > 1 && rows * in_dim * out_dim >= 1 << 15 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        // SAFETY: the pointers cover rows x in (x), out x in (w) and rows x out (y, its
        // capacity) elements with the strides given; y does not alias x or w. Without
        // `bias_in_finish` every element of y is initialised (read, then written); with it
        // (`in_dim > 0`) the GEMM writes every element without reading any, so y's length can
        // be set to cover them after it.
        unsafe {
            gemm::gemm(
                rows,
                out_dim,
                in_dim,
                y.as_mut_ptr(),
                1,
                out_dim as isize,
                !bias_in_finish,
                x.as_ptr(),
                1,
                in_dim as isize,
                w.as_ptr(),
                w_cs,
                w_rs,
                T::one(),
                T::one(),
                false,
                false,
                false,
                parallelism,
            );
            if bias_in_finish {
                y.set_len(rows * out_dim);
            }
        }
        self.finish(&mut y, bias_in_finish.then_some(b));
        y
    }

    /// The fused GELU (after adding `bias`, rows of its length, where given) and dropout on
    /// the product, in place.
    fn finish<T: Real + Default + 'static>(&self, y: &mut [T], bias: Option<&[T]>) {
        if self.gelu {
            // Chunk by chunk in parallel (whole rows when a bias is added).
            let bias = bias.filter(|b| !b.is_empty());
            let chunk = match bias {
                Some(b) => b.len() * (1usize << 12).div_ceil(b.len()),
                None => 1 << 12,
            };
            crate::team::parallel_chunks_mut(y, chunk, |_, chunk| {
                if let Some(b) = bias {
                    with_simd(
                        #[inline(always)]
                        || {
                            for row in chunk.chunks_exact_mut(b.len()) {
                                row.iter_mut().zip(b).for_each(|(v, &c)| *v += c);
                            }
                        },
                    )
                }
                if let Some(chunk32) = as_f32_mut(chunk) {
                    if crate::vector_math::gelu_in_place(chunk32) {
                        return;
                    }
                }
                with_simd(
                    #[inline(always)]
                    || chunk.iter_mut().for_each(|v| *v = gelu(*v)),
                )
            });
        }
        if let Some((keep, scale)) = &self.dropout {
            let scale = T::from_f64(*scale);
            y.par_iter_mut()
                .zip(keep.par_iter())
                .for_each(|(v, &kept)| {
                    *v = if kept { *v * scale } else { T::zero() };
                });
        }
    }
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

/// Sums the rows of a contiguous `[rows, cols]` block (candle's `sum(0)` walks the columns
/// with a stride), deterministically: see [`ordered_row_sums`].
fn column_sums<T: Real + Default>(x: &[T], cols: usize) -> Vec<T> {
    let rows = x.len() / cols.max(1);
    ordered_row_sums(rows, cols, |r, acc: &mut [T]| {
        for (a, &v) in acc.iter_mut().zip(&x[r * cols..(r + 1) * cols]) {
            *a += v;
        }
    })
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

/// The bias gradient of [`LinearOp`]: column sums of `dy` viewed as `[rows, out]`.
struct ColumnSums;

impl CustomOp1 for ColumnSums {
    fn name(&self) -> &'static str {
        "bert-column-sums"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let cols = xl.dims().last().copied().unwrap_or(0);
        let name = self.name();
        let out = per_float!(name, [F32, F64], (x => x @ xl), column_sums(x, cols));
        Ok((out, Shape::from(cols)))
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "bert-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = self.name();
        let in_dim = xl.dims().last().copied().unwrap_or(0);
        let rows = xl.shape().elem_count() / in_dim.max(1);
        let (out_dim, w_in) = wl.shape().dims2()?;
        let Some((w_layout, w_storage)) = WeightLayout::of(wl) else {
            candle_core::bail!(
                "{name}: weight {:?} with strides {:?} is neither [out, in] nor [in, out] contiguous",
                wl.dims(),
                wl.stride()
            )
        };
        let mask_fits = self
            .dropout
            .as_ref()
            .is_none_or(|(keep, _)| keep.len() == rows * out_dim);
        if w_in != in_dim || bl.dims() != [out_dim] || xl.dims().is_empty() || !mask_fits {
            candle_core::bail!(
                "{name}: x {:?}, weight {:?}, bias {:?} (or a dropout mask of another size)",
                xl.dims(),
                wl.dims(),
                bl.dims()
            )
        }
        let mut dims = xl.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = out_dim;
        }
        let out = match &self.residual {
            Some(residual) => {
                let (storage, rl) = residual.storage_and_layout();
                if rl.dims() != dims {
                    candle_core::bail!(
                        "{name}: residual {:?} does not match the output {dims:?}",
                        rl.dims()
                    )
                }
                let r = cpu_storage(&storage, name)?;
                per_float!(name, [F32, F64], (x => x @ xl, w => w @ &w_storage, b => b @ bl, r => r @ rl), self.forward(x, w, w_layout, b, Some(r), rows, in_dim, out_dim))
            }
            None => {
                per_float!(name, [F32, F64], (x => x @ xl, w => w @ &w_storage, b => b @ bl), self.forward(x, w, w_layout, b, None, rows, in_dim, out_dim))
            }
        };
        Ok((out, Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if self.gelu || self.residual.is_some() {
            candle_core::bail!(
                "{}: the fused GELU and residual are for inference only",
                self.name()
            )
        }
        let (out_dim, in_dim) = w.dims2()?;
        let rows = x.elem_count() / in_dim.max(1);
        // Through the dropout mask first, then as a plain [rows, out] gradient.
        let grad = match &self.dropout {
            Some((keep, scale)) => grad.contiguous()?.apply_op1_no_bwd(&DropoutOp {
                keep: keep.clone(),
                scale: *scale,
            })?,
            None => grad.contiguous()?,
        };
        let grad = grad.reshape((rows, out_dim))?;
        let dx = x
            .track_op()
            .then(|| grad.matmul(w)?.reshape(x.shape()))
            .transpose()?;
        let dw = w
            .track_op()
            .then(|| grad.t()?.matmul(&x.reshape((rows, in_dim))?))
            .transpose()?;
        let db = b
            .track_op()
            .then(|| grad.apply_op1_no_bwd(&ColumnSums))
            .transpose()?;
        Ok((dx, dw, db))
    }
}

// ---------------------------------------------------------------------------------------------
// Self-attention core

/// Probabilities a forward pass keeps for its backward.
#[derive(Debug)]
pub(crate) enum SavedProbs {
    F32(Vec<f32>),
    F64(Vec<f64>),
}

/// Scaled dot-product attention over all heads at once, for `q`, `k`, `v` laid out as the
/// projections produce them (`[batch, seq, heads * head_dim]`, contiguous): per (sequence, head),
/// `softmax(scale * q k^T + bias)`, dropout, then `@ v`, written straight into the context
/// `[batch, seq, heads * head_dim]`. No head-split copies, no transposed copies, one task per
/// (sequence, head) on rayon's pool, small GEMMs addressed by stride. The probabilities are kept
/// for the backward pass (and for callers that ask for them); the backward recomputes nothing
/// else and returns the gradients of `q`, `k` and `v`.
#[derive(Debug)]
pub(crate) struct AttentionOp {
    pub heads: usize,
    pub scale: f64,
    /// `[batch, keys]` additive mask, shared by every head and query of a sequence.
    pub bias: Option<Vec<f32>>,
    /// Keep-mask over `[batch, heads, queries, keys]` and its `1 / (1 - p)` scale.
    pub dropout: Option<(Vec<bool>, f64)>,
    /// Keep the probabilities (for a backward pass or a caller that asked for them). Without,
    /// each task softmaxes in a per-thread scratch row block: inference never holds the
    /// `[batch, heads, seq, seq]` tensor (100 MB at 8 x 512 for 12 heads).
    pub keep_probs: bool,
    saved: SavedAttention,
}

/// A handle on the probabilities an [`AttentionOp`] keeps, shared with its caller (candle owns
/// the op once it is applied).
#[derive(Debug, Clone, Default)]
pub(crate) struct SavedAttention(Arc<std::sync::Mutex<Option<SavedProbs>>>);

impl SavedAttention {
    fn lock(&self) -> candle_core::Result<std::sync::MutexGuard<'_, Option<SavedProbs>>> {
        self.0
            .lock()
            .map_err(|_| candle_core::Error::Msg("attention state poisoned".into()))
    }

    /// The probabilities of the op's forward pass, `[batch, heads, queries, keys]`.
    pub fn probabilities(
        &self,
        shape: (usize, usize, usize, usize),
    ) -> candle_core::Result<Tensor> {
        match self.lock()?.as_ref() {
            Some(SavedProbs::F32(p)) => Tensor::from_slice(p, shape, &candle_core::Device::Cpu),
            Some(SavedProbs::F64(p)) => Tensor::from_slice(p, shape, &candle_core::Device::Cpu),
            None => candle_core::bail!("attention probabilities requested before a forward pass"),
        }
    }
}

/// A pointer that parallel tasks may share because each writes a disjoint region.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut<T>(pub(crate) *mut T);
// SAFETY: used only for disjoint per-task regions of one buffer (see AttentionOp,
// `team::parallel_chunks_mut`, the panel product).
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// The pointer (a method, so closures capture the `Send` wrapper, not the raw field).
    pub(crate) fn get(&self) -> *mut T {
        self.0
    }
}

/// `dst (m x n) = lhs (m x k) @ rhs (k x n)`, every operand given by pointer and (row, column)
/// strides; `accumulate` adds onto `dst` instead of overwriting it.
///
/// # Safety
/// The pointers must cover the strided extents, and `dst` must not overlap the inputs.
#[allow(clippy::too_many_arguments)]
unsafe fn small_gemm<T: WithDType + 'static>(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut T,
    dst_rs: usize,
    lhs: *const T,
    lhs_rs: isize,
    lhs_cs: isize,
    rhs: *const T,
    rhs_rs: isize,
    rhs_cs: isize,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        false,
        lhs,
        lhs_cs,
        lhs_rs,
        rhs,
        rhs_cs,
        rhs_rs,
        T::zero(),
        T::one(),
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

impl AttentionOp {
    pub fn new(
        heads: usize,
        scale: f64,
        bias: Option<Vec<f32>>,
        dropout: Option<(Vec<bool>, f64)>,
        keep_probs: bool,
    ) -> (Self, SavedAttention) {
        let saved = SavedAttention::default();
        let op = Self {
            heads,
            scale,
            bias,
            dropout,
            keep_probs,
            saved: saved.clone(),
        };
        (op, saved)
    }

    /// `q`, `k` and `v` hold rows of `ld` elements, of which the first `hidden` are used: `ld`
    /// is `hidden` for separate projections, `3 * hidden` for the packed output of one QKV
    /// projection (then `k` and `v` start `hidden` and `2 * hidden` elements in).
    #[allow(clippy::too_many_arguments)]
    fn forward<T: Real + Default + 'static>(
        &self,
        q: &[T],
        k: &[T],
        v: &[T],
        ld: usize,
        batch: usize,
        seq: usize,
        hidden: usize,
    ) -> (Vec<T>, Option<Vec<T>>) {
        let heads = self.heads;
        let d = hidden / heads;
        let mut context = filled(batch * seq * hidden, T::zero());
        let mut probs = self
            .keep_probs
            .then(|| filled(batch * heads * seq * seq, T::zero()));
        let ctx_ptr = SharedMut(context.as_mut_ptr());
        let probs_ptr = probs.as_mut().map(|p| SharedMut(p.as_mut_ptr()));
        let scale = T::from_f64(self.scale);
        // Inference (no dropout, probabilities not kept) in f32 divides the `P V` rows by the
        // softmax sums instead of the probability rows: head size (32) wide, not sequence wide.
        let divide_after = self.dropout.is_none() && probs_ptr.is_none();
        let init = || (Vec::new(), Vec::new());
        crate::team::parallel_for_init(batch * heads, init, |state, task| {
            let (scratch, sums): &mut (Vec<T>, Vec<f32>) = state;
            // This task's (seq x seq) probabilities: its block of the kept tensor, or the
            // thread's scratch.
            let p: &mut [T] = match probs_ptr {
                // SAFETY: task blocks of seq * seq elements are disjoint and in bounds.
                Some(ptr) => unsafe {
                    std::slice::from_raw_parts_mut(ptr.get().add(task * seq * seq), seq * seq)
                },
                None => {
                    scratch.resize(seq * seq, T::zero());
                    scratch
                }
            };
            with_simd(
                #[inline(always)]
                || {
                    let (b, h) = (task / heads, task % heads);
                    let base = b * seq * ld + h * d;
                    // SAFETY: q, k (rows of stride `ld`) and p (seq x seq) are in bounds.
                    unsafe {
                        small_gemm(
                            seq,
                            seq,
                            d,
                            p.as_mut_ptr(),
                            seq,
                            q[base..].as_ptr(),
                            ld as isize,
                            1,
                            k[base..].as_ptr(),
                            1,
                            ld as isize,
                        );
                    }
                    let row_bias = self.bias.as_ref().map(|bias| &bias[b * seq..(b + 1) * seq]);
                    sums.clear();
                    if let Some(p32) = as_f32_mut(p) {
                        let scale = self.scale as f32;
                        for row in p32.chunks_exact_mut(seq) {
                            if divide_after {
                                sums.push(crate::vector_math::scaled_exp_row(row, scale, row_bias));
                            } else {
                                crate::vector_math::scaled_softmax(row, scale, row_bias);
                            }
                        }
                    } else {
                        let bias: Option<Vec<T>> = row_bias
                            .map(|bias| bias.iter().map(|&v| T::from_f64(v as f64)).collect());
                        for row in p.chunks_exact_mut(seq) {
                            scaled_softmax_in_place(row, scale, bias.as_deref());
                        }
                    }
                    let dropped;
                    let weights: &[T] = match &self.dropout {
                        Some((keep, keep_scale)) => {
                            let keep = &keep[task * seq * seq..(task + 1) * seq * seq];
                            let keep_scale = T::from_f64(*keep_scale);
                            dropped = p
                                .iter()
                                .zip(keep)
                                .map(|(&x, &kept)| if kept { x * keep_scale } else { T::zero() })
                                .collect::<Vec<T>>();
                            &dropped
                        }
                        None => p,
                    };
                    // SAFETY: this task alone writes context rows b, columns h*d..(h+1)*d.
                    unsafe {
                        small_gemm(
                            seq,
                            d,
                            seq,
                            ctx_ptr.get().add(b * seq * hidden + h * d),
                            hidden,
                            weights.as_ptr(),
                            seq as isize,
                            1,
                            v[base..].as_ptr(),
                            ld as isize,
                            1,
                        );
                    }
                    // `sums` is filled only in the f32 case, where T is f32.
                    for (r, &sum) in sums.iter().enumerate() {
                        // SAFETY: this task's context row r, columns h*d..(h+1)*d, as above.
                        let row = unsafe {
                            std::slice::from_raw_parts_mut(
                                ctx_ptr
                                    .get()
                                    .add((b * seq + r) * hidden + h * d)
                                    .cast::<f32>(),
                                d,
                            )
                        };
                        crate::vector_math::scale_row(row, 1.0 / sum);
                    }
                },
            )
        });
        (context, probs)
    }

    /// Gradients of `q`, `k`, `v` from that of the context, packed `[3, batch, seq, hidden]`.
    #[allow(clippy::too_many_arguments)]
    fn backward<T: Real + Default + 'static>(
        &self,
        q: &[T],
        k: &[T],
        v: &[T],
        probs: &[T],
        dctx: &[T],
        batch: usize,
        seq: usize,
        hidden: usize,
    ) -> Vec<T> {
        let heads = self.heads;
        let d = hidden / heads;
        let size = batch * seq * hidden;
        let mut grads = filled(3 * size, T::zero());
        let out = SharedMut(grads.as_mut_ptr());
        let scale = T::from_f64(self.scale);
        (0..batch * heads).into_par_iter().for_each(|task| {
            with_simd(
                #[inline(always)]
                || {
                    let (b, h) = (task / heads, task % heads);
                    let base = b * seq * hidden + h * d;
                    let p = &probs[task * seq * seq..(task + 1) * seq * seq];
                    let mut dp = filled(seq * seq, T::zero());
                    // dP_dropped = dctx @ v^T.
                    // SAFETY: strided reads in bounds; dp is this task's own buffer.
                    unsafe {
                        small_gemm(
                            seq,
                            seq,
                            d,
                            dp.as_mut_ptr(),
                            seq,
                            dctx[base..].as_ptr(),
                            hidden as isize,
                            1,
                            v[base..].as_ptr(),
                            1,
                            hidden as isize,
                        );
                    }
                    // The weights the forward multiplied v by (dropped probabilities), and dP.
                    let weights: Vec<T> = match &self.dropout {
                        Some((keep, keep_scale)) => {
                            let keep = &keep[task * seq * seq..(task + 1) * seq * seq];
                            let keep_scale = T::from_f64(*keep_scale);
                            for (g, &kept) in dp.iter_mut().zip(keep) {
                                *g = if kept { *g * keep_scale } else { T::zero() };
                            }
                            p.iter()
                                .zip(keep)
                                .map(|(&x, &kept)| if kept { x * keep_scale } else { T::zero() })
                                .collect()
                        }
                        None => p.to_vec(),
                    };
                    // dv = weights^T @ dctx.
                    // SAFETY: this task alone writes dv rows b, columns h*d..(h+1)*d.
                    unsafe {
                        small_gemm(
                            seq,
                            d,
                            seq,
                            out.get().add(2 * size + base),
                            hidden,
                            weights.as_ptr(),
                            1,
                            seq as isize,
                            dctx[base..].as_ptr(),
                            hidden as isize,
                            1,
                        );
                    }
                    // dS = scale * P * (dP - rowsum(dP * P)), in place in dp.
                    for i in 0..seq {
                        let (prow, grow) =
                            (&p[i * seq..(i + 1) * seq], &mut dp[i * seq..(i + 1) * seq]);
                        let dot = dot(prow, grow);
                        for (g, &a) in grow.iter_mut().zip(prow) {
                            *g = scale * a * (*g - dot);
                        }
                    }
                    // dq = dS @ k, dk = dS^T @ q.
                    // SAFETY: this task alone writes dq and dk rows b, columns h*d..(h+1)*d.
                    unsafe {
                        small_gemm(
                            seq,
                            d,
                            seq,
                            out.get().add(base),
                            hidden,
                            dp.as_ptr(),
                            seq as isize,
                            1,
                            k[base..].as_ptr(),
                            hidden as isize,
                            1,
                        );
                        small_gemm(
                            seq,
                            d,
                            seq,
                            out.get().add(size + base),
                            hidden,
                            dp.as_ptr(),
                            1,
                            seq as isize,
                            q[base..].as_ptr(),
                            hidden as isize,
                            1,
                        );
                    }
                },
            )
        });
        grads
    }

    fn check(
        &self,
        q: &Layout,
        k: &Layout,
        v: &Layout,
    ) -> candle_core::Result<(usize, usize, usize)> {
        let (batch, seq, hidden) = q.shape().dims3()?;
        if k.dims() != q.dims() || v.dims() != q.dims() || hidden % self.heads != 0 {
            candle_core::bail!(
                "bert-attention: q {:?}, k {:?}, v {:?} with {} heads",
                q.dims(),
                k.dims(),
                v.dims(),
                self.heads
            )
        }
        if self.bias.as_ref().is_some_and(|b| b.len() != batch * seq)
            || self
                .dropout
                .as_ref()
                .is_some_and(|(m, _)| m.len() != batch * self.heads * seq * seq)
        {
            candle_core::bail!(
                "bert-attention: bias or dropout mask does not fit {:?}",
                q.dims()
            )
        }
        Ok((batch, seq, hidden))
    }
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "bert-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        k: &CpuStorage,
        kl: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (batch, seq, hidden) = self.check(ql, kl, vl)?;
        let name = self.name();
        let mut saved = self.saved.lock()?;
        let out = per_float!(name, [F32, F64], (q => q @ ql, k => k @ kl, v => v @ vl), {
            let (context, probs) = self.forward(q, k, v, hidden, batch, seq, hidden);
            *saved = probs.map(Real::save);
            context
        });
        Ok((out, ql.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (batch, seq, hidden) = self.check(q.layout(), k.layout(), v.layout())?;
        let grad = grad.contiguous()?;
        let saved = self.saved.lock()?;
        let (qs, _) = q.storage_and_layout();
        let (ks, _) = k.storage_and_layout();
        let (vs, _) = v.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let name = self.name();
        let (qc, kc, vc, gc) = (
            cpu_storage(&qs, name)?,
            cpu_storage(&ks, name)?,
            cpu_storage(&vs, name)?,
            cpu_storage(&gs, name)?,
        );
        let probs = saved
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg(format!("{name}: backward before forward")))?;
        let grads = per_float!(
            name,
            [F32, F64],
            (qc => qd @ q.layout(), kc => kd @ k.layout(), vc => vd @ v.layout(), gc => gd @ gl),
            {
                let p = Real::saved(probs).ok_or_else(|| {
                    candle_core::Error::Msg(format!("{name}: backward in another dtype"))
                })?;
                self.backward(qd, kd, vd, p, gd, batch, seq, hidden)
            }
        );
        let shape = (3, batch, seq, hidden);
        let packed = match grads {
            CpuStorage::F32(g) => Tensor::from_vec(g, shape, q.device())?,
            CpuStorage::F64(g) => Tensor::from_vec(g, shape, q.device())?,
            _ => candle_core::bail!("{name}: f32 or f64 expected"),
        };
        let pick = |i: usize, t: &Tensor| -> candle_core::Result<Option<Tensor>> {
            t.track_op().then(|| packed.get(i)).transpose()
        };
        Ok((pick(0, q)?, pick(1, k)?, pick(2, v)?))
    }
}

/// Inference attention over the packed output of one QKV projection, `[batch, seq, 3 * hidden]`
/// (query, key and value columns side by side, as `BertSelfAttention`'s fused projection
/// writes them): the same computation as [`AttentionOp`], reading the three blocks in place.
/// No dropout and no backward: it is built only for inference.
#[derive(Debug)]
pub(crate) struct PackedAttentionOp(pub AttentionOp);

impl CustomOp1 for PackedAttentionOp {
    fn name(&self) -> &'static str {
        "bert-attention-packed"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = self.name();
        let op = &self.0;
        let (batch, seq, packed) = xl.shape().dims3()?;
        let hidden = packed / 3;
        if packed % 3 != 0 || hidden % op.heads != 0 || op.dropout.is_some() {
            candle_core::bail!(
                "{name}: {:?} is not [batch, seq, 3 x heads x d] (or has dropout)",
                xl.dims()
            )
        }
        if op.bias.as_ref().is_some_and(|b| b.len() != batch * seq) {
            candle_core::bail!("{name}: bias does not fit {:?}", xl.dims())
        }
        let mut saved = op.saved.lock()?;
        let out = per_float!(name, [F32, F64], (x => x @ xl), {
            let (context, probs) =
                op.forward(x, &x[hidden..], &x[2 * hidden..], packed, batch, seq, hidden);
            *saved = probs.map(Real::save);
            context
        });
        Ok((out, Shape::from((batch, seq, hidden))))
    }
}

// ---------------------------------------------------------------------------------------------
// Embedding lookup

/// Row gather `table[ids]` for a `[rows, dim]` table and contiguous integer `ids` of any shape
/// (output `[ids.., dim]`). Its backward writes the table's gradient in one pass: a zeroed
/// buffer (fresh pages, so only the rows the batch touched are ever written) with each
/// gradient row added onto its id's row. candle's `index_select` backward zero-fills a tensor
/// and then copies it into a second one for `index_add`: for a 30k-row vocabulary that was two
/// 47 MB buffers written, page by page, every training step.
///
/// Ids must be in range: the caller checks them (they are user input) before this runs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EmbeddingOp;

/// Ids of any integer storage as row indices, or an error naming the first out of `0..rows`.
fn row_indices(ids: &CpuStorage, layout: &Layout, rows: usize) -> candle_core::Result<Vec<usize>> {
    let name = "bert-embedding";
    fn to_rows<I: Copy>(
        ids: &[I],
        rows: usize,
        index: impl Fn(I) -> Option<usize>,
    ) -> candle_core::Result<Vec<usize>> {
        ids.iter()
            .map(|&id| match index(id) {
                Some(r) if r < rows => Ok(r),
                _ => candle_core::bail!("bert-embedding: id outside the table of {rows} rows"),
            })
            .collect()
    }
    match ids {
        CpuStorage::U32(v) => to_rows(contiguous(v, layout, name)?, rows, |i| Some(i as usize)),
        CpuStorage::U8(v) => to_rows(contiguous(v, layout, name)?, rows, |i| Some(i as usize)),
        CpuStorage::I64(v) => to_rows(contiguous(v, layout, name)?, rows, |i| {
            usize::try_from(i).ok()
        }),
        _ => candle_core::bail!("{name}: ids must be u8, u32 or i64"),
    }
}

fn table_dims(layout: &Layout) -> candle_core::Result<(usize, usize)> {
    match layout.dims() {
        [rows, dim] => Ok((*rows, *dim)),
        other => candle_core::bail!("bert-embedding: the table must be [rows, dim], got {other:?}"),
    }
}

impl CustomOp2 for EmbeddingOp {
    fn name(&self) -> &'static str {
        "bert-embedding"
    }

    fn cpu_fwd(
        &self,
        table: &CpuStorage,
        tl: &Layout,
        ids: &CpuStorage,
        il: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, dim) = table_dims(tl)?;
        let index = row_indices(ids, il, rows)?;
        let name = self.name();
        let out = per_float!(name, [F32, F64], (table => table @ tl), {
            for_rows(index.len(), dim, |r, out| {
                let at = index[r] * dim;
                out.copy_from_slice(&table[at..at + dim]);
            })
        });
        let mut dims = il.dims().to_vec();
        dims.push(dim);
        Ok((out, Shape::from(dims)))
    }

    fn bwd(
        &self,
        table: &Tensor,
        ids: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        if !table.track_op() {
            // A frozen table (LoRA, head-only training) needs no 47 MB gradient.
            return Ok((None, None));
        }
        let grad = grad.contiguous()?;
        let ids = ids.contiguous()?;
        Ok((
            Some(grad.apply_op2_no_bwd(&ids, &EmbeddingBackward(table.dims2()?))?),
            None,
        ))
    }
}

/// The table gradient of [`EmbeddingOp`]: `[rows, dim]`, zero but for the looked-up rows.
struct EmbeddingBackward((usize, usize));

impl EmbeddingBackward {
    fn scatter<T: Real + Default>(&self, grad: &[T], index: &[usize]) -> Vec<T> {
        let (rows, dim) = self.0;
        // `vec![zero; n]` is calloc: untouched rows stay on never-written pages. A row's first
        // gradient is copied, not added: a read first would map the shared zero page, and the
        // write after it would fault again and flush the TLB of every core.
        let mut out = vec![T::zero(); rows * dim];
        let mut written = vec![false; rows];
        // Sequential: duplicate ids add into one row, and a batch holds a few thousand rows
        // against the table's tens of thousands, so this is a small part of the cost.
        for (r, &row) in index.iter().enumerate() {
            let dst = &mut out[row * dim..(row + 1) * dim];
            let src = &grad[r * dim..(r + 1) * dim];
            if std::mem::replace(&mut written[row], true) {
                dst.iter_mut().zip(src).for_each(|(d, &g)| *d += g);
            } else {
                dst.copy_from_slice(src);
            }
        }
        out
    }
}

impl CustomOp2 for EmbeddingBackward {
    fn name(&self) -> &'static str {
        "bert-embedding-backward"
    }

    fn cpu_fwd(
        &self,
        grad: &CpuStorage,
        gl: &Layout,
        ids: &CpuStorage,
        il: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, dim) = self.0;
        let index = row_indices(ids, il, rows)?;
        if gl.shape().elem_count() != index.len() * dim {
            candle_core::bail!(
                "{}: gradient {:?} for {} ids of dim {dim}",
                self.name(),
                gl.dims(),
                index.len()
            )
        }
        let name = self.name();
        let out = per_float!(name, [F32, F64], (grad => grad @ gl), self.scatter(grad, &index));
        Ok((out, Shape::from((rows, dim))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_fast_is_within_two_ulp_of_libm() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (fast, exact) = (x.exp_fast() as f64, (x as f64).exp());
            worst = worst.max(((fast - exact) / exact).abs());
            x += 0.001_3;
        }
        // Two f32 ulp are 2.4e-7 relative.
        assert!(worst < 2.4e-7, "worst relative error {worst}");
        assert_eq!(0f32.exp_fast(), 1.0);
        assert_eq!(f32::NEG_INFINITY.exp_fast(), 0.0);
        assert_eq!((-1e4f32).exp_fast(), 0.0);
        assert_eq!(f32::MIN.exp_fast(), 0.0);
        assert_eq!(f32::INFINITY.exp_fast(), f32::INFINITY);
        assert_eq!(100f32.exp_fast(), f32::INFINITY);
        assert!(f32::NAN.exp_fast().is_nan());
    }

    #[test]
    fn lane_reductions_cover_every_element() {
        for n in [0usize, 1, 7, 8, 9, 17, 128, 131] {
            let a: Vec<f64> = (0..n).map(|i| (i as f64 * 0.37).sin()).collect();
            let b: Vec<f64> = (0..n).map(|i| (i as f64 * 0.11).cos()).collect();
            let expected: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - expected).abs() < 1e-12, "dot over {n}");
            let mut row = a.clone();
            softmax_in_place(&mut row);
            if n > 0 {
                let max = a.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let total: f64 = a.iter().map(|v| (v - max).exp()).sum();
                for (p, v) in row.iter().zip(&a) {
                    assert!(
                        (p - (v - max).exp() / total).abs() < 1e-15,
                        "softmax over {n}"
                    );
                }
            }
        }
    }

    /// The f32 element maps, compiled for the CPU's vectors by `with_simd`, against f64 GELU
    /// (libm's erf), over lengths below, at and past one chunk and the parallel threshold.
    #[test]
    fn vectorised_element_maps_match_f64() {
        for n in [0usize, 1, 15, 4096, 4097, 3 * PARALLEL_MIN_ELEMENTS + 5] {
            let x: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.013).sin() * 9.0).collect();
            let dy: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.007).cos()).collect();
            let keep: Vec<bool> = (0..n).map(|i| i % 3 != 0).collect();
            let forward = map_elements(&x, &x, |v, _| gelu(v));
            let backward = map_elements(&x, &dy, |v, g| gelu_grad(v) * g);
            let dropped = map_elements(&x, &keep, |v, kept| if kept { v * 1.5 } else { 0.0 });
            assert_eq!((forward.len(), backward.len(), dropped.len()), (n, n, n));
            for k in 0..n {
                let v = x[k] as f64;
                let cdf = 0.5 * (1.0 + libm::erf(v * FRAC_1_SQRT_2));
                let pdf = FRAC_1_SQRT_2PI * (-0.5 * v * v).exp();
                let (f, b) = (v * cdf, (cdf + v * pdf) * dy[k] as f64);
                assert!(
                    (forward[k] as f64 - f).abs() < 2e-6 * (1.0 + f.abs()),
                    "gelu({v})"
                );
                assert!((backward[k] as f64 - b).abs() < 2e-6, "gelu'({v})");
                let d = if keep[k] { x[k] * 1.5 } else { 0.0 };
                assert_eq!(dropped[k], d, "dropout at {k}");
            }
        }
    }

    /// Each instruction-set path of `with_simd` that this CPU can run gives the same bits as
    /// the baseline build (no fused multiply-adds are introduced, lanes are independent).
    #[test]
    fn every_simd_path_gives_the_baseline_bits() {
        let x: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.021).collect();
        #[inline(always)]
        fn run(v: &[f32]) -> Vec<f32> {
            v.iter().map(|&a| gelu_grad(a) * gelu(a)).collect()
        }
        let baseline = run(&x);
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") && has!("fma") {
                // SAFETY: the CPU has AVX2 and FMA.
                assert_eq!(unsafe { simd_avx2(|| run(&x)) }, baseline, "avx2");
            }
            if has!("avx512f") && has!("avx2") && has!("fma") {
                // SAFETY: the CPU has AVX-512F, AVX2 and FMA.
                assert_eq!(unsafe { simd_avx512(|| run(&x)) }, baseline, "avx512");
            }
        }
        assert_eq!(with_simd(|| run(&x)), baseline, "dispatch");
    }

    /// Bias and LayerNorm gradient sums round the same way on every run and thread count
    /// (exact resume depends on it): column sums of f32 rows in pools of 1, 2 and 3 threads,
    /// each several times, give one bit pattern.
    #[test]
    fn row_sums_are_the_same_bits_on_any_thread_count() {
        let (rows, cols) = (1000, 37);
        let x: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919) % 1013) as f32 * 1e-3 - 0.5)
            .collect();
        let reference = column_sums(&x, cols);
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for _ in 0..5 {
                let sums = pool.install(|| column_sums(&x, cols));
                let same = sums
                    .iter()
                    .zip(&reference)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{threads} threads: {sums:?} vs {reference:?}");
            }
        }
    }
}
