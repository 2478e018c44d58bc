//! LayerNorm (`nn.LayerNorm`): the CPU kernel, or composed ops that record a gradient.

use super::*;

/// LayerNorm over the last dimension, with statistics in f32 for half-precision inputs.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// Wraps existing `[dim]` weight and bias.
    pub fn new(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self { weight, bias, eps }
    }

    /// Loads `weight` and `bias` of shape `[dim]` under `vb`.
    pub fn load(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self::new(vb.get(dim, "weight")?, vb.get(dim, "bias")?, eps))
    }

    /// The `[dim]` scale.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The `[dim]` shift.
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    /// The epsilon added to the variance.
    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// Whether a fused f32 inference block may apply this norm: f32 parameters that track no
    /// gradient.
    pub(super) fn fits_fused_block(&self) -> bool {
        self.weight.dtype() == DType::F32 && !needs_grad(&[&self.weight, &self.bias])
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // Mixed precision: a narrower input is normalised in the weights' dtype (f32), as
        // autocast does, and returned in its own.
        if x.dtype() != self.weight.dtype() {
            return self
                .forward(&x.to_dtype(self.weight.dtype())?)?
                .to_dtype(x.dtype());
        }
        // candle's fused layer_norm takes the variance as E[x^2] - mean^2 in f32, which cancels
        // badly on BERT's large-offset residual streams (2e-4 off transformers on MiniLM). The
        // CPU kernel is two-pass, with its own backward; other devices take the composed (also
        // two-pass) path.
        if !x.device().is_cpu() {
            // On CUDA, for inference (nothing tracking a gradient), one fused kernel; in f32
            // training, the same kernel forward and one of its own backward.
            #[cfg(feature = "cuda")]
            if gpu_fused_kernels() {
                let fused = crate::cuda_epilogues::residual_layer_norm(
                    x,
                    None,
                    None,
                    (&self.weight, &self.bias),
                    self.eps,
                )?;
                if let Some(y) = fused {
                    return Ok(y);
                }
                // Training (something tracks a gradient): two kernels and two column sums.
                let train =
                    crate::cuda_epilogues::layer_norm_train(x, &self.weight, &self.bias, self.eps)?;
                if let Some(y) = train {
                    return Ok(y);
                }
            }
            return layer_norm_differentiable(x, &self.weight, &self.bias, self.eps);
        }
        x.contiguous()?.apply_op3(
            &self.weight.contiguous()?,
            &self.bias.contiguous()?,
            crate::kernels::LayerNormOp { eps: self.eps },
        )
    }
}

/// LayerNorm as plain tensor ops, every one of which has a backward.
pub(super) fn layer_norm_differentiable(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(compute_dtype(dtype))?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let variance = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(variance + eps)?.sqrt()?)?;
    normed
        .to_dtype(dtype)?
        .broadcast_mul(weight)?
        .broadcast_add(bias)
}
