//! f32 element kernels written with AVX-512 intrinsics, for the loops the compiler left
//! partly scalar: the attention row softmax (its max and sum reductions compiled to scalar
//! `vmaxss` / `vaddss` chains, 15% of an 8 x 512 forward pass). The softmax also in AVX2, for
//! CPUs without AVX-512 (there the portable row took 13% of an 8 x 512 pass, this one 7%).
//!
//! Every function here computes what its portable counterpart in `kernels` does, with the same
//! algorithm; the `exp` uses fused multiply-adds, so results differ from the portable code in
//! the last bit or two (tested).
//!
//! The softmax row functions are `#[inline(always)]`, into the attention's loop (compiled by
//! `kernels::with_simd`): a call less per row; before the AVX2 rows existed it was also what
//! kept their portable fallback from running at baseline x86-64 (scalar `exp`) on AVX2 CPUs.

/// Whether this CPU runs the kernels here (AVX-512F, checked once by std's cache).
#[inline]
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU runs the AVX2 softmax here (AVX2 and FMA; used where AVX-512 is missing).
#[inline]
fn avx2_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `row = softmax(row * scale + bias)` in place (`bias`, when given, as long as `row`).
/// In AVX-512, else AVX2, else the portable code.
#[inline(always)]
pub(crate) fn scaled_softmax(row: &mut [f32], scale: f32, bias: Option<&[f32]>) {
    let sum = scaled_exp_row(row, scale, bias);
    if sum != 1.0 {
        scale_row(row, 1.0 / sum);
    }
}

/// The softmax of `row * scale + bias` up to its normalisation, in place: `row` becomes
/// `exp(row * scale + bias - max)` and the return value is its sum (1 where the portable
/// fallback normalised already). Lets the attention divide the `P V` rows (head size wide)
/// instead of the probability rows (sequence wide).
#[inline(always)]
pub(crate) fn scaled_exp_row(row: &mut [f32], scale: f32, bias: Option<&[f32]>) -> f32 {
    if let Some(bias) = bias {
        assert_eq!(bias.len(), row.len(), "bias and row lengths differ");
    }
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: AVX-512F is present (checked just above); `bias` is as long as `row`.
        return unsafe { avx512::scaled_exp_row(row, scale, bias) };
    }
    #[cfg(target_arch = "x86_64")]
    if avx2_available() {
        // SAFETY: AVX2 and FMA are present (checked just above); `bias` is as long as `row`.
        return unsafe { avx2::scaled_exp_row(row, scale, bias) };
    }
    crate::kernels::scaled_softmax_in_place(row, scale, bias);
    1.0
}

/// `row *= factor`, in AVX-512 or AVX2 where present.
#[inline(always)]
pub(crate) fn scale_row(row: &mut [f32], factor: f32) {
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: AVX-512F is present (checked just above).
        unsafe { avx512::scale_row(row, factor) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if avx2_available() {
        // SAFETY: AVX2 and FMA are present (checked just above).
        unsafe { avx2::scale_row(row, factor) };
        return;
    }
    row.iter_mut().for_each(|v| *v *= factor);
}

/// LayerNorm of one f32 row, written to `out`: the mean and variance in f64 (in one shifted
/// pass; the portable `LayerNormOp` takes two), `(x - mean) * rstd * w + b` in f32 with the
/// mean in two parts, so that the centring is exact to a rounding of the centred value
/// whatever the row's offset (within a few roundings of the portable f64 result; tested).
/// `None` where AVX-512 is missing, for the caller's portable loop. All four slices have the
/// same length.
pub(crate) fn layer_norm_row(
    row: &[f32],
    weight: &[f32],
    bias: &[f32],
    eps: f64,
    out: &mut [f32],
) -> Option<()> {
    let n = row.len();
    assert!(
        weight.len() == n && bias.len() == n && out.len() == n,
        "layer_norm_row: lengths differ"
    );
    #[cfg(target_arch = "x86_64")]
    if available() && n > 0 {
        // SAFETY: AVX-512F is present (checked just above); the lengths agree (asserted).
        unsafe { avx512::layer_norm_row(row, weight, bias, eps, out) };
        return Some(());
    }
    let _ = eps;
    None
}

/// `v = gelu(v)` (the erf form, erf by Abramowitz & Stegun 7.1.26 as the portable `gelu`)
/// over `values`, with fused multiply-adds, a refined reciprocal for the formula's division
/// and its `e^(-x^2)` as a power of two; `false` (nothing done) where AVX-512F and DQ are
/// missing, for the caller's portable loop.
pub(crate) fn gelu_in_place(values: &mut [f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if available() && std::arch::is_x86_feature_detected!("avx512dq") {
        // SAFETY: AVX-512F and DQ are present (checked just above).
        unsafe { avx512::gelu_in_place(values) };
        return true;
    }
    let _ = values;
    false
}

#[cfg(target_arch = "x86_64")]
pub(crate) use avx512::{exp2_nonpositive, store_and_sum};

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    const LANES: usize = 16;

    /// The lanes of a row chunk that exist: all 16, or the `len % 16` of the tail.
    #[inline(always)]
    fn lane_mask(len: usize, at: usize) -> __mmask16 {
        let left = len - at;
        if left >= LANES {
            0xffff
        } else {
            ((1u32 << left) - 1) as __mmask16
        }
    }

    /// `e^r` for `r = x - n ln 2` (`n` the rounded `x log2 e`), by Cephes' polynomial: the
    /// range reduction (`ln 2` in two parts) and the polynomial in fused multiply-adds.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn exp_of_remainder(x: __m512, n: __m512) -> __m512 {
        use crate::kernels::{EXP_LN2_HI, EXP_LN2_LO, EXP_POLY as C};
        let set = _mm512_set1_ps;
        let r = _mm512_fnmadd_ps(n, set(EXP_LN2_HI), x);
        let r = _mm512_fnmadd_ps(n, set(EXP_LN2_LO), r);
        let mut poly = _mm512_fmadd_ps(set(C[0]), r, set(C[1]));
        for &c in &C[2..] {
            poly = _mm512_fmadd_ps(poly, r, set(c));
        }
        _mm512_add_ps(_mm512_fmadd_ps(poly, _mm512_mul_ps(r, r), r), set(1.0))
    }

    /// `e^x` per lane for `x <= 0` (and -inf and NaN), as the softmax's `x - max` always is:
    /// Cephes' `expf` (the algorithm and constants of the portable `<f32 as Real>::exp_fast`)
    /// with its polynomial and range reduction in fused multiply-adds, `n = round(x log2 e)`
    /// by a shifter, and `2^n` and the underflow to exactly 0 in one masked `vscalefps`: 14
    /// vector operations, within 2 ulp of `e^x` like the portable one (tested).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn exp_nonpositive(x: __m512) -> __m512 {
        use crate::kernels::EXP_LO as LO;
        let set = _mm512_set1_ps;
        // NaN kept: vmaxps returns its second operand when either is NaN.
        let clamped = _mm512_max_ps(set(LO), x);
        // n = round(x log2 e) by the 1.5 * 2^23 shifter: one multiply-add and a subtract
        // instead of a multiply and the two-uop `vrndscaleps`.
        let shifter = set(12_582_912.0);
        let n = _mm512_sub_ps(
            _mm512_fmadd_ps(clamped, set(std::f32::consts::LOG2_E), shifter),
            shifter,
        );
        let e = exp_of_remainder(clamped, n);
        // Lanes at or above LO, or NaN (unordered), keep their value; the rest become 0.
        let keep = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(x, set(LO));
        _mm512_maskz_scalef_ps(keep, e, n)
    }

    /// `2^u` per lane for `u <= 0` (and NaN, kept), for the attention's softmax in base 2
    /// (`tiled_attention`): the fraction `u - floor(u)` by `vreduceps`, its power of two by
    /// [`EXP2_POLY`], and the `2^floor(u)` by `vscalefps`: 8 vector operations where
    /// [`exp_nonpositive`] takes 14. Within 2 ulp of `2^u`, exactly 1 at 0, and 0 from
    /// about -150 down (tested).
    ///
    /// # Safety
    /// The CPU must have AVX-512F and AVX-512DQ.
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq")]
    pub(crate) unsafe fn exp2_nonpositive(u: __m512) -> __m512 {
        let set = _mm512_set1_ps;
        let c = EXP2_POLY;
        // -inf would give a NaN fraction; from -150 on the result rounds to 0 anyway. NaN
        // kept: vmaxps returns its second operand when either is NaN.
        let u = _mm512_max_ps(set(-150.0), u);
        let f = _mm512_reduce_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(u);
        let mut p = _mm512_fmadd_ps(set(c[0]), f, set(c[1]));
        for &c in &c[2..] {
            p = _mm512_fmadd_ps(p, f, set(c));
        }
        _mm512_scalef_ps(_mm512_fmadd_ps(p, f, set(1.0)), u)
    }

    /// `2^f = 1 + f (c0 f^4 + c1 f^3 + ... + c4)` on `[0, 1)`: fitted here (iteratively
    /// reweighted least squares towards the minimax relative error, 8.2e-8, with the constant
    /// term held at exactly 1).
    const EXP2_POLY: [f32; 5] = [
        1.867_118_3e-3,
        9.017_055e-3,
        5.579_989_4e-2,
        2.401_644_6e-1,
        6.931_513e-1,
    ];

    /// See [`super::scaled_exp_row`].
    ///
    /// # Safety
    /// The CPU must have AVX-512F; `bias`, when given, must be as long as `row`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn scaled_exp_row(row: &mut [f32], scale: f32, bias: Option<&[f32]>) -> f32 {
        let len = row.len();
        let p = row.as_mut_ptr();
        let scale_v = _mm512_set1_ps(scale);
        let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);
        // `row * scale + bias` (or `+ addend` without a bias: 0, or `-max` in the exponent
        // pass) of the 16 lanes at `at`, in one fused multiply-add (missing tail lanes read 0
        // and are masked out below).
        let shifted = |at: usize, m: __mmask16, addend: __m512| {
            let s = _mm512_maskz_loadu_ps(m, p.add(at));
            match bias {
                Some(bias) => {
                    _mm512_fmadd_ps(s, scale_v, _mm512_maskz_loadu_ps(m, bias.as_ptr().add(at)))
                }
                None => _mm512_fmadd_ps(s, scale_v, addend),
            }
        };
        // The maximum score, in two accumulators (each `vmaxps` waits for the one before it
        // on the same accumulator), nothing stored: the exponent pass recomputes the scores.
        // Without a bias and with `scale > 0` (the attention's) the maximum of `row` is taken
        // and scaled. A NaN score makes the row NaN through `v - max` below, as in the
        // portable code.
        let zero = _mm512_setzero_ps();
        let unbiased = bias.is_none() && scale > 0.0;
        let (mut max0, mut max1) = (neg_inf, neg_inf);
        let mut at = 0;
        let raw = |at: usize, m: __mmask16| {
            if unbiased {
                _mm512_maskz_loadu_ps(m, p.add(at))
            } else {
                shifted(at, m, zero)
            }
        };
        while at + 2 * LANES <= len {
            max0 = _mm512_max_ps(max0, raw(at, 0xffff));
            max1 = _mm512_max_ps(max1, raw(at + LANES, 0xffff));
            at += 2 * LANES;
        }
        while at < len {
            let m = lane_mask(len, at);
            max0 = _mm512_mask_max_ps(max0, m, max0, raw(at, m));
            at += LANES;
        }
        let mut max = _mm512_reduce_max_ps(_mm512_max_ps(max0, max1));
        if unbiased {
            max *= scale;
        }
        let max = _mm512_set1_ps(max);
        let neg_max = _mm512_sub_ps(zero, max);
        let exponent = |at: usize, m: __mmask16| {
            if unbiased {
                exp_nonpositive(shifted(at, m, neg_max))
            } else {
                exp_nonpositive(_mm512_sub_ps(shifted(at, m, zero), max))
            }
        };
        store_and_sum(p, len, exponent)
    }

    /// `p[at..at + 16] = exponent(at, lanes)` over `len` floats (the tail's missing lanes
    /// masked out, `exponent` may read `p`'s lanes at `at` before they are written), and the
    /// sum of what was stored: the last pass of both softmax rows, this module's and the tiled
    /// attention's. Two sums, so that each add waits on the one before it only every other
    /// vector.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; `p` is valid for reads and writes of `len` floats.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn store_and_sum(
        p: *mut f32,
        len: usize,
        exponent: impl Fn(usize, __mmask16) -> __m512,
    ) -> f32 {
        let (mut sum0, mut sum1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut at = 0;
        while at + 2 * LANES <= len {
            let (e0, e1) = (exponent(at, 0xffff), exponent(at + LANES, 0xffff));
            _mm512_storeu_ps(p.add(at), e0);
            _mm512_storeu_ps(p.add(at + LANES), e1);
            sum0 = _mm512_add_ps(sum0, e0);
            sum1 = _mm512_add_ps(sum1, e1);
            at += 2 * LANES;
        }
        while at < len {
            let m = lane_mask(len, at);
            let e = exponent(at, m);
            _mm512_mask_storeu_ps(p.add(at), m, e);
            sum0 = _mm512_mask_add_ps(sum0, m, sum0, e);
            at += LANES;
        }
        _mm512_reduce_add_ps(_mm512_add_ps(sum0, sum1))
    }

    /// See [`super::layer_norm_row`].
    ///
    /// # Safety
    /// The CPU must have AVX-512F; all slices are `row.len() > 0` long.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn layer_norm_row(
        row: &[f32],
        weight: &[f32],
        bias: &[f32],
        eps: f64,
        out: &mut [f32],
    ) {
        let len = row.len();
        let x = row.as_ptr();
        // Both moments in one pass, in f64, of `x - x[0]`: the shift keeps the variance's
        // `E[d^2] - E[d]^2` from cancelling on a row far from 0 (BERT's residual streams),
        // and f64 holds f32 data's squares and sums exactly enough (a relative error of
        // 1e-16 times `(mean - x[0])^2 / variance`). Each 16 floats as two f64 halves; two
        // accumulators a half, so each add waits on the one before it only every other step.
        let shift = _mm512_set1_pd(row[0] as f64);
        let mut sums = [_mm512_setzero_pd(); 4];
        let mut squares = [_mm512_setzero_pd(); 4];
        let mut at = 0;
        let mut step = 0;
        while at < len {
            let m = lane_mask(len, at);
            let v = _mm512_maskz_loadu_ps(m, x.add(at));
            let lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
            let hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(
                _mm512_castps_pd(v),
            )));
            // Tail lanes would add `-x[0]`: masked out (low 8 lanes, high 8 lanes of `m`).
            let (m_lo, m_hi) = ((m & 0xff) as __mmask8, (m >> 8) as __mmask8);
            let d_lo = _mm512_maskz_sub_pd(m_lo, lo, shift);
            let d_hi = _mm512_maskz_sub_pd(m_hi, hi, shift);
            let (i, j) = (step % 2 * 2, step % 2 * 2 + 1);
            sums[i] = _mm512_add_pd(sums[i], d_lo);
            sums[j] = _mm512_add_pd(sums[j], d_hi);
            squares[i] = _mm512_fmadd_pd(d_lo, d_lo, squares[i]);
            squares[j] = _mm512_fmadd_pd(d_hi, d_hi, squares[j]);
            at += LANES;
            step += 1;
        }
        let total = |a: [__m512d; 4]| {
            _mm512_reduce_add_pd(_mm512_add_pd(
                _mm512_add_pd(a[0], a[1]),
                _mm512_add_pd(a[2], a[3]),
            ))
        };
        let n = len as f64;
        let mean_shifted = total(sums) / n;
        let variance = (total(squares) / n - mean_shifted * mean_shifted).max(0.0);
        let mean = row[0] as f64 + mean_shifted;
        let rstd = _mm512_set1_ps((1.0 / (variance + eps).sqrt()) as f32);
        // The mean as f32 `hi + lo`: `(x - hi) - lo` is the centred value to within a
        // rounding or two of it (not of the offset, as `x - mean` in f32 would be).
        let mean_hi = mean as f32;
        let (hi, lo) = (
            _mm512_set1_ps(mean_hi),
            _mm512_set1_ps((mean - mean_hi as f64) as f32),
        );
        at = 0;
        while at < len {
            let m = lane_mask(len, at);
            let v = _mm512_maskz_loadu_ps(m, x.add(at));
            let centred = _mm512_sub_ps(_mm512_sub_ps(v, hi), lo);
            let w = _mm512_maskz_loadu_ps(m, weight.as_ptr().add(at));
            let b = _mm512_maskz_loadu_ps(m, bias.as_ptr().add(at));
            let y = _mm512_fmadd_ps(_mm512_mul_ps(centred, rstd), w, b);
            _mm512_mask_storeu_ps(out.as_mut_ptr().add(at), m, y);
            at += LANES;
        }
    }

    /// See [`super::gelu_in_place`].
    ///
    /// # Safety
    /// The CPU must have AVX-512F and AVX-512DQ.
    #[target_feature(enable = "avx512f,avx512dq")]
    pub(super) unsafe fn gelu_in_place(values: &mut [f32]) {
        use crate::kernels::{ERF_A as A, ERF_P as P};
        use std::f32::consts::LOG2_E;
        let set = _mm512_set1_ps;
        let sign = _mm512_set1_epi32(i32::MIN);
        let len = values.len();
        let p = values.as_mut_ptr();
        let mut at = 0;
        while at < len {
            let m = lane_mask(len, at);
            let v = _mm512_maskz_loadu_ps(m, p.add(at));
            let z = _mm512_mul_ps(v, set(std::f32::consts::FRAC_1_SQRT_2));
            let x = _mm512_abs_ps(z);
            // t = 1 / (1 + P x): a 14-bit reciprocal and one Newton step (the division's
            // throughput would bound the loop). x capped for it: the step would turn an
            // infinite x into NaN, and past 10 the exp below makes erf 1 whatever t is.
            let d = _mm512_fmadd_ps(set(P), _mm512_min_ps(x, set(1e4)), set(1.0));
            let r = _mm512_rcp14_ps(d);
            let t = _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, set(2.0)));
            let mut poly = _mm512_fmadd_ps(set(A[4]), t, set(A[3]));
            poly = _mm512_fmadd_ps(poly, t, set(A[2]));
            poly = _mm512_fmadd_ps(poly, t, set(A[1]));
            poly = _mm512_fmadd_ps(poly, t, set(A[0]));
            poly = _mm512_mul_ps(poly, t);
            // e^(-x^2) = 2^(-x^2 log2 e): 8 operations where `exp` takes 19.
            let e = exp2_nonpositive(_mm512_mul_ps(x, _mm512_mul_ps(x, set(-LOG2_E))));
            // erf(|z|) = 1 - poly e, then z's sign.
            let magnitude = _mm512_fnmadd_ps(poly, e, set(1.0));
            let erf = _mm512_castsi512_ps(_mm512_or_si512(
                _mm512_castps_si512(magnitude),
                _mm512_and_si512(_mm512_castps_si512(z), sign),
            ));
            let half = _mm512_mul_ps(v, set(0.5));
            _mm512_mask_storeu_ps(p.add(at), m, _mm512_fmadd_ps(half, erf, half));
            at += LANES;
        }
    }

    /// `row *= factor`.
    ///
    /// # Safety
    /// The CPU must have AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn scale_row(row: &mut [f32], factor: f32) {
        let len = row.len();
        let p = row.as_mut_ptr();
        let factor = _mm512_set1_ps(factor);
        let mut at = 0;
        while at < len {
            let m = lane_mask(len, at);
            let v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, p.add(at)), factor);
            _mm512_mask_storeu_ps(p.add(at), m, v);
            at += LANES;
        }
    }
}

/// The softmax row in AVX2 for CPUs without AVX-512: the same algorithm as the AVX-512 code
/// (the same `exp` polynomial in fused multiply-adds, 2^n put into the exponent bits where
/// AVX-512 has `vscalefps`), eight lanes, tails by masked loads and stores.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    const LANES: usize = 8;

    /// All ones in the lanes of a row chunk that exist: all 8, or the `len % 8` of the tail.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn lane_mask(len: usize, at: usize) -> __m256i {
        let left = (len - at).min(LANES) as i32;
        _mm256_cmpgt_epi32(
            _mm256_set1_epi32(left),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        )
    }

    /// The avx512 module's `exp_nonpositive` in eight lanes: `e^x` for `x <= 0` (and -inf and
    /// NaN) within 2 ulp (tested), exactly 0 below `EXP_LO`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_nonpositive(x: __m256) -> __m256 {
        use crate::kernels::{EXP_LN2_HI, EXP_LN2_LO, EXP_LO as LO, EXP_POLY as C};
        let set = _mm256_set1_ps;
        // NaN kept: vmaxps returns its second operand when either is NaN.
        let clamped = _mm256_max_ps(set(LO), x);
        // n = round(x log2 e) by the 1.5 * 2^23 shifter, in [-126, 0] after the clamp.
        let shifter = set(12_582_912.0);
        let n = _mm256_sub_ps(
            _mm256_fmadd_ps(clamped, set(std::f32::consts::LOG2_E), shifter),
            shifter,
        );
        let r = _mm256_fnmadd_ps(n, set(EXP_LN2_HI), clamped);
        let r = _mm256_fnmadd_ps(n, set(EXP_LN2_LO), r);
        let mut poly = _mm256_fmadd_ps(set(C[0]), r, set(C[1]));
        for &c in &C[2..] {
            poly = _mm256_fmadd_ps(poly, r, set(c));
        }
        let e = _mm256_add_ps(_mm256_fmadd_ps(poly, _mm256_mul_ps(r, r), r), set(1.0));
        // 2^n, a normal float for n >= -126: n + 127 in the exponent bits. One rounding in
        // the product, as `vscalefps` does.
        let bits = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
        let y = _mm256_mul_ps(e, _mm256_castsi256_ps(_mm256_slli_epi32::<23>(bits)));
        // Lanes at or above LO, or NaN (unordered), keep their value; the rest become 0.
        _mm256_and_ps(y, _mm256_cmp_ps::<_CMP_NLT_UQ>(x, set(LO)))
    }

    /// The largest lane.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn reduce_max(v: __m256) -> f32 {
        let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<1>(m, m)))
    }

    /// The sum of the lanes.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn reduce_add(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
    }

    /// See [`super::scaled_exp_row`].
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; `bias`, when given, must be as long as `row`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn scaled_exp_row(row: &mut [f32], scale: f32, bias: Option<&[f32]>) -> f32 {
        let len = row.len();
        let p = row.as_mut_ptr();
        let scale_v = _mm256_set1_ps(scale);
        let neg_inf = _mm256_set1_ps(f32::NEG_INFINITY);
        let zero = _mm256_setzero_ps();
        // Eight lanes at `at`: all of them (`None`), or the tail's (missing lanes read 0).
        let load = |ptr: *const f32, m: Option<__m256i>| match m {
            None => _mm256_loadu_ps(ptr),
            Some(m) => _mm256_maskload_ps(ptr, m),
        };
        // `row * scale + bias` (or `+ addend` without a bias) in one fused multiply-add.
        let shifted = |at: usize, m: Option<__m256i>, addend: __m256| {
            let s = load(p.add(at), m);
            match bias {
                Some(bias) => _mm256_fmadd_ps(s, scale_v, load(bias.as_ptr().add(at), m)),
                None => _mm256_fmadd_ps(s, scale_v, addend),
            }
        };
        // The maximum score, in two accumulators, nothing stored (as the AVX-512 code; with
        // no bias and `scale > 0` the maximum of `row` is taken, then scaled). Missing tail
        // lanes count as -inf.
        let unbiased = bias.is_none() && scale > 0.0;
        let raw = |at: usize, m: Option<__m256i>| {
            let v = if unbiased {
                load(p.add(at), m)
            } else {
                shifted(at, m, zero)
            };
            match m {
                None => v,
                Some(m) => _mm256_blendv_ps(neg_inf, v, _mm256_castsi256_ps(m)),
            }
        };
        let (mut max0, mut max1) = (neg_inf, neg_inf);
        let mut at = 0;
        while at + 2 * LANES <= len {
            max0 = _mm256_max_ps(max0, raw(at, None));
            max1 = _mm256_max_ps(max1, raw(at + LANES, None));
            at += 2 * LANES;
        }
        while at < len {
            let m = (at + LANES > len).then(|| lane_mask(len, at));
            max0 = _mm256_max_ps(max0, raw(at, m));
            at += LANES;
        }
        let mut max = reduce_max(_mm256_max_ps(max0, max1));
        if unbiased {
            max *= scale;
        }
        let max = _mm256_set1_ps(max);
        let neg_max = _mm256_sub_ps(zero, max);
        let exponent = |at: usize, m: Option<__m256i>| {
            if unbiased {
                exp_nonpositive(shifted(at, m, neg_max))
            } else {
                exp_nonpositive(_mm256_sub_ps(shifted(at, m, zero), max))
            }
        };
        let (mut sum0, mut sum1) = (zero, zero);
        at = 0;
        while at + 2 * LANES <= len {
            let (e0, e1) = (exponent(at, None), exponent(at + LANES, None));
            _mm256_storeu_ps(p.add(at), e0);
            _mm256_storeu_ps(p.add(at + LANES), e1);
            sum0 = _mm256_add_ps(sum0, e0);
            sum1 = _mm256_add_ps(sum1, e1);
            at += 2 * LANES;
        }
        while at < len {
            if at + LANES <= len {
                let e = exponent(at, None);
                _mm256_storeu_ps(p.add(at), e);
                sum0 = _mm256_add_ps(sum0, e);
            } else {
                let m = lane_mask(len, at);
                let e = _mm256_and_ps(exponent(at, Some(m)), _mm256_castsi256_ps(m));
                _mm256_maskstore_ps(p.add(at), m, e);
                sum0 = _mm256_add_ps(sum0, e);
            }
            at += LANES;
        }
        reduce_add(_mm256_add_ps(sum0, sum1))
    }

    /// `row *= factor`.
    ///
    /// # Safety
    /// The CPU must have AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn scale_row(row: &mut [f32], factor: f32) {
        let len = row.len();
        let p = row.as_mut_ptr();
        let factor_v = _mm256_set1_ps(factor);
        let mut at = 0;
        while at + LANES <= len {
            _mm256_storeu_ps(
                p.add(at),
                _mm256_mul_ps(_mm256_loadu_ps(p.add(at)), factor_v),
            );
            at += LANES;
        }
        row[at..].iter_mut().for_each(|v| *v *= factor);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The intrinsics give the portable softmax's values (within the rounding of the row sum)
    /// for row lengths around the 16-lane width, with and without a bias, with a positive and a
    /// negative scale, with masked (-inf and large negative) scores, and keep NaN rows NaN.
    #[test]
    fn scaled_softmax_matches_the_portable_code() {
        // The dispatch (AVX-512, else AVX2, else the portable code itself), and the AVX2 code
        // on its own wherever it runs (also on AVX-512 CPUs, where the dispatch skips it).
        check_softmax("dispatch", &|row, scale, bias| {
            scaled_softmax(row, scale, bias)
        });
        #[cfg(target_arch = "x86_64")]
        if avx2_available() {
            // SAFETY: AVX2 and FMA are present (checked just above); the checks pass a bias
            // as long as the row.
            check_softmax("avx2", &|row, scale, bias| unsafe {
                let sum = avx2::scaled_exp_row(row, scale, bias);
                avx2::scale_row(row, 1.0 / sum);
            });
        }
    }

    type Softmax = dyn Fn(&mut [f32], f32, Option<&[f32]>);

    fn check_softmax(name: &str, softmax: &Softmax) {
        let mut seed = 7u32;
        let mut next = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 * 20.0 - 10.0
        };
        // The attention's positive scale, and a negative one (its maximum is not the scaled
        // maximum of the row).
        let cases = [(0.125f32, false), (0.125, true), (-0.5, false)];
        for len in [1usize, 2, 15, 16, 17, 31, 32, 33, 128, 129, 512] {
            for (scale, with_bias) in cases {
                let scores: Vec<f32> = (0..len).map(|_| next()).collect();
                let bias: Vec<f32> = (0..len)
                    .map(|j| match j % 5 {
                        0 => f32::MIN,
                        1 => -1e4,
                        _ => next(),
                    })
                    .collect();
                let bias = with_bias.then_some(&bias[..]);
                let mut expected = scores.clone();
                crate::kernels::scaled_softmax_in_place(&mut expected, scale, bias);
                let mut got = scores.clone();
                softmax(&mut got, scale, bias);
                for (j, (g, e)) in got.iter().zip(&expected).enumerate() {
                    assert!(
                        (g - e).abs() <= 1e-6 * e.abs().max(1e-30) + 1e-37,
                        "{name}: len {len} scale {scale} bias {with_bias} [{j}]: {g} vs {e}"
                    );
                }
                let total: f32 = got.iter().sum();
                assert!((total - 1.0).abs() < 1e-5, "{name}: len {len}: sum {total}");
            }
        }
        for len in [3, 11] {
            let mut with_nan = vec![0.5f32; len];
            with_nan[1] = f32::NAN;
            softmax(&mut with_nan, 1.0, None);
            assert!(with_nan.iter().all(|v| v.is_nan()), "{name}: {with_nan:?}");
        }
    }

    /// The AVX2 `exp_nonpositive` is within 2 ulp of `e^x` over `x <= 0`, gives exactly 0 where
    /// the portable `exp_fast` does, keeps NaN, and gives the AVX-512 one's bits where both run.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_exp_nonpositive_is_within_two_ulp_and_keeps_the_edges() {
        use crate::kernels::Real;
        if !avx2_available() {
            return;
        }
        let mut xs: Vec<f32> = (-176_000..=0).map(|i| i as f32 * 5e-4).collect();
        xs.extend([
            -87.336_55,
            -87.336_56,
            f32::NEG_INFINITY,
            f32::MIN,
            -1e4,
            -1e-30,
            -0.0,
            f32::NAN,
        ]);
        let mut worst = 0f64;
        for chunk in xs.chunks(8) {
            let mut lanes = [0f32; 8];
            lanes[..chunk.len()].copy_from_slice(chunk);
            let mut out = [0f32; 8];
            // SAFETY: AVX2 and FMA are present (checked above); 8-lane arrays.
            unsafe {
                use std::arch::x86_64::*;
                let y = avx2_exp_nonpositive_for_tests(_mm256_loadu_ps(lanes.as_ptr()));
                _mm256_storeu_ps(out.as_mut_ptr(), y);
            }
            for (&x, y) in chunk.iter().zip(out) {
                if x.is_nan() {
                    assert!(y.is_nan(), "exp(NaN): {y}");
                } else if x.exp_fast() == 0.0 {
                    assert_eq!(y, 0.0, "exp({x}) at the edge");
                } else {
                    let exact = (x as f64).exp();
                    worst = worst.max(((y as f64 - exact) / exact).abs());
                }
            }
            if available() {
                let mut wide = [0f32; 16];
                wide[..8].copy_from_slice(&lanes);
                let mut out512 = [0f32; 16];
                // SAFETY: AVX-512F is present (checked just above); 16-lane arrays.
                unsafe {
                    use std::arch::x86_64::*;
                    let x = _mm512_loadu_ps(wide.as_ptr());
                    _mm512_storeu_ps(out512.as_mut_ptr(), avx512_exp_nonpositive_for_tests(x));
                }
                for (a, b) in out.iter().zip(&out512[..8]) {
                    assert!(a.to_bits() == b.to_bits() || a.is_nan() && b.is_nan());
                }
            }
        }
        // Two f32 ulp are 2.4e-7 relative.
        assert!(worst < 2.4e-7, "worst relative error {worst}");
    }

    /// The softmax's vector `exp_nonpositive` is within 2 ulp of `e^x` (as the portable
    /// `exp_fast` is) over `x <= 0`, and gives exactly 0 and NaN where that does.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_exp_nonpositive_is_within_two_ulp_and_keeps_the_edges() {
        use crate::kernels::Real;
        if !available() {
            return;
        }
        let mut xs: Vec<f32> = (-174_000..=0).map(|i| i as f32 * 5e-4).collect();
        let edges = [
            -87.336_55,
            -87.336_56,
            f32::NEG_INFINITY,
            f32::MIN,
            -1e4,
            -1e-30,
            0.0,
            -0.0,
            f32::NAN,
        ];
        xs.extend(edges);
        let mut worst = 0f64;
        for chunk in xs.chunks(16) {
            let mut lanes = [0f32; 16];
            lanes[..chunk.len()].copy_from_slice(chunk);
            let mut out = [0f32; 16];
            // SAFETY: AVX-512F is present (checked above); 16-lane arrays.
            unsafe {
                use std::arch::x86_64::*;
                let x = _mm512_loadu_ps(lanes.as_ptr());
                _mm512_storeu_ps(out.as_mut_ptr(), avx512_exp_nonpositive_for_tests(x));
            }
            for (&x, y) in chunk.iter().zip(out) {
                let portable = x.exp_fast();
                if x.is_nan() {
                    assert!(y.is_nan(), "exp(NaN): {y}");
                } else if portable == 0.0 {
                    assert_eq!(y, 0.0, "exp({x}) at the edge");
                } else {
                    let exact = (x as f64).exp();
                    worst = worst.max(((y as f64 - exact) / exact).abs());
                }
            }
        }
        // Two f32 ulp are 2.4e-7 relative.
        assert!(worst < 2.4e-7, "worst relative error {worst}");
    }

    /// The softmax's `2^u` is within two ulp of `2^u` over every `u <= 0` that does not
    /// underflow, exactly 1 at 0 and exact at the integers, 0 past the underflow, and NaN
    /// for NaN.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn exp2_nonpositive_is_within_two_ulp_and_keeps_the_edges() {
        if !(available() && std::arch::is_x86_feature_detected!("avx512dq")) {
            return;
        }
        let mut us: Vec<f32> = (0..=1_300_000).map(|i| i as f32 * -1e-4).collect();
        us.extend((0..=160).map(|i| -(i as f32)));
        us.extend([
            -149.4,
            -150.0,
            -1e4,
            f32::MIN,
            f32::NEG_INFINITY,
            -0.0,
            f32::NAN,
        ]);
        let mut worst = 0f64;
        for chunk in us.chunks(16) {
            let mut lanes = [0f32; 16];
            lanes[..chunk.len()].copy_from_slice(chunk);
            let mut out = [0f32; 16];
            // SAFETY: AVX-512F and DQ are present (checked above); 16-lane arrays.
            unsafe {
                use std::arch::x86_64::*;
                let u = _mm512_loadu_ps(lanes.as_ptr());
                _mm512_storeu_ps(out.as_mut_ptr(), avx512_exp2_nonpositive_for_tests(u));
            }
            for (&u, y) in chunk.iter().zip(out) {
                let exact = (u as f64).exp2();
                if u.is_nan() {
                    assert!(y.is_nan(), "2^NaN: {y}");
                } else if u == u.round() && u >= -149.0 {
                    assert_eq!(y as f64, exact, "2^{u}");
                } else if u <= -150.0 {
                    assert_eq!(y, 0.0, "2^{u}");
                } else if u >= -126.0 {
                    worst = worst.max(((y as f64 - exact) / exact).abs());
                } else {
                    // Subnormal results: within two of their steps (the polynomial's ulp, then
                    // the rounding to the subnormal).
                    assert!((y as f64 - exact).abs() <= 2f64.powi(-148), "2^{u}: {y}");
                }
            }
        }
        assert!(worst < 2.4e-7, "worst relative error {worst}");
    }

    /// The vector LayerNorm row is the f64 computation within the roundings of its f32
    /// normalisation (`((x - hi) - lo) * rstd`, then `* w + b` fused: five of the normalised
    /// term, two of the result), for lengths around the 16-lane width and rows on a large
    /// offset (BERT's residual streams).
    #[test]
    fn layer_norm_row_matches_f64() {
        if !available() {
            return;
        }
        let mut seed = 11u32;
        let mut next = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        for len in [1usize, 7, 16, 17, 31, 384, 1000] {
            // Rows near 0, on an offset, and near 0 with one large value first (the one-pass
            // moments are shifted by the first value).
            for (offset, first) in [(0f32, 0f32), (300.0, 0.0), (0.0, 300.0)] {
                let mut row: Vec<f32> = (0..len).map(|_| offset + next() * 4.0).collect();
                row[0] += first;
                let w: Vec<f32> = (0..len).map(|_| 1.0 + next()).collect();
                let b: Vec<f32> = (0..len).map(|_| next()).collect();
                let mut out = vec![0f32; len];
                layer_norm_row(&row, &w, &b, 1e-12, &mut out).unwrap();
                let mean = row.iter().map(|&v| v as f64).sum::<f64>() / len as f64;
                let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / len as f64;
                let rstd = 1.0 / (var + 1e-12).sqrt();
                for j in 0..len {
                    let scaled = (row[j] as f64 - mean) * rstd * w[j] as f64;
                    let expected = scaled + b[j] as f64;
                    let rounding = f32::EPSILON as f64 / 2.0;
                    let tolerance = rounding * (5.0 * scaled.abs() + 2.0 * expected.abs());
                    assert!(
                        (out[j] as f64 - expected).abs() <= tolerance,
                        "len {len} offset {offset} first {first} [{j}]: {} vs {expected}",
                        out[j]
                    );
                }
            }
        }
    }

    /// The vector GELU is the portable one within the A&S erf's own error (1.5e-7 absolute,
    /// times |v|), including infinities and NaN.
    #[test]
    fn vector_gelu_matches_the_portable_one() {
        use crate::kernels::Real;
        if !available() {
            return;
        }
        let portable = |v: f32| {
            let half = 0.5f32;
            v * half * (1.0 + Real::erf(v * std::f32::consts::FRAC_1_SQRT_2))
        };
        let mut xs: Vec<f32> = (-40_000..=40_000).map(|i| i as f32 * 3e-4).collect();
        xs.extend([
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -0.0,
            30.0,
            -30.0,
            1e30,
            -1e30,
        ]);
        let mut got = xs.clone();
        assert!(gelu_in_place(&mut got));
        for (&x, &g) in xs.iter().zip(&got) {
            let expected = portable(x);
            if expected.is_nan() {
                assert!(g.is_nan(), "gelu({x}): {g}");
                continue;
            }
            let tolerance = 4e-7 * x.abs().max(1.0);
            assert!(
                g == expected || (g - expected).abs() <= tolerance,
                "gelu({x}): {g} vs {expected}"
            );
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512dq")]
    unsafe fn avx512_exp2_nonpositive_for_tests(
        u: std::arch::x86_64::__m512,
    ) -> std::arch::x86_64::__m512 {
        avx512::exp2_nonpositive(u)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2_exp_nonpositive_for_tests(
        x: std::arch::x86_64::__m256,
    ) -> std::arch::x86_64::__m256 {
        avx2::exp_nonpositive(x)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn avx512_exp_nonpositive_for_tests(
        x: std::arch::x86_64::__m512,
    ) -> std::arch::x86_64::__m512 {
        avx512::exp_nonpositive(x)
    }
}
