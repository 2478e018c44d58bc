//! The fused epilogues on CUDA (`src/cuda/epilogues.cu`, compiled to PTX by `build.rs`): for
//! inference in f32, f16 and bf16, `gelu(x + bias)` after the intermediate projection and
//! `LayerNorm(x + bias + residual)` after the output projections (and the embeddings' plain
//! LayerNorm), one pass each where candle's ops take two and about ten. Their logic is checked
//! on the CPU by the test suite (`tests/cuda_emulation/`) and on a GPU by `bert selftest
//! --device cuda`, against the plain path.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp3, DType, Layout, Shape, Tensor, WithDType,
};

use crate::cuda_launch::{arg_or_null, storage_view, to_i32, wrap, Held};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/epilogues.ptx"));
const MODULE: &str = "bert_epilogues";
/// The kernels' block shape (epilogues.cu): 128 threads, a warp per LayerNorm row.
const THREADS: usize = 128;
const WARPS: usize = THREADS / 32;
/// LayerNorm builds: registers a lane, so rows of up to 32 x this many elements.
const PER_LANE_BUILDS: [usize; 6] = [4, 8, 12, 16, 24, 32];

/// The smallest of `builds` (registers a lane, warp-per-row kernels) whose warp holds a row of
/// `width` values: `None` for an empty row or one wider than the largest build.
fn per_lane_build(builds: &[usize], width: usize) -> Option<usize> {
    builds
        .iter()
        .copied()
        .find(|&registers| width > 0 && 32 * registers >= width)
}

/// Whether every tensor is on `x`'s CUDA device in its dtype, an f32, f16 or bf16 one, and
/// none tracks a gradient (the kernels have no backward).
fn applies(x: &Tensor, others: &[&Tensor]) -> bool {
    x.device().is_cuda()
        && matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16)
        && !x.track_op()
        && others
            .iter()
            .all(|t| t.dtype() == x.dtype() && t.device().same_device(x.device()) && !t.track_op())
}

/// The kernel's name for `dtype`: `{base}_f32`, `_f16` or `_bf16`.
fn kernel_name(base: &str, dtype: DType) -> String {
    format!("{base}_{}", format!("{dtype:?}").to_lowercase())
}

fn grid(blocks: usize) -> candle_core::Result<LaunchConfig> {
    let blocks = u32::try_from(blocks)
        .ok()
        .filter(|&b| b <= i32::MAX as u32)
        .ok_or_else(|| candle_core::Error::Msg(format!("{blocks} blocks exceed the grid")))?;
    Ok(LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// `gelu(x + bias)` (erf form) for `x: [.., cols]` and `bias: [cols]` on CUDA; `None` where the
/// kernel does not apply (see [`applies`]; also `cols` a multiple of one 16-byte vector).
pub(crate) fn bias_gelu(x: &Tensor, bias: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let cols = x.dims().last().copied().unwrap_or(0);
    let vector = 16 / x.dtype().size_in_bytes();
    if !applies(x, &[bias]) || bias.dims() != [cols] || cols == 0 || !cols.is_multiple_of(vector) {
        return Ok(None);
    }
    let (x, bias) = (x.contiguous()?, bias.contiguous()?);
    // 16-byte loads: the element offset of x's start must be a whole vector.
    if !x.layout().start_offset().is_multiple_of(vector) {
        return Ok(None);
    }
    let out = match x.dtype() {
        DType::F32 => launch_bias_gelu::<f32>(&x, &bias, vector)?,
        DType::F16 => launch_bias_gelu::<half::f16>(&x, &bias, vector)?,
        _ => launch_bias_gelu::<half::bf16>(&x, &bias, vector)?,
    };
    Ok(Some(out))
}

/// The launch, `vector` elements a thread.
fn launch_bias_gelu<T: CudaDType + DeviceRepr>(
    x: &Tensor,
    bias: &Tensor,
    vector: usize,
) -> candle_core::Result<Tensor> {
    let (held_x, held_bias) = (Held::new(x), Held::new(bias));
    let device = held_x.cuda()?.device.clone();
    let func = device.get_or_load_custom_func(&kernel_name("bias_gelu", x.dtype()), MODULE, PTX)?;
    let total = x.elem_count();
    let cols = to_i32(bias.elem_count())?;
    let total_u64 = total as u64;
    // SAFETY: the kernel writes every element (one 16-byte vector a thread, total a multiple).
    let out = unsafe { device.alloc::<T>(total)? };
    let (x_view, bias_view) = (held_x.view::<T>()?, held_bias.view::<T>()?);
    let mut builder = func.builder();
    builder.arg(&x_view);
    builder.arg(&bias_view);
    builder.arg(&out);
    builder.arg(&total_u64);
    builder.arg(&cols);
    // SAFETY: the arguments match the kernel's signature; sizes and alignment were checked.
    unsafe { builder.launch(grid(total.div_ceil(THREADS * vector))?) }.w()?;
    Ok(wrap(out, &device, x.dims()))
}

/// `LayerNorm(x + bias + residual) * gamma + beta` over the last dimension on CUDA, `bias`
/// (`[hidden]`) and `residual` (shaped as `x`) optional; `None` where the kernel does not apply
/// (see [`applies`]; also rows of more than 1024 elements).
pub(crate) fn residual_layer_norm(
    x: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    (gamma, beta): (&Tensor, &Tensor),
    eps: f64,
) -> candle_core::Result<Option<Tensor>> {
    let hidden = x.dims().last().copied().unwrap_or(0);
    let mut others = vec![gamma, beta];
    others.extend(bias);
    others.extend(residual);
    let per_lane = per_lane_build(&PER_LANE_BUILDS, hidden);
    let shapes_fit = gamma.dims() == [hidden]
        && beta.dims() == [hidden]
        && bias.is_none_or(|b| b.dims() == [hidden])
        && residual.is_none_or(|r| r.dims() == x.dims());
    let (Some(per_lane), true, true) = (per_lane, shapes_fit, applies(x, &others)) else {
        return Ok(None);
    };
    let x = x.contiguous()?;
    let bias = bias.map(Tensor::contiguous).transpose()?;
    let residual = residual.map(Tensor::contiguous).transpose()?;
    let (gamma, beta) = (gamma.contiguous()?, beta.contiguous()?);
    let inputs = LayerNormInputs {
        x: &x,
        bias: bias.as_ref(),
        residual: residual.as_ref(),
        gamma: &gamma,
        beta: &beta,
    };
    let out = match x.dtype() {
        DType::F32 => inputs.launch::<f32>(per_lane, eps)?,
        DType::F16 => inputs.launch::<half::f16>(per_lane, eps)?,
        _ => inputs.launch::<half::bf16>(per_lane, eps)?,
    };
    Ok(Some(out))
}

/// The contiguous inputs of one residual LayerNorm launch.
struct LayerNormInputs<'a> {
    x: &'a Tensor,
    bias: Option<&'a Tensor>,
    residual: Option<&'a Tensor>,
    gamma: &'a Tensor,
    beta: &'a Tensor,
}

impl LayerNormInputs<'_> {
    fn launch<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        per_lane: usize,
        eps: f64,
    ) -> candle_core::Result<Tensor> {
        let held_x = Held::new(self.x);
        let held_bias = self.bias.map(Held::new);
        let held_residual = self.residual.map(Held::new);
        let (held_gamma, held_beta) = (Held::new(self.gamma), Held::new(self.beta));
        let device = held_x.cuda()?.device.clone();
        let views = LayerNormViews {
            x: held_x.view::<T>()?,
            bias: held_bias.as_ref().map(Held::view::<T>).transpose()?,
            residual: held_residual.as_ref().map(Held::view::<T>).transpose()?,
            gamma: held_gamma.view::<T>()?,
            beta: held_beta.view::<T>()?,
        };
        let out = views.launch(&device, per_lane, eps)?;
        Ok(wrap(out, &device, self.x.dims()))
    }
}

/// The device memory one residual LayerNorm launch reads: `x` (and `residual`) `[rows,
/// hidden]`, `bias`, `gamma`, `beta` `[hidden]`.
struct LayerNormViews<'a, T> {
    x: CudaView<'a, T>,
    bias: Option<CudaView<'a, T>>,
    residual: Option<CudaView<'a, T>>,
    gamma: CudaView<'a, T>,
    beta: CudaView<'a, T>,
}

impl<T: CudaDType + DeviceRepr + WithDType> LayerNormViews<'_, T> {
    fn launch(
        &self,
        device: &CudaDevice,
        per_lane: usize,
        eps: f64,
    ) -> candle_core::Result<CudaSlice<T>> {
        let hidden = self.gamma.len();
        let rows = self.x.len() / hidden.max(1);
        if hidden == 0
            || self.x.len() != rows * hidden
            || self.beta.len() != hidden
            || self.bias.as_ref().is_some_and(|b| b.len() != hidden)
            || self
                .residual
                .as_ref()
                .is_some_and(|r| r.len() != self.x.len())
            || 32 * per_lane < hidden
        {
            candle_core::bail!("residual LayerNorm kernel: sizes do not fit")
        }
        let name = kernel_name("residual_layer_norm", T::DTYPE);
        let func = device.get_or_load_custom_func(&format!("{name}_{per_lane}"), MODULE, PTX)?;
        // SAFETY: the kernel writes every element of every row.
        let out = unsafe { device.alloc::<T>(rows * hidden)? };
        let (rows_i32, hidden_i32, eps) = (to_i32(rows)?, to_i32(hidden)?, eps as f32);
        let mut builder = func.builder();
        builder.arg(&self.x);
        arg_or_null(&mut builder, self.bias.as_ref());
        arg_or_null(&mut builder, self.residual.as_ref());
        builder.arg(&self.gamma);
        builder.arg(&self.beta);
        builder.arg(&out);
        builder.arg(&rows_i32);
        builder.arg(&hidden_i32);
        builder.arg(&eps);
        // SAFETY: the arguments match the kernel's signature; every size was checked above
        // against `[rows, hidden]`, and `hidden` fits this build's registers.
        unsafe { builder.launch(grid(rows.div_ceil(WARPS))?) }.w()?;
        Ok(out)
    }
}

/// LayerNorm over the last dimension of an f32 `x` on CUDA, recording a gradient, for
/// training (`nn::LayerNorm` where something tracks one): the forward is the
/// `residual_layer_norm` kernel, the backward the `layer_norm_backward` kernel plus two column
/// sums (gamma's and beta's gradients), where composed ops take about thirty launches. `None`
/// where it does not apply (not CUDA, not all f32 on one device, shapes, rows over 1024).
pub(crate) fn layer_norm_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> candle_core::Result<Option<Tensor>> {
    let hidden = x.dims().last().copied().unwrap_or(0);
    let per_lane = per_lane_build(&PER_LANE_BUILDS, hidden);
    let applies = x.device().is_cuda()
        && [x, gamma, beta]
            .iter()
            .all(|t| t.dtype() == DType::F32 && t.device().same_device(x.device()))
        && gamma.dims() == [hidden]
        && beta.dims() == [hidden];
    let (Some(per_lane), true) = (per_lane, applies) else {
        return Ok(None);
    };
    let op = LayerNormTrainOp { eps, per_lane };
    Ok(Some(x.contiguous()?.apply_op3(
        &gamma.contiguous()?,
        &beta.contiguous()?,
        op,
    )?))
}

/// See [`layer_norm_train`].
struct LayerNormTrainOp {
    eps: f64,
    per_lane: usize,
}

impl CustomOp3 for LayerNormTrainOp {
    fn name(&self) -> &'static str {
        "bert-layer-norm-cuda"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("{}: runs on CUDA only", self.name())
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        x_layout: &Layout,
        gamma: &CudaStorage,
        gamma_layout: &Layout,
        beta: &CudaStorage,
        beta_layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let views = LayerNormViews {
            x: storage_view::<f32>(x, x_layout)?,
            bias: None,
            residual: None,
            gamma: storage_view::<f32>(gamma, gamma_layout)?,
            beta: storage_view::<f32>(beta, beta_layout)?,
        };
        let device = x.device().clone();
        let out = views.launch(&device, self.per_lane, self.eps)?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, device),
            x_layout.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let hidden = gamma.elem_count();
        let rows = x.elem_count() / hidden;
        let dy = dy.to_dtype(DType::F32)?.contiguous()?;
        let (held_x, held_dy, held_gamma) = (Held::new(x), Held::new(&dy), Held::new(gamma));
        let device = held_x.cuda()?.device.clone();
        let func = device.get_or_load_custom_func(
            &format!("layer_norm_backward_f32_{}", self.per_lane),
            MODULE,
            PTX,
        )?;
        // SAFETY: the kernel writes every element of both (each row's every column).
        let dx = unsafe { device.alloc::<f32>(rows * hidden)? };
        let dy_xhat = unsafe { device.alloc::<f32>(rows * hidden)? };
        let (x_view, dy_view) = (held_x.view::<f32>()?, held_dy.view::<f32>()?);
        let gamma_view = held_gamma.view::<f32>()?;
        if x_view.len() != rows * hidden || dy_view.len() != rows * hidden {
            candle_core::bail!("{}: gradient and input sizes differ", self.name())
        }
        let (rows_i32, hidden_i32, eps) = (to_i32(rows)?, to_i32(hidden)?, self.eps as f32);
        let mut builder = func.builder();
        builder.arg(&x_view);
        builder.arg(&dy_view);
        builder.arg(&gamma_view);
        builder.arg(&dx);
        builder.arg(&dy_xhat);
        builder.arg(&rows_i32);
        builder.arg(&hidden_i32);
        builder.arg(&eps);
        // SAFETY: the arguments match the kernel's signature; x, dy, dx and dy_xhat hold
        // `[rows, hidden]` f32 and gamma `[hidden]`, which fits this build's registers.
        unsafe { builder.launch(grid(rows.div_ceil(WARPS))?) }.w()?;
        let dx = wrap(dx, &device, x.dims());
        let dgamma = wrap(dy_xhat, &device, &[rows, hidden]).sum(0)?;
        let dbeta = dy.reshape((rows, hidden))?.sum(0)?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

/// Rows the attention softmax kernels take: up to 32 x this many keys.
const SOFTMAX_PER_LANE_BUILDS: [usize; 5] = [1, 2, 4, 8, 16];

/// The attention softmax kernels' build for rows of `keys`: `None` past 512 keys.
pub(crate) fn softmax_per_lane(keys: usize) -> Option<usize> {
    per_lane_build(&SOFTMAX_PER_LANE_BUILDS, keys)
}

/// `softmax(scale * x + bias)` on CUDA for f32 scores `x` (`[batch, .., keys]`, contiguous) and
/// a `[batch, keys]` bias: the `attention_softmax` kernel, for `kernels::AttentionSoftmaxOp`.
pub(crate) fn attention_softmax(
    (x, x_layout): (&CudaStorage, &Layout),
    (bias, bias_layout): (&CudaStorage, &Layout),
    scale: f64,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let keys = x_layout.dims().last().copied().unwrap_or(0);
    let (x_view, bias_view) = (
        storage_view::<f32>(x, x_layout)?,
        storage_view::<f32>(bias, bias_layout)?,
    );
    let Some(per_lane) = softmax_per_lane(keys) else {
        candle_core::bail!("attention softmax kernel: rows of {keys} keys are not built")
    };
    let (rows, batch) = (x_view.len() / keys, bias_view.len() / keys);
    if batch == 0
        || bias_view.len() != batch * keys
        || x_view.len() != rows * keys
        || rows % batch != 0
    {
        candle_core::bail!(
            "attention softmax kernel: scores {:?} and bias {:?} do not fit",
            x_layout.dims(),
            bias_layout.dims()
        )
    }
    let device = x.device().clone();
    let func = device.get_or_load_custom_func(
        &format!("attention_softmax_f32_{per_lane}"),
        MODULE,
        PTX,
    )?;
    // SAFETY: the kernel writes every element of every row.
    let out = unsafe { device.alloc::<f32>(rows * keys)? };
    let (rows_i32, keys_i32) = (to_i32(rows)?, to_i32(keys)?);
    let (per_sequence, scale) = (to_i32(rows / batch)?, scale as f32);
    let mut builder = func.builder();
    builder.arg(&x_view);
    builder.arg(&bias_view);
    builder.arg(&out);
    builder.arg(&rows_i32);
    builder.arg(&keys_i32);
    builder.arg(&per_sequence);
    builder.arg(&scale);
    // SAFETY: the arguments match the kernel's signature; x and out hold `[rows, keys]` f32,
    // bias `[batch, keys]`, and `keys` fits this build's registers.
    unsafe { builder.launch(grid(rows.div_ceil(WARPS))?) }.w()?;
    Ok((
        CudaStorage::wrap_cuda_slice(out, device),
        x_layout.shape().clone(),
    ))
}

/// The scores' gradient `scale * y * (dy - sum(dy * y))` on CUDA from [`attention_softmax`]'s
/// output `y` and its gradient `dy` (f32, contiguous, the same shape).
pub(crate) fn attention_softmax_backward(
    (y, y_layout): (&CudaStorage, &Layout),
    (dy, dy_layout): (&CudaStorage, &Layout),
    scale: f64,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let keys = y_layout.dims().last().copied().unwrap_or(0);
    let (y_view, dy_view) = (
        storage_view::<f32>(y, y_layout)?,
        storage_view::<f32>(dy, dy_layout)?,
    );
    let Some(per_lane) = softmax_per_lane(keys) else {
        candle_core::bail!("attention softmax kernel: rows of {keys} keys are not built")
    };
    let rows = y_view.len() / keys;
    if dy_view.len() != y_view.len() || y_view.len() != rows * keys {
        candle_core::bail!(
            "attention softmax backward: y {:?} and dy {:?} differ",
            y_layout.dims(),
            dy_layout.dims()
        )
    }
    let device = y.device().clone();
    let func = device.get_or_load_custom_func(
        &format!("attention_softmax_backward_f32_{per_lane}"),
        MODULE,
        PTX,
    )?;
    // SAFETY: the kernel writes every element of every row.
    let dx = unsafe { device.alloc::<f32>(rows * keys)? };
    let (rows_i32, keys_i32, scale) = (to_i32(rows)?, to_i32(keys)?, scale as f32);
    let mut builder = func.builder();
    builder.arg(&y_view);
    builder.arg(&dy_view);
    builder.arg(&dx);
    builder.arg(&rows_i32);
    builder.arg(&keys_i32);
    builder.arg(&scale);
    // SAFETY: the arguments match the kernel's signature; y, dy and dx hold `[rows, keys]` f32
    // and `keys` fits this build's registers.
    unsafe { builder.launch(grid(rows.div_ceil(WARPS))?) }.w()?;
    Ok((
        CudaStorage::wrap_cuda_slice(dx, device),
        y_layout.shape().clone(),
    ))
}

/// Dropout's mask for `x` on CUDA, in its dtype and shape: `scale` where kept, 0 where
/// dropped, element i kept when draw i + 1 of the SplitMix64 stream at `state` is at least
/// `p` (the flags the CPU draws from that stream). A constant: no gradient of its own.
pub(crate) fn dropout_mask(
    x: &Tensor,
    state: u64,
    p: f32,
    scale: f32,
) -> candle_core::Result<Tensor> {
    let Some(device) = (match x.device() {
        candle_core::Device::Cuda(device) => Some(device.clone()),
        _ => None,
    }) else {
        candle_core::bail!("dropout_mask: not a CUDA tensor")
    };
    match x.dtype() {
        DType::F32 => launch_dropout_mask::<f32>(&device, x.dims(), state, p, scale),
        DType::F16 => launch_dropout_mask::<half::f16>(&device, x.dims(), state, p, scale),
        DType::BF16 => launch_dropout_mask::<half::bf16>(&device, x.dims(), state, p, scale),
        other => candle_core::bail!("dropout_mask: {other:?} is not f32, f16 or bf16"),
    }
}

fn launch_dropout_mask<T: CudaDType + DeviceRepr + WithDType>(
    device: &CudaDevice,
    shape: &[usize],
    state: u64,
    p: f32,
    scale: f32,
) -> candle_core::Result<Tensor> {
    let total = shape.iter().product::<usize>();
    if total == 0 {
        return Tensor::zeros(shape, T::DTYPE, &candle_core::Device::Cuda(device.clone()));
    }
    let func =
        device.get_or_load_custom_func(&kernel_name("dropout_mask", T::DTYPE), MODULE, PTX)?;
    // SAFETY: the kernel writes every element, one a thread.
    let out = unsafe { device.alloc::<T>(total)? };
    let total_u64 = total as u64;
    let mut builder = func.builder();
    builder.arg(&out);
    builder.arg(&total_u64);
    builder.arg(&state);
    builder.arg(&p);
    builder.arg(&scale);
    // SAFETY: the arguments match the kernel's signature; it writes `total` elements.
    unsafe { builder.launch(grid(total.div_ceil(THREADS))?) }.w()?;
    Ok(wrap(out, device, shape))
}
