//! The product `y += x W` for f32 inference on weights packed once, at load, into panels of a
//! few output columns (`[out / width][in][width]`, the last panel zero-padded, every panel
//! starting on a cache line), so that a product reads every weight in address order.
//!
//! Why: with few rows (a single short query, the 1 x 16 case) the product is bound by streaming
//! the weights, not by arithmetic. A general GEMM reads an `[in, out]` weight one column block
//! at a time, a row-sized stride apart, which the hardware prefetchers do not follow; here each
//! thread walks whole panels front to back. The rows are taken [`TILE_ROWS`] at a time, their
//! accumulators held in vector registers across the whole `in` loop.
//!
//! Two kernels, chosen at run time, each used for every row count, `x` taken in blocks that
//! stay in L2 while the panels run past them: on AVX-512 CPUs, panels of 64 columns (6 x 4 of
//! the 32 registers); on CPUs with AVX2 and FMA but no AVX-512, panels of 16 columns (6 x 2 of
//! the 16 registers). On large batches the AVX-512 kernel is level with the `gemm` crate's
//! (2 Zen 4 cores, MiniLM at 8 x 512 and 32 x 128); it also runs the fused feed-forward block
//! (`kernels::FeedForwardOp`), one block of rows at a time on one thread. The `gemm` crate's
//! AVX2 kernels, which read `x` unpacked with a row-sized stride between the six broadcasts of
//! each step, reached ~60% of the FMA peak on an AMD EPYC (Zen 3).

/// Rows whose accumulators live in registers at once.
const TILE_ROWS: usize = 6;

/// Output columns per panel: four AVX-512 registers of f32, or two AVX2 registers.
const AVX512_PANEL: usize = 64;
const AVX2_PANEL: usize = 16;

/// Most rows the AVX-512 kernel takes as one block: up to here each panel streams from
/// memory once, past all of them (measured at 128 rows: blocks of 64 were 5% slower). Past
/// it, blocks: on an AVX-512 Xeon, one block of 4096 rows (every panel re-reading all of `x`)
/// was slower than the `gemm` crate, which blocks `x` for its caches.
const AVX512_WHOLE_ROWS: usize = 512;

/// Bytes of `x` the AVX-512 kernel takes per block of rows (96 rows of 384 floats, 24 of
/// 1536), which stays in L2 beside the panel being run past it.
const AVX512_BLOCK_BYTES: usize = 144 << 10;

/// How many panel rows ahead the AVX-512 kernel prefetches.
#[cfg(target_arch = "x86_64")]
const PREFETCH_ROWS: usize = 16;

/// Bytes of `x` the AVX2 kernel takes per block of rows (within the 512 KiB L2 of a Zen 3
/// core), the most panel rows it runs through per pass over a block (256 rows of 16 floats:
/// 16 KiB, which stays in a 32 KiB L1 beside the six rows of `x`; a whole panel of 384 or
/// 1536 rows does not), and how many panel rows ahead it prefetches.
const AVX2_BLOCK_BYTES: usize = 192 << 10;
const AVX2_DEPTH: usize = 256;
#[cfg(target_arch = "x86_64")]
const AVX2_PREFETCH_ROWS: usize = 32;

/// Which kernel runs the product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Avx512,
    Avx2,
}

impl Kernel {
    /// Every kernel, best first.
    const ALL: [Self; 2] = [Self::Avx512, Self::Avx2];

    /// The best kernel this CPU runs, checked at run time (std caches the feature bits).
    fn detect() -> Option<Self> {
        Self::ALL.into_iter().find(|kernel| kernel.runs_here())
    }

    /// Whether this CPU has the instructions the kernel needs.
    fn runs_here(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            has!("fma")
                && match self {
                    Self::Avx512 => has!("avx512f"),
                    Self::Avx2 => has!("avx2"),
                }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = self;
            false
        }
    }

    /// Output columns per panel.
    fn panel_width(self) -> usize {
        match self {
            Self::Avx512 => AVX512_PANEL,
            Self::Avx2 => AVX2_PANEL,
        }
    }
}

/// One cache line of floats: the panels' storage, so that every panel row starts on a line.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; 16]);

/// A `[out, in]` weight packed into panels, for [`PanelWeights::multiply_add`].
#[derive(Debug, Clone)]
pub(crate) struct PanelWeights {
    lines: Vec<Line>,
    in_dim: usize,
    out_dim: usize,
    kernel: Kernel,
}

impl PanelWeights {
    /// Packs a weight given as `[in, out]` row-major (`w_in_out[i * out + o]` is `W[o, i]`)
    /// for this CPU's kernel; `None` where there is none (see [`Self::available`]).
    pub(crate) fn pack(w_in_out: &[f32], in_dim: usize, out_dim: usize) -> Option<Self> {
        Kernel::detect().map(|kernel| Self::pack_for(kernel, w_in_out, in_dim, out_dim))
    }

    fn pack_for(kernel: Kernel, w_in_out: &[f32], in_dim: usize, out_dim: usize) -> Self {
        assert_eq!(w_in_out.len(), in_dim * out_dim, "weight size");
        let width = kernel.panel_width();
        let count = out_dim.div_ceil(width);
        // Both widths are whole lines, so every panel (and panel row) starts on a line.
        let mut packed = Self {
            lines: vec![Line([0.0; 16]); count * in_dim * width / 16],
            in_dim,
            out_dim,
            kernel,
        };
        // (`max(1)`: with no input columns there are no panel rows, nothing to copy.)
        for (p, panel) in packed
            .floats_mut()
            .chunks_mut((in_dim * width).max(1))
            .enumerate()
        {
            let first = p * width;
            let cols = width.min(out_dim - first);
            for (i, row) in panel.chunks_mut(width).enumerate() {
                let start = i * out_dim + first;
                row[..cols].copy_from_slice(&w_in_out[start..start + cols]);
            }
        }
        packed
    }

    fn floats(&self) -> &[f32] {
        // SAFETY: `Line` is 16 f32s with no padding (size 64, align 64).
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast(), self.lines.len() * 16) }
    }

    fn floats_mut(&mut self) -> &mut [f32] {
        // SAFETY: as in `floats`, borrowed mutably.
        unsafe {
            std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast(), self.lines.len() * 16)
        }
    }

    /// Whether the AVX-512 kernel runs this packing (the fused feed-forward block is measured
    /// and used there only).
    pub(crate) fn is_avx512(&self) -> bool {
        self.kernel == Kernel::Avx512
    }

    /// Whether this is the packing of an `[out_dim, in_dim]` weight.
    pub(crate) fn fits(&self, in_dim: usize, out_dim: usize) -> bool {
        (self.in_dim, self.out_dim) == (in_dim, out_dim)
    }

    /// Whether a kernel runs here: AVX-512F or AVX2, with FMA, checked at run time.
    pub(crate) fn available() -> bool {
        Kernel::detect().is_some()
    }

    /// `y[rows, out] += x[rows, in] W^T`, both row-major and contiguous, shared out over the
    /// threads ([`crate::team::parallel_for`]): `x` in blocks of rows that stay in L2 (one
    /// block for a short batch), a task per (block, panel), block-major so that each thread's
    /// tasks share their blocks.
    pub(crate) fn multiply_add(&self, x: &[f32], rows: usize, y: &mut [f32]) {
        self.check(x, rows, y);
        if rows == 0 || self.out_dim == 0 {
            return; // nothing to add to
        }
        let block = self.block_rows(rows);
        let panels = self.panels();
        let out = crate::kernels::SharedMut(y.as_mut_ptr());
        crate::team::parallel_for(rows.div_ceil(block) * panels, |task| {
            let (b, p) = (task / panels, task % panels);
            // SAFETY: x and y were checked to cover `rows` rows; this task alone writes
            // panel p's columns of rows b * block.. (tasks are disjoint (block, panel) pairs).
            unsafe { self.rows_by_panel(x, b * block..rows.min((b + 1) * block), p, out, None) }
        });
    }

    /// [`Self::multiply_add`] on the calling thread alone: for a caller that shares out its
    /// own blocks of rows (the fused inference blocks).
    pub(crate) fn multiply_add_here(&self, x: &[f32], rows: usize, y: &mut [f32]) {
        self.here(x, rows, None, y);
    }

    /// `y[rows, out] = x[rows, in] W^T + bias` on the calling thread alone, `y`'s contents
    /// unread: each tile's sums are stored with the bias added, where filling `y` with the bias
    /// first cost a copy per row and a read per element (1.5% of a MiniLM pass at 8 x 512).
    pub(crate) fn multiply_bias_here(&self, x: &[f32], rows: usize, bias: &[f32], y: &mut [f32]) {
        assert_eq!(bias.len(), self.out_dim, "panel product: bias length");
        self.here(x, rows, Some(bias), y);
    }

    /// [`Self::multiply_add_here`] (`bias` `None`) or [`Self::multiply_bias_here`].
    fn here(&self, x: &[f32], rows: usize, bias: Option<&[f32]>, y: &mut [f32]) {
        self.check(x, rows, y);
        let block = self.block_rows(rows.max(1));
        let out = crate::kernels::SharedMut(y.as_mut_ptr());
        for start in (0..rows).step_by(block) {
            for p in 0..self.panels() {
                // SAFETY: x and y cover `rows` rows (checked), bias `out_dim` columns (checked
                // by the caller); this thread is their only user.
                unsafe { self.rows_by_panel(x, start..rows.min(start + block), p, out, bias) }
            }
        }
    }

    /// Panics unless `x` and `y` are exactly `rows` rows of this weight's input and output.
    fn check(&self, x: &[f32], rows: usize, y: &[f32]) {
        let (in_dim, out_dim) = (self.in_dim, self.out_dim);
        assert!(
            x.len() == rows * in_dim && y.len() == rows * out_dim,
            "panel product: x {} / y {} for {rows} x {in_dim} -> {out_dim}",
            x.len(),
            y.len()
        );
    }

    /// How many panels the weight is packed into.
    fn panels(&self) -> usize {
        self.out_dim.div_ceil(self.kernel.panel_width())
    }

    /// Rows of `x` per block: as many as fit the kernel's L2 share, evened out over `rows`
    /// in whole tiles (200 rows in blocks of at most 128: 102 + 98, not 128 + 72).
    fn block_rows(&self, rows: usize) -> usize {
        let bytes = match self.kernel {
            Kernel::Avx512 if rows <= AVX512_WHOLE_ROWS => return rows.max(1),
            Kernel::Avx512 => AVX512_BLOCK_BYTES,
            Kernel::Avx2 => AVX2_BLOCK_BYTES,
        };
        let most = (bytes / (4 * self.in_dim.max(1))).max(TILE_ROWS);
        rows.div_ceil(rows.div_ceil(most))
            .next_multiple_of(TILE_ROWS)
    }

    /// `y[rows, first..first + width] += x[rows] W[first..first + width]^T` for one panel
    /// `p` (its columns `first..`) and one block of rows, by this CPU's kernel; with a `bias`
    /// (`out_dim` long), `=` and `+ bias` instead, `y` unread.
    ///
    /// # Safety
    /// `x` covers the rows of `rows` (row stride `in_dim`), `y` points at a buffer of at least
    /// `rows.end` rows of `out_dim`, and nothing else reads or writes this panel's columns of
    /// those rows meanwhile; a bias holds `out_dim` floats.
    unsafe fn rows_by_panel(
        &self,
        x: &[f32],
        rows: std::ops::Range<usize>,
        p: usize,
        out: crate::kernels::SharedMut<f32>,
        bias: Option<&[f32]>,
    ) {
        let width = self.kernel.panel_width();
        let start = bias.map_or(std::ptr::null(), |b| b[p * width..].as_ptr());
        match self.kernel {
            Kernel::Avx512 => self.rows_by_panel_avx512(x, rows, p, out, start),
            Kernel::Avx2 => self.rows_by_panel_avx2(x, rows, p, out, start),
        }
    }

    /// The AVX-512 [`Self::rows_by_panel`]: the panel (a whole `in x 64`, 96 KiB at 384)
    /// run past every tile of the block, both in L2.
    ///
    /// # Safety
    /// As [`Self::rows_by_panel`].
    unsafe fn rows_by_panel_avx512(
        &self,
        x: &[f32],
        rows: std::ops::Range<usize>,
        p: usize,
        out: crate::kernels::SharedMut<f32>,
        start: *const f32,
    ) {
        const PANEL: usize = AVX512_PANEL;
        let (in_dim, out_dim) = (self.in_dim, self.out_dim);
        let panel_len = in_dim * PANEL;
        let all = self.floats();
        let panel = &all[p * panel_len..(p + 1) * panel_len];
        let first = p * PANEL;
        let width = PANEL.min(out_dim - first);
        // The first tile reads the panel from memory (or L3), the later ones re-read it from
        // L2 and are bound by arithmetic: they prefetch the next panel meanwhile, shared out
        // so that the last later tile ends on the panel's end.
        let tiles = rows.len().div_ceil(TILE_ROWS);
        let lines = panel_len * 4 / 64;
        let lines_per_tile = if tiles > 1 {
            lines.div_ceil(tiles - 1)
        } else {
            0
        };
        let lines_per_k = lines_per_tile.div_ceil(in_dim.max(1));
        let next = all
            .get((p + 1) * panel_len..)
            .filter(|rest| !rest.is_empty())
            .map(<[f32]>::as_ptr);
        let end = rows.end;
        for (t, r0) in rows.step_by(TILE_ROWS).enumerate() {
            let tile = TILE_ROWS.min(end - r0);
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
            // SAFETY: this kernel was detected (packed for it); x covers the rows, the panel
            // in x PANEL; the caller gives this thread columns first..first + width of them.
            let x = x.as_ptr().add(r0 * in_dim);
            let y = out.get().add(r0 * out_dim + first);
            let y = Output {
                y,
                stride: out_dim,
                width,
                start,
            };
            tile_rows_avx512(tile, x, in_dim, panel.as_ptr(), y, prefetch);
        }
    }

    /// The AVX2 [`Self::rows_by_panel`]: the panel in slices of at most [`AVX2_DEPTH`] rows,
    /// each run past every tile of the block while it sits in L1.
    ///
    /// # Safety
    /// As [`Self::rows_by_panel`].
    unsafe fn rows_by_panel_avx2(
        &self,
        x: &[f32],
        rows: std::ops::Range<usize>,
        p: usize,
        out: crate::kernels::SharedMut<f32>,
        start: *const f32,
    ) {
        const PANEL: usize = AVX2_PANEL;
        let (in_dim, out_dim) = (self.in_dim, self.out_dim);
        let panel_len = in_dim * PANEL;
        let panel = &self.floats()[p * panel_len..(p + 1) * panel_len];
        let first = p * PANEL;
        let width = PANEL.min(out_dim - first);
        // Even slices (384 panel rows: 192 + 192, not 256 + 128).
        let depth = in_dim.div_ceil(in_dim.div_ceil(AVX2_DEPTH).max(1)).max(1);
        // At least one slice, empty when `in_dim` is 0, so a product from a bias still
        // writes it.
        for k0 in (0..in_dim.max(1)).step_by(depth) {
            let slice = depth.min(in_dim - k0);
            for r0 in rows.clone().step_by(TILE_ROWS) {
                let tile = TILE_ROWS.min(rows.end - r0);
                // SAFETY: as in `rows_by_panel_avx512`, for this kernel and its 16-wide
                // panels: rows r0.. of x from column k0 on, panel rows k0..k0 + slice.
                let x = x.as_ptr().add(r0 * in_dim + k0);
                let w = panel.as_ptr().add(k0 * PANEL);
                let y = out.get().add(r0 * out_dim + first);
                // The first slice starts from the bias, if any; the later ones add to it.
                let start = if k0 == 0 { start } else { std::ptr::null() };
                let y = Output {
                    y,
                    stride: out_dim,
                    width,
                    start,
                };
                tile_rows_avx2(tile, x, in_dim, slice, w, y);
            }
        }
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

/// `$kernel::<R>(args..)` for a tile of `$tile` (1..=6) rows: each row count is its own
/// compiled kernel, its accumulators held in registers. Also the tiled attention's dispatch
/// over its tiles of six queries.
#[cfg(target_arch = "x86_64")]
macro_rules! for_tile_rows {
    ($tile:expr, $kernel:ident($($arg:expr),* $(,)?)) => {
        match $tile {
            1 => $kernel::<1>($($arg),*),
            2 => $kernel::<2>($($arg),*),
            3 => $kernel::<3>($($arg),*),
            4 => $kernel::<4>($($arg),*),
            5 => $kernel::<5>($($arg),*),
            _ => $kernel::<6>($($arg),*),
        }
    };
}
#[cfg(target_arch = "x86_64")]
pub(crate) use for_tile_rows;

/// Dispatches a tile of `tile` (1..=6) rows to the AVX-512 kernel compiled for that count.
///
/// # Safety
/// As [`tile_avx512`].
#[allow(clippy::too_many_arguments)]
unsafe fn tile_rows_avx512(
    tile: usize,
    x: *const f32,
    in_dim: usize,
    panel: *const f32,
    y: Output,
    prefetch: Prefetch,
) {
    #[cfg(target_arch = "x86_64")]
    for_tile_rows!(tile, tile_avx512(x, in_dim, panel, y, prefetch));
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("no panel kernel is detected off x86_64")
}

/// Dispatches a tile of `tile` (1..=6) rows to the AVX2 kernel compiled for that count.
///
/// # Safety
/// As [`tile_avx2`].
#[allow(clippy::too_many_arguments)]
unsafe fn tile_rows_avx2(
    tile: usize,
    x: *const f32,
    x_stride: usize,
    depth: usize,
    panel: *const f32,
    y: Output,
) {
    #[cfg(target_arch = "x86_64")]
    for_tile_rows!(tile, tile_avx2(x, x_stride, depth, panel, y));
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("no panel kernel is detected off x86_64")
}

/// Where a tile's sums go: `R` rows of `width` floats from `y`, `stride` apart, each the sum
/// added to `start` (the same `width` floats for every row: a bias) or, where `start` is
/// null, to the row's own values.
#[derive(Clone, Copy)]
struct Output {
    y: *mut f32,
    stride: usize,
    width: usize,
    start: *const f32,
}

impl Output {
    /// What row `r`'s sums are added to, from column `at` on.
    fn start(&self, r: usize, at: usize) -> *const f32 {
        if self.start.is_null() {
            self.y.wrapping_add(r * self.stride + at)
        } else {
            self.start.wrapping_add(at)
        }
    }
}

/// `y[r, ..width] = start[r, ..width] + sum_k x[r, k] * panel[k, ..width]` for `R` rows
/// ([`Output`]: `start` the rows themselves or a bias), the `R x 64` accumulators in registers
/// for the whole `k` loop.
///
/// # Safety
/// The CPU has AVX-512F and FMA; `x` covers `R` rows of `in_dim` (row stride `in_dim`),
/// `panel` covers `in_dim x 64`, `y` covers `R` rows of `width <= 64` elements at its row
/// stride (a non-null `start`, `width` elements), and nothing else writes them meanwhile.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn tile_avx512<const R: usize>(
    x: *const f32,
    in_dim: usize,
    panel: *const f32,
    y: Output,
    prefetch: Prefetch,
) {
    use std::arch::x86_64::*;
    const PANEL: usize = AVX512_PANEL;
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
        let row = y.y.add(r * y.stride);
        for (j, &sum) in acc.iter().enumerate() {
            let start = j * 16;
            if start >= y.width {
                break;
            }
            let lanes = (y.width - start).min(16);
            let mask: __mmask16 = if lanes == 16 {
                0xFFFF
            } else {
                (1u16 << lanes) - 1
            };
            let old = _mm512_maskz_loadu_ps(mask, y.start(r, start));
            _mm512_mask_storeu_ps(row.add(start), mask, _mm512_add_ps(old, sum));
        }
    }
}

/// `y[r, ..width] = start[r, ..width] + sum_{k < depth} x[r, k] * panel[k, ..width]` for
/// `R` rows ([`Output`]), the `R x 16` accumulators in registers for the whole `k` loop (12 of
/// the 16 for six rows, two for the panel row, one for the broadcast).
///
/// # Safety
/// The CPU has AVX2 and FMA; `x` covers `R` rows of `depth` elements at row stride
/// `x_stride`, `panel` covers `depth x 16`, `y` covers `R` rows of `width <= 16` elements at
/// its row stride (a non-null `start`, `width` elements), and nothing else writes them
/// meanwhile.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2<const R: usize>(
    x: *const f32,
    x_stride: usize,
    depth: usize,
    panel: *const f32,
    y: Output,
) {
    use std::arch::x86_64::*;
    const PANEL: usize = AVX2_PANEL;
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for k in 0..depth {
        let w = panel.add(k * PANEL);
        // Each panel row is one cache line: ask for the one this loop reaches later (past
        // the panel's end the hint is harmless and ignored).
        _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(AVX2_PREFETCH_ROWS * PANEL).cast::<i8>());
        let w0 = _mm256_loadu_ps(w);
        let w1 = _mm256_loadu_ps(w.add(8));
        for (r, acc) in acc.iter_mut().enumerate() {
            let xv = _mm256_broadcast_ss(&*x.add(r * x_stride + k));
            acc[0] = _mm256_fmadd_ps(xv, w0, acc[0]);
            acc[1] = _mm256_fmadd_ps(xv, w1, acc[1]);
        }
    }
    let lane_index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (r, acc) in acc.iter().enumerate() {
        let row = y.y.add(r * y.stride);
        for (j, &sum) in acc.iter().enumerate() {
            let start = j * 8;
            if start >= y.width {
                break;
            }
            let (at, from) = (row.add(start), y.start(r, start));
            let lanes = (y.width - start).min(8);
            if lanes == 8 {
                _mm256_storeu_ps(at, _mm256_add_ps(_mm256_loadu_ps(from), sum));
            } else {
                let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes as i32), lane_index);
                let old = _mm256_maskload_ps(from, mask);
                _mm256_maskstore_ps(at, mask, _mm256_add_ps(old, sum));
            }
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
    fn panel_product_matches_the_plain_product_for_every_kernel_tile_and_edge() {
        // Every kernel this CPU runs (none: nothing to check, callers never use it here).
        let mut rng = crate::nn::SplitMix64(0x2545_F491_4F6C_DD1D);
        let mut next = move || rng.next_f32() - 0.5;
        // Rows across every tile size and a partial tile; widths with a partial last panel
        // and a partial last register; in dims that are not multiples of anything.
        let shapes = [
            (1, 384, 384),
            (16, 37, 130),
            (7, 5, 64),
            (13, 64, 1),
            (32, 100, 200),
            // More rows than one AVX2 block of x (192 KiB over 1536 floats a row: 32 rows)
            // and panel rows than one slice (1536 = 6 x 256), ending in a partial tile; an
            // uneven split of both (400 = 2 x 200 panel rows, 200 rows = 2 x 100).
            (67, 1536, 40),
            (200, 400, 17),
            // More rows than the AVX-512 kernel takes whole (512), in blocks of 24 rows of
            // 1536 and a partial tile.
            (531, 1536, 70),
            // Empty products: no rows, no output columns, no input columns.
            (0, 384, 384),
            (5, 384, 0),
            (5, 0, 20),
        ];
        for (kernel, (rows, k, n)) in Kernel::ALL
            .into_iter()
            .filter(|kernel| kernel.runs_here())
            .flat_map(|kernel| shapes.map(|shape| (kernel, shape)))
        {
            let x: Vec<f32> = (0..rows * k).map(|_| next()).collect();
            let w: Vec<f32> = (0..k * n).map(|_| next()).collect();
            let y0: Vec<f32> = (0..rows * n).map(|_| next()).collect();
            let packed = PanelWeights::pack_for(kernel, &w, k, n);
            let expected = reference(&x, &w, &y0, rows, k, n);
            // Shared out over the threads, and on this thread alone.
            let mut shared = y0.clone();
            packed.multiply_add(&x, rows, &mut shared);
            let mut here = y0.clone();
            packed.multiply_add_here(&x, rows, &mut here);
            // From a bias instead of y (whose NaNs must go unread): as if y started as rows of
            // the bias.
            let bias: Vec<f32> = (0..n).map(|_| next()).collect();
            let mut from_bias = vec![f32::NAN; rows * n];
            packed.multiply_bias_here(&x, rows, &bias, &mut from_bias);
            let biased: Vec<f32> = (0..rows * n).map(|i| bias[i % n.max(1)]).collect();
            let expected_biased = reference(&x, &w, &biased, rows, k, n);
            for (how, y, expected) in [
                ("shared", shared, &expected),
                ("here", here, &expected),
                ("bias", from_bias, &expected_biased),
            ] {
                let worst = y
                    .iter()
                    .zip(expected)
                    .map(|(a, b)| (*a as f64 - b).abs())
                    // NaN kept (f64::max would drop it), so an unset output fails.
                    .fold(0f64, |m, d| if d.is_nan() || d > m { d } else { m });
                assert!(worst < 1e-4, "{kernel:?} {how} {rows}x{k}x{n}: {worst}");
            }
        }
    }
}
