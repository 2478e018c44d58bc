//! Building blocks shared by every BERT module: linear (with LoRA adapters), embedding,
//! LayerNorm, dropout, activations, softmax and the attention core.
//!
//! candle's fused kernels (`candle_nn::ops::layer_norm`, `softmax_last_dim`) record no gradient,
//! and its autograd over composed ops is slow on BERT's large activations. On the CPU (f32/f64)
//! the blocks here run this crate's kernels (`kernels/`, one file per op), each with a
//! hand-written backward, in training and inference alike; on other devices and dtypes they compose candle ops, every
//! one of which has a backward. The unit tests hold both paths to the same values and
//! gradients.

use candle_core::{DType, Module, Tensor, D};
use candle_nn::VarBuilder;

use crate::config::HiddenAct;
use crate::error::{Error, Result};

/// Whether a computation over these tensors must be recorded for backpropagation.
fn needs_grad(tensors: &[&Tensor]) -> bool {
    tensors.iter().any(|t| t.track_op())
}

/// `y = x W^T + b`, HF's `nn.Linear` (weight `[out, in]`), optionally with a LoRA adapter
/// (PEFT's `lora.Linear`): `y = x W^T + b + scaling * dropout(x) A^T B^T`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    adapter: Option<LoraAdapter>,
    /// The weight packed into panels on the CPU (f32, AVX-512 or AVX2; see
    /// [`Linear::use_inference_layout`]); `None` elsewhere.
    panels: Option<std::sync::Arc<crate::panel_gemm::PanelWeights>>,
}

/// A low-rank update of a [`Linear`] (Hu et al. 2021, as PEFT's `LoraLayer`): `A: [r, in]`,
/// `B: [out, r]`, applied as `scaling * dropout(x) A^T B^T`.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    a: Tensor,
    b: Tensor,
    scaling: f64,
    dropout: Dropout,
}

impl LoraAdapter {
    /// An adapter from `a: [r, in]` and `b: [out, r]`; `scaling` is PEFT's `lora_alpha / r`
    /// (`lora_alpha / sqrt(r)` with rsLoRA) and `dropout` acts on the adapter's input only.
    pub fn new(a: Tensor, b: Tensor, scaling: f64, dropout: Dropout) -> Result<Self> {
        let (rank, _) = a.dims2()?;
        let (_, b_rank) = b.dims2()?;
        if rank != b_rank {
            return Err(Error::input(format!(
                "LoRA A is {:?} and B is {:?}: their ranks differ",
                a.dims(),
                b.dims()
            )));
        }
        Ok(Self {
            a,
            b,
            scaling,
            dropout,
        })
    }

    /// `A`, `[r, in]`.
    pub fn a(&self) -> &Tensor {
        &self.a
    }

    /// `B`, `[out, r]`.
    pub fn b(&self) -> &Tensor {
        &self.b
    }

    /// The factor on `B A`.
    pub fn scaling(&self) -> f64 {
        self.scaling
    }

    /// The rank `r`.
    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }

    /// `scaling * B A`, the `[out, in]` update the adapter adds to the weight.
    pub fn delta_weight(&self) -> candle_core::Result<Tensor> {
        self.b.matmul(&self.a)? * self.scaling
    }
}

impl Linear {
    /// Wraps existing tensors (`weight: [out, in]`, `bias: [out]`).
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            adapter: None,
            panels: None,
        }
    }

    /// Loads `weight` and `bias` under `vb`.
    pub fn load(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = vb.get(out_dim, "bias")?;
        Ok(Self::new(weight, Some(bias)))
    }

    /// The `[out, in]` weight (without any adapter's update).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The `[out]` bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Input width.
    pub fn in_dim(&self) -> usize {
        self.weight.dims()[1]
    }

    /// Output width.
    pub fn out_dim(&self) -> usize {
        self.weight.dims()[0]
    }

    /// The LoRA adapter, if one is attached.
    pub fn adapter(&self) -> Option<&LoraAdapter> {
        self.adapter.as_ref()
    }

    /// Attaches (or with `None`, removes) a LoRA adapter, checking its shapes against the
    /// weight.
    pub fn set_adapter(&mut self, adapter: Option<LoraAdapter>) -> Result<()> {
        if let Some(adapter) = &adapter {
            let (out_dim, in_dim) = (self.out_dim(), self.in_dim());
            if adapter.a.dims()[1] != in_dim || adapter.b.dims()[0] != out_dim {
                return Err(Error::input(format!(
                    "LoRA A {:?} / B {:?} do not fit a [{out_dim}, {in_dim}] weight",
                    adapter.a.dims(),
                    adapter.b.dims()
                )));
            }
        }
        self.adapter = adapter;
        Ok(())
    }

    /// Folds the adapter into the weight (`W + scaling * B A`, PEFT's `merge_and_unload`) and
    /// removes it: the same outputs in inference, at a plain linear's cost.
    pub fn merge_adapter(&mut self) -> Result<()> {
        if let Some(adapter) = self.adapter.take() {
            let delta = adapter.delta_weight()?.to_dtype(self.weight.dtype())?;
            self.weight = (self.weight.detach() + delta.detach())?;
            self.panels = None;
        }
        Ok(())
    }

    /// Stores the weight transposed (`[in, out]` in memory, still seen as `[out, in]`), the
    /// layout the CPU kernel multiplies by without repacking it on every call (that repacking
    /// was two thirds of a 1 x 16 forward pass). For inference: the transposed copy replaces
    /// the weight, so it is detached from any gradient; a weight already in that layout is left
    /// as is. An f32 weight on a CPU with AVX-512 or AVX2 and FMA is also packed into panels
    /// (`panel_gemm`: the weight read in address order; a second copy of it), used for products
    /// over few rows (AVX-512) or any number (AVX2).
    /// [`Linear::store_transposed`] then [`Linear::pack_for_small_batches`].
    pub fn use_inference_layout(&mut self) -> Result<()> {
        self.store_transposed()?;
        self.pack_for_small_batches()
    }

    /// The layout half of [`Linear::use_inference_layout`], without the panels.
    pub fn store_transposed(&mut self) -> Result<()> {
        if !self.is_stored_transposed() {
            self.weight = self.weight.detach().t()?.contiguous()?.t()?;
        }
        Ok(())
    }

    /// Whether the weight is stored `[in, out]` (as [`Linear::store_transposed`] leaves it).
    fn is_stored_transposed(&self) -> bool {
        matches!(
            crate::kernels::WeightLayout::of(self.weight.layout()),
            Some((crate::kernels::WeightLayout::InByOut, _))
        )
    }

    /// The panel half of [`Linear::use_inference_layout`]: packs an f32 weight stored
    /// transposed (on a CPU with AVX-512, or AVX2 and FMA; the name dates from the AVX-512
    /// kernel, used for small batches only). A weight that is a strided view into a larger
    /// block, as query, key and value become when an attention block fuses them, is left
    /// unpacked: inference multiplies by the block, so its panels would go unused.
    pub fn pack_for_small_batches(&mut self) -> Result<()> {
        let (out_dim, in_dim) = self.weight.dims2()?;
        let packable = self.is_stored_transposed()
            && self.weight.device().is_cpu()
            && self.weight.dtype() == DType::F32
            && crate::panel_gemm::PanelWeights::available();
        if packable && self.panels.is_none() {
            let in_out = self.weight.t()?.flatten_all()?.to_vec1::<f32>()?;
            self.panels =
                crate::panel_gemm::PanelWeights::pack(&in_out, in_dim, out_dim).map(Into::into);
        }
        Ok(())
    }

    /// The weight as the CPU kernel takes it: either layout in place, any other striding
    /// copied to a contiguous one.
    fn kernel_weight(&self) -> candle_core::Result<Tensor> {
        match crate::kernels::WeightLayout::of(self.weight.layout()) {
            Some(_) => Ok(self.weight.clone()),
            None => self.weight.contiguous(),
        }
    }

    /// The layer's output; `train` turns the adapter's dropout on.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.forward_dropout(x, None, train)
    }

    /// `dropout(linear(x))`, the projection-then-dropout of BERT's output blocks; `dropout`
    /// acts only when `train` is set. On the CPU (f32/f64, with a bias and no adapter) this is
    /// one kernel, forward and backward.
    pub fn forward_dropout(
        &self,
        x: &Tensor,
        dropout: Option<&Dropout>,
        train: bool,
    ) -> candle_core::Result<Tensor> {
        if x.dtype() != self.weight.dtype() {
            return self.cast_to(x.dtype())?.forward_dropout(x, dropout, train);
        }
        let dropout = dropout.filter(|d| train && d.p > 0.0);
        let dims = x.dims();
        let in_dim = *dims.last().unwrap_or(&0);
        let rows = x.elem_count() / in_dim.max(1);
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = self.out_dim();
        }
        let fused = x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64);
        let y = match &self.bias {
            Some(bias) if fused => {
                // With an adapter, its update joins before the dropout, so the kernel only
                // computes the (frozen) base product.
                let kernel_dropout = match (&self.adapter, dropout) {
                    (None, Some(d)) => Some((
                        std::sync::Arc::new(d.draw_keep(rows * self.out_dim())),
                        (1.0 / (1.0 - d.p)) as f64,
                    )),
                    _ => None,
                };
                let y = x.contiguous()?.apply_op3(
                    &self.kernel_weight()?,
                    &bias.contiguous()?,
                    crate::kernels::LinearOp {
                        dropout: kernel_dropout,
                        gelu: false,
                        panels: self.panels.clone(),
                        residual: None,
                    },
                )?;
                if self.adapter.is_none() {
                    return Ok(y);
                }
                y
            }
            // Fold every leading dimension into the rows so the product is one GEMM instead of
            // a batch of small ones against a broadcast weight.
            Some(bias) => x
                .reshape((rows, in_dim))?
                .matmul(&self.weight.t()?)?
                .broadcast_add(bias)?
                .reshape(out_dims.as_slice())?,
            None => x
                .reshape((rows, in_dim))?
                .matmul(&self.weight.t()?)?
                .reshape(out_dims.as_slice())?,
        };
        let y = match &self.adapter {
            Some(adapter) => {
                let x2 = x.reshape((rows, in_dim))?;
                let dropped = adapter.dropout.forward(&x2, train)?;
                let low_rank = dropped.matmul(&adapter.a.t()?)?.matmul(&adapter.b.t()?)?;
                (y + (low_rank * adapter.scaling)?.reshape(out_dims.as_slice())?)?
            }
            None => y,
        };
        match dropout {
            Some(d) => d.forward(&y, train),
            None => Ok(y),
        }
    }
}

impl Linear {
    /// The layer with its weights cast to `dtype`, for mixed precision (an input in a narrower
    /// dtype than the weights, as `ForwardOptions::compute_dtype` makes): the casts are ops, so
    /// gradients flow back to the weights in their own dtype (f32 master weights).
    fn cast_to(&self, dtype: DType) -> candle_core::Result<Self> {
        let adapter = match &self.adapter {
            Some(adapter) => Some(LoraAdapter {
                a: adapter.a.to_dtype(dtype)?,
                b: adapter.b.to_dtype(dtype)?,
                ..adapter.clone()
            }),
            None => None,
        };
        Ok(Self {
            weight: self.weight.to_dtype(dtype)?,
            bias: self.bias.as_ref().map(|b| b.to_dtype(dtype)).transpose()?,
            adapter,
            panels: None,
        })
    }

    /// `act(linear(x))` for inference. On the CPU (f32/f64, with a bias, no adapter, nothing
    /// tracking a gradient) the erf GELU is applied inside the linear kernel, on its output in
    /// place: no second pass over a fresh tensor. Otherwise the layer, then [`activation`].
    pub fn forward_activation(&self, x: &Tensor, act: HiddenAct) -> candle_core::Result<Tensor> {
        let fused = act == HiddenAct::Gelu && self.inference_kernel_applies(x);
        match (&self.bias, fused) {
            (Some(bias), true) => self.inference_kernel(x, bias, true, None),
            #[cfg(feature = "cuda")]
            (Some(bias), false) if act == HiddenAct::Gelu && self.gpu_epilogue_applies(x) => {
                let product = self.product_without_bias(x)?;
                match crate::cuda_epilogues::bias_gelu(&product, bias)? {
                    Some(y) => Ok(y),
                    None => activation(act, &product.broadcast_add(bias)?),
                }
            }
            _ => activation(act, &self.forward_t(x, false)?),
        }
    }

    /// `norm(linear(x) + residual)` for inference, BERT's output blocks (dropout is off).
    /// On the CPU the residual joins inside the product ([`Linear::forward_residual`]); on
    /// CUDA (with a bias, no adapter, nothing tracking a gradient, [`gpu_fused_kernels`] on)
    /// the product runs without its bias, then one kernel adds bias and residual and
    /// normalises. Otherwise the layer, the addition, then the norm.
    pub fn forward_residual_norm(
        &self,
        x: &Tensor,
        residual: &Tensor,
        norm: &LayerNorm,
    ) -> candle_core::Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let (Some(bias), true) = (&self.bias, self.gpu_epilogue_applies(x)) {
            let product = self.product_without_bias(x)?;
            let fused = crate::cuda_epilogues::residual_layer_norm(
                &product,
                Some(bias),
                Some(residual),
                (&norm.weight, &norm.bias),
                norm.eps,
            )?;
            if let Some(y) = fused {
                return Ok(y);
            }
            return norm.forward(&(product.broadcast_add(bias)? + residual)?);
        }
        norm.forward(&self.forward_residual(x, residual)?)
    }

    /// Whether this layer's inference product may end in a fused GPU epilogue: CUDA, weights
    /// in x's dtype, no adapter, nothing tracking a gradient, the kernels switched on.
    #[cfg(feature = "cuda")]
    fn gpu_epilogue_applies(&self, x: &Tensor) -> bool {
        x.device().is_cuda()
            && gpu_fused_kernels()
            && x.dtype() == self.weight.dtype()
            && self.adapter.is_none()
            && !x.track_op()
            && !self.weight.track_op()
            && self.bias.as_ref().is_some_and(|b| !b.track_op())
    }

    /// `x W^T` over every leading dimension folded into rows (one GEMM), without the bias.
    #[cfg(feature = "cuda")]
    fn product_without_bias(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims();
        let in_dim = *dims.last().unwrap_or(&0);
        let rows = x.elem_count() / in_dim.max(1);
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = self.out_dim();
        }
        x.reshape((rows, in_dim))?
            .matmul(&self.weight.t()?)?
            .reshape(out_dims.as_slice())
    }

    /// `linear(x) + residual` for inference, `residual` shaped as the output. On the CPU
    /// (f32/f64, with a bias, no adapter, nothing tracking a gradient) the product starts from
    /// `bias + residual` inside the linear kernel: no second pass and tensor for the sum.
    /// Otherwise the layer, then the addition.
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> candle_core::Result<Tensor> {
        let fused = self.inference_kernel_applies(x) && !residual.track_op();
        match (&self.bias, fused) {
            (Some(bias), true) => {
                self.inference_kernel(x, bias, false, Some(residual.contiguous()?))
            }
            _ => self.forward_t(x, false)? + residual,
        }
    }

    /// The inference-only CPU kernel (no backward) on `x`: the product with `bias`, then the
    /// GELU, or started from `residual`.
    fn inference_kernel(
        &self,
        x: &Tensor,
        bias: &Tensor,
        gelu: bool,
        residual: Option<Tensor>,
    ) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op3_no_bwd(
            &self.kernel_weight()?,
            &bias.contiguous()?,
            &crate::kernels::LinearOp {
                dropout: None,
                gelu,
                panels: self.panels.clone(),
                residual,
            },
        )
    }

    /// Whether the inference-only CPU kernel (no backward) computes this layer on `x`: CPU,
    /// f32/f64, a bias, no adapter and nothing tracking a gradient.
    fn inference_kernel_applies(&self, x: &Tensor) -> bool {
        x.device().is_cpu()
            && matches!(x.dtype(), DType::F32 | DType::F64)
            && self.adapter.is_none()
            && !x.track_op()
            && !self.weight.track_op()
            && self.bias.as_ref().is_some_and(|b| !b.track_op())
    }
}

impl Module for Linear {
    /// Inference: [`Linear::forward_t`] without dropout.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_t(x, false)
    }
}

/// Models that can list their linear layers by checkpoint path (`bert.encoder.layer.0.
/// attention.self.query`, ...), mutably: how LoRA adapters are attached, found and merged.
pub trait NamedLinears {
    /// Appends every linear layer under `prefix` (the module's own path, `""` at the root).
    fn named_linears<'a>(&'a mut self, prefix: &str, out: &mut Vec<(String, &'a mut Linear)>);
}

impl NamedLinears for Linear {
    fn named_linears<'a>(&'a mut self, prefix: &str, out: &mut Vec<(String, &'a mut Linear)>) {
        out.push((prefix.to_string(), self));
    }
}

/// `prefix.name`, or `name` at the root: the path join of module names.
pub fn join_path(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// A lookup table (`nn.Embedding`).
#[derive(Debug, Clone)]
pub struct Embedding {
    weight: Tensor,
}

impl Embedding {
    /// Wraps a `[rows, dim]` table.
    pub fn new(weight: Tensor) -> Self {
        Self { weight }
    }

    /// Loads `weight` of shape `[rows, dim]` under `vb`.
    pub fn load(rows: usize, dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self::new(vb.get((rows, dim), "weight")?))
    }

    /// The `[rows, dim]` table.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.weight.dims()[0]
    }
}

impl Module for Embedding {
    fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        if self.weight.device().is_cpu()
            && matches!(self.weight.dtype(), DType::F32 | DType::F64)
            && matches!(ids.dtype(), DType::U8 | DType::U32 | DType::I64)
        {
            return self
                .weight
                .contiguous()?
                .apply_op2(&ids.contiguous()?, crate::kernels::EmbeddingOp);
        }
        let mut out_dims = ids.dims().to_vec();
        out_dims.push(self.weight.dim(1)?);
        self.weight
            .index_select(&ids.flatten_all()?, 0)?
            .reshape(out_dims)
    }
}

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
            // On CUDA, for inference (nothing tracking a gradient), one fused kernel.
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
fn layer_norm_differentiable(
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

/// The dtype reductions run in: f32 for half-precision inputs, the input's own otherwise.
pub fn compute_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    }
}

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
/// On the CPU, a per-sequence bias (`[batch, 1, 1, keys]`, the padding mask) and f32/f64 scores
/// take one fused kernel with its own backward; anything else the composed ops.
pub fn attention_probabilities(
    scores: &Tensor,
    bias: Option<&Tensor>,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let (batch, _, _, keys) = scores.dims4()?;
    let fused = scores.device().is_cpu()
        && matches!(scores.dtype(), DType::F32 | DType::F64)
        && bias.is_none_or(|b| b.dims() == [batch, 1, 1, keys]);
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

/// Inverted dropout that drops only when `train` is set (HF's `nn.Dropout` in train mode).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    p: f32,
}

impl Dropout {
    /// A dropout layer with drop probability `p` in [0, 1).
    pub fn new(p: f64) -> Result<Self> {
        if !(0.0..1.0).contains(&p) {
            return Err(Error::input(format!(
                "dropout probability must be in [0, 1), got {p}"
            )));
        }
        Ok(Self { p: p as f32 })
    }

    /// The drop probability.
    pub fn p(&self) -> f32 {
        self.p
    }

    /// Zeroes each element with probability `p` and scales the rest by `1 / (1 - p)` when
    /// training; the identity otherwise. Masks come from this thread's seeded dropout stream
    /// ([`seed_dropout`]), so a training run is reproducible and resumable.
    pub fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        if !train || self.p == 0.0 {
            return Ok(x.clone());
        }
        let scale = 1.0 / (1.0 - self.p);
        let keep = self.draw_keep(x.elem_count());
        // On the CPU one kernel applies the mask forward and backward; elsewhere a mask tensor.
        if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
            return x.contiguous()?.apply_op1(crate::kernels::DropoutOp {
                keep: std::sync::Arc::new(keep),
                scale: scale as f64,
            });
        }
        let mask: Vec<f32> = keep
            .into_iter()
            .map(|k| if k { scale } else { 0.0 })
            .collect();
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        x.mul(&mask)
    }
}

impl Dropout {
    /// `n` keep flags from this thread's seeded dropout stream (true with probability `1 - p`).
    fn draw_keep(&self, n: usize) -> Vec<bool> {
        DROPOUT_RNG.with(|rng| {
            let mut rng = rng.borrow_mut();
            (0..n).map(|_| rng.next_f32() >= self.p).collect()
        })
    }
}

/// Multi-head attention of `[batch, seq, heads * head_dim]` projections `q`, `k`, `v`:
/// `dropout(softmax(scale * q k^T + bias)) v` per head, returned as the context
/// `[batch, seq, heads * head_dim]` and, with `want_probs`, the probabilities
/// `[batch, heads, seq, seq]` (before dropout). `dropout` is given in training only. One fused CPU kernel with its own backward
/// (see `kernels::AttentionOp`); `None` when it does not apply (another device or dtype, or a
/// bias that is not one `[batch, 1, 1, seq]` row per sequence), so the caller composes ops.
pub fn fused_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    bias: Option<&Tensor>,
    dropout: Option<&Dropout>,
    want_probs: bool,
) -> candle_core::Result<Option<(Tensor, Option<Tensor>)>> {
    let (batch, seq, hidden) = q.dims3()?;
    let Some(bias) = attention_kernel_bias(q, batch, seq, hidden, heads, bias)? else {
        return Ok(None);
    };
    let dropout = dropout.filter(|d| d.p > 0.0).map(|d| {
        (
            d.draw_keep(batch * heads * seq * seq),
            // The factor Dropout::forward uses (computed in f32), so both paths agree exactly.
            (1.0 / (1.0 - d.p)) as f64,
        )
    });
    let scale = 1.0 / ((hidden / heads) as f64).sqrt();
    // Probabilities are kept only when something will read them: the caller, or a backward
    // pass through any of q, k, v.
    let keep_probs = want_probs || [q, k, v].iter().any(|t| t.track_op());
    let (op, saved) = crate::kernels::AttentionOp::new(heads, scale, bias, dropout, keep_probs);
    let context = q
        .contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?;
    let probs = kept_probabilities(&saved, want_probs, (batch, heads, seq, seq), q.device())?;
    Ok(Some((context, probs)))
}

static GPU_FUSED_KERNELS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Whether inference on a GPU may use this crate's own kernels (on by default): the fused
/// attention, bias + GELU, and bias + residual + LayerNorm. With them off, the plain path runs
/// (candle's matmuls, an f32 softmax, element-wise ops, the composed LayerNorm). For comparing
/// the two (`bert selftest`) and as an escape hatch. Process-wide.
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

/// [`fused_attention`] for inference over the packed output of one QKV projection,
/// `qkv: [batch, seq, 3 * hidden]` (query, key, value columns side by side), read in place.
/// `None` when the kernel does not apply (as for [`fused_attention`]) or `qkv` tracks a
/// gradient (the packed kernel has no backward).
pub fn fused_attention_packed(
    qkv: &Tensor,
    heads: usize,
    bias: Option<&Tensor>,
    want_probs: bool,
) -> candle_core::Result<Option<(Tensor, Option<Tensor>)>> {
    let (batch, seq, packed) = qkv.dims3()?;
    if packed % 3 != 0 || qkv.track_op() {
        return Ok(None);
    }
    #[cfg(all(feature = "cuda", not(bert_no_flash_attention)))]
    if !want_probs && gpu_fused_kernels() {
        if let Some(context) = crate::cuda_attention::packed_attention(qkv, heads, bias)? {
            return Ok(Some((context, None)));
        }
    }
    let hidden = packed / 3;
    let Some(bias) = attention_kernel_bias(qkv, batch, seq, hidden, heads, bias)? else {
        return Ok(None);
    };
    let scale = 1.0 / ((hidden / heads) as f64).sqrt();
    let (op, saved) = crate::kernels::AttentionOp::new(heads, scale, bias, None, want_probs);
    let context = qkv
        .contiguous()?
        .apply_op1_no_bwd(&crate::kernels::PackedAttentionOp(op))?;
    let probs = kept_probabilities(&saved, want_probs, (batch, heads, seq, seq), qkv.device())?;
    Ok(Some((context, probs)))
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

/// Whether the CPU attention kernel applies to `x` (CPU, f32/f64, non-empty, heads dividing
/// `hidden`, a bias of one `[batch, 1, 1, seq]` row per sequence): `None` when it does not,
/// else the bias as the kernel takes it (`Some(None)` without one).
#[allow(clippy::type_complexity)]
fn attention_kernel_bias(
    x: &Tensor,
    batch: usize,
    seq: usize,
    hidden: usize,
    heads: usize,
    bias: Option<&Tensor>,
) -> candle_core::Result<Option<Option<Vec<f32>>>> {
    let applies = x.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && batch > 0
        && seq > 0
        && heads > 0
        && hidden.is_multiple_of(heads)
        && bias.is_none_or(|b| b.dims() == [batch, 1, 1, seq]);
    if !applies {
        return Ok(None);
    }
    let bias = bias
        .map(|b| b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>())
        .transpose()?;
    Ok(Some(bias))
}

/// SplitMix64: a small, fast, well-mixed generator whose whole state is one `u64`, so runs that
/// use it (dropout, initialisation, shuffling) are reproducible from a seed.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 24 bits of precision.
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in [0, 1) with 53 bits of precision.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A standard normal draw (Box-Muller).
    pub fn next_normal(&mut self) -> f64 {
        let u1 = 1.0 - self.next_f64(); // (0, 1]: ln is finite
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// A uniform index in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_f64() * n as f64) as usize % n.max(1)
    }
}

thread_local! {
    static DROPOUT_RNG: std::cell::RefCell<SplitMix64> = const { std::cell::RefCell::new(SplitMix64(0)) };
}

/// Seeds the dropout masks drawn on this thread. A trainer calls it at every step with a value
/// derived from its seed and the step, so masks depend only on (seed, step): a resumed run
/// draws exactly the masks the uninterrupted one would have.
pub fn seed_dropout(seed: u64) {
    DROPOUT_RNG.with(|rng| *rng.borrow_mut() = SplitMix64(seed));
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Largest absolute difference, in f64 whatever the dtype.
    fn max_abs_diff64(a: &Tensor, b: &Tensor) -> f64 {
        (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        max_abs_diff64(a, b) as f32
    }

    #[test]
    fn layer_norm_is_exact_on_large_offsets() {
        // Rows with a large common offset: E[x^2] - mean^2 in f32 loses the variance here.
        let dev = Device::Cpu;
        let noise = Tensor::randn(0f64, 1.0, (4, 384), &dev).unwrap();
        let x64 = (noise + 300.0).unwrap();
        let w = Tensor::ones(384, DType::F64, &dev).unwrap();
        let b = Tensor::zeros(384, DType::F64, &dev).unwrap();
        let exact = layer_norm_differentiable(&x64, &w, &b, 1e-12).unwrap();
        let x32 = x64.to_dtype(DType::F32).unwrap();
        let (w32, b32) = (
            w.to_dtype(DType::F32).unwrap(),
            b.to_dtype(DType::F32).unwrap(),
        );
        let ours = LayerNorm::new(w32, b32, 1e-12).forward(&x32).unwrap();
        let diff = max_abs_diff(&ours, &exact.to_dtype(DType::F32).unwrap());
        assert!(diff < 1e-4, "max abs diff {diff}");
    }

    #[test]
    fn fused_and_differentiable_layer_norm_agree() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 3.0, (2, 5, 16), &dev).unwrap();
        let w = Tensor::randn(1f32, 0.1, 16, &dev).unwrap();
        let b = Tensor::randn(0f32, 0.1, 16, &dev).unwrap();
        let fused = LayerNorm::new(w.clone(), b.clone(), 1e-12)
            .forward(&x)
            .unwrap();
        let composed = layer_norm_differentiable(&x, &w, &b, 1e-12).unwrap();
        assert!(max_abs_diff(&fused, &composed) < 1e-5);
    }

    #[test]
    fn layer_norm_records_gradients_for_trainable_weights() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (3, 8), &dev).unwrap();
        let w = Var::ones(8, DType::F32, &dev).unwrap();
        let b = Var::zeros(8, DType::F32, &dev).unwrap();
        let ln = LayerNorm::new(w.as_tensor().clone(), b.as_tensor().clone(), 1e-5);
        let loss = ln.forward(&x).unwrap().sqr().unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        assert!(grads.get(w.as_tensor()).is_some());
        assert!(grads.get(b.as_tensor()).is_some());
    }

    /// Every fused CPU kernel against the same function written as composed candle ops: values
    /// and the gradients of a weighted sum (random weights, so no gradient is trivially zero),
    /// in f64 so the comparison is tight.
    #[test]
    fn fused_kernels_match_composed_ops_values_and_gradients() {
        let dev = Device::Cpu;
        let check = |name: &str,
                     inputs: &[&Var],
                     fused: &dyn Fn() -> Tensor,
                     composed: &dyn Fn() -> Tensor| {
            let (a, b) = (fused(), composed());
            let d = max_abs_diff64(&a, &b);
            assert!(d < 1e-10, "{name}: values differ by {d}\n{a}\n{b}");
            let weights = Tensor::randn(0f64, 1.0, a.shape(), &dev).unwrap();
            let ga = (a * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gb = (b * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for (i, v) in inputs.iter().enumerate() {
                let (x, y) = (
                    ga.get(v.as_tensor()).unwrap(),
                    gb.get(v.as_tensor()).unwrap(),
                );
                let diff = max_abs_diff64(x, y);
                assert!(
                    diff < 1e-9,
                    "{name}: gradient of input {i} differs by {diff}"
                );
            }
        };
        // LayerNorm, rows with a large offset.
        let x = Var::from_tensor(
            &(Tensor::randn(0f64, 2.0, (2, 3, 16), &dev).unwrap() + 50.0).unwrap(),
        )
        .unwrap();
        let w = Var::from_tensor(&Tensor::randn(1f64, 0.2, 16, &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f64, 0.2, 16, &dev).unwrap()).unwrap();
        let ln = LayerNorm::new(w.as_tensor().clone(), b.as_tensor().clone(), 1e-12);
        check(
            "layer norm",
            &[&x, &w, &b],
            &|| ln.forward(x.as_tensor()).unwrap(),
            &|| {
                layer_norm_differentiable(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-12)
                    .unwrap()
            },
        );
        // Linear: one GEMM onto the bias against matmul + broadcast add.
        let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (2, 3, 6), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f64, 1.0, (4, 6), &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f64, 1.0, 4, &dev).unwrap()).unwrap();
        let linear = Linear::new(w.as_tensor().clone(), Some(b.as_tensor().clone()));
        check(
            "linear",
            &[&x, &w, &b],
            &|| linear.forward(x.as_tensor()).unwrap(),
            &|| {
                x.as_tensor()
                    .broadcast_matmul(&w.as_tensor().t().unwrap())
                    .unwrap()
                    .broadcast_add(b.as_tensor())
                    .unwrap()
            },
        );
        // Linear then dropout as one kernel, against the layer and a dropout op.
        let output_dropout = Dropout::new(0.25).unwrap();
        check(
            "linear + dropout",
            &[&x, &w, &b],
            &|| {
                seed_dropout(4);
                linear
                    .forward_dropout(x.as_tensor(), Some(&output_dropout), true)
                    .unwrap()
            },
            &|| {
                seed_dropout(4);
                let y = x
                    .as_tensor()
                    .broadcast_matmul(&w.as_tensor().t().unwrap())
                    .unwrap()
                    .broadcast_add(b.as_tensor())
                    .unwrap();
                let mask = output_dropout
                    .forward(&Tensor::ones(y.shape(), DType::F64, &dev).unwrap(), true)
                    .unwrap();
                (y * mask).unwrap()
            },
        );
        // The fused attention core against split heads, matmuls, softmax and dropout.
        let (batch, seq, heads, head_dim) = (2, 5, 2, 3);
        let qkv: Vec<Var> = (0..3)
            .map(|_| {
                Var::from_tensor(
                    &Tensor::randn(0f64, 1.0, (batch, seq, heads * head_dim), &dev).unwrap(),
                )
                .unwrap()
            })
            .collect();
        let padding = Tensor::new(
            &[
                [0f64, 0., 0., 0., 0.],
                [0., 0., 0., f32::MIN as f64, f32::MIN as f64],
            ],
            &dev,
        )
        .unwrap()
        .reshape((batch, 1, 1, seq))
        .unwrap();
        let attention_dropout = Dropout::new(0.2).unwrap();
        let split = |t: &Tensor| {
            t.reshape((batch, seq, heads, head_dim))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        check(
            "attention",
            &[&qkv[0], &qkv[1], &qkv[2]],
            &|| {
                seed_dropout(9);
                let (t, _) = fused_attention(
                    qkv[0].as_tensor(),
                    qkv[1].as_tensor(),
                    qkv[2].as_tensor(),
                    heads,
                    Some(&padding),
                    Some(&attention_dropout),
                    false,
                )
                .unwrap()
                .unwrap();
                t
            },
            &|| {
                seed_dropout(9);
                let (q, k, v) = (
                    split(qkv[0].as_tensor()),
                    split(qkv[1].as_tensor()),
                    split(qkv[2].as_tensor()),
                );
                let scores = (q.matmul(&k.t().unwrap()).unwrap() / (head_dim as f64).sqrt())
                    .unwrap()
                    .broadcast_add(&padding)
                    .unwrap();
                let probs = candle_nn::ops::softmax(&scores, D::Minus1).unwrap();
                let mask = attention_dropout
                    .forward(
                        &Tensor::ones(probs.shape(), DType::F64, &dev).unwrap(),
                        true,
                    )
                    .unwrap();
                (probs * mask)
                    .unwrap()
                    .matmul(&v)
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .reshape((batch, seq, heads * head_dim))
                    .unwrap()
            },
        );
        // Attention softmax with a padding bias on the last keys of the second sequence.
        let scores =
            Var::from_tensor(&Tensor::randn(0f64, 3.0, (2, 3, 4, 5), &dev).unwrap()).unwrap();
        let bias = Tensor::new(
            &[
                [0f64, 0., 0., 0., 0.],
                [0., 0., 0., f32::MIN as f64, f32::MIN as f64],
            ],
            &dev,
        )
        .unwrap()
        .reshape((2, 1, 1, 5))
        .unwrap();
        check(
            "attention softmax",
            &[&scores],
            &|| attention_probabilities(scores.as_tensor(), Some(&bias), 0.5).unwrap(),
            &|| {
                let z = (scores.as_tensor() * 0.5)
                    .unwrap()
                    .broadcast_add(&bias)
                    .unwrap();
                candle_nn::ops::softmax(&z, D::Minus1).unwrap()
            },
        );
        // GELU: candle's own gelu_erf backward is 4e-7 off in f64 (its erf is approximate),
        // so the gradient is checked against central differences of the forward instead.
        let x = Var::from_tensor(&Tensor::randn(0f64, 2.0, (7, 9), &dev).unwrap()).unwrap();
        let gelu = |t: &Tensor| activation(HiddenAct::Gelu, t).unwrap();
        let values = gelu(x.as_tensor());
        assert!(max_abs_diff64(&values, &x.as_tensor().gelu_erf().unwrap()) < 1e-10);
        let grad = values.sum_all().unwrap().backward().unwrap();
        let h = 1e-5;
        let numeric = ((gelu(&(x.as_tensor() + h).unwrap()) - gelu(&(x.as_tensor() - h).unwrap()))
            .unwrap()
            / (2.0 * h))
            .unwrap();
        let diff = max_abs_diff64(grad.get(x.as_tensor()).unwrap(), &numeric);
        assert!(
            diff < 1e-8,
            "gelu: gradient off central differences by {diff}"
        );
        // Dropout: the same seed draws the same mask on both paths.
        let dropout = Dropout::new(0.3).unwrap();
        check(
            "dropout",
            &[&x],
            &|| {
                seed_dropout(5);
                dropout.forward(x.as_tensor(), true).unwrap()
            },
            &|| {
                seed_dropout(5);
                let kept = dropout
                    .forward(&Tensor::ones(x.shape(), DType::F64, &dev).unwrap(), true)
                    .unwrap();
                (x.as_tensor() * kept).unwrap()
            },
        );
        // Embedding lookup: ids repeat (their gradient rows add up) and some rows are never
        // looked up (their gradient is zero), in every id dtype.
        let table = Var::from_tensor(&Tensor::randn(0f64, 1.0, (7, 5), &dev).unwrap()).unwrap();
        let embedding = Embedding::new(table.as_tensor().clone());
        for dtype in [DType::U8, DType::U32, DType::I64] {
            let ids = Tensor::new(&[[3u32, 0, 3], [6, 3, 1]], &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            check(
                "embedding",
                &[&table],
                &|| embedding.forward(&ids).unwrap(),
                &|| {
                    table
                        .as_tensor()
                        .index_select(&ids.flatten_all().unwrap(), 0)
                        .unwrap()
                        .reshape((2, 3, 5))
                        .unwrap()
                },
            );
        }
    }

    /// The f32 inference kernel (softmax sums divided out of the `P V` rows) and the path
    /// that keeps the probabilities (rows normalised first) agree with each other and with
    /// the f64 kernel, with padding, at lengths around the 16-lane width.
    #[test]
    fn f32_inference_attention_matches_f64() {
        let dev = Device::Cpu;
        let (heads, head_dim) = (3, 8);
        let hidden = heads * head_dim;
        for (batch, seq) in [(2usize, 5usize), (1, 16), (3, 33)] {
            let qkv: Vec<Tensor> = (0..3)
                .map(|_| Tensor::randn(0f64, 2.0, (batch, seq, hidden), &dev).unwrap())
                .collect();
            let padding: Vec<f64> = (0..batch * seq)
                .map(|i| {
                    if i % seq >= seq - (i / seq) {
                        f32::MIN as f64
                    } else {
                        0.0
                    }
                })
                .collect();
            let padding = Tensor::from_vec(padding, (batch, 1, 1, seq), &dev).unwrap();
            let run = |dtype: DType, want_probs: bool| {
                let t: Vec<Tensor> = qkv.iter().map(|t| t.to_dtype(dtype).unwrap()).collect();
                let bias = padding.to_dtype(dtype).unwrap();
                fused_attention(&t[0], &t[1], &t[2], heads, Some(&bias), None, want_probs)
                    .unwrap()
                    .unwrap()
                    .0
            };
            let exact = run(DType::F64, false);
            let divided = run(DType::F32, false);
            let normalised = run(DType::F32, true);
            let d1 = max_abs_diff64(&divided, &exact);
            let d2 = max_abs_diff64(&normalised, &exact);
            assert!(d1 < 1e-5 && d2 < 1e-5, "{batch} x {seq}: {d1} / {d2}");
        }
    }

    #[test]
    fn dropout_only_in_training() {
        let x = Tensor::ones((1000,), DType::F32, &Device::Cpu).unwrap();
        let d = Dropout::new(0.5).unwrap();
        let eval = d.forward(&x, false).unwrap();
        assert_eq!(max_abs_diff(&eval, &x), 0.0);
        let train = d.forward(&x, true).unwrap().to_vec1::<f32>().unwrap();
        let zeros = train.iter().filter(|&&v| v == 0.0).count();
        assert!((300..700).contains(&zeros), "{zeros} of 1000 dropped");
        assert!(train.iter().all(|&v| v == 0.0 || (v - 2.0).abs() < 1e-6));
        assert!(Dropout::new(1.0).is_err());
    }

    #[test]
    fn dropout_masks_follow_the_seed() {
        let x = Tensor::ones((64,), DType::F32, &Device::Cpu).unwrap();
        let d = Dropout::new(0.3).unwrap();
        seed_dropout(7);
        let a = d.forward(&x, true).unwrap().to_vec1::<f32>().unwrap();
        let b = d.forward(&x, true).unwrap().to_vec1::<f32>().unwrap();
        seed_dropout(7);
        let again = d.forward(&x, true).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a, again);
        assert_ne!(a, b);
    }

    #[test]
    fn linear_matches_matmul() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (4, 3), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 4, &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 5, 3), &dev).unwrap();
        let y = Linear::new(w.clone(), Some(b.clone())).forward(&x).unwrap();
        assert_eq!(y.dims(), &[2, 5, 4]);
        let expected = x
            .broadcast_matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        assert!(max_abs_diff(&y, &expected) < 1e-5);
    }

    /// The inference layout (weight stored `[in, out]`) gives the checkpoint layout's outputs,
    /// across the GEMM's small-batch and large-batch paths (and, in f32, the panel kernel for
    /// few rows) and sizes that are not multiples of their register tiles, in f64 (tight) and
    /// f32; a weight of any other striding is refused.
    #[test]
    fn inference_layout_matches_checkpoint_layout() {
        let dev = Device::Cpu;
        for (rows, in_dim, out_dim) in [(1, 384, 1536), (16, 384, 384), (300, 37, 53), (7, 5, 1)] {
            for dtype in [DType::F64, DType::F32] {
                let w = Tensor::randn(0f64, 1.0, (out_dim, in_dim), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let b = Tensor::randn(0f64, 1.0, out_dim, &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let x = Tensor::randn(0f64, 1.0, (rows, in_dim), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let stored = Linear::new(w, Some(b));
                let mut transposed = stored.clone();
                transposed.use_inference_layout().unwrap();
                // Idempotent: a second call keeps the layout.
                transposed.use_inference_layout().unwrap();
                if out_dim > 1 {
                    assert_eq!(transposed.weight().stride(), [1, out_dim]);
                }
                assert_eq!(transposed.weight().dims(), [out_dim, in_dim]);
                let (a, c) = (stored.forward(&x).unwrap(), transposed.forward(&x).unwrap());
                let tolerance = if dtype == DType::F64 { 1e-12 } else { 1e-4 };
                let d = max_abs_diff64(&a, &c);
                assert!(d < tolerance, "{rows}x{in_dim}x{out_dim} {dtype:?}: {d}");
            }
        }
        // A weight that is a strided slice of a wider one (neither layout) is copied, not misread.
        let wide = Tensor::randn(0f32, 1.0, (6, 8), &dev).unwrap();
        let w = wide.narrow(1, 2, 3).unwrap();
        let b = Tensor::zeros(6, DType::F32, &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 3), &dev).unwrap();
        let y = Linear::new(w.clone(), Some(b)).forward(&x).unwrap();
        let expected = x.matmul(&w.t().unwrap()).unwrap();
        assert!(max_abs_diff(&y, &expected) < 1e-5);
    }

    /// The GELU fused into the linear kernel gives the layer-then-activation values, in both
    /// weight layouts and (f32) through the small-batch panel kernel as well as the GEMM; a
    /// weight that tracks gradients takes the unfused path (which has a backward).
    #[test]
    fn fused_gelu_matches_linear_then_activation() {
        let dev = Device::Cpu;
        for (dtype, rows) in [(DType::F64, 70), (DType::F32, 70), (DType::F32, 9)] {
            let w = Tensor::randn(0f64, 1.0, (48, 20), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let b = Tensor::randn(0f64, 1.0, 48, &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let x = Tensor::randn(0f64, 1.0, (3, rows, 20), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let mut linear = Linear::new(w.clone(), Some(b.clone()));
            let expected = activation(HiddenAct::Gelu, &linear.forward(&x).unwrap()).unwrap();
            let tolerance = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
            for _ in 0..2 {
                let fused = linear.forward_activation(&x, HiddenAct::Gelu).unwrap();
                let d = max_abs_diff64(&fused, &expected);
                assert!(d < tolerance, "{dtype:?} {rows}: {d}");
                linear.use_inference_layout().unwrap();
            }
            let relu = linear.forward_activation(&x, HiddenAct::Relu).unwrap();
            assert!(
                max_abs_diff64(&relu, &linear.forward(&x).unwrap().relu().unwrap()) < tolerance
            );
        }
        let w = Var::randn(0f32, 1.0, (8, 4), &dev).unwrap();
        let b = Var::randn(0f32, 1.0, 8, &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (5, 4), &dev).unwrap();
        let linear = Linear::new(w.as_tensor().clone(), Some(b.as_tensor().clone()));
        let y = linear.forward_activation(&x, HiddenAct::Gelu).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(w.as_tensor()).is_some());
    }

    /// The residual started from inside the linear kernel gives `linear(x) + residual`, in
    /// both weight layouts, through the panel kernel (f32, few rows), the GEMM and the
    /// parallel row fill (over 64K outputs); a residual of another shape is an error, and a
    /// weight that tracks gradients takes the composed path, which has a backward.
    #[test]
    fn fused_residual_matches_linear_plus_residual() {
        let dev = Device::Cpu;
        for (dtype, rows) in [(DType::F64, 70), (DType::F32, 700), (DType::F32, 9)] {
            let randn = |shape: &[usize]| {
                Tensor::randn(0f64, 1.0, shape, &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            };
            let (w, b, x, residual) = (
                randn(&[48, 20]),
                randn(&[48]),
                randn(&[3, rows, 20]),
                randn(&[3, rows, 48]),
            );
            let mut linear = Linear::new(w, Some(b));
            let expected = (linear.forward(&x).unwrap() + &residual).unwrap();
            let tolerance = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
            for _ in 0..2 {
                let fused = linear.forward_residual(&x, &residual).unwrap();
                let d = max_abs_diff64(&fused, &expected);
                assert!(d < tolerance, "{dtype:?} {rows}: {d}");
                linear.use_inference_layout().unwrap();
            }
            let wrong = randn(&[3, rows, 47]);
            let err = linear.forward_residual(&x, &wrong).unwrap_err().to_string();
            assert!(err.contains("residual"), "{err}");
        }
        let w = Var::randn(0f32, 1.0, (8, 4), &dev).unwrap();
        let b = Var::randn(0f32, 1.0, 8, &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (5, 4), &dev).unwrap();
        let residual = Tensor::randn(0f32, 1.0, (5, 8), &dev).unwrap();
        let linear = Linear::new(w.as_tensor().clone(), Some(b.as_tensor().clone()));
        let y = linear.forward_residual(&x, &residual).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(w.as_tensor()).is_some());
    }

    /// Panels are packed for a weight stored transposed, not for a strided view into a larger
    /// block (fused query/key/value), and `use_inference_layout` does both halves.
    #[test]
    fn panels_only_for_weights_stored_transposed() {
        if !crate::panel_gemm::PanelWeights::available() {
            return;
        }
        let dev = Device::Cpu;
        let block = Tensor::randn(0f32, 1.0, (20, 3 * 48), &dev).unwrap();
        let mut view = Linear::new(block.narrow(1, 48, 48).unwrap().t().unwrap(), None);
        view.pack_for_small_batches().unwrap();
        assert!(view.panels.is_none());
        let mut plain = Linear::new(Tensor::randn(0f32, 1.0, (48, 20), &dev).unwrap(), None);
        plain.pack_for_small_batches().unwrap();
        assert!(plain.panels.is_none(), "not yet stored transposed");
        plain.store_transposed().unwrap();
        plain.pack_for_small_batches().unwrap();
        assert!(plain.panels.is_some());
        let mut both = Linear::new(Tensor::randn(0f32, 1.0, (48, 20), &dev).unwrap(), None);
        both.use_inference_layout().unwrap();
        assert!(both.panels.is_some());
    }
}
