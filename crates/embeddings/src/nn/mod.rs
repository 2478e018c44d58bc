//! Building blocks shared by every BERT module, one file each: `linear` (with LoRA adapters),
//! `embedding`, `layer_norm`, `dropout` (and the seeded generator), `attention` (softmax and
//! the attention core), `packed` (padding-free batches and the attention mask that says which
//! keys a query sees); activations here.
//!
//! candle's fused kernels (`candle_nn::ops::layer_norm`, `softmax_last_dim`) record no gradient,
//! and its autograd over composed ops is slow on BERT's large activations. On the CPU (f32/f64)
//! the blocks here run this crate's kernels (`kernels/`, one file per op), each with a
//! hand-written backward, in training and inference alike; on other devices and dtypes they
//! compose candle ops, every one of which has a backward. The unit tests hold both paths to the
//! same values and gradients.

use candle_core::{DType, Module, Tensor, D};
use candle_nn::VarBuilder;

use crate::config::HiddenAct;
use crate::error::{Error, Result};

/// Whether a computation over these tensors must be recorded for backpropagation.
fn needs_grad(tensors: &[&Tensor]) -> bool {
    tensors.iter().any(|t| t.track_op())
}

mod attention;
mod dropout;
mod embedding;
mod layer_norm;
mod linear;
mod packed;
#[cfg(test)]
mod tests;

pub use attention::{
    attention_probabilities, fused_attention, fused_attention_block, fused_attention_packed,
    fused_qkv_attention, gpu_fused_attention_built, gpu_fused_epilogues_built, gpu_fused_kernels,
    set_gpu_fused_kernels, softmax_last_dim, QkvAttention,
};
pub use dropout::{seed_dropout, Dropout, SplitMix64};
pub use embedding::Embedding;
pub use layer_norm::LayerNorm;
pub use linear::{fused_feed_forward, join_path, Linear, LoraAdapter, NamedLinears};
pub use packed::{AttentionMask, PackedSequences};

/// The dtype reductions run in: f32 for half-precision inputs, the input's own otherwise.
pub fn compute_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    }
}

/// Applies a `hidden_act` activation.
pub fn activation(act: HiddenAct, x: &Tensor) -> candle_core::Result<Tensor> {
    match act {
        HiddenAct::Gelu if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) => {
            x.contiguous()?.apply_op1(crate::kernels::GeluErfOp)
        }
        HiddenAct::Gelu => x.gelu_erf(),
        // candle's `gelu` is the tanh approximation, which is what both names mean.
        HiddenAct::GeluNew | HiddenAct::GeluPytorchTanh => x.gelu(),
        HiddenAct::Relu => x.relu(),
        HiddenAct::Silu | HiddenAct::Swish => x.silu(),
    }
}
