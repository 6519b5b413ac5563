// CUDA kernel of ditfast::timestep_embedding: one thread per output element.
#include "launchers.h"

namespace ditfast {
namespace cuda {
namespace {

__global__ void timestep_embedding_kernel(const float* __restrict__ t,  // (batch,)
                                          float* __restrict__ out,      // (batch, dim)
                                          int64_t batch, int64_t dim, float neg_log_period) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= batch * dim) return;
  const int64_t b = idx / dim;
  const int64_t j = idx - b * dim;
  const int64_t half = dim / 2;
  if (j >= 2 * half) {  // trailing zero column of an odd dim
    out[idx] = 0.0f;
    return;
  }
  const int64_t i = j < half ? j : j - half;
  const float freq = expf(neg_log_period * static_cast<float>(i) / static_cast<float>(half));
  const float arg = t[b] * freq;
  out[idx] = j < half ? cosf(arg) : sinf(arg);
}

}  // namespace

cudaError_t timestep_embedding(const float* t, float* out, int64_t batch, int64_t dim, float max_period,
                               cudaStream_t stream) {
  const int64_t n = batch * dim;
  if (n == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  timestep_embedding_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(t, out, batch, dim,
                                                                                   -logf(max_period));
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace ditfast
