// AdamW's update of one f32 variable on the GPU, in place, one element a thread: the
// arithmetic of optim.rs's CPU kernel (PyTorch's order), every product and sum rounded on its
// own (the __f*_rn intrinsics: nvcc would otherwise fuse multiply-adds), so GPU and CPU runs
// update the same gradients to the same bits:
//   g = grad * grad_scale; theta *= keep;
//   m = beta1 m + (1 - beta1) g; v = beta2 v + (1 - beta2) g g;
//   theta -= step_size * (m / (sqrt(v) / bias2_sqrt + eps))
// where keep = 1 - lr * weight_decay, step_size = lr / (1 - beta1^t) and
// bias2_sqrt = sqrt(1 - beta2^t). One launch per variable replaces about fifteen tensor ops.
//
// The same source builds under the CPU emulation of tests/cuda_emulation/, which checks it
// against the CPU kernel in the test suite.

namespace bert_adamw {

constexpr int THREADS = 256;

struct Scalars {
  float beta1, beta2, one_minus_beta1, one_minus_beta2, eps, keep, step_size, bias2_sqrt,
      grad_scale;
};

__device__ __forceinline__ void adamw_step(float* __restrict__ theta,
                                           const float* __restrict__ grad,
                                           float* __restrict__ first, float* __restrict__ second,
                                           unsigned long long n, const Scalars& s) {
  const unsigned long long i = (unsigned long long)blockIdx.x * THREADS + threadIdx.x;
  if (i >= n) return;
  const float g = __fmul_rn(grad[i], s.grad_scale);
  const float kept = __fmul_rn(theta[i], s.keep);
  const float m = __fadd_rn(__fmul_rn(s.beta1, first[i]), __fmul_rn(s.one_minus_beta1, g));
  const float v = __fadd_rn(__fmul_rn(s.beta2, second[i]),
                            __fmul_rn(__fmul_rn(s.one_minus_beta2, g), g));
  first[i] = m;
  second[i] = v;
  const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), s.bias2_sqrt), s.eps);
  theta[i] = __fsub_rn(kept, __fmul_rn(s.step_size, __fdiv_rn(m, denom)));
}

}  // namespace bert_adamw

#ifdef __CUDACC__
// Launch with ceil(n / 256) blocks of 256 threads.
extern "C" __global__ void __launch_bounds__(bert_adamw::THREADS)
    adamw_step_f32(float* theta, const float* grad, float* first, float* second,
                   unsigned long long n, bert_adamw::Scalars scalars) {
  bert_adamw::adamw_step(theta, grad, first, second, n, scalars);
}
#endif
