//! The fused attention kernel on CUDA (`src/cuda/flash_attention.cu`, compiled to PTX by
//! `build.rs`): the inference attention of f16 and bf16 models with 32- or 64-wide heads, read
//! from the packed QKV projection, whose bias it can add itself. Its logic is checked on the
//! CPU by the test suite (`tests/cuda_emulation/`) and on a GPU by `bert selftest --device
//! cuda`, against the plain path.

use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{DType, Device, Tensor};

use crate::cuda_launch::{arg_or_null, to_i32, wrap, Held};
use crate::nn::AttentionMask;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/flash_attention.ptx"));
const MODULE: &str = "bert_flash_attention";
/// The kernel's block shape (flash_attention.cu: 4 warps, 64 queries).
const THREADS: u32 = 128;
const BLOCK_QUERIES: usize = 64;
/// The kernel reads 16 bytes at a time: 8 f16 or bf16 elements.
const VECTOR: usize = 8;

/// Head sizes the kernel is built for.
pub(crate) const HEAD_DIMS: [usize; 2] = [32, 64];

/// Whether the kernel takes a QKV product of `dims` (`[batch, seq, 3 * hidden]`) in `dtype` on
/// `device` under `mask`: CUDA, f16 or bf16, a head size it is built for, a `[batch, 1, 1,
/// seq]` padding bias, none, or packed rows (`batch` 1, `seq` their tokens), and from one to
/// 65535 sequences.
pub(crate) fn applies(
    device: &Device,
    dtype: DType,
    (batch, seq, width): (usize, usize, usize),
    heads: usize,
    mask: AttentionMask,
) -> bool {
    let hidden = width / 3;
    let (sequences, fits) = match mask {
        AttentionMask::None => (batch, true),
        AttentionMask::Bias(b) => (batch, b.dims() == [batch, 1, 1, seq]),
        AttentionMask::Packed(p) => (
            p.sequences(),
            batch == 1 && p.tokens() == seq && i32::try_from(seq).is_ok(),
        ),
    };
    device.is_cuda()
        && matches!(dtype, DType::F16 | DType::BF16)
        // gridDim.z (the sequences) is at most 65535.
        && (1..=65_535).contains(&sequences)
        && seq > 0
        && heads > 0
        && width % 3 == 0
        && hidden % heads == 0
        && HEAD_DIMS.contains(&(hidden / heads))
        && fits
}

/// `softmax(q k^T / sqrt(head_dim) + mask) v` of every head as `[batch, seq, hidden]`, from
/// `qkv: [batch, seq, 3 * hidden]` plus `projection_bias` (`[3 * hidden]`, added as the kernel
/// loads each tile) when given; `None` where the kernel does not apply (see [`applies`]; also
/// a projection bias of another shape or dtype, or either input not starting on a 16-byte
/// boundary).
pub(crate) fn packed_attention(
    qkv: &Tensor,
    projection_bias: Option<&Tensor>,
    heads: usize,
    mask: AttentionMask,
) -> candle_core::Result<Option<Tensor>> {
    let (batch, seq, width) = qkv.dims3()?;
    if !applies(qkv.device(), qkv.dtype(), (batch, seq, width), heads, mask) {
        return Ok(None);
    }
    let bias_fits = projection_bias.is_none_or(|b| {
        b.dims() == [width] && b.dtype() == qkv.dtype() && b.device().same_device(qkv.device())
    });
    if !bias_fits {
        return Ok(None);
    }
    let qkv = qkv.contiguous()?;
    let projection_bias = projection_bias.map(Tensor::contiguous).transpose()?;
    let aligned = |t: &Tensor| t.layout().start_offset().is_multiple_of(VECTOR);
    if !aligned(&qkv) || !projection_bias.as_ref().is_none_or(aligned) {
        return Ok(None);
    }
    // The kernel takes the padding bias or the sequences' starts (u32, read as int: `applies`
    // checked the tokens fit i32); the other is a null pointer, as is a missing bias.
    let (key_bias, starts, packed) = match mask {
        AttentionMask::None => (None, None, None),
        AttentionMask::Bias(b) => (
            Some(
                b.to_dtype(DType::F32)?
                    .reshape((batch, seq))?
                    .contiguous()?,
            ),
            None,
            None,
        ),
        AttentionMask::Packed(p) => (
            None,
            Some(p.starts_on_device().to_device(qkv.device())?),
            Some((p.sequences(), p.longest())),
        ),
    };
    let launch = Launch {
        qkv: &qkv,
        projection_bias: projection_bias.as_ref(),
        key_bias: key_bias.as_ref(),
        starts: starts.as_ref(),
        heads,
        packed,
    };
    let context = match qkv.dtype() {
        DType::F16 => launch.run::<half::f16>("f16")?,
        _ => launch.run::<half::bf16>("bf16")?,
    };
    Ok(Some(context))
}

/// The contiguous inputs of one launch.
struct Launch<'a> {
    qkv: &'a Tensor,
    projection_bias: Option<&'a Tensor>,
    /// The padded layout's `[batch, seq]` f32 key bias.
    key_bias: Option<&'a Tensor>,
    /// The packed layout's first rows of the sequences (u32), and their last row's end.
    starts: Option<&'a Tensor>,
    heads: usize,
    /// Packed rows: the number of sequences and the longest's length.
    packed: Option<(usize, usize)>,
}

impl Launch<'_> {
    fn run<T: CudaDType + DeviceRepr>(&self, dtype_name: &str) -> candle_core::Result<Tensor> {
        let (batch, seq, width) = self.qkv.dims3()?;
        let hidden = width / 3;
        let head_dim = hidden / self.heads;
        let held_qkv = Held::new(self.qkv);
        let held_projection_bias = self.projection_bias.map(Held::new);
        let held_key_bias = self.key_bias.map(Held::new);
        let held_starts = self.starts.map(Held::new);
        let device = held_qkv.cuda()?.device.clone();
        let kernel = format!("flash_attention_{dtype_name}_d{head_dim}");
        let func = device.get_or_load_custom_func(&kernel, MODULE, PTX)?;
        let qkv = held_qkv.view::<T>()?;
        let projection_bias = held_projection_bias
            .as_ref()
            .map(Held::view::<T>)
            .transpose()?;
        let key_bias = held_key_bias.as_ref().map(Held::view::<f32>).transpose()?;
        let starts = held_starts.as_ref().map(Held::view::<u32>).transpose()?;
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
        let (seq_i32, heads_i32) = (to_i32(longest)?, to_i32(self.heads)?);
        let scale = 1.0f32 / (head_dim as f32).sqrt();
        let mut builder = func.builder();
        builder.arg(&qkv);
        arg_or_null(&mut builder, projection_bias.as_ref());
        arg_or_null(&mut builder, key_bias.as_ref());
        arg_or_null(&mut builder, starts.as_ref());
        builder.arg(&out);
        builder.arg(&seq_i32);
        builder.arg(&heads_i32);
        builder.arg(&scale);
        // SAFETY: the argument list matches the kernel's signature; shapes, alignment and
        // sizes were checked by `packed_attention`.
        unsafe { builder.launch(config) }.w()?;
        Ok(wrap(out, &device, &[batch, seq, hidden]))
    }
}
