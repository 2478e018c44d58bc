//! `fma-peak`: the CPU's measured f32 multiply-add peak, the roofline the benchmark tables are
//! read against (what fraction of the arithmetic limit an implementation reaches).
//!
//! Each thread runs independent chains of vector fused multiply-adds (enough to cover the
//! FMA latency on every unit: 12 chains of 8 or 16 lanes), all threads at once, so that a
//! VM's vCPUs that share a physical core, or a clock that drops with more cores busy, show
//! in the total. The best of a few repeats is reported: on a shared machine the others are
//! the neighbours' doing.

use anyhow::{bail, Result};
use serde_json::json;
use std::time::Instant;

/// Independent accumulator chains per thread.
const CHAINS: usize = 12;

/// Which instructions the loop uses.
#[derive(Clone, Copy, Debug)]
enum Isa {
    Avx512,
    Avx2,
}

impl Isa {
    fn detect() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512f") {
                return Some(Self::Avx512);
            }
            if has!("avx2") && has!("fma") {
                return Some(Self::Avx2);
            }
        }
        None
    }

    fn lanes(self) -> usize {
        match self {
            Self::Avx512 => 16,
            Self::Avx2 => 8,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Avx512 => "avx512f",
            Self::Avx2 => "avx2+fma",
        }
    }

    /// `steps` steps of `CHAINS` multiply-adds `a = a * 0.999999 + 1e-7` from `a = 1`; returns
    /// the sum of the chains' first lanes (so the loop is not optimised away, and checkable).
    fn run(self, steps: u64) -> f32 {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the features were detected at run time (`detect`).
        unsafe {
            match self {
                Self::Avx512 => chains_avx512(steps),
                Self::Avx2 => chains_avx2(steps),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = steps;
            unreachable!("no ISA is detected off x86_64")
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn chains_avx2(steps: u64) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_set1_ps(1.0); CHAINS];
    let (mul, add) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
    for _ in 0..steps {
        for a in acc.iter_mut() {
            *a = _mm256_fmadd_ps(*a, mul, add);
        }
    }
    let mut total = _mm256_setzero_ps();
    for a in acc {
        total = _mm256_add_ps(total, a);
    }
    _mm256_cvtss_f32(total)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn chains_avx512(steps: u64) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_set1_ps(1.0); CHAINS];
    let (mul, add) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
    for _ in 0..steps {
        for a in acc.iter_mut() {
            *a = _mm512_fmadd_ps(*a, mul, add);
        }
    }
    _mm512_cvtss_f32(
        acc.into_iter()
            .fold(_mm512_setzero_ps(), |s, a| _mm512_add_ps(s, a)),
    )
}

/// Prints one JSON line: GFLOP/s per thread and in total, best of `repeats`.
pub fn fma_peak(threads: usize, repeats: usize, steps: u64) -> Result<()> {
    let Some(isa) = Isa::detect() else {
        bail!("no AVX2+FMA or AVX-512 unit detected: fma-peak measures x86-64 vector units only");
    };
    if threads == 0 || repeats == 0 || steps == 0 {
        bail!("--threads, --repeats and --steps must be at least 1");
    }
    let flops_per_thread = (steps as f64) * (CHAINS * isa.lanes() * 2) as f64;
    let mut best = 0f64;
    let mut sink = 0f32;
    for _ in 0..repeats {
        let start = Instant::now();
        let outs: Vec<f32> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|_| scope.spawn(move || isa.run(steps)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("an FMA thread panicked"))
                .collect()
        });
        let seconds = start.elapsed().as_secs_f64();
        sink += outs.iter().sum::<f32>();
        best = best.max(flops_per_thread * threads as f64 / seconds / 1e9);
    }
    println!(
        "{}",
        json!({
            "bench": "fma-peak",
            "isa": isa.name(),
            "threads": threads,
            "gflops_total": best,
            "gflops_per_thread": best / threads as f64,
            "repeats": repeats,
            "checksum": sink,
        })
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chains_compute_what_they_claim_and_bad_arguments_are_refused() {
        if let Some(isa) = Isa::detect() {
            // a_n = 0.1 + 0.9 * 0.999999^n, the fixed point 1e-7 / (1 - 0.999999) = 0.1.
            let steps = 10_000;
            let expected = CHAINS as f64 * (0.1 + 0.9 * 0.999_999f64.powi(steps as i32));
            let got = isa.run(steps) as f64;
            assert!(
                (got - expected).abs() < 1e-4 * expected,
                "{isa:?}: {got} vs {expected}"
            );
        }
        for (threads, repeats, steps) in [(0, 1, 1), (1, 0, 1), (1, 1, 0)] {
            assert!(fma_peak(threads, repeats, steps).is_err());
        }
    }
}
