//! AdamW on CUDA (`src/cuda/adamw.cu`, compiled to PTX by `build.rs`): one in-place launch per
//! f32 variable, its moments in device buffers beside it, where the tensor-op form takes about
//! fifteen launches and as many fresh tensors. The kernel's source is checked against the CPU
//! kernel in the test suite under the CPU emulation (`tests/cuda_emulation/`).

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::WrapErr;
use candle_core::op::BackpropOp;
use candle_core::{
    CpuStorage, CudaStorage, DType, Device, InplaceOp2, Layout, Storage, Tensor, Var,
};

use crate::optim::{AdamWKernel, AdamWScalars, MomentBuffer};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/adamw.ptx"));
const THREADS: u32 = 256; // the kernel's block, bert_adamw::THREADS

// SAFETY: `AdamWScalars` is `repr(C)`, nine f32, as the kernel's `Scalars` parameter.
unsafe impl DeviceRepr for AdamWScalars {}

/// The first and second moments of one f32 variable on CUDA.
#[derive(Debug)]
pub(crate) struct DeviceMoments {
    first: CudaSlice<f32>,
    second: CudaSlice<f32>,
}

impl DeviceMoments {
    /// Zeros for `var`, or `None` where the kernel does not take it (not f32 on CUDA).
    pub(crate) fn zeros(var: &Var) -> candle_core::Result<Option<Self>> {
        let Device::Cuda(device) = var.device() else {
            return Ok(None);
        };
        if var.dtype() != DType::F32 {
            return Ok(None);
        }
        let n = var.elem_count();
        Ok(Some(Self {
            first: device.alloc_zeros::<f32>(n)?,
            second: device.alloc_zeros::<f32>(n)?,
        }))
    }

    /// Copies of both moments as tensors in `var`'s shape (a checkpoint's state; the buffers
    /// go on changing in place).
    pub(crate) fn tensors(&self, var: &Var) -> candle_core::Result<(Tensor, Tensor)> {
        let Device::Cuda(device) = var.device() else {
            candle_core::bail!("AdamW moments on CUDA for a variable that is not")
        };
        let copy = |slice: &CudaSlice<f32>| -> candle_core::Result<Tensor> {
            let copied = slice.try_clone().w()?;
            let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(copied, device.clone()));
            Ok(Tensor::from_storage(
                storage,
                var.shape().clone(),
                BackpropOp::none(),
                false,
            ))
        };
        Ok((copy(&self.first)?, copy(&self.second)?))
    }

    /// Moments copied from `first` and `second`: f32 tensors on the variable's CUDA device,
    /// of its shape (`Moments::restore` checked both).
    pub(crate) fn from_tensors(first: &Tensor, second: &Tensor) -> candle_core::Result<Self> {
        let copy = |t: &Tensor| -> candle_core::Result<CudaSlice<f32>> {
            let t = t.contiguous()?;
            let (storage, layout) = t.storage_and_layout();
            let (Storage::Cuda(cuda), Some((start, end))) =
                (&*storage, layout.contiguous_offsets())
            else {
                candle_core::bail!("AdamW moments: a contiguous CUDA tensor expected")
            };
            let view = cuda.as_cuda_slice::<f32>()?.slice(start..end);
            cuda.device().cuda_stream().clone_dtod(&view).w()
        };
        Ok(Self {
            first: copy(first)?,
            second: copy(second)?,
        })
    }

    /// One update of `var` from `grad` (cast to f32 if it is not).
    pub(crate) fn step(
        &mut self,
        var: &Var,
        grad: &Tensor,
        scalars: AdamWScalars,
    ) -> candle_core::Result<()> {
        let kernel = AdamWKernel {
            first: Mutex::new(&mut self.first),
            second: Mutex::new(&mut self.second),
            scalars,
        };
        var.as_tensor()
            .inplace_op2(&grad.to_dtype(DType::F32)?.contiguous()?, &kernel)
    }
}

impl MomentBuffer for CudaSlice<f32> {
    fn values(&self) -> usize {
        self.len()
    }
}

/// The launch of `adamw_step_f32` on a variable (in place) and its gradient.
impl InplaceOp2 for AdamWKernel<'_, CudaSlice<f32>> {
    fn name(&self) -> &'static str {
        "bert-adamw-cuda"
    }

    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<()> {
        candle_core::bail!("{}: runs on CUDA only", self.name())
    }

    fn cuda_fwd(
        &self,
        theta: &mut CudaStorage,
        theta_layout: &Layout,
        grad: &CudaStorage,
        grad_layout: &Layout,
    ) -> candle_core::Result<()> {
        let (t, g, mut first, mut second) = self.checked(self.name(), theta_layout, grad_layout)?;
        let n = t.len();
        if n == 0 {
            return Ok(());
        }
        let device = theta.device().clone();
        let func = device.get_or_load_custom_func("adamw_step_f32", "bert_adamw", PTX)?;
        let grad = grad.as_cuda_slice::<f32>()?.slice(g);
        let mut theta = theta.as_cuda_slice_mut::<f32>()?.slice_mut(t);
        let blocks = u32::try_from(n.div_ceil(THREADS as usize))
            .map_err(|_| candle_core::Error::Msg(format!("{n} elements exceed the grid")))?;
        let n = n as u64;
        let mut builder = func.builder();
        builder.arg(&mut theta);
        builder.arg(&grad);
        builder.arg(&mut **first);
        builder.arg(&mut **second);
        builder.arg(&n);
        builder.arg(&self.scalars);
        let config = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match the kernel's signature; the variable, gradient and both
        // moments hold `n` f32 each, and the kernel touches element i < n only.
        unsafe { builder.launch(config) }.w()?;
        Ok(())
    }
}
