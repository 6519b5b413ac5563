// CPU implementation of ditfast::timestep_embedding.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>

#include "../checks.h"

namespace ditfast {
namespace {

at::Tensor timestep_embedding_cpu(const at::Tensor& t, int64_t dim, double max_period) {
  check_timestep_embedding(t, dim, max_period);
  const at::Tensor tf = t.to(at::kFloat).contiguous();
  const int64_t batch = tf.size(0);
  const int64_t half = dim / 2;
  at::Tensor out = at::empty({batch, dim}, tf.options());
  const float* src = tf.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  // Frequencies in float32, computed the way the PyTorch reference computes them.
  const float neg_log_period = static_cast<float>(-std::log(max_period));
  at::parallel_for(0, batch, 64, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      float* row = dst + b * dim;
      for (int64_t i = 0; i < half; ++i) {
        const float freq = std::exp(neg_log_period * static_cast<float>(i) / static_cast<float>(half));
        const float arg = src[b] * freq;
        row[i] = std::cos(arg);
        row[half + i] = std::sin(arg);
      }
      if (dim % 2) row[dim - 1] = 0.0f;
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ditfast, CPU, m) { m.impl("timestep_embedding", &timestep_embedding_cpu); }

}  // namespace ditfast
