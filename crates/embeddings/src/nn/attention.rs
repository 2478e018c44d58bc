//! The attention core: probabilities (`softmax(scale * scores + bias)`) and the fused multi-head
//! kernels of the CPU and the GPU.

use super::*;

/// Softmax over the last dimension: candle's fused kernel for inference, composed ops when a
/// gradient is needed.
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    if needs_grad(&[x]) {
        candle_nn::ops::softmax(x, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(&x.contiguous()?)
    }
}

/// Attention probabilities `softmax(scale * scores + bias)` over the last dimension.
/// `scores`: `[batch, heads, queries, keys]`; `bias`: an additive mask broadcastable to it.
/// A per-sequence bias (`[batch, 1, 1, keys]`, the padding mask) or none takes one fused kernel
/// with its own backward: on the CPU for f32/f64 scores, on CUDA for f32 scores of up to 512
/// keys (with the GPU kernels on, [`set_gpu_fused_kernels`]); anything else the composed ops.
pub fn attention_probabilities(
    scores: &Tensor,
    bias: Option<&Tensor>,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let (batch, _, _, keys) = scores.dims4()?;
    let on_cpu = scores.device().is_cpu() && matches!(scores.dtype(), DType::F32 | DType::F64);
    #[cfg(feature = "cuda")]
    let on_gpu = scores.device().is_cuda()
        && scores.dtype() == DType::F32
        && crate::cuda_epilogues::softmax_per_lane(keys).is_some()
        && gpu_fused_kernels();
    #[cfg(not(feature = "cuda"))]
    let on_gpu = false;
    let fused = (on_cpu || on_gpu) && bias.is_none_or(|b| b.dims() == [batch, 1, 1, keys]);
    if fused {
        let bias = match bias {
            Some(b) => b.reshape((batch, keys))?.to_dtype(scores.dtype())?,
            None => Tensor::zeros((batch, keys), scores.dtype(), scores.device())?,
        };
        return scores.contiguous()?.apply_op2(
            &bias.contiguous()?,
            crate::kernels::AttentionSoftmaxOp { scale },
        );
    }
    let scaled = (scores * scale)?;
    let biased = match bias {
        Some(b) => scaled.broadcast_add(&b.to_dtype(scaled.dtype())?)?,
        None => scaled,
    };
    softmax_last_dim(&biased)
}

/// Multi-head attention of `[batch, seq, heads * head_dim]` projections `q`, `k`, `v`:
/// `dropout(softmax(scale * q k^T + bias)) v` per head, returned as the context
/// `[batch, seq, heads * head_dim]` and, with `want_probs`, the probabilities
/// `[batch, heads, seq, seq]` (before dropout). `dropout` is given in training only. One fused
/// CPU kernel with its own backward (see `kernels::AttentionOp`); `None` when it does not apply
/// (another device or dtype, a bias that is not one `[batch, 1, 1, seq]` row per sequence, or
/// packed rows with dropout, probabilities or a gradient), so the caller composes ops.
pub fn fused_attention<'m>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: impl Into<AttentionMask<'m>>,
    dropout: Option<&Dropout>,
    want_probs: bool,
) -> candle_core::Result<Option<(Tensor, Option<Tensor>)>> {
    let mask = mask.into();
    let (batch, seq, hidden) = q.dims3()?;
    let Some(kernel_mask) = attention_kernel_mask(q, batch, seq, hidden, heads, mask)? else {
        return Ok(None);
    };
    let dropout = dropout.filter(|d| d.p > 0.0);
    let tracked = [q, k, v].iter().any(|t| t.track_op());
    if kernel_mask.starts.is_some() && (dropout.is_some() || want_probs || tracked) {
        return Ok(None);
    }
    let dropout = dropout.map(|d| {
        (
            d.draw_keep(batch * heads * seq * seq),
            // The factor Dropout::forward uses (computed in f32), so both paths agree exactly.
            (1.0 / (1.0 - d.p)) as f64,
        )
    });
    let scale = 1.0 / ((hidden / heads) as f64).sqrt();
    // Probabilities are kept only when something will read them: the caller, or a backward
    // pass through any of q, k, v.
    let keep_probs = want_probs || tracked;
    let (op, saved) = kernel_mask.op(heads, scale, dropout, keep_probs);
    let context = q
        .contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?;
    let probs = kept_probabilities(&saved, want_probs, (batch, heads, seq, seq), q.device())?;
    Ok(Some((context, probs)))
}

static GPU_FUSED_KERNELS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Whether a GPU may use this crate's own kernels (on by default): in inference the fused
/// attention, bias + GELU, and bias + residual + LayerNorm; the f32 attention softmax (with
/// its backward) wherever the plain attention path runs, training included; in f32 training,
/// LayerNorm's forward and backward. With them off, the plain path runs (candle's matmuls, an f32 softmax,
/// element-wise ops, the composed LayerNorm). For comparing the two (`bert selftest`) and as an
/// escape hatch. Process-wide.
pub fn set_gpu_fused_kernels(enabled: bool) {
    GPU_FUSED_KERNELS.store(enabled, std::sync::atomic::Ordering::Relaxed);
}

/// See [`set_gpu_fused_kernels`].
pub fn gpu_fused_kernels() -> bool {
    GPU_FUSED_KERNELS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether this build has the fused epilogue kernels for the GPU (the `cuda` feature): bias +
/// GELU after the intermediate projection, bias + residual + LayerNorm after the output
/// projections and the embeddings' LayerNorm, for f32, f16 and bf16 inference with rows of
/// up to 1024 elements.
pub fn gpu_fused_epilogues_built() -> bool {
    cfg!(feature = "cuda")
}

/// Whether this build has the fused attention kernel for the GPU: the `cuda` feature, built for
/// a compute capability of 8.0 or newer. It runs for f16 and bf16 models with 32- or 64-wide
/// heads, in inference, when the attention probabilities are not asked for.
pub fn gpu_fused_attention_built() -> bool {
    cfg!(all(feature = "cuda", not(bert_no_flash_attention)))
}

/// [`fused_attention`] for inference over the output of one QKV projection,
/// `qkv: [batch, seq, 3 * hidden]` (query, key, value columns side by side), read in place.
/// `None` when the kernel does not apply (as for [`fused_attention`]) or `qkv` tracks a
/// gradient (this kernel has no backward).
pub fn fused_attention_packed<'m>(
    qkv: &Tensor,
    heads: usize,
    mask: impl Into<AttentionMask<'m>>,
    want_probs: bool,
) -> candle_core::Result<Option<(Tensor, Option<Tensor>)>> {
    let mask = mask.into();
    let (batch, seq, packed) = qkv.dims3()?;
    if packed % 3 != 0 || qkv.track_op() {
        return Ok(None);
    }
    #[cfg(all(feature = "cuda", not(bert_no_flash_attention)))]
    if !want_probs && gpu_fused_kernels() {
        if let Some(context) = crate::cuda_attention::packed_attention(qkv, None, heads, mask)? {
            return Ok(Some((context, None)));
        }
    }
    let hidden = packed / 3;
    let Some(kernel_mask) = attention_kernel_mask(qkv, batch, seq, hidden, heads, mask)? else {
        return Ok(None);
    };
    if kernel_mask.starts.is_some() && want_probs {
        return Ok(None);
    }
    let scale = 1.0 / ((hidden / heads) as f64).sqrt();
    let (op, saved) = kernel_mask.op(heads, scale, None, want_probs);
    let context = qkv
        .contiguous()?
        .apply_op1_no_bwd(&crate::kernels::PackedAttentionOp(op))?;
    let probs = kept_probabilities(&saved, want_probs, (batch, heads, seq, seq), qkv.device())?;
    Ok(Some((context, probs)))
}

/// What [`fused_qkv_attention`] did.
#[derive(Debug, Clone)]
pub enum QkvAttention {
    /// A kernel ran the attention: the context `[batch, seq, hidden]` and, when asked for
    /// (CPU kernels only), the probabilities `[batch, heads, seq, seq]`.
    Attended {
        /// The heads' context, joined: `[batch, seq, hidden]`.
        context: Tensor,
        /// The attention probabilities, when asked for.
        probs: Option<Tensor>,
    },
    /// No kernel applies: the projection's output `[batch, seq, 3 * hidden]` (query, key and
    /// value columns side by side), for the caller's own attention.
    Projected(Tensor),
}

/// Inference attention from a layer's input `x: [batch, seq, in]` through its fused QKV
/// projection `qkv` (`in -> 3 * hidden`). On CUDA, where the fused attention kernel applies
/// (f16/bf16, the GPU kernels on, a bias and no adapter), the projection runs without its
/// bias and the kernel adds it as it loads each tile: one pass fewer over the
/// `[tokens, 3 * hidden]` product. Elsewhere the projection, then [`fused_attention_packed`].
pub fn fused_qkv_attention<'m>(
    x: &Tensor,
    qkv: &Linear,
    heads: usize,
    mask: impl Into<AttentionMask<'m>>,
    want_probs: bool,
) -> candle_core::Result<QkvAttention> {
    let mask = mask.into();
    #[cfg(all(feature = "cuda", not(bert_no_flash_attention)))]
    if let (false, true, Some(bias), Ok((batch, seq, _))) = (
        want_probs,
        qkv.gpu_epilogue_applies(x),
        qkv.bias(),
        x.dims3(),
    ) {
        let dims = (batch, seq, qkv.out_dim());
        if crate::cuda_attention::applies(x.device(), x.dtype(), dims, heads, mask) {
            let product = qkv.product_without_bias(x)?;
            let fused = crate::cuda_attention::packed_attention(&product, Some(bias), heads, mask)?;
            return Ok(match fused {
                Some(context) => QkvAttention::Attended {
                    context,
                    probs: None,
                },
                // Only for inputs off the kernel's 16-byte alignment: the bias as a pass.
                None => QkvAttention::Projected(product.broadcast_add(bias)?),
            });
        }
    }
    let projected = qkv.forward_t(x, false)?;
    Ok(
        match fused_attention_packed(&projected, heads, mask, want_probs)? {
            Some((context, probs)) => QkvAttention::Attended { context, probs },
            None => QkvAttention::Projected(projected),
        },
    )
}

/// BERT's attention block for inference, `norm(output(attention(qkv(x))) + x)` for `x` of
/// `[batch, seq, hidden]`, in one CPU kernel where it applies: f32 on the CPU with AVX-512, a
/// fused QKV projection and an output layer that both have a bias, no adapter and AVX-512
/// panels, a head size of 16 to 64, nothing tracking a gradient, a padding bias of one
/// `[batch, 1, 1, seq]` row per sequence (or none, or packed rows), and at least two sequences
/// per thread and 192 tokens. Each thread takes whole
/// sequences through the projection, every head's attention, the output projection, the
/// residual and the norm, so a sequence's query, key, value and context rows stay in its
/// caches between them and the threads meet once per block instead of four times. `None`
/// where it does not apply: the caller runs the layers.
pub fn fused_attention_block<'m>(
    x: &Tensor,
    qkv: &Linear,
    heads: usize,
    mask: impl Into<AttentionMask<'m>>,
    output: &Linear,
    norm: &LayerNorm,
) -> candle_core::Result<Option<Tensor>> {
    let mask = mask.into();
    #[cfg(target_arch = "x86_64")]
    {
        let Ok((batch, seq, hidden)) = x.dims3() else {
            return Ok(None);
        };
        let threads = candle_core::utils::get_num_threads();
        let sequences = mask.packed().map_or(batch, PackedSequences::sequences);
        let applies = heads > 0
            && hidden.is_multiple_of(heads)
            && crate::tiled_attention::supports(hidden / heads)
            && sequences >= 2 * threads
            && batch * seq >= crate::kernels::FeedForwardOp::MIN_ROWS
            && norm.fits_fused_block();
        let (Some((p_qkv, b_qkv)), Some((p_out, b_out)), true) =
            (qkv.avx512_panels(x), output.avx512_panels(x), applies)
        else {
            return Ok(None);
        };
        let Some(kernel_mask) = attention_kernel_mask(x, batch, seq, hidden, heads, mask)? else {
            return Ok(None);
        };
        let op = crate::kernels::AttentionBlockOp {
            qkv: p_qkv.clone(),
            qkv_bias: b_qkv.to_vec1()?,
            heads,
            mask: kernel_mask.bias,
            starts: kernel_mask.starts,
            output: super::linear::output_norm(p_out, b_out, norm)?,
        };
        x.contiguous()?.apply_op1_no_bwd(&op).map(Some)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (x, qkv, heads, mask, output, norm);
        Ok(None)
    }
}

/// The probabilities an attention kernel kept, on `device`, when the caller asked for them.
fn kept_probabilities(
    saved: &crate::kernels::SavedAttention,
    want_probs: bool,
    shape: (usize, usize, usize, usize),
    device: &candle_core::Device,
) -> candle_core::Result<Option<Tensor>> {
    want_probs
        .then(|| saved.probabilities(shape)?.to_device(device))
        .transpose()
}

/// What the CPU attention kernels take of an [`AttentionMask`].
struct KernelMask {
    /// `[batch, seq]` additive bias.
    bias: Option<Vec<f32>>,
    /// First rows of packed sequences.
    starts: Option<std::sync::Arc<[usize]>>,
}

impl KernelMask {
    fn op(
        self,
        heads: usize,
        scale: f64,
        dropout: Option<(Vec<bool>, f64)>,
        keep_probs: bool,
    ) -> (crate::kernels::AttentionOp, crate::kernels::SavedAttention) {
        let (op, saved) =
            crate::kernels::AttentionOp::new(heads, scale, self.bias, dropout, keep_probs);
        match self.starts {
            Some(starts) => (op.with_starts(starts), saved),
            None => (op, saved),
        }
    }
}

/// Whether the CPU attention kernels apply to `x` (CPU, f32/f64, non-empty, heads dividing
/// `hidden`, a bias of one `[batch, 1, 1, seq]` row per sequence, or packed rows that are
/// `x`'s): `None` when they do not, else the mask as they take it.
fn attention_kernel_mask(
    x: &Tensor,
    batch: usize,
    seq: usize,
    hidden: usize,
    heads: usize,
    mask: AttentionMask,
) -> candle_core::Result<Option<KernelMask>> {
    let fits = match mask {
        AttentionMask::None => true,
        AttentionMask::Bias(b) => b.dims() == [batch, 1, 1, seq],
        AttentionMask::Packed(p) => batch == 1 && p.tokens() == seq,
    };
    let applies = x.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && batch > 0
        && seq > 0
        && heads > 0
        && hidden.is_multiple_of(heads)
        && fits;
    if !applies {
        return Ok(None);
    }
    let bias = mask
        .bias()
        .map(|b| b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>())
        .transpose()?;
    let starts = mask.packed().map(PackedSequences::shared_starts);
    Ok(Some(KernelMask { bias, starts }))
}
