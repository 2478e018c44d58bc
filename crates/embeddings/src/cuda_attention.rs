//! The fused attention kernel on CUDA (`src/cuda/flash_attention.cu`, compiled to PTX by
//! `build.rs`): the inference attention of f16 and bf16 models with 32- or 64-wide heads, read
//! from the packed QKV projection. Its logic is checked on the CPU by the test suite
//! (`tests/cuda_emulation/`) and on a GPU by `bert selftest --device cuda`, against the plain
//! path.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{CpuStorage, CudaStorage, CustomOp2, DType, Layout, Shape, Tensor};

use crate::nn::AttentionMask;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/flash_attention.ptx"));
/// The kernel's block shape (flash_attention.cu: 4 warps, 64 queries).
const THREADS: u32 = 128;
const BLOCK_QUERIES: usize = 64;

/// Head sizes the kernel is built for.
pub(crate) const HEAD_DIMS: [usize; 2] = [32, 64];

/// `softmax(q k^T / sqrt(head_dim) + bias) v` of every head, from `qkv: [batch, seq, 3 * hidden]`
/// and a `[batch, seq]` f32 key bias, as `[batch, seq, hidden]`; or, with `packed`, from packed
/// rows `[1, tokens, 3 * hidden]` and their sequences' first rows (u32, in place of the bias).
struct FlashAttention {
    heads: usize,
    /// Packed rows: the number of sequences and the longest's length.
    packed: Option<(usize, usize)>,
}

impl FlashAttention {
    fn launch<T: DeviceRepr>(
        &self,
        kernel: &str,
        qkv: &CudaSlice<T>,
        qkv_layout: &Layout,
        mask: &CudaStorage,
        mask_layout: &Layout,
    ) -> candle_core::Result<(CudaSlice<T>, Shape)> {
        let (batch, seq, packed) = qkv_layout.shape().dims3()?;
        let hidden = packed / 3;
        let head_dim = hidden / self.heads;
        let shape = Shape::from((batch, seq, hidden));
        let (Some((qkv_start, _)), Some((mask_start, _))) = (
            qkv_layout.contiguous_offsets(),
            mask_layout.contiguous_offsets(),
        ) else {
            candle_core::bail!("flash-attention: inputs must be contiguous");
        };
        // The kernel reads 16 bytes at a time from each token's row.
        if qkv_start % 8 != 0 {
            candle_core::bail!("flash-attention: qkv must start on a 16-byte boundary");
        }
        let device = mask.device();
        let func = device.get_or_load_custom_func(kernel, "bert_flash_attention", PTX)?;
        let qkv = qkv.slice(qkv_start..);
        // The kernel takes the bias or the sequences' starts; the other is a null pointer.
        let (bias, starts) = match self.packed {
            None => (Some(mask.as_cuda_slice::<f32>()?.slice(mask_start..)), None),
            Some(_) => (None, Some(mask.as_cuda_slice::<u32>()?.slice(mask_start..))),
        };
        let null_pointer = 0u64;
        // SAFETY: every element is written by the kernel (each query row of each head).
        let out = unsafe { device.alloc::<T>(batch * seq * hidden)? };
        let to_u32 = |n: usize| {
            u32::try_from(n).map_err(|_| candle_core::Error::Msg(format!("{n} exceeds u32")))
        };
        // Packed: one grid row per sequence, as many query blocks as the longest needs.
        let (sequences, longest) = self.packed.unwrap_or((batch, seq));
        let config = LaunchConfig {
            grid_dim: (
                to_u32(longest.div_ceil(BLOCK_QUERIES))?,
                to_u32(self.heads)?,
                to_u32(sequences)?,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (seq, heads) = (to_u32(longest)? as i32, to_u32(self.heads)? as i32);
        let scale = 1.0f32 / (head_dim as f32).sqrt();
        let mut builder = func.builder();
        builder.arg(&qkv);
        match &bias {
            Some(bias) => builder.arg(bias),
            None => builder.arg(&null_pointer),
        };
        // u32 starts read as int: `packed_attention` checked they fit i32.
        match &starts {
            Some(starts) => builder.arg(starts),
            None => builder.arg(&null_pointer),
        };
        builder.arg(&out);
        builder.arg(&seq);
        builder.arg(&heads);
        builder.arg(&scale);
        // SAFETY: the argument list matches the kernel's signature; sizes were checked by
        // `packed_attention`.
        unsafe { builder.launch(config) }.w()?;
        Ok((out, shape))
    }
}

impl CustomOp2 for FlashAttention {
    fn name(&self) -> &'static str {
        "flash-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("flash-attention runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        qkv: &CudaStorage,
        qkv_layout: &Layout,
        mask: &CudaStorage,
        mask_layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let head_dim = qkv_layout.dims()[2] / 3 / self.heads;
        let (slice, shape) = match &qkv.slice {
            CudaStorageSlice::F16(q) => {
                let kernel = format!("flash_attention_f16_d{head_dim}");
                let (out, shape) = self.launch(&kernel, q, qkv_layout, mask, mask_layout)?;
                (CudaStorageSlice::F16(out), shape)
            }
            CudaStorageSlice::BF16(q) => {
                let kernel = format!("flash_attention_bf16_d{head_dim}");
                let (out, shape) = self.launch(&kernel, q, qkv_layout, mask, mask_layout)?;
                (CudaStorageSlice::BF16(out), shape)
            }
            _ => candle_core::bail!("flash-attention: qkv must be f16 or bf16"),
        };
        let device = qkv.device().clone();
        Ok((CudaStorage { slice, device }, shape))
    }
}

/// The kernel's context for `qkv: [batch, seq, 3 * hidden]` on CUDA, with `mask` the
/// `[batch, 1, 1, seq]` padding bias, none, or packed rows (`batch` 1, `seq` their tokens);
/// `None` where the kernel does not apply (not CUDA, not f16/bf16, another head size or bias
/// shape, an empty batch or one of more than 65535 sequences).
pub(crate) fn packed_attention(
    qkv: &Tensor,
    heads: usize,
    mask: AttentionMask,
) -> candle_core::Result<Option<Tensor>> {
    let (batch, seq, packed) = qkv.dims3()?;
    let hidden = packed / 3;
    let (sequences, fits) = match mask {
        AttentionMask::None => (batch, true),
        AttentionMask::Bias(b) => (batch, b.dims() == [batch, 1, 1, seq]),
        AttentionMask::Packed(p) => (
            p.sequences(),
            batch == 1 && p.tokens() == seq && i32::try_from(seq).is_ok(),
        ),
    };
    let applies = qkv.device().is_cuda()
        && matches!(qkv.dtype(), DType::F16 | DType::BF16)
        // gridDim.z (the sequences) is at most 65535.
        && (1..=65_535).contains(&sequences)
        && seq > 0
        && heads > 0
        && packed % 3 == 0
        && hidden % heads == 0
        && HEAD_DIMS.contains(&(hidden / heads))
        && fits;
    if !applies {
        return Ok(None);
    }
    let (mask, packed) = match mask {
        AttentionMask::Bias(b) => (b.to_dtype(DType::F32)?.reshape((batch, seq))?, None),
        AttentionMask::None => (Tensor::zeros((batch, seq), DType::F32, qkv.device())?, None),
        AttentionMask::Packed(p) => (
            p.starts_on_device().to_device(qkv.device())?,
            Some((p.sequences(), p.longest())),
        ),
    };
    let context = qkv
        .contiguous()?
        .apply_op2_no_bwd(&mask.contiguous()?, &FlashAttention { heads, packed })?;
    Ok(Some(context))
}
