// The fused bias/GELU and residual/LayerNorm kernels' source under the CPU emulation
// (emulate.h), launched over the same grids as on the GPU. Called from the test suite
// (tests/src/lib.rs, cuda_emulation).
#include "emulate.h"

namespace bert_epilogues {
inline float to_float(float x) { return x; }
template <typename T>
T from_float(float x);
template <>
inline float from_float<float>(float x) {
  return x;
}
}  // namespace bert_epilogues

#include "../../crates/embeddings/src/cuda/epilogues.cu"

// x, out: `total` floats in rows of `cols`; both multiples of 4 (one 16-byte vector a thread).
// Returns 0, or 1 for sizes the kernel does not take.
extern "C" int emulated_bias_gelu(const float* x, const float* bias, float* out,
                                  unsigned long long total, int cols) {
  using namespace bert_epilogues;
  constexpr int VEC = 4;
  if (cols <= 0 || cols % VEC != 0 || total % cols != 0) return 1;
  const int blocks = (int)((total + THREADS * VEC - 1) / (THREADS * VEC));
  emulation::launch({blocks, 1, 1}, THREADS, [=] { bias_gelu<float>(x, bias, out, total, cols); });
  return 0;
}

// x, residual, out: [rows, hidden]; bias, gamma, beta: [hidden]; bias and residual may be null.
// `per_lane` picks the build (4, 8, 12, 16, 24 or 32 registers a lane; hidden <= 32 * per_lane).
// Returns 0, or 1 for a per_lane that is not built or too small.
extern "C" int emulated_residual_layer_norm(const float* x, const float* bias,
                                            const float* residual, const float* gamma,
                                            const float* beta, float* out, int rows, int hidden,
                                            float eps, int per_lane) {
  using namespace bert_epilogues;
  if (hidden <= 0 || hidden > 32 * per_lane) return 1;
  const int blocks = (rows + WARPS - 1) / WARPS;
#define BERT_EMULATED_LAYER_NORM(N)                                                        \
  case N:                                                                                  \
    emulation::launch({blocks, 1, 1}, THREADS, [=] {                                       \
      residual_layer_norm<float, N>(x, bias, residual, gamma, beta, out, rows, hidden, eps); \
    });                                                                                    \
    return 0;
  switch (per_lane) {
    BERT_EMULATED_LAYER_NORM(4)
    BERT_EMULATED_LAYER_NORM(8)
    BERT_EMULATED_LAYER_NORM(12)
    BERT_EMULATED_LAYER_NORM(16)
    BERT_EMULATED_LAYER_NORM(24)
    BERT_EMULATED_LAYER_NORM(32)
    default:
      return 1;
  }
#undef BERT_EMULATED_LAYER_NORM
}

// x, dy, dx, dy_xhat: [rows, hidden]; gamma: [hidden]. `per_lane` as for
// emulated_residual_layer_norm. Returns 0, or 1 for a per_lane that is not built or too small.
extern "C" int emulated_layer_norm_backward(const float* x, const float* dy, const float* gamma,
                                            float* dx, float* dy_xhat, int rows, int hidden,
                                            float eps, int per_lane) {
  using namespace bert_epilogues;
  if (hidden <= 0 || hidden > 32 * per_lane) return 1;
  const int blocks = (rows + WARPS - 1) / WARPS;
#define BERT_EMULATED_BACKWARD(N)                                                      \
  case N:                                                                              \
    emulation::launch({blocks, 1, 1}, THREADS, [=] {                                   \
      layer_norm_backward<N>(x, dy, gamma, dx, dy_xhat, rows, hidden, eps);            \
    });                                                                                \
    return 0;
  switch (per_lane) {
    BERT_EMULATED_BACKWARD(4)
    BERT_EMULATED_BACKWARD(8)
    BERT_EMULATED_BACKWARD(12)
    BERT_EMULATED_BACKWARD(16)
    BERT_EMULATED_BACKWARD(24)
    BERT_EMULATED_BACKWARD(32)
    default:
      return 1;
  }
#undef BERT_EMULATED_BACKWARD
}

// x, out: [rows, keys] (rows = batch * rows_per_sequence); bias: [batch, keys]. `per_lane`:
// 1, 2, 4, 8 or 16 (keys <= 32 * per_lane). Returns 0, or 1 for a build that does not exist or
// is too small.
extern "C" int emulated_attention_softmax(const float* x, const float* bias, float* out,
                                          int rows, int keys, int rows_per_sequence, float scale,
                                          int per_lane) {
  using namespace bert_epilogues;
  if (keys <= 0 || keys > 32 * per_lane) return 1;
  const int blocks = (rows + WARPS - 1) / WARPS;
#define BERT_EMULATED_SOFTMAX(N)                                                         \
  case N:                                                                                \
    emulation::launch({blocks, 1, 1}, THREADS, [=] {                                     \
      attention_softmax<N>(x, bias, out, rows, keys, rows_per_sequence, scale);          \
    });                                                                                  \
    return 0;
  switch (per_lane) {
    BERT_EMULATED_SOFTMAX(1)
    BERT_EMULATED_SOFTMAX(2)
    BERT_EMULATED_SOFTMAX(4)
    BERT_EMULATED_SOFTMAX(8)
    BERT_EMULATED_SOFTMAX(16)
    default:
      return 1;
  }
#undef BERT_EMULATED_SOFTMAX
}

// y, dy, dx: [rows, keys]; `per_lane` as above. Returns 0, or 1 as above.
extern "C" int emulated_attention_softmax_backward(const float* y, const float* dy, float* dx,
                                                   int rows, int keys, float scale,
                                                   int per_lane) {
  using namespace bert_epilogues;
  if (keys <= 0 || keys > 32 * per_lane) return 1;
  const int blocks = (rows + WARPS - 1) / WARPS;
#define BERT_EMULATED_SOFTMAX_BACKWARD(N)                                                \
  case N:                                                                                \
    emulation::launch({blocks, 1, 1}, THREADS,                                           \
                      [=] { attention_softmax_backward<N>(y, dy, dx, rows, keys, scale); }); \
    return 0;
  switch (per_lane) {
    BERT_EMULATED_SOFTMAX_BACKWARD(1)
    BERT_EMULATED_SOFTMAX_BACKWARD(2)
    BERT_EMULATED_SOFTMAX_BACKWARD(4)
    BERT_EMULATED_SOFTMAX_BACKWARD(8)
    BERT_EMULATED_SOFTMAX_BACKWARD(16)
    default:
      return 1;
  }
#undef BERT_EMULATED_SOFTMAX_BACKWARD
}

// out: `total` floats of the mask (see dropout_mask). Always 0.
extern "C" int emulated_dropout_mask(float* out, unsigned long long total,
                                     unsigned long long state, float p, float scale) {
  using namespace bert_epilogues;
  const int blocks = (int)((total + THREADS - 1) / THREADS);
  emulation::launch({blocks, 1, 1}, THREADS,
                    [=] { dropout_mask<float>(out, total, state, p, scale); });
  return 0;
}
