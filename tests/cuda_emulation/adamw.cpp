// The fused AdamW kernel's source under the CPU emulation (emulate.h), launched over the same
// grid as on the GPU. Called from the test suite (tests/src/lib.rs, cuda_emulation).
#include "emulate.h"

#include "../../crates/finetune/src/cuda/adamw.cu"

// theta, grad, first, second: n floats each; scalars: the nine of bert_adamw::Scalars, in its
// order. Always 0.
extern "C" int emulated_adamw_step(float* theta, const float* grad, float* first, float* second,
                                   unsigned long long n, const float* scalars) {
  using namespace bert_adamw;
  const Scalars s{scalars[0], scalars[1], scalars[2], scalars[3], scalars[4],
                  scalars[5], scalars[6], scalars[7], scalars[8]};
  const int blocks = (int)((n + THREADS - 1) / THREADS);
  emulation::launch({blocks, 1, 1}, THREADS,
                    [=] { adamw_step(theta, grad, first, second, n, s); });
  return 0;
}
