//! What launching this crate's own CUDA kernels (`cuda_attention`, `cuda_epilogues`) takes on
//! candle's side: a tensor's device memory held for the launch, and the output wrapped back
//! into a tensor.

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchArgs, PushKernelArg};
use candle_core::cuda_backend::CudaDType;
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, Layout, Storage, Tensor};

/// A tensor's CUDA storage, held for reading while a kernel is launched on it.
pub(crate) struct Held<'a> {
    storage: candle_core::StorageRef<'a>,
    layout: &'a Layout,
}

impl<'a> Held<'a> {
    pub(crate) fn new(t: &'a Tensor) -> Self {
        let (storage, layout) = t.storage_and_layout();
        Self { storage, layout }
    }

    pub(crate) fn cuda(&self) -> candle_core::Result<&CudaStorage> {
        match &*self.storage {
            Storage::Cuda(cuda) => Ok(cuda),
            _ => candle_core::bail!("CUDA kernels: a tensor is not on CUDA"),
        }
    }

    /// The elements as a view, from the layout's start (the tensor is contiguous).
    pub(crate) fn view<T: CudaDType>(&self) -> candle_core::Result<CudaView<'_, T>> {
        storage_view(self.cuda()?, self.layout)
    }
}

/// A contiguous `layout`'s elements of `storage` as a view, from the layout's start.
pub(crate) fn storage_view<'a, T: CudaDType>(
    storage: &'a CudaStorage,
    layout: &Layout,
) -> candle_core::Result<CudaView<'a, T>> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("CUDA kernels: inputs must be contiguous")
    };
    Ok(storage.as_cuda_slice::<T>()?.slice(start..end))
}

/// `n` as a kernel's `int`, or an error past `i32::MAX`.
pub(crate) fn to_i32(n: usize) -> candle_core::Result<i32> {
    i32::try_from(n).map_err(|_| candle_core::Error::Msg(format!("{n} exceeds i32")))
}

/// A fresh tensor of `shape` (contiguous, no gradient) around `out`.
pub(crate) fn wrap<T: CudaDType>(
    out: CudaSlice<T>,
    device: &CudaDevice,
    shape: &[usize],
) -> Tensor {
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(out, device.clone()));
    Tensor::from_storage(storage, shape, BackpropOp::none(), false)
}

/// What a kernel reads as a null pointer: an optional input left out.
static NULL_POINTER: u64 = 0;

/// Pushes `view` as a kernel's pointer argument, or a null pointer where it is `None`.
pub(crate) fn arg_or_null<'a, 'b: 'a, 'c: 'b, T>(
    builder: &mut LaunchArgs<'a>,
    view: Option<&'b CudaView<'c, T>>,
) {
    match view {
        Some(view) => builder.arg(view),
        None => builder.arg(&NULL_POINTER),
    };
}
