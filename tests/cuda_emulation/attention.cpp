// The fused attention kernel's source under the CPU emulation (emulate.h), launched over the
// same grid as on the GPU. Called from the test suite (tests/src/lib.rs, cuda_emulation).
#include "emulate.h"

namespace bert_flash {
template <typename T>
T from_float(float x);
inline float to_float(float x) { return x; }
template <typename T, int D>
void scores_tile(const T* q, const T* k, float* s);
template <typename T, int D>
void context_tile(const T* p, const T* v, float* o);
}  // namespace bert_flash

#include "../../crates/embeddings/src/cuda/flash_attention.cu"

namespace bert_flash {
template <>
float from_float<float>(float x) {
  return x;
}

template <typename T, int D>
void scores_tile(const T* q, const T* k, float* s) {
  if (threadIdx.x % 32 != 0) return;
  for (int m = 0; m < ROWS_PER_WARP; ++m)
    for (int n = 0; n < BLOCK_KEYS; ++n) {
      float dot = 0.0f;
      for (int d = 0; d < D; ++d) dot += q[m * QKV_LD<D> + d] * k[n * QKV_LD<D> + d];
      s[m * S_LD + n] = dot;
    }
}

template <typename T, int D>
void context_tile(const T* p, const T* v, float* o) {
  if (threadIdx.x % 32 != 0) return;
  for (int m = 0; m < ROWS_PER_WARP; ++m)
    for (int n = 0; n < D; ++n) {
      float sum = o[m * O_LD<D> + n];
      for (int k = 0; k < BLOCK_KEYS; ++k) sum += p[m * P_LD + k] * v[k * QKV_LD<D> + n];
      o[m * O_LD<D> + n] = sum;
    }
}
}  // namespace bert_flash

template <int D>
static void launch(const float* qkv, const float* projection_bias, const float* bias,
                   const int* starts, float* out, int batch, int seq, int heads, float scale) {
  using namespace bert_flash;
  const int query_blocks = (seq + BLOCK_QUERIES - 1) / BLOCK_QUERIES;
  emulation::launch({query_blocks, heads, batch}, THREADS, [=] {
    attention<float, D>(qkv, projection_bias, bias, starts, out, seq, heads, scale);
  });
}

// Padded (starts null): qkv [batch, seq, 3 * heads * head_dim], bias [batch, seq] or null, out
// [batch, seq, heads * head_dim]. Packed (starts given, batch + 1 of them): qkv holds
// starts[batch] rows, sequence z rows starts[z] .. starts[z + 1], seq the longest, bias null.
// projection_bias: [3 * heads * head_dim] added to every row of qkv, or null.
// Returns 0, or 1 for a head_dim the kernel is not built for.
extern "C" int emulated_flash_attention(const float* qkv, const float* projection_bias,
                                        const float* bias, const int* starts, float* out,
                                        int batch, int seq, int heads, int head_dim,
                                        float scale) {
  switch (head_dim) {
    case 32:
      launch<32>(qkv, projection_bias, bias, starts, out, batch, seq, heads, scale);
      return 0;
    case 64:
      launch<64>(qkv, projection_bias, bias, starts, out, batch, seq, heads, scale);
      return 0;
    default:
      return 1;
  }
}
