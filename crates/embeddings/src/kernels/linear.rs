//! The linear layer (one GEMM onto bias-filled rows, optional dropout), with its backward.

use super::gelu::gelu;
use super::*;

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
    /// The same weight packed into panels: f32 products use it instead of the general GEMM.
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
            .filter(|p| p.fits(in_dim, out_dim) && as_f32(x).is_some());
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

/// Sums the rows of a contiguous `[rows, cols]` block (candle's `sum(0)` walks the columns
/// with a stride), deterministically: see [`ordered_row_sums`].
pub(super) fn column_sums<T: Real + Default>(x: &[T], cols: usize) -> Vec<T> {
    let rows = x.len() / cols.max(1);
    ordered_row_sums(rows, cols, |r, acc: &mut [T]| {
        for (a, &v) in acc.iter_mut().zip(&x[r * cols..(r + 1) * cols]) {
            *a += v;
        }
    })
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

/// `W + scaling * B A` (a LoRA adapter folded into its weight; `W: [out, in]` in either
/// [`WeightLayout`], `A: [r, in]`, `B: [out, r]`, all contiguous f32 or f64 on the CPU),
/// returned stored transposed (`[in, out]` in memory, viewed as `[out, in]`), the layout
/// inference multiplies by. `None` for any other device, dtype or striding: the caller then
/// merges with tensor ops.
///
/// Two passes over one new tensor (fill, then one GEMM onto it). The tensor-op merge (a `B A`
/// matmul, a scale, an add, then the transposed copy) made four weight-sized tensors per
/// adapter; for the bundled cross-encoder's 37 adapters it took about twice as long
/// (`crates/bench/README.md`, time to first score).
pub(crate) fn merge_low_rank_transposed(
    weight: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scaling: f64,
) -> candle_core::Result<Option<Tensor>> {
    let (out_dim, in_dim) = weight.dims2()?;
    let (rank, a_in) = a.dims2()?;
    let (b_out, b_rank) = b.dims2()?;
    if (a_in, b_out, b_rank) != (in_dim, out_dim, rank) {
        candle_core::bail!(
            "LoRA A {:?} / B {:?} do not fit a [{out_dim}, {in_dim}] weight",
            a.dims(),
            b.dims()
        )
    }
    let on_cpu = [weight, a, b].iter().all(|t| t.device().is_cpu());
    let float = matches!(
        weight.dtype(),
        candle_core::DType::F32 | candle_core::DType::F64
    );
    let same_dtype = a.dtype() == weight.dtype() && b.dtype() == weight.dtype();
    if !on_cpu || !float || !same_dtype || !a.is_contiguous() || !b.is_contiguous() {
        return Ok(None);
    }
    let Some((w_layout, w_storage_layout)) = WeightLayout::of(weight.layout()) else {
        return Ok(None);
    };
    let (ws, _) = weight.storage_and_layout();
    let (a_s, al) = a.storage_and_layout();
    let (b_s, bl) = b.storage_and_layout();
    let (ws, a_s, b_s) = (
        cpu_storage(&ws, "lora-merge")?,
        cpu_storage(&a_s, "lora-merge")?,
        cpu_storage(&b_s, "lora-merge")?,
    );
    let dims = (out_dim, in_dim, rank, w_layout);
    let merged = per_float!("lora-merge", [F32, F64], (ws => w @ &w_storage_layout, a_s => a @ al, b_s => b @ bl), merge_into_in_by_out(w, a, b, scaling, dims));
    let merged = Tensor::from_storage(
        candle_core::Storage::Cpu(merged),
        (in_dim, out_dim),
        candle_core::op::BackpropOp::none(),
        false,
    );
    Ok(Some(merged.t()?))
}

/// The `[in, out]` result starts as `W^T` (rows copied or gathered, split over the threads)
/// and gets `scaling * A^T B^T` added by one GEMM that reads `A` and `B` in place (strides)
/// with the inner dimension `r`.
fn merge_into_in_by_out<T: Real>(
    w: &[T],
    a: &[T],
    b: &[T],
    scaling: f64,
    (out_dim, in_dim, rank, w_layout): (usize, usize, usize, WeightLayout),
) -> Vec<T> {
    let scaling = T::from_f64(scaling);
    let n = in_dim * out_dim;
    let mut merged: Vec<T> = Vec::with_capacity(n);
    let fill_row = |j: usize, row: &mut [std::mem::MaybeUninit<T>]| match w_layout {
        WeightLayout::InByOut => {
            let src = &w[j * out_dim..(j + 1) * out_dim];
            row.iter_mut().zip(src).for_each(|(o, &v)| {
                o.write(v);
            });
        }
        // Column `j` of the weight: strided reads, the writes in address order (faster here
        // than blocks of rows written with a stride).
        WeightLayout::OutByIn => row.iter_mut().enumerate().for_each(|(i, o)| {
            o.write(w[i * in_dim + j]);
        }),
    };
    let spare = &mut merged.spare_capacity_mut()[..n];
    if n >= PARALLEL_MIN_ELEMENTS {
        crate::team::parallel_chunks_mut(spare, out_dim, fill_row);
    } else {
        spare
            .chunks_mut(out_dim.max(1))
            .enumerate()
            .for_each(|(j, row)| fill_row(j, row));
    }
    // SAFETY: the rows above cover all `in * out` elements, each written.
    unsafe { merged.set_len(n) };
    let threads = candle_core::utils::get_num_threads();
    let parallelism = if threads > 1 && n * rank >= 1 << 20 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: `merged` is `[in, out]` row-major (in x out elements, initialised above);
    // `A^T` is read from `a: [r, in]` (element (j, k) at k * in + j) and `B^T` from
    // `b: [out, r]` (element (k, i) at i * r + k), both covering their r x in and out x r
    // elements; the output aliases neither.
    unsafe {
        gemm::gemm(
            in_dim,
            out_dim,
            rank,
            merged.as_mut_ptr(),
            1,
            out_dim as isize,
            true,
            a.as_ptr(),
            in_dim as isize,
            1,
            b.as_ptr(),
            rank as isize,
            1,
            T::one(),
            scaling,
            false,
            false,
            false,
            parallelism,
        );
    }
    merged
}
