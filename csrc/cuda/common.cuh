// Device helpers shared by the kernels: element types, fp32 (fp64) math type, 16-byte vector
// access and dispatch from the launchers' DType. CUDA headers only.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "launchers.h"

namespace ditfast {
namespace cuda {

// Math type: fp32 for fp32/fp16/bf16, fp64 for fp64.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
__device__ __forceinline__ acc_t<T> to_acc(T v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(v);
  } else {
    return v;
  }
}

template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(v);
  } else {
    return v;
  }
}

// Elements in one 16-byte access.
template <typename T>
inline constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));

// N contiguous elements from/to 16-byte aligned global or shared memory, as 16-byte accesses.
template <typename T, int N>
__device__ __forceinline__ void load_vec(const T* __restrict__ src, T (&dst)[N]) {
  static_assert((N * sizeof(T)) % 16 == 0, "whole 16-byte accesses only");
  constexpr int kU = static_cast<int>(N * sizeof(T) / 16);
  const uint4* s = reinterpret_cast<const uint4*>(src);
  uint4* d = reinterpret_cast<uint4*>(dst);
#pragma unroll
  for (int u = 0; u < kU; ++u) d[u] = s[u];
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* __restrict__ dst, const T (&src)[N]) {
  static_assert((N * sizeof(T)) % 16 == 0, "whole 16-byte accesses only");
  constexpr int kU = static_cast<int>(N * sizeof(T) / 16);
  uint4* d = reinterpret_cast<uint4*>(dst);
  const uint4* s = reinterpret_cast<const uint4*>(src);
#pragma unroll
  for (int u = 0; u < kU; ++u) d[u] = s[u];
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Streaming multiprocessors of the current device (used to size grids); 1 if the query fails.
inline int sm_count() {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 1;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) return 1;
  return sms > 0 ? sms : 1;
}

// Calls f(T{}) with T the element type named by dtype.
template <typename F>
cudaError_t dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      return f(float{});
    case DType::kFloat16:
      return f(__half{});
    case DType::kBFloat16:
      return f(__nv_bfloat16{});
    case DType::kFloat64:
      return f(double{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace ditfast
