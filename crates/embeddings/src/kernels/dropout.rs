//! Dropout by a fixed, caller-drawn keep-mask, with its backward.

use super::*;

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
