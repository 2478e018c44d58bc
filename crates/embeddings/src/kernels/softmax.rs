//! The attention softmax (`softmax(scale * scores + bias)`), with its backward.

use super::*;

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

    /// f32 on CUDA (`nn::attention_probabilities` sends nothing else): the kernel of
    /// `cuda/epilogues.cu`, rows of up to 512 keys.
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        bias: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda_epilogues::attention_softmax((x, xl), (bias, bl), self.scale)
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        y: &candle_core::CudaStorage,
        yl: &Layout,
        dy: &candle_core::CudaStorage,
        dyl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda_epilogues::attention_softmax_backward((y, yl), (dy, dyl), self.0.scale)
    }
}
