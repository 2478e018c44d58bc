// A CPU emulation of the CUDA primitives the kernels in crates/embeddings/src/cuda/ use, so
// their indexing, tiling and arithmetic run in the test suite on machines without a GPU.
//
// Each thread of a block is a std::thread (blocks run one after another), so __shared__
// becomes `static` (one copy, shared by the block's threads), __syncthreads and __syncwarp
// are barriers over the block and over the thread's warp of 32, and __shfl_xor_sync trades
// through a shared array between two warp barriers. Element type float: the half-precision
// conversions are identities here. The attention kernel's two tensor-core tile products
// (WMMA, CUDA-only in its source) are written as plain loops, run by lane 0 of the warp
// (attention.cpp): the kernel brackets each with __syncwarp, as the warp-collective WMMA calls
// need.
#pragma once

#include <barrier>
#include <cmath>
#include <cstddef>
#include <mutex>
#include <memory>
#include <thread>
#include <vector>

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
inline std::mutex launch_lock;  // see launch
}  // namespace emulation

#define threadIdx (emulation::thread_index)
#define blockIdx (emulation::block_index)
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

inline void __syncthreads() { emulation::block_barrier->arrive_and_wait(); }
inline void __syncwarp() { emulation::warp_barriers[threadIdx.x / 32]->arrive_and_wait(); }

// Every lane of the warp calls it (as the full mask says); a lane reads its partner's value
// once all have written theirs, and writes again only after all have read.
inline float __shfl_xor_sync(unsigned /* full mask */, float value, int lane_mask) {
  static float exchange[1024];
  exchange[threadIdx.x] = value;
  __syncwarp();
  const float partner = exchange[threadIdx.x ^ lane_mask];
  __syncwarp();
  return partner;
}

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
// The GPU's fast approximation; exact here (the tests' tolerance covers its few ulp).
inline float __expf(float x) { return std::exp(x); }
// Single roundings, as on the GPU (x86-64's baseline has no FMA for the compiler to fuse
// with; the CPU's own kernels in Rust do not fuse either).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }

namespace emulation {
// Runs body() as every thread of every block of `grid`, `threads` threads a block (a multiple
// of 32), one block after another. One launch at a time in the process (tests run on several
// threads): the barriers and the __shared__ statics are global.
template <typename Body>
void launch(emulated_dim3 grid, int threads, Body body) {
  const std::lock_guard<std::mutex> hold(launch_lock);
  for (int z = 0; z < grid.z; ++z)
    for (int y = 0; y < grid.y; ++y)
      for (int x = 0; x < grid.x; ++x) {
        std::barrier<> block(threads);
        std::vector<std::unique_ptr<std::barrier<>>> warps;
        std::vector<std::barrier<>*> warp_pointers;
        for (int w = 0; w < threads / 32; ++w) {
          warps.push_back(std::make_unique<std::barrier<>>(32));
          warp_pointers.push_back(warps.back().get());
        }
        block_barrier = &block;
        warp_barriers = warp_pointers.data();
        std::vector<std::thread> team;
        for (int t = 0; t < threads; ++t)
          team.emplace_back([=] {
            thread_index = {t, 0, 0};
            block_index = {x, y, z};
            body();
          });
        for (auto& thread : team) thread.join();
      }
}
}  // namespace emulation

