// CUDA bindings of ditfast::patch_embed, ditfast::unpatchify, ditfast::patchify and
// ditfast::unpatchify_cfg: argument checks (shared with the CPU ops), device guard, current
// stream, dtype -> launcher; the kernels are in patch_embed.cu and unpatchify.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"
#include "launchers.h"

namespace ditfast {
namespace {

cuda::DType launcher_dtype(const char* op, at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return cuda::DType::kFloat32;
    case at::kHalf:
      return cuda::DType::kFloat16;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    case at::kDouble:
      return cuda::DType::kFloat64;
    default:
      break;
  }
  TORCH_CHECK(false, op, ": unsupported dtype ", t, " (expected float32, float16, bfloat16 or float64)");
  return cuda::DType::kFloat32;  // not reached
}

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err != cudaErrorInvalidValue, op,
              ": shape outside what the CUDA kernel supports (a token of p*p*C values must fit its "
              "shared-memory tile; see csrc/cuda/launchers.h)");
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

at::Tensor patch_embed_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& pos_embed) {
  const PatchEmbedShape s = check_patch_embed(x, weight, bias, pos_embed);
  const cuda::DType dtype = launcher_dtype("patch_embed", x.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({s.B, s.T, s.D}, x.options());
  if (out.numel() == 0) return out;
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor pe = pos_embed.has_value() ? pos_embed->contiguous() : at::Tensor();
  check_launch("patch_embed",
               cuda::patch_embed(dtype, x.const_data_ptr(), x.stride(0), x.stride(1), x.stride(2), x.stride(3),
                                 w.const_data_ptr(), b.defined() ? b.const_data_ptr() : nullptr,
                                 pe.defined() ? pe.const_data_ptr() : nullptr, out.mutable_data_ptr(), s.B, s.C, s.H,
                                 s.W, s.p, s.D, current_stream()));
  return out;
}

at::Tensor unpatchify_cuda(const at::Tensor& tokens, int64_t p, int64_t C) {
  const int64_t G = check_tokens("unpatchify", tokens, p, C);
  const cuda::DType dtype = launcher_dtype("unpatchify", tokens.scalar_type());
  const c10::cuda::CUDAGuard guard(tokens.device());
  at::Tensor out = at::empty({tokens.size(0), C, G * p, G * p}, tokens.options());
  if (out.numel() == 0) return out;
  const at::Tensor y = tokens.contiguous();
  check_launch("unpatchify", cuda::unpatchify(dtype, y.const_data_ptr(), out.mutable_data_ptr(), y.size(0), C, p, G,
                                              current_stream()));
  return out;
}

at::Tensor patchify_cuda(const at::Tensor& image, int64_t p) {
  const int64_t G = check_image("patchify", image, p);
  const cuda::DType dtype = launcher_dtype("patchify", image.scalar_type());
  const c10::cuda::CUDAGuard guard(image.device());
  const int64_t C = image.size(1);
  at::Tensor out = at::empty({image.size(0), G * G, p * p * C}, image.options());
  if (out.numel() == 0) return out;
  const at::Tensor x = image.contiguous();
  check_launch("patchify", cuda::patchify(dtype, x.const_data_ptr(), out.mutable_data_ptr(), x.size(0), C, p, G,
                                          current_stream()));
  return out;
}

at::Tensor unpatchify_cfg_cuda(const at::Tensor& tokens, int64_t p, int64_t C, double cfg_scale,
                               int64_t guided_channels, bool full_batch) {
  const int64_t G = check_tokens("unpatchify_cfg", tokens, p, C);
  check_cfg(tokens, C, guided_channels);
  const cuda::DType dtype = launcher_dtype("unpatchify_cfg", tokens.scalar_type());
  const c10::cuda::CUDAGuard guard(tokens.device());
  const int64_t half = tokens.size(0) / 2;
  at::Tensor out = at::empty({full_batch ? 2 * half : half, C, G * p, G * p}, tokens.options());
  if (out.numel() == 0) return out;
  const at::Tensor y = tokens.contiguous();
  check_launch("unpatchify_cfg", cuda::unpatchify_cfg(dtype, y.const_data_ptr(), out.mutable_data_ptr(), half, C, p,
                                                      G, guided_channels, cfg_scale, full_batch, current_stream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ditfast, CUDA, m) {
  m.impl("patch_embed", &patch_embed_cuda);
  m.impl("unpatchify", &unpatchify_cuda);
  m.impl("patchify", &patchify_cuda);
  m.impl("unpatchify_cfg", &unpatchify_cfg_cuda);
}

}  // namespace ditfast
