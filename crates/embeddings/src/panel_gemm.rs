//! The small-batch product `y += x W` for inference: f32 weights packed once, at load, into
//! panels of [`PANEL`] output columns (`[out / PANEL][in][PANEL]`, the last panel zero-padded),
//! so that a product over few rows reads every weight exactly once and in address order.
//!
//! Why: with few rows (a single short query, the 1 x 16 case) the product is bound by streaming
//! the weights, not by arithmetic. A general GEMM reads an `[in, out]` weight one `PANEL`-wide
//! column block at a time, a row-sized stride apart, which the hardware prefetchers do not
//! follow; here each thread walks whole panels front to back. The rows are taken
//! [`TILE_ROWS`] at a time, their accumulators held in AVX-512 registers across the whole `in`
//! loop, the panel prefetched ahead. Past [`MAX_ROWS`] rows the general GEMM, which blocks `x`
//! for its caches, is faster.

/// Output columns per panel: four AVX-512 registers of f32.
pub(crate) const PANEL: usize = 64;

/// Rows whose accumulators live in registers at once (6 x 4 of the 32 vector registers).
const TILE_ROWS: usize = 6;

/// How many panel rows (of `PANEL` floats) ahead the kernel prefetches.
#[cfg(target_arch = "x86_64")]
const PREFETCH_ROWS: usize = 16;

/// Most rows for which [`PanelWeights::multiply_add`] is used. Measured on MiniLM, 2 threads
/// (AVX-512 Xeon): at 16 rows it halves the forward pass, at 256 it is ~20% faster than the
/// general GEMM, at 1024 level with it, at 4096 slower (every panel re-reads all of `x`; the
/// GEMM blocks `x` for its caches).
pub(crate) const MAX_ROWS: usize = 512;

/// A `[out, in]` weight packed into panels, for [`PanelWeights::multiply_add`].
#[derive(Debug, Clone)]
pub(crate) struct PanelWeights {
    panels: Vec<f32>,
    in_dim: usize,
    out_dim: usize,
}

impl PanelWeights {
    /// Packs a weight given as `[in, out]` row-major (`w_in_out[i * out + o]` is `W[o, i]`).
    pub(crate) fn pack(w_in_out: &[f32], in_dim: usize, out_dim: usize) -> Self {
        assert_eq!(w_in_out.len(), in_dim * out_dim, "weight size");
        let count = out_dim.div_ceil(PANEL);
        let mut panels = vec![0f32; count * in_dim * PANEL];
        for (p, panel) in panels.chunks_mut(in_dim * PANEL).enumerate() {
            let first = p * PANEL;
            let width = PANEL.min(out_dim - first);
            for (i, row) in panel.chunks_mut(PANEL).enumerate() {
                let start = i * out_dim + first;
                row[..width].copy_from_slice(&w_in_out[start..start + width]);
            }
        }
        Self {
            panels,
            in_dim,
            out_dim,
        }
    }

    /// Whether this is the packing of an `[out_dim, in_dim]` weight.
    pub(crate) fn fits(&self, in_dim: usize, out_dim: usize) -> bool {
        (self.in_dim, self.out_dim) == (in_dim, out_dim)
    }

    /// Whether this kernel runs here: AVX-512F and FMA, checked at run time.
    pub(crate) fn available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// `y[rows, out] += x[rows, in] W^T`, both row-major and contiguous. The panels are shared
    /// out over the threads ([`crate::team::parallel_for`]). Callers check [`Self::available`]
    /// first.
    pub(crate) fn multiply_add(&self, x: &[f32], rows: usize, y: &mut [f32]) {
        let (in_dim, out_dim) = (self.in_dim, self.out_dim);
        assert!(
            x.len() == rows * in_dim && y.len() == rows * out_dim && Self::available(),
            "panel product: x {} / y {} for {rows} x {in_dim} -> {out_dim}",
            x.len(),
            y.len()
        );
        let out = crate::kernels::SharedMut(y.as_mut_ptr());
        let panel_len = in_dim * PANEL;
        let all = &self.panels;
        let tiles = rows.div_ceil(TILE_ROWS);
        // The first tile of a panel streams it from memory, the later ones re-read it from
        // L2 and are bound by arithmetic: they prefetch the next panel meanwhile, shared out
        // so that the last later tile ends on the panel's end.
        let lines = panel_len * 4 / 64;
        let lines_per_tile = if tiles > 1 {
            lines.div_ceil(tiles - 1)
        } else {
            0
        };
        let lines_per_k = lines_per_tile.div_ceil(in_dim.max(1));
        crate::team::parallel_for(all.len() / panel_len, |p| {
            let panel = &all[p * panel_len..(p + 1) * panel_len];
            let first = p * PANEL;
            let width = PANEL.min(out_dim - first);
            let next = all
                .get((p + 1) * panel_len..)
                .filter(|rest| !rest.is_empty())
                .map(<[f32]>::as_ptr);
            for (t, r0) in (0..rows).step_by(TILE_ROWS).enumerate() {
                let tile = TILE_ROWS.min(rows - r0);
                let prefetch = match next {
                    Some(next) if t > 0 => Prefetch {
                        at: next
                            .cast::<i8>()
                            .wrapping_add((t - 1) * lines_per_tile * 64),
                        lines: lines_per_tile,
                        lines_per_k,
                    },
                    _ => Prefetch::NONE,
                };
                // SAFETY: AVX-512F/FMA are present (asserted above); x covers rows x in,
                // the panel in x PANEL, and y rows x out, of which this task alone writes
                // columns first..first + width of rows r0..r0 + tile.
                unsafe {
                    let x = x.as_ptr().add(r0 * in_dim);
                    let y = out.get().add(r0 * out_dim + first);
                    tile_rows(tile, x, in_dim, panel.as_ptr(), y, out_dim, width, prefetch);
                }
            }
        });
    }
}

/// Cache lines a tile asks for into L2 as it goes: `lines` lines from `at` on, `lines_per_k`
/// per step of the `in` loop (a hint only: addresses past the weights are harmless).
#[derive(Clone, Copy)]
struct Prefetch {
    at: *const i8,
    lines: usize,
    lines_per_k: usize,
}

impl Prefetch {
    const NONE: Self = Self {
        at: std::ptr::null(),
        lines: 0,
        lines_per_k: 0,
    };
}

/// Dispatches a tile of `tile` (1..=6) rows to the kernel compiled for that count.
///
/// # Safety
/// As [`tile_avx512`].
#[allow(clippy::too_many_arguments)]
unsafe fn tile_rows(
    tile: usize,
    x: *const f32,
    in_dim: usize,
    panel: *const f32,
    y: *mut f32,
    y_stride: usize,
    width: usize,
    prefetch: Prefetch,
) {
    #[cfg(target_arch = "x86_64")]
    match tile {
        1 => tile_avx512::<1>(x, in_dim, panel, y, y_stride, width, prefetch),
        2 => tile_avx512::<2>(x, in_dim, panel, y, y_stride, width, prefetch),
        3 => tile_avx512::<3>(x, in_dim, panel, y, y_stride, width, prefetch),
        4 => tile_avx512::<4>(x, in_dim, panel, y, y_stride, width, prefetch),
        5 => tile_avx512::<5>(x, in_dim, panel, y, y_stride, width, prefetch),
        _ => tile_avx512::<6>(x, in_dim, panel, y, y_stride, width, prefetch),
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("PanelWeights::available is false off x86_64")
}

/// `y[r, ..width] += sum_k x[r, k] * panel[k, ..width]` for `R` rows, the `R x 64`
/// accumulators in registers for the whole `k` loop.
///
/// # Safety
/// The CPU has AVX-512F and FMA; `x` covers `R` rows of `in_dim` (row stride `in_dim`),
/// `panel` covers `in_dim x PANEL`, `y` covers `R` rows of `width <= PANEL` elements at row
/// stride `y_stride`, and nothing else writes them meanwhile.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn tile_avx512<const R: usize>(
    x: *const f32,
    in_dim: usize,
    panel: *const f32,
    y: *mut f32,
    y_stride: usize,
    width: usize,
    prefetch: Prefetch,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 4]; R];
    for k in 0..in_dim {
        let first = k * prefetch.lines_per_k;
        for line in first..(first + prefetch.lines_per_k).min(prefetch.lines) {
            _mm_prefetch::<_MM_HINT_T1>(prefetch.at.wrapping_add(line * 64));
        }
        let w = panel.add(k * PANEL);
        // The panel streams from memory the first time through: ask for it ahead, a cache
        // line per register (past the panel's end the hint is harmless and ignored).
        let ahead = w.wrapping_add(PREFETCH_ROWS * PANEL).cast::<i8>();
        _mm_prefetch::<_MM_HINT_T0>(ahead);
        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64));
        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(128));
        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(192));
        let w0 = _mm512_loadu_ps(w);
        let w1 = _mm512_loadu_ps(w.add(16));
        let w2 = _mm512_loadu_ps(w.add(32));
        let w3 = _mm512_loadu_ps(w.add(48));
        for (r, acc) in acc.iter_mut().enumerate() {
            let xv = _mm512_set1_ps(*x.add(r * in_dim + k));
            acc[0] = _mm512_fmadd_ps(xv, w0, acc[0]);
            acc[1] = _mm512_fmadd_ps(xv, w1, acc[1]);
            acc[2] = _mm512_fmadd_ps(xv, w2, acc[2]);
            acc[3] = _mm512_fmadd_ps(xv, w3, acc[3]);
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        let row = y.add(r * y_stride);
        for (j, &sum) in acc.iter().enumerate() {
            let start = j * 16;
            if start >= width {
                break;
            }
            let lanes = (width - start).min(16);
            let mask: __mmask16 = if lanes == 16 {
                0xFFFF
            } else {
                (1u16 << lanes) - 1
            };
            let at = row.add(start);
            let old = _mm512_maskz_loadu_ps(mask, at);
            _mm512_mask_storeu_ps(at, mask, _mm512_add_ps(old, sum));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain triple loop in f64.
    fn reference(
        x: &[f32],
        w_in_out: &[f32],
        y0: &[f32],
        rows: usize,
        k: usize,
        n: usize,
    ) -> Vec<f64> {
        (0..rows * n)
            .map(|idx| {
                let (r, o) = (idx / n, idx % n);
                y0[idx] as f64
                    + (0..k)
                        .map(|i| x[r * k + i] as f64 * w_in_out[i * n + o] as f64)
                        .sum::<f64>()
            })
            .collect()
    }

    #[test]
    fn panel_product_matches_the_plain_product_for_every_tile_and_edge() {
        if !PanelWeights::available() {
            return; // nothing to check: callers never use it here
        }
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        // Rows across every tile size and a partial tile; widths with a partial last panel
        // and a partial last register; in dims that are not multiples of anything.
        for (rows, k, n) in [
            (1, 384, 384),
            (16, 37, 130),
            (7, 5, 64),
            (13, 64, 1),
            (32, 100, 200),
        ] {
            let x: Vec<f32> = (0..rows * k).map(|_| next()).collect();
            let w: Vec<f32> = (0..k * n).map(|_| next()).collect();
            let y0: Vec<f32> = (0..rows * n).map(|_| next()).collect();
            let mut y = y0.clone();
            PanelWeights::pack(&w, k, n).multiply_add(&x, rows, &mut y);
            let expected = reference(&x, &w, &y0, rows, k, n);
            let worst = y
                .iter()
                .zip(&expected)
                .map(|(a, b)| (*a as f64 - b).abs())
                .fold(0f64, f64::max);
            assert!(worst < 1e-4, "{rows}x{k}x{n}: {worst}");
        }
    }
}
