//! The fused epilogues on CUDA (`src/cuda/epilogues.cu`, compiled to PTX by `build.rs`): for
//! inference in f32, f16 and bf16, `gelu(x + bias)` after the intermediate projection and
//! `LayerNorm(x + bias + residual)` after the output projections (and the embeddings' plain
//! LayerNorm), one pass each where candle's ops take two and about ten. Their logic is checked
//! on the CPU by the test suite (`tests/cuda_emulation/`) and on a GPU by `bert selftest
//! --device cuda`, against the plain path.

use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaDevice, DType, Tensor};

use crate::cuda_launch::{arg_or_null, to_i32, wrap, Held};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/epilogues.ptx"));
const MODULE: &str = "bert_epilogues";
/// The kernels' block shape (epilogues.cu): 128 threads, a warp per LayerNorm row.
const THREADS: usize = 128;
const WARPS: usize = THREADS / 32;
/// LayerNorm builds: registers a lane, so rows of up to 32 x this many elements.
const PER_LANE_BUILDS: [usize; 6] = [4, 8, 12, 16, 24, 32];

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
    let per_lane = PER_LANE_BUILDS
        .into_iter()
        .find(|&registers| 32 * registers >= hidden);
    let shapes_fit = gamma.dims() == [hidden]
        && beta.dims() == [hidden]
        && bias.is_none_or(|b| b.dims() == [hidden])
        && residual.is_none_or(|r| r.dims() == x.dims());
    let (Some(per_lane), true, true) = (per_lane, shapes_fit, applies(x, &others)) else {
        return Ok(None);
    };
    if hidden == 0 {
        return Ok(None);
    }
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
    fn launch<T: CudaDType + DeviceRepr>(
        &self,
        per_lane: usize,
        eps: f64,
    ) -> candle_core::Result<Tensor> {
        let hidden = self.gamma.elem_count();
        let rows = self.x.elem_count() / hidden;
        let held_x = Held::new(self.x);
        let held_bias = self.bias.map(Held::new);
        let held_residual = self.residual.map(Held::new);
        let (held_gamma, held_beta) = (Held::new(self.gamma), Held::new(self.beta));
        let device = held_x.cuda()?.device.clone();
        let name = kernel_name("residual_layer_norm", self.x.dtype());
        let func = device.get_or_load_custom_func(&format!("{name}_{per_lane}"), MODULE, PTX)?;
        // SAFETY: the kernel writes every element of every row.
        let out = unsafe { device.alloc::<T>(rows * hidden)? };
        let x = held_x.view::<T>()?;
        let bias = held_bias.as_ref().map(Held::view::<T>).transpose()?;
        let residual = held_residual.as_ref().map(Held::view::<T>).transpose()?;
        let (gamma, beta) = (held_gamma.view::<T>()?, held_beta.view::<T>()?);
        let (rows_i32, hidden_i32, eps) = (to_i32(rows)?, to_i32(hidden)?, eps as f32);
        let mut builder = func.builder();
        builder.arg(&x);
        arg_or_null(&mut builder, bias.as_ref());
        arg_or_null(&mut builder, residual.as_ref());
        builder.arg(&gamma);
        builder.arg(&beta);
        builder.arg(&out);
        builder.arg(&rows_i32);
        builder.arg(&hidden_i32);
        builder.arg(&eps);
        // SAFETY: the arguments match the kernel's signature; every size was checked against
        // x's `[rows, hidden]`, and `hidden` fits this build's registers.
        unsafe { builder.launch(grid(rows.div_ceil(WARPS))?) }.w()?;
        Ok(wrap(out, &device, self.x.dims()))
    }
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

fn launch_dropout_mask<T: CudaDType + DeviceRepr + candle_core::WithDType>(
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
