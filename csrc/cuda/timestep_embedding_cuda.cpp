// CUDA binding of ditfast::timestep_embedding: checks, device guard, current stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "launchers.h"

#include "../checks.h"

namespace ditfast {
namespace {

at::Tensor timestep_embedding_cuda(const at::Tensor& t, int64_t dim, double max_period) {
  check_timestep_embedding(t, dim, max_period);
  const c10::cuda::CUDAGuard guard(t.device());
  const at::Tensor tf = t.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({tf.size(0), dim}, tf.options());
  const cudaError_t err = cuda::timestep_embedding(tf.data_ptr<float>(), out.data_ptr<float>(), tf.size(0), dim,
                                                   static_cast<float>(max_period),
                                                   c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "timestep_embedding: CUDA launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ditfast, CUDA, m) { m.impl("timestep_embedding", &timestep_embedding_cuda); }

}  // namespace ditfast
