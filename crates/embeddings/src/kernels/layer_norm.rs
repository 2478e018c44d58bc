//! LayerNorm over the last dimension, with its backward.

use super::*;

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
            normalize_row(row, w, b, self.eps, out);
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

/// One row of [`LayerNormOp`]'s forward in portable code, compiled for AVX2 / AVX-512 where
/// present (`vector_math::layer_norm_row` covers f32 on AVX-512, its normalisation in f32).
#[inline]
fn normalize_row<T: WithDType>(row: &[T], w: &[T], b: &[T], eps: f64, out: &mut [T]) {
    with_simd(
        #[inline(always)]
        || {
            let (mean, rstd) = row_stats(row, eps);
            for (j, o) in out.iter_mut().enumerate() {
                let normed = (row[j].to_f64() - mean) * rstd;
                *o = T::from_f64(normed * w[j].to_f64() + b[j].to_f64());
            }
        },
    )
}

/// One f32 row of [`LayerNormOp`]'s forward (within a few f32 roundings): the AVX-512 row where
/// present, else the portable one.
pub(super) fn layer_norm_row_f32(row: &[f32], w: &[f32], b: &[f32], eps: f64, out: &mut [f32]) {
    if crate::vector_math::layer_norm_row(row, w, b, eps, out).is_none() {
        normalize_row(row, w, b, eps, out);
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
