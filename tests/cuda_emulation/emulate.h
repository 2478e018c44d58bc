// A CPU emulation of the CUDA primitives crates/embeddings/src/cuda/flash_attention.cu uses,
// so its indexing, tiling and online softmax run in the test suite on machines without a GPU.
//
// Each thread of a block is a std::thread (blocks run one after another), so __shared__
// becomes `static` (one copy, shared by the block's threads), __syncthreads and __syncwarp
// are barriers over the block and over the thread's warp of 32. Element type float: the
// half-precision conversions are identities here. The two tensor-core tile products (WMMA,
// CUDA-only in the kernel's source) are written as plain loops, run by lane 0 of the warp:
// the kernel brackets each with __syncwarp, as the warp-collective WMMA calls need.
#pragma once

#include <barrier>
#include <cmath>
#include <cstddef>

struct uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

struct emulated_dim3 {
  int x = 0, y = 0, z = 0;
};

namespace emulation {
inline thread_local emulated_dim3 thread_index;
inline thread_local emulated_dim3 block_index;
inline std::barrier<>* block_barrier = nullptr;
inline std::barrier<>** warp_barriers = nullptr;
}  // namespace emulation

#define threadIdx (emulation::thread_index)
#define blockIdx (emulation::block_index)
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

inline void __syncthreads() { emulation::block_barrier->arrive_and_wait(); }
inline void __syncwarp() { emulation::warp_barriers[threadIdx.x / 32]->arrive_and_wait(); }

namespace bert_flash {
template <typename T>
T from_float(float x);
template <typename T, int D>
void scores_tile(const T* q, const T* k, float* s);
template <typename T, int D>
void context_tile(const T* p, const T* v, float* o);
}  // namespace bert_flash
