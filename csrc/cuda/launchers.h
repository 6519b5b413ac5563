// Raw-pointer launchers of the CUDA kernels. Only CUDA runtime types here, so each .cu file
// compiles with nvcc alone (no torch headers); the torch-facing bindings are in *_cuda.cpp.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>

namespace ditfast {
namespace cuda {

// Element type of the tensors a launcher reads and writes (the binding maps at::ScalarType to it).
enum class DType : int { kFloat32, kFloat16, kBFloat16, kFloat64 };

// t: (batch,) float32 timesteps; out: (batch, dim) float32, row-major.
cudaError_t timestep_embedding(const float* t, float* out, int64_t batch, int64_t dim, float max_period,
                               cudaStream_t stream);

// Patch embedding: out[b*T + t, d] = bias[d] + pos[t, d] + sum_k weight[d, k] * patch(b, t)[k], with
// patch k = (c*p + kh)*p + kw the pixel x[b, c, gh*p + kh, gw*p + kw] of token t = gh*(W/p) + gw.
// x: (B, C, H, W) with element strides sb, sc, sh, sw; weight: (D, C*p*p) contiguous; bias: (D,)
// or null; pos: (T, D) contiguous or null; out: (B*T, D) contiguous; T = (H/p)*(W/p). All of
// one dtype; fp32 accumulation (fp64 for fp64). cudaErrorInvalidValue when C*p*p is too large
// for the shared-memory tile (over 3072 in fp32).
cudaError_t patch_embed(DType dtype, const void* x, int64_t sb, int64_t sc, int64_t sh, int64_t sw,
                        const void* weight, const void* bias, const void* pos, void* out, int64_t B, int64_t C,
                        int64_t H, int64_t W, int64_t p, int64_t D, cudaStream_t stream);

// Token-major <-> image layout of a square patch grid, G = grid side, P = p*p*C values per token.
// tokens: (B, G*G, P) contiguous with per-token order (i, j, c); image: (B, C, G*p, G*p) contiguous;
// image[b, c, gh*p + i, gw*p + j] = tokens[b, gh*G + gw, (i*p + j)*C + c].
// unpatchify reads tokens and writes image; patchify reads image and writes tokens.
// cudaErrorInvalidValue when one token (p*p*C values) does not fit the shared-memory tile.
cudaError_t unpatchify(DType dtype, const void* tokens, void* image, int64_t B, int64_t C, int64_t p, int64_t G,
                       cudaStream_t stream);
cudaError_t patchify(DType dtype, const void* image, void* tokens, int64_t B, int64_t C, int64_t p, int64_t G,
                     cudaStream_t stream);

// Classifier-free guidance fused with unpatchify. tokens: (2*half, G*G, p*p*C), samples [0, half)
// conditional and [half, 2*half) unconditional; image: (half, C, G*p, G*p), or (2*half, ...) when
// full_batch. Channel c < guided: u + scale*(k - u) for cond value k and uncond value u, computed
// in fp32 (fp64 for fp64), in every output sample; channel c >= guided: the cond value in samples
// [0, half) and the uncond value in samples [half, 2*half).
cudaError_t unpatchify_cfg(DType dtype, const void* tokens, void* image, int64_t half, int64_t C, int64_t p,
                           int64_t G, int64_t guided, double scale, bool full_batch, cudaStream_t stream);

}  // namespace cuda
}  // namespace ditfast
