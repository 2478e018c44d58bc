//! f32 element kernels written with AVX-512 intrinsics, for the loops the compiler left
//! partly scalar: the attention row softmax (its max and sum reductions compiled to scalar
//! `vmaxss` / `vaddss` chains, 15% of an 8 x 512 forward pass).
//!
//! Every function here computes what its portable counterpart in `kernels` does, with the
//! same operations in the same order per element (no fused multiply-adds the portable code does
//! not have), so results differ from it only through the order of the row sums.

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

/// `row = softmax(row * scale + bias)` in place (`bias`, when given, as long as `row`).
/// Falls back to the portable code where AVX-512 is missing.
pub(crate) fn scaled_softmax(row: &mut [f32], scale: f32, bias: Option<&[f32]>) {
    if let Some(bias) = bias {
        assert_eq!(bias.len(), row.len(), "bias and row lengths differ");
    }
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: AVX-512F is present (checked just above); `bias` is as long as `row`.
        unsafe { avx512::scaled_softmax(row, scale, bias) };
        return;
    }
    crate::kernels::scaled_softmax_in_place(row, scale, bias);
}

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

    /// `e^x` per lane, the algorithm and constants of `<f32 as Real>::exp_fast` (Cephes' `expf`),
    /// operation for operation; `2^n` by `vscalefps`, exact as the portable bit construction.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn exp(x: __m512) -> __m512 {
        const HI: f32 = 88.376_26;
        const LO: f32 = -87.336_55;
        const LN2_HI: f32 = 0.693_359_4;
        const LN2_LO: f32 = -2.121_944_4e-4;
        let set = _mm512_set1_ps;
        // `clamp`, NaN kept: vmaxps / vminps return their second operand when either is NaN.
        let clamped = _mm512_min_ps(set(HI), _mm512_max_ps(set(LO), x));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(clamped, set(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_sub_ps(
            _mm512_sub_ps(clamped, _mm512_mul_ps(n, set(LN2_HI))),
            _mm512_mul_ps(n, set(LN2_LO)),
        );
        let mut poly = _mm512_add_ps(_mm512_mul_ps(set(1.987_569_1e-4), r), set(1.398_199_9e-3));
        poly = _mm512_add_ps(_mm512_mul_ps(poly, r), set(8.333_452e-3));
        poly = _mm512_add_ps(_mm512_mul_ps(poly, r), set(4.166_579_6e-2));
        poly = _mm512_add_ps(_mm512_mul_ps(poly, r), set(0.166_666_65));
        poly = _mm512_add_ps(_mm512_mul_ps(poly, r), set(0.5));
        let e = _mm512_add_ps(
            _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(poly, r), r), r),
            set(1.0),
        );
        let y = _mm512_scalef_ps(e, n);
        let below = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, set(LO));
        let above = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, set(HI));
        let y = _mm512_mask_mov_ps(y, below, _mm512_setzero_ps());
        _mm512_mask_mov_ps(y, above, set(f32::INFINITY))
    }

    /// See [`super::scaled_softmax`].
    ///
    /// # Safety
    /// The CPU must have AVX-512F; `bias`, when given, must be as long as `row`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn scaled_softmax(row: &mut [f32], scale: f32, bias: Option<&[f32]>) {
        let len = row.len();
        let p = row.as_mut_ptr();
        let scale_v = _mm512_set1_ps(scale);
        let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);
        // Scores, and their running maximum (missing tail lanes read as -inf).
        let mut max = neg_inf;
        let mut at = 0;
        while at < len {
            let m = lane_mask(len, at);
            let mut s = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, p.add(at)), scale_v);
            if let Some(bias) = bias {
                s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(m, bias.as_ptr().add(at)));
            }
            _mm512_mask_storeu_ps(p.add(at), m, s);
            // A NaN score makes the row NaN through `v - max` below, as in the portable code.
            max = _mm512_mask_max_ps(max, m, max, s);
            at += LANES;
        }
        let max = _mm512_set1_ps(_mm512_reduce_max_ps(max));
        let mut sum = _mm512_setzero_ps();
        at = 0;
        while at < len {
            let m = lane_mask(len, at);
            let e = exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p.add(at)), max));
            _mm512_mask_storeu_ps(p.add(at), m, e);
            sum = _mm512_mask_add_ps(sum, m, sum, e);
            at += LANES;
        }
        let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sum));
        at = 0;
        while at < len {
            let m = lane_mask(len, at);
            let v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, p.add(at)), inv);
            _mm512_mask_storeu_ps(p.add(at), m, v);
            at += LANES;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The intrinsics give the portable softmax's values (within the rounding of the row sum)
    /// for row lengths around the 16-lane width, with and without a bias, with masked (-inf
    /// and large negative) scores, and keep NaN rows NaN.
    #[test]
    fn scaled_softmax_matches_the_portable_code() {
        let mut seed = 7u32;
        let mut next = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 * 20.0 - 10.0
        };
        for len in [1usize, 2, 15, 16, 17, 31, 32, 33, 128, 129, 512] {
            for with_bias in [false, true] {
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
                crate::kernels::scaled_softmax_in_place(&mut expected, 0.125, bias);
                let mut got = scores.clone();
                scaled_softmax(&mut got, 0.125, bias);
                for (j, (g, e)) in got.iter().zip(&expected).enumerate() {
                    assert!(
                        (g - e).abs() <= 1e-6 * e.abs().max(1e-30) + 1e-37,
                        "len {len} bias {with_bias} [{j}]: {g} vs {e}"
                    );
                }
                let total: f32 = got.iter().sum();
                assert!((total - 1.0).abs() < 1e-5, "len {len}: sum {total}");
            }
        }
        let mut with_nan = vec![0.5f32, f32::NAN, 1.0];
        scaled_softmax(&mut with_nan, 1.0, None);
        assert!(with_nan.iter().all(|v| v.is_nan()));
    }

    /// The vector `exp` gives `exp_fast`'s bits, over the whole range and at its edges.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_exp_gives_the_portable_bits() {
        use crate::kernels::Real;
        if !available() {
            return;
        }
        let mut xs: Vec<f32> = (-200_000..=200_000).map(|i| i as f32 * 5e-4).collect();
        xs.extend([
            -87.336_55,
            -87.336_56,
            88.376_26,
            88.376_27,
            f32::NEG_INFINITY,
            f32::INFINITY,
            -1e-30,
            0.0,
            -0.0,
        ]);
        for chunk in xs.chunks(16) {
            let mut lanes = [0f32; 16];
            lanes[..chunk.len()].copy_from_slice(chunk);
            let mut out = [0f32; 16];
            // SAFETY: AVX-512F is present (checked above); 16-lane arrays.
            unsafe {
                use std::arch::x86_64::*;
                _mm512_storeu_ps(
                    out.as_mut_ptr(),
                    avx512_exp_for_tests(_mm512_loadu_ps(lanes.as_ptr())),
                );
            }
            for (x, y) in chunk.iter().zip(out) {
                let expected = x.exp_fast();
                assert_eq!(
                    y.to_bits(),
                    expected.to_bits(),
                    "exp({x}): {y} vs {expected}"
                );
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn avx512_exp_for_tests(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
        avx512::exp(x)
    }
}
