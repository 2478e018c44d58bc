//! Linear layers (`nn.Linear`) with optional LoRA adapters, and the walk over a model's named
//! linears.

use super::*;

/// `y = x W^T + b`, HF's `nn.Linear` (weight `[out, in]`), optionally with a LoRA adapter
/// (PEFT's `lora.Linear`): `y = x W^T + b + scaling * dropout(x) A^T B^T`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    adapter: Option<LoraAdapter>,
    /// The weight packed into panels on the CPU (f32, AVX-512 or AVX2; see
    /// [`Linear::use_inference_layout`]); `None` elsewhere.
    pub(super) panels: Option<std::sync::Arc<crate::panel_gemm::PanelWeights>>,
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
    /// removes it: the same outputs in inference, at a plain linear's cost. The merged weight
    /// is detached from any gradient. On the CPU (f32 or f64) it is made as one new tensor,
    /// stored transposed (as [`Linear::store_transposed`] would leave it); elsewhere it
    /// is made with tensor ops, in the weight's layout.
    pub fn merge_adapter(&mut self) -> Result<()> {
        if let Some(adapter) = self.adapter.take() {
            let merged = crate::kernels::merge_low_rank_transposed(
                &self.weight,
                &adapter.a,
                &adapter.b,
                adapter.scaling,
            )?;
            self.weight = match merged {
                Some(merged) => merged,
                None => {
                    let delta = adapter.delta_weight()?.to_dtype(self.weight.dtype())?;
                    (self.weight.detach() + delta.detach())?
                }
            };
            self.panels = None;
        }
        Ok(())
    }

    /// Stores the weight transposed (`[in, out]` in memory, still seen as `[out, in]`), the
    /// layout the CPU kernel multiplies by without repacking it on every call (that repacking
    /// was two thirds of a 1 x 16 forward pass). For inference: the transposed copy replaces
    /// the weight, so it is detached from any gradient; a weight already in that layout is left
    /// as is. An f32 weight on a CPU with AVX-512 or AVX2 and FMA is also packed into panels
    /// (`panel_gemm`: the weight read in address order; a second copy of it), used for every
    /// f32 product.
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
    /// transposed (on a CPU with AVX-512, or AVX2 and FMA; the name dates from the first
    /// AVX-512 kernel, used for small batches only). A weight that is a strided view into a larger
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
                (norm.weight(), norm.bias()),
                norm.eps(),
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
    pub(crate) fn gpu_epilogue_applies(&self, x: &Tensor) -> bool {
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
    pub(crate) fn product_without_bias(&self, x: &Tensor) -> candle_core::Result<Tensor> {
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

    /// This layer's AVX-512 panels and bias, for a fused inference block over `x`: `Some`
    /// where the inference kernel applies, `x` is f32 and the weight is packed for the AVX-512
    /// kernel.
    pub(super) fn avx512_panels(
        &self,
        x: &Tensor,
    ) -> Option<(&std::sync::Arc<crate::panel_gemm::PanelWeights>, &Tensor)> {
        if x.dtype() != DType::F32 || !self.inference_kernel_applies(x) {
            return None;
        }
        let panels = self.panels.as_ref().filter(|p| p.is_avx512())?;
        Some((panels, self.bias.as_ref()?))
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

/// BERT's feed-forward block for inference, `norm(output(act(intermediate(x))) + x)`, in one
/// CPU kernel where it applies: f32 on the CPU, the erf GELU, both layers with a bias, no
/// adapter, packed into panels (AVX-512), nothing tracking a gradient, and a batch of at
/// least 192 rows (four of the kernel's blocks of 48; fewer would leave threads idle, where the
/// layers' own kernels share every product out). The kernel runs both products, the GELU,
/// the residual and the norm block of rows by block of rows, so the
/// `[rows, 4 hidden]` activations never leave L2. `None` where it does not apply: the caller
/// runs the layers.
pub fn fused_feed_forward(
    x: &Tensor,
    intermediate: &Linear,
    act: HiddenAct,
    output: &Linear,
    norm: &LayerNorm,
) -> candle_core::Result<Option<Tensor>> {
    let rows = x.elem_count() / x.dims().last().copied().unwrap_or(1).max(1);
    let applies = act == HiddenAct::Gelu
        && rows >= crate::kernels::FeedForwardOp::MIN_ROWS
        && norm.fits_fused_block();
    let (Some((p1, b1)), Some((p2, b2)), true) = (
        intermediate.avx512_panels(x),
        output.avx512_panels(x),
        applies,
    ) else {
        return Ok(None);
    };
    let op = crate::kernels::FeedForwardOp {
        intermediate: p1.clone(),
        intermediate_bias: b1.to_vec1()?,
        output: output_norm(p2, b2, norm)?,
    };
    x.contiguous()?.apply_op1_no_bwd(&op).map(Some)
}

/// The output tail of a fused block: a dense layer's panels and bias, and the norm after it.
pub(super) fn output_norm(
    panels: &std::sync::Arc<crate::panel_gemm::PanelWeights>,
    bias: &Tensor,
    norm: &LayerNorm,
) -> candle_core::Result<crate::kernels::OutputNorm> {
    Ok(crate::kernels::OutputNorm {
        dense: panels.clone(),
        bias: bias.to_vec1()?,
        norm_weight: norm.weight().to_vec1()?,
        norm_bias: norm.bias().to_vec1()?,
        eps: norm.eps(),
    })
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
