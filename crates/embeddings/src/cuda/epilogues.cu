// The element-wise work that follows BERT's linear products, fused for inference on NVIDIA GPUs,
// in f32, f16 and bf16 (arithmetic in f32).
//
// Composed from candle's ops these are several kernels, each a full pass over the activations:
// the bias add after the product, then the GELU (2 passes); and the bias add, the residual add
// and LayerNorm, which candle's ops compose as about ten passes (mean, centre, square, mean,
// add eps, sqrt, divide, scale, shift). Here each is one pass:
//
// - bias_gelu: out = gelu(x + bias), the erf form of transformers' "gelu" (BertIntermediate).
// - residual_layer_norm: out = LayerNorm(x + bias + residual) * gamma + beta (BertSelfOutput,
//   BertOutput; with no bias and no residual, the embeddings' LayerNorm). One warp per row,
//   the row held in registers; mean, then the variance of the centred values (two passes over
//   registers, as transformers' f32 LayerNorm: E[x^2] - mean^2 cancels on BERT's large-offset
//   residual streams).
//
// And for training: dropout's keep mask drawn where it is used (dropout_mask), from the same
// seeded stream as the CPU's, the host only moving the stream's state on; LayerNorm's
// backward in f32 (layer_norm_backward), the forward being residual_layer_norm's, so a
// training LayerNorm is two kernels and two column sums where composed ops take about
// thirty launches; and attention's f32 softmax(scale * scores + padding bias) with its
// backward (attention_softmax, attention_softmax_backward): one pass each where composed ops
// take three (inference) to seven (training) forward.
//
// The same source builds under a CPU emulation of the CUDA primitives it uses
// (tests/cuda_emulation/), which checks it against plain loops in the test suite.

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace bert_epilogues {

constexpr int THREADS = 128;
constexpr int WARPS = THREADS / 32;

#ifdef __CUDACC__
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
#endif

// gelu(x + bias) over `total` elements of rows of `cols` (cols a multiple of the vector width,
// x and out 16-byte aligned): each thread one 16-byte vector. Launch with ceil(total / (THREADS
// * vector width)) blocks of THREADS threads.
template <typename T>
__device__ __forceinline__ void bias_gelu(const T* __restrict__ x, const T* __restrict__ bias,
                                          T* __restrict__ out, unsigned long long total,
                                          int cols) {
  constexpr int VEC = 16 / sizeof(T);  // elements in one 16-byte load
  const unsigned long long first = ((unsigned long long)blockIdx.x * THREADS + threadIdx.x) * VEC;
  if (first >= total) return;
  union Vector {
    uint4 raw;
    T element[VEC];
  } in, result;
  in.raw = *reinterpret_cast<const uint4*>(x + first);
  const int column = (int)(first % (unsigned long long)cols);
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    const float v = to_float(in.element[i]) + to_float(bias[column + i]);
    result.element[i] = from_float<T>(0.5f * v * (1.0f + erff(v * 0.70710678118654752f)));
  }
  *reinterpret_cast<uint4*>(out + first) = result.raw;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// The mean and 1 / sqrt(variance + eps) of a row a warp holds, lane l's v[j] being column
// j * 32 + l (0 past `hidden`): the mean, then the variance of the centred values (two passes
// over registers, as transformers' f32 LayerNorm).
template <int PER_LANE>
__device__ __forceinline__ void row_statistics(const float (&v)[PER_LANE], int lane, int hidden,
                                               float eps, float& mean, float& inverse_std) {
  float sum = 0.0f;
#pragma unroll
  for (int j = 0; j < PER_LANE; ++j) sum += v[j];
  mean = warp_sum(sum) / hidden;
  float squares = 0.0f;
#pragma unroll
  for (int j = 0; j < PER_LANE; ++j) {
    if (j * 32 + lane < hidden) {
      const float d = v[j] - mean;
      squares += d * d;
    }
  }
  inverse_std = rsqrtf(warp_sum(squares) / hidden + eps);
}

// LayerNorm(x + bias + residual) * gamma + beta over rows of `hidden` <= 32 * PER_LANE
// elements; bias and residual may be null. One warp per row, lane l holding columns l, l + 32,
// ...; WARPS rows per block: launch with ceil(rows / WARPS) blocks of THREADS threads.
template <typename T, int PER_LANE>
__device__ __forceinline__ void residual_layer_norm(const T* __restrict__ x,
                                                    const T* __restrict__ bias,
                                                    const T* __restrict__ residual,
                                                    const T* __restrict__ gamma,
                                                    const T* __restrict__ beta,
                                                    T* __restrict__ out, int rows, int hidden,
                                                    float eps) {
  const int lane = threadIdx.x % 32;
  const int row = blockIdx.x * WARPS + threadIdx.x / 32;
  if (row >= rows) return;  // the whole warp: no block-wide barrier follows
  const unsigned long long offset = (unsigned long long)row * hidden;
  float v[PER_LANE];
#pragma unroll
  for (int j = 0; j < PER_LANE; ++j) {
    const int c = j * 32 + lane;
    v[j] = 0.0f;
    if (c < hidden) {
      float t = to_float(x[offset + c]);
      if (bias) t += to_float(bias[c]);
      if (residual) t += to_float(residual[offset + c]);
      v[j] = t;
    }
  }
  float mean, inverse_std;
  row_statistics<PER_LANE>(v, lane, hidden, eps, mean, inverse_std);
#pragma unroll
  for (int j = 0; j < PER_LANE; ++j) {
    const int c = j * 32 + lane;
    if (c < hidden) {
      const float normed = (v[j] - mean) * inverse_std;
      out[offset + c] = from_float<T>(normed * to_float(gamma[c]) + to_float(beta[c]));
    }
  }
}

// LayerNorm's backward over rows of `hidden` <= 32 * PER_LANE f32 elements, from the input x
// (the statistics are recomputed, two-pass as in the forward) and the output's gradient dy:
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * gamma, xhat = (x - mean) * rstd,
// and dy_xhat = dy * xhat, whose column sums are gamma's gradient (beta's is dy's column sums).
// One warp per row as in the forward; launch with ceil(rows / WARPS) blocks of THREADS.
template <int PER_LANE>
__device__ __forceinline__ void layer_norm_backward(const float* __restrict__ x,
                                                    const float* __restrict__ dy,
                                                    const float* __restrict__ gamma,
                                                    float* __restrict__ dx,
                                                    float* __restrict__ dy_xhat, int rows,
                                                    int hidden, float eps) {
  const int lane = threadIdx.x % 32;
  const int row = blockIdx.x * WARPS + threadIdx.x / 32;
  if (row >= rows) return;  // the whole warp: no block-wide barrier follows
  const unsigned long long offset = (unsigned long long)row * hidden;
  float xhat[PER_LANE];
  float g[PER_LANE];
#pragma unroll
  for (int j = 0; j < PER_LANE; ++j) {
    const int c = j * 32 + lane;
    xhat[j] = c < hidden ? x[offset + c] : 0.0f;
  }
  float mean, rstd;
  row_statistics<PER_LANE>(xhat, lane, hidden, eps, mean, rstd);
  float sum_g = 0.0f;
  float sum_g_xhat = 0.0f;
#pragma unroll
  for (int j = 0; j < PER_LANE; ++j) {
    const int c = j * 32 + lane;
    xhat[j] = 0.0f;
    g[j] = 0.0f;
    if (c < hidden) {
      xhat[j] = (x[offset + c] - mean) * rstd;
      g[j] = dy[offset + c] * gamma[c];
      sum_g += g[j];
      sum_g_xhat += g[j] * xhat[j];
    }
  }
  const float mean_g = warp_sum(sum_g) / hidden;
  const float mean_g_xhat = warp_sum(sum_g_xhat) / hidden;
#pragma unroll
  for (int j = 0; j < PER_LANE; ++j) {
    const int c = j * 32 + lane;
    if (c < hidden) {
      dx[offset + c] = rstd * (g[j] - mean_g - xhat[j] * mean_g_xhat);
      dy_xhat[offset + c] = dy[offset + c] * xhat[j];
    }
  }
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  }
  return x;
}

// softmax(scale * x + bias) over rows of `keys` <= 32 * PER_LANE f32 scores, x
// [batch, heads, queries, keys] and bias [batch, keys] (BERT's padding mask, 0 or f32::MIN, one
// row per sequence shared by its rows_per_sequence = heads * queries rows). One warp per row,
// the row in registers; launch with ceil(rows / WARPS) blocks of THREADS.
template <int PER_LANE>
__device__ __forceinline__ void attention_softmax(const float* __restrict__ x,
                                                  const float* __restrict__ bias,
                                                  float* __restrict__ out, int rows, int keys,
                                                  int rows_per_sequence, float scale) {
  const int lane = threadIdx.x % 32;
  const int row = blockIdx.x * WARPS + threadIdx.x / 32;
  if (row >= rows) return;  // the whole warp: no block-wide barrier follows
  const unsigned long long offset = (unsigned long long)row * keys;
  const float* row_bias = bias + (unsigned long long)(row / rows_per_sequence) * keys;
  float v[PER_LANE];
  float most = -INFINITY;
#pragma unroll
  for (int j = 0; j < PER_LANE; ++j) {
    const int c = j * 32 + lane;
    v[j] = c < keys ? x[offset + c] * scale + row_bias[c] : -INFINITY;
    most = fmaxf(most, v[j]);
  }
  most = warp_max(most);  // finite: every row has at least one key, and the bias is finite
  float sum = 0.0f;
#pragma unroll
  for (int j = 0; j < PER_LANE; ++j) {
    v[j] = expf(v[j] - most);  // 0 past the row's end
    sum += v[j];
  }
  const float inverse = 1.0f / warp_sum(sum);
#pragma unroll
  for (int j = 0; j < PER_LANE; ++j) {
    const int c = j * 32 + lane;
    if (c < keys) out[offset + c] = v[j] * inverse;
  }
}

// The backward of attention_softmax from its output y and the output's gradient dy:
// dx = scale * y * (dy - sum(dy * y)) per row (the bias takes no gradient).
template <int PER_LANE>
__device__ __forceinline__ void attention_softmax_backward(const float* __restrict__ y,
                                                           const float* __restrict__ dy,
                                                           float* __restrict__ dx, int rows,
                                                           int keys, float scale) {
  const int lane = threadIdx.x % 32;
  const int row = blockIdx.x * WARPS + threadIdx.x / 32;
  if (row >= rows) return;  // the whole warp: no block-wide barrier follows
  const unsigned long long offset = (unsigned long long)row * keys;
  float p[PER_LANE];
  float g[PER_LANE];
  float dot = 0.0f;
#pragma unroll
  for (int j = 0; j < PER_LANE; ++j) {
    const int c = j * 32 + lane;
    p[j] = c < keys ? y[offset + c] : 0.0f;
    g[j] = c < keys ? dy[offset + c] : 0.0f;
    dot += p[j] * g[j];
  }
  dot = warp_sum(dot);
#pragma unroll
  for (int j = 0; j < PER_LANE; ++j) {
    const int c = j * 32 + lane;
    if (c < keys) dx[offset + c] = scale * p[j] * (g[j] - dot);
  }
}

// Dropout's mask over `total` elements: `scale` where kept, 0 where dropped. Element i takes
// draw i + 1 of the SplitMix64 stream whose state is `state` (the generator adds the golden
// gamma before each draw, so draw k mixes state + k * gamma), kept when its 24-bit uniform is
// at least p: the flags `Dropout::draw_keep` draws on the CPU. One element a thread: launch
// with ceil(total / THREADS) blocks.
template <typename T>
__device__ __forceinline__ void dropout_mask(T* __restrict__ out, unsigned long long total,
                                             unsigned long long state, float p, float scale) {
  const unsigned long long i = (unsigned long long)blockIdx.x * THREADS + threadIdx.x;
  if (i >= total) return;
  unsigned long long z = state + (i + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  const float uniform = (float)(z >> 40) * (1.0f / 16777216.0f);
  out[i] = from_float<T>(uniform >= p ? scale : 0.0f);
}

}  // namespace bert_epilogues

#ifdef __CUDACC__
#define BERT_BIAS_GELU(NAME, T)                                                                 \
  extern "C" __global__ void __launch_bounds__(bert_epilogues::THREADS)                        \
      NAME(const T* x, const T* bias, T* out, unsigned long long total, int cols) {             \
    bert_epilogues::bias_gelu<T>(x, bias, out, total, cols);                                    \
  }
BERT_BIAS_GELU(bias_gelu_f32, float)
BERT_BIAS_GELU(bias_gelu_f16, __half)
BERT_BIAS_GELU(bias_gelu_bf16, __nv_bfloat16)

// Per-lane register counts built: hidden sizes up to 128, 256, 384, 512, 768 and 1024.
#define BERT_LAYER_NORM(NAME, T, PER_LANE)                                                      \
  extern "C" __global__ void __launch_bounds__(bert_epilogues::THREADS)                        \
      NAME(const T* x, const T* bias, const T* residual, const T* gamma, const T* beta, T* out, \
           int rows, int hidden, float eps) {                                                   \
    bert_epilogues::residual_layer_norm<T, PER_LANE>(x, bias, residual, gamma, beta, out, rows, \
                                                     hidden, eps);                              \
  }
#define BERT_LAYER_NORMS(T, SUFFIX)                         \
  BERT_LAYER_NORM(residual_layer_norm_##SUFFIX##_4, T, 4)   \
  BERT_LAYER_NORM(residual_layer_norm_##SUFFIX##_8, T, 8)   \
  BERT_LAYER_NORM(residual_layer_norm_##SUFFIX##_12, T, 12) \
  BERT_LAYER_NORM(residual_layer_norm_##SUFFIX##_16, T, 16) \
  BERT_LAYER_NORM(residual_layer_norm_##SUFFIX##_24, T, 24) \
  BERT_LAYER_NORM(residual_layer_norm_##SUFFIX##_32, T, 32)
BERT_LAYER_NORMS(float, f32)
BERT_LAYER_NORMS(__half, f16)
BERT_LAYER_NORMS(__nv_bfloat16, bf16)

#define BERT_LAYER_NORM_BACKWARD(PER_LANE)                                                   \
  extern "C" __global__ void __launch_bounds__(bert_epilogues::THREADS)                     \
      layer_norm_backward_f32_##PER_LANE(const float* x, const float* dy, const float* gamma, \
                                         float* dx, float* dy_xhat, int rows, int hidden,    \
                                         float eps) {                                        \
    bert_epilogues::layer_norm_backward<PER_LANE>(x, dy, gamma, dx, dy_xhat, rows, hidden,   \
                                                  eps);                                      \
  }
BERT_LAYER_NORM_BACKWARD(4)
BERT_LAYER_NORM_BACKWARD(8)
BERT_LAYER_NORM_BACKWARD(12)
BERT_LAYER_NORM_BACKWARD(16)
BERT_LAYER_NORM_BACKWARD(24)
BERT_LAYER_NORM_BACKWARD(32)

// Rows of up to 32, 64, 128, 256 and 512 keys.
#define BERT_ATTENTION_SOFTMAX(PER_LANE)                                                      \
  extern "C" __global__ void __launch_bounds__(bert_epilogues::THREADS)                       \
      attention_softmax_f32_##PER_LANE(const float* x, const float* bias, float* out,          \
                                       int rows, int keys, int rows_per_sequence,              \
                                       float scale) {                                          \
    bert_epilogues::attention_softmax<PER_LANE>(x, bias, out, rows, keys, rows_per_sequence,   \
                                                scale);                                        \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(bert_epilogues::THREADS)                       \
      attention_softmax_backward_f32_##PER_LANE(const float* y, const float* dy, float* dx,    \
                                                int rows, int keys, float scale) {             \
    bert_epilogues::attention_softmax_backward<PER_LANE>(y, dy, dx, rows, keys, scale);        \
  }
BERT_ATTENTION_SOFTMAX(1)
BERT_ATTENTION_SOFTMAX(2)
BERT_ATTENTION_SOFTMAX(4)
BERT_ATTENTION_SOFTMAX(8)
BERT_ATTENTION_SOFTMAX(16)

#define BERT_DROPOUT_MASK(NAME, T)                                                              \
  extern "C" __global__ void __launch_bounds__(bert_epilogues::THREADS)                        \
      NAME(T* out, unsigned long long total, unsigned long long state, float p, float scale) { \
    bert_epilogues::dropout_mask<T>(out, total, state, p, scale);                               \
  }
BERT_DROPOUT_MASK(dropout_mask_f32, float)
BERT_DROPOUT_MASK(dropout_mask_f16, __half)
BERT_DROPOUT_MASK(dropout_mask_bf16, __nv_bfloat16)
#endif
