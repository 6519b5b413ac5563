// Raw-pointer launchers of the CUDA kernels. Only CUDA runtime types here, so each .cu file
// compiles with nvcc alone (no torch headers); the torch-facing bindings are in *_cuda.cpp.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>

namespace ditfast {
namespace cuda {

// t: (batch,) float32 timesteps; out: (batch, dim) float32, row-major.
cudaError_t timestep_embedding(const float* t, float* out, int64_t batch, int64_t dim, float max_period,
                               cudaStream_t stream);

}  // namespace cuda
}  // namespace ditfast
