//! Tests of the CPU kernels against the composed ops and finite differences.

use super::gelu::{gelu, gelu_grad, FRAC_1_SQRT_2, FRAC_1_SQRT_2PI};
use super::linear::column_sums;
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

/// Each task gets its own range, zeroed, and what it writes is the output.
#[test]
fn written_by_tasks_gives_each_task_its_range_zeroed() {
    let ends = [0usize, 3, 3, 10, 11, 40];
    let out = written_by_tasks(
        40,
        ends.len() - 1,
        |i| ends[i]..ends[i + 1],
        || (),
        |(), i, region| {
            assert_eq!(region.len(), ends[i + 1] - ends[i]);
            assert!(
                region.iter().all(|&v| v == 0.0),
                "task {i} got unzeroed floats"
            );
            region.fill(i as f32 + 1.0);
        },
    );
    let expected: Vec<f32> = (0..40)
        .map(|j| (ends.iter().rposition(|&e| e <= j).unwrap() + 1) as f32)
        .collect();
    assert_eq!(out, expected);
}

/// Ranges that leave a gap (floats no task would write), overlap, or stop short are refused
/// before any task runs.
#[test]
fn written_by_tasks_refuses_ranges_that_do_not_tile_the_output() {
    for ranges in [[0..4, 5..10], [0..6, 5..10], [0..4, 4..9], [1..5, 5..10]] {
        let result = std::panic::catch_unwind(|| {
            written_by_tasks(
                10,
                2,
                |i| ranges[i].clone(),
                || (),
                |(), _, _| panic!("a task ran"),
            )
        });
        let message = result.expect_err("ranges that do not tile the output");
        let text = message
            .downcast_ref::<String>()
            .map(String::as_str)
            .unwrap_or_default();
        assert!(text.contains("written_by_tasks"), "{ranges:?}: {text}");
    }
}
