// Host emulation of the CUDA execution model, for running csrc/cuda/*.cu kernels on a machine
// without a GPU (tests only). A launch runs every block in turn; a block runs blockDim.x host
// threads sharing one shared-memory buffer (poisoned with 0xFF, i.e. NaN, before each block),
// with __syncthreads() as a std::barrier. Races show up only by chance (2 cores), so this checks
// index math, tails, vector paths and grid/tile choices, not timing or memory-model subtleties.
// The launch syntax kernel<<<grid, threads, smem, stream>>>(args) is rewritten by the test into
// emu::Launch(emu_smem, grid, threads, smem, stream)(kernel, args).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <math.h>

#include <barrier>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

inline thread_local uint3 threadIdx;
inline uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

template <typename T>
inline T min(T a, T b) {
  return a < b ? a : b;
}

namespace emu {

constexpr size_t kSmemBytes = 48 * 1024;
inline int sm_count = 132;
inline cudaError_t pending = cudaSuccess;
inline std::barrier<>* block_barrier = nullptr;
inline int launches = 0;

inline cudaError_t take_error() {
  const cudaError_t e = pending;
  pending = cudaSuccess;
  return e;
}

inline void sync() { block_barrier->arrive_and_wait(); }

struct Launch {
  unsigned char* smem_buf;
  dim3 grid;
  dim3 block;
  size_t smem;

  Launch(unsigned char* buf, dim3 g, dim3 b, size_t s = 0, cudaStream_t = nullptr) : smem_buf(buf), grid(g), block(b), smem(s) {}

  template <typename K, typename... Args>
  void operator()(K kernel, Args... args) {
    ++launches;
    const unsigned threads = block.x * block.y * block.z;
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 || threads == 0 ||
        threads > 1024 || block.y != 1 || block.z != 1 || smem > kSmemBytes) {
      pending = cudaErrorInvalidConfiguration;
      return;
    }
    gridDim = grid;
    blockDim = block;
    // One host thread per CUDA thread, reused for every block: start/done bracket each block.
    std::barrier<> start(threads + 1), done(threads + 1);
    bool stop = false;
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned t = 0; t < threads; ++t)
      pool.emplace_back([&, t] {
        threadIdx = uint3{t, 0, 0};
        for (;;) {
          start.arrive_and_wait();
          if (stop) return;
          kernel(args...);
          block_barrier->arrive_and_drop();  // an exited thread no longer takes part in barriers
          done.arrive_and_wait();
        }
      });
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          blockIdx = uint3{x, y, z};
          std::memset(smem_buf, 0xFF, kSmemBytes);
          std::barrier<> bar(threads);
          block_barrier = &bar;
          start.arrive_and_wait();
          done.arrive_and_wait();
          block_barrier = nullptr;
        }
    stop = true;
    start.arrive_and_wait();
    for (auto& th : pool) th.join();
  }
};

}  // namespace emu

#define __syncthreads() ::emu::sync()
#define cudaGetLastError() ::emu::take_error()
#define cudaGetDevice(dev) (*(dev) = 0, cudaSuccess)
#define cudaDeviceGetAttribute(value, attr, dev) (*(value) = ::emu::sm_count, cudaSuccess)
