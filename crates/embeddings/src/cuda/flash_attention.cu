// Fused multi-head attention for BERT inference on NVIDIA GPUs, in f16 and bf16.
//
// softmax(Q K^T * scale + bias) V for every (sequence, head), read straight from the packed
// output of the one QKV projection ([batch, seq, 3 * hidden]: query, key and value columns side
// by side, head h at columns h * D .. h * D + D of each), written as the context
// [batch, seq, hidden] that the output projection reads. Flash-style (Dao et al. 2022): keys
// and values stream through shared memory in tiles; each query row keeps a running maximum and
// sum (online softmax, in f32), so the [seq, seq] scores and probabilities never exist in
// global memory. Products run on tensor cores (WMMA 16x16x16, f32 accumulation).
//
// Layout of a block: 4 warps, 64 queries of one (sequence, head); each warp owns 16 query rows,
// its own score, probability and output tiles in shared memory. Within a warp, lanes 2r and
// 2r + 1 share row r for the softmax, each taking half of the row's keys; rescaling and
// writing the output go row by row, a column a lane.
//
// `projection_bias` (may be null) is the QKV projection's bias, [3 * hidden] in the columns'
// order: the projection then runs without it and each tile adds it as it loads (f32
// arithmetic, one rounding), which saves a pass over the [tokens, 3 * hidden] product.
//
// Two layouts of the sequences. Padded (`starts` null): sequence z is rows z * seq .. of a
// [batch, seq] grid, and `bias` is BERT's additive padding mask, one f32 per key of each
// sequence (0 or f32::MIN, as transformers' get_extended_attention_mask), shared by heads and
// queries; it may be null. Packed, padding-free (`starts` given, `bias` null): the rows hold
// only real tokens, sequence z is rows starts[z] .. starts[z + 1] (flash-attention's
// cu_seqlens), and `seq` is the longest sequence (the grid's x covers it; blocks past a
// shorter sequence's end leave at once). Keys past the sequence's end in the last tile score
// -inf.
//
// The same source builds under a CPU emulation of the CUDA primitives it uses
// (tests/cuda_emulation/), which checks its indexing and softmax against the plain path in
// the test suite. Only the two WMMA tile products differ there: they are CUDA-only below.

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#endif

namespace bert_flash {

constexpr int WARPS = 4;
constexpr int THREADS = WARPS * 32;
constexpr int ROWS_PER_WARP = 16;
constexpr int BLOCK_QUERIES = WARPS * ROWS_PER_WARP;
constexpr int BLOCK_KEYS = 32;
constexpr int HALF_KEYS = BLOCK_KEYS / 2;  // a lane's share of a score row
// Leading dimensions of the shared tiles, padded so that rows do not all start on the same
// bank, which the tensor-core tile loads and stores read and write rows at a time: query,
// key and value rows (T) by 8 elements (16 bytes), output rows (f32, loaded and stored
// twice per key tile) by 4. Score and probability rows (one tile store or load of each per
// key tile) stay unpadded: the d64 build's static shared memory is then 49024 bytes of the
// 49152 allowed, and the softmax loops' rotated walk is conflict-free on them.
template <int D> constexpr int QKV_LD = D + 8;
constexpr int S_LD = BLOCK_KEYS;
constexpr int P_LD = BLOCK_KEYS;
template <int D> constexpr int O_LD = D + 4;

#ifdef __CUDACC__
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// s[16 x BLOCK_KEYS] = q[16 x D] k[BLOCK_KEYS x D]^T; row-major, leading dimensions QKV_LD,
// QKV_LD and S_LD. Warp-collective.
template <typename T, int D>
__device__ __forceinline__ void scores_tile(const T* q, const T* k, float* s) {
  using namespace nvcuda;
#pragma unroll
  for (int n = 0; n < BLOCK_KEYS; n += 16) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.0f);
#pragma unroll
    for (int d = 0; d < D; d += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      // Column-major B(d', n') = k[(n + n') * QKV_LD + d + d']: the keys' rows are K^T's
      // columns.
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
      wmma::load_matrix_sync(a, q + d, QKV_LD<D>);
      wmma::load_matrix_sync(b, k + n * QKV_LD<D> + d, QKV_LD<D>);
      wmma::mma_sync(acc, a, b, acc);
    }
    wmma::store_matrix_sync(s + n, acc, S_LD, wmma::mem_row_major);
  }
}

// o[16 x D] += p[16 x BLOCK_KEYS] v[BLOCK_KEYS x D]; row-major, leading dimensions O_LD,
// P_LD and QKV_LD. Warp-collective.
template <typename T, int D>
__device__ __forceinline__ void context_tile(const T* p, const T* v, float* o) {
  using namespace nvcuda;
#pragma unroll
  for (int n = 0; n < D; n += 16) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::load_matrix_sync(acc, o + n, O_LD<D>, wmma::mem_row_major);
#pragma unroll
    for (int k = 0; k < BLOCK_KEYS; k += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
      wmma::load_matrix_sync(a, p + k, P_LD);
      wmma::load_matrix_sync(b, v + k * QKV_LD<D> + n, QKV_LD<D>);
      wmma::mma_sync(acc, a, b, acc);
    }
    wmma::store_matrix_sync(o + n, acc, O_LD<D>, wmma::mem_row_major);
  }
}
#endif

// rows x D elements of tokens first.. (stride row_stride elements) into dst (leading dimension
// QKV_LD), 16 bytes per load, plus bias[column] where bias is given; tokens at or past seq
// read as zeros. Block-collective.
template <typename T, int D>
__device__ __forceinline__ void load_rows(T* dst, const T* src, const T* bias, int first,
                                          int rows, int seq, int row_stride) {
  constexpr int CHUNK = 16 / sizeof(T);
  constexpr int CHUNKS_PER_ROW = D / CHUNK;
  for (int i = threadIdx.x; i < rows * CHUNKS_PER_ROW; i += THREADS) {
    const int row = i / CHUNKS_PER_ROW;
    const int column = (i % CHUNKS_PER_ROW) * CHUNK;
    const int token = first + row;
    union Vector {
      uint4 raw;
      T element[CHUNK];
    } value, added;
    value.raw = make_uint4(0, 0, 0, 0);
    if (token < seq) {
      value.raw = *reinterpret_cast<const uint4*>(src + (size_t)token * row_stride + column);
      if (bias) {
        added.raw = *reinterpret_cast<const uint4*>(bias + column);
#pragma unroll
        for (int e = 0; e < CHUNK; ++e) {
          const float sum = to_float(value.element[e]) + to_float(added.element[e]);
          value.element[e] = from_float<T>(sum);
        }
      }
    }
    *reinterpret_cast<uint4*>(dst + row * QKV_LD<D> + column) = value.raw;
  }
}

// One block: queries blockIdx.x * BLOCK_QUERIES .. of head blockIdx.y of sequence blockIdx.z.
template <typename T, int D>
__device__ __forceinline__ void attention(const T* __restrict__ qkv,
                                          const T* __restrict__ projection_bias,
                                          const float* __restrict__ bias,
                                          const int* __restrict__ starts, T* __restrict__ out,
                                          int seq, int heads, float scale) {
  static_assert(D % 32 == 0, "head_dim must be a multiple of 32");
  const int hidden = heads * D;
  const int row_stride = 3 * hidden;
  const int sequence = blockIdx.z;
  const int head = blockIdx.y;
  const int first_query = blockIdx.x * BLOCK_QUERIES;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  // The sequence's first row and its length; from here on `seq` is the latter.
  const int start = starts ? starts[sequence] : sequence * seq;
  seq = starts ? starts[sequence + 1] - start : seq;
  // The whole block leaves together, before any barrier.
  if (first_query >= seq) return;
  const float* key_biases = bias ? bias + start : nullptr;  // one per row of either layout

  // Every tile a tensor-core load or store starts on is 32-byte aligned (as WMMA needs): the
  // leading dimensions above keep 16-row steps and 16-column steps on 32-byte multiples.
  __shared__ __align__(32) T q_tile[BLOCK_QUERIES * QKV_LD<D>];
  __shared__ __align__(32) T k_tile[BLOCK_KEYS * QKV_LD<D>];
  __shared__ __align__(32) T v_tile[BLOCK_KEYS * QKV_LD<D>];
  __shared__ __align__(32) float s_tiles[WARPS][ROWS_PER_WARP * S_LD];
  __shared__ __align__(32) T p_tiles[WARPS][ROWS_PER_WARP * P_LD];
  __shared__ __align__(32) float o_tiles[WARPS][ROWS_PER_WARP * O_LD<D>];
  __shared__ float key_bias[BLOCK_KEYS];
  // Each lane's partial maximum or sum, read by its partner lane (lane ^ 1).
  __shared__ float partials[WARPS][32];
  // Per row of each warp's queries: the tile's rescaling of the output, at the end 1 / sum.
  __shared__ float row_factor[WARPS][ROWS_PER_WARP];

  const T* tokens = qkv + (size_t)start * row_stride + head * D;
  // The head's query, key and value columns of the projection's bias.
  const T* q_bias = projection_bias ? projection_bias + head * D : nullptr;
  const T* k_bias = projection_bias ? q_bias + hidden : nullptr;
  const T* v_bias = projection_bias ? q_bias + 2 * hidden : nullptr;
  load_rows<T, D>(q_tile, tokens, q_bias, first_query, BLOCK_QUERIES, seq, row_stride);
  float* o_tile = o_tiles[warp];
  for (int i = lane; i < ROWS_PER_WARP * O_LD<D>; i += 32) o_tile[i] = 0.0f;

  const int row = lane / 2;
  const int half = lane % 2;
  float* s_row = s_tiles[warp] + row * S_LD + half * HALF_KEYS;
  T* p_row = p_tiles[warp] + row * P_LD + half * HALF_KEYS;
  const float* bias_half = key_bias + half * HALF_KEYS;
  float row_max = -INFINITY;
  float row_sum = 0.0f;

  for (int first_key = 0; first_key < seq; first_key += BLOCK_KEYS) {
    __syncthreads();  // every warp is done with the previous tile's keys and values
    load_rows<T, D>(k_tile, tokens + hidden, k_bias, first_key, BLOCK_KEYS, seq, row_stride);
    load_rows<T, D>(v_tile, tokens + 2 * hidden, v_bias, first_key, BLOCK_KEYS, seq,
                    row_stride);
    for (int j = threadIdx.x; j < BLOCK_KEYS; j += THREADS) {
      const int key = first_key + j;
      key_bias[j] = key >= seq ? -INFINITY : key_biases ? key_biases[key] : 0.0f;
    }
    __syncthreads();

    scores_tile<T, D>(q_tile + warp * ROWS_PER_WARP * QKV_LD<D>, k_tile, s_tiles[warp]);
    __syncwarp();

    // Each lane walks its half row from column `row` on (mod HALF_KEYS): in step, the 32
    // lanes would hit 2 banks of the score tile and 4 of the probability tile (rows 32 floats
    // and 32 halves apart); rotated, they hit 32 (enumerated over the lanes' addresses).
    // Unrolled by 4 only: fully unrolled, the compiler hoists all 16 rotated addresses and a
    // d32 build needs 116 registers instead of 72 (ptxas -v), which would cut the blocks an SM
    // holds from 7 to 4.
    // The tile's maximum of this row: this lane's half, then its partner's.
    float tile_max = -INFINITY;
#pragma unroll 4
    for (int i = 0; i < HALF_KEYS; ++i) {
      const int j = (i + row) % HALF_KEYS;
      const float x = s_row[j] * scale + bias_half[j];
      s_row[j] = x;
      tile_max = fmaxf(tile_max, x);
    }
    partials[warp][lane] = tile_max;
    __syncwarp();
    tile_max = fmaxf(tile_max, partials[warp][lane ^ 1]);
    // Finite: the tile's first key is a real one, and its row pair covers it.
    const float new_max = fmaxf(row_max, tile_max);
    // __expf: the hardware's exp2 approximation (a few ulp of f32), far below the f16/bf16
    // rounding of the probabilities; libm's expf costs several times the instructions.
    const float correction = __expf(row_max - new_max);  // 0 on the first tile
    float part = 0.0f;
#pragma unroll 4
    for (int i = 0; i < HALF_KEYS; ++i) {
      const int j = (i + row) % HALF_KEYS;
      const float p = __expf(s_row[j] - new_max);
      p_row[j] = from_float<T>(p);
      part += p;
    }
    __syncwarp();  // the partner has read this lane's maximum
    partials[warp][lane] = part;
    __syncwarp();
    row_sum = row_sum * correction + part + partials[warp][lane ^ 1];
    row_max = new_max;
    if (half == 0) row_factor[warp][row] = correction;
    __syncwarp();
    // Rescale the output rows, each lane taking consecutive columns (conflict-free).
    for (int i = lane; i < ROWS_PER_WARP * D; i += 32) {
      o_tile[i / D * O_LD<D> + i % D] *= row_factor[warp][i / D];
    }
    __syncwarp();

    context_tile<T, D>(p_tiles[warp], v_tile, o_tile);
    __syncwarp();
  }

  // Normalise and write, consecutive lanes on consecutive columns of a row.
  if (half == 0) row_factor[warp][row] = 1.0f / row_sum;
  __syncwarp();
  for (int i = lane; i < ROWS_PER_WARP * D; i += 32) {
    const int r = i / D;
    const int query = first_query + warp * ROWS_PER_WARP + r;
    if (query < seq) {
      T* dst = out + ((size_t)start + query) * hidden + head * D + i % D;
      *dst = from_float<T>(o_tile[r * O_LD<D> + i % D] * row_factor[warp][r]);
    }
  }
}

}  // namespace bert_flash

#ifdef __CUDACC__
// Launch with grid (ceil(seq / 64), heads, batch) and 128 threads; no dynamic shared memory.
#define BERT_FLASH_ATTENTION(NAME, T, D)                                                      \
  extern "C" __global__ void __launch_bounds__(bert_flash::THREADS)                          \
      NAME(const T* qkv, const T* projection_bias, const float* bias, const int* starts,      \
           T* out, int seq, int heads, float scale) {                                         \
    bert_flash::attention<T, D>(qkv, projection_bias, bias, starts, out, seq, heads, scale);  \
  }

BERT_FLASH_ATTENTION(flash_attention_f16_d32, __half, 32)
BERT_FLASH_ATTENTION(flash_attention_f16_d64, __half, 64)
BERT_FLASH_ATTENTION(flash_attention_bf16_d32, __nv_bfloat16, 32)
BERT_FLASH_ATTENTION(flash_attention_bf16_d64, __nv_bfloat16, 64)
#endif
