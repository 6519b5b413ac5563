// Argument checks of the ops, shared by the CPU and CUDA implementations (which see the same
// schemas, declared in ditfast.cpp). The patch ops' checks return the geometry the kernels need.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>

namespace ditfast {

inline void check_timestep_embedding(const at::Tensor& t, int64_t dim, double max_period) {
  TORCH_CHECK(t.dim() == 1, "timestep_embedding: t must be 1-D (B,), got ", t.dim(), "-D");
  TORCH_CHECK(dim >= 1, "timestep_embedding: dim must be positive, got ", dim);
  TORCH_CHECK(max_period > 0, "timestep_embedding: max_period must be positive, got ", max_period);
}

struct PatchEmbedShape {
  int64_t B, C, H, W, p, D, T;
};

inline PatchEmbedShape check_patch_embed(const at::Tensor& x, const at::Tensor& weight,
                                         const std::optional<at::Tensor>& bias,
                                         const std::optional<at::Tensor>& pos_embed) {
  TORCH_CHECK(x.dim() == 4, "patch_embed: x must be (B, C, H, W), got ", x.sizes());
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == weight.size(3),
              "patch_embed: weight must be (D, C, p, p), got ", weight.sizes());
  PatchEmbedShape s{x.size(0), x.size(1), x.size(2), x.size(3), weight.size(2), weight.size(0), 0};
  TORCH_CHECK(weight.size(1) == s.C, "patch_embed: weight ", weight.sizes(), " does not take x's ", s.C, " channels");
  TORCH_CHECK(s.p > 0 && s.H % s.p == 0 && s.W % s.p == 0, "patch_embed: H and W (", s.H, ", ", s.W,
              ") must be multiples of the patch size ", s.p);
  s.T = (s.H / s.p) * (s.W / s.p);
  TORCH_CHECK(x.is_floating_point(), "patch_embed: x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.device() == x.device(),
              "patch_embed: weight must have x's dtype and device");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == s.D, "patch_embed: bias must be (", s.D, ",), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->device() == x.device(),
                "patch_embed: bias must have x's dtype and device");
  }
  if (pos_embed.has_value()) {
    TORCH_CHECK(pos_embed->dim() == 3 && pos_embed->size(0) == 1 && pos_embed->size(1) == s.T && pos_embed->size(2) == s.D,
                "patch_embed: pos_embed must be (1, ", s.T, ", ", s.D, "), got ", pos_embed->sizes());
    TORCH_CHECK(pos_embed->scalar_type() == x.scalar_type() && pos_embed->device() == x.device(),
                "patch_embed: pos_embed must have x's dtype and device");
  }
  return s;
}

// Side of the square patch grid of a token tensor (B, G*G, p*p*C).
inline int64_t check_tokens(const char* op, const at::Tensor& y, int64_t p, int64_t C) {
  TORCH_CHECK(p >= 1 && C >= 1, op, ": patch size and channels must be positive, got p=", p, ", C=", C);
  TORCH_CHECK(y.dim() == 3 && y.size(2) == p * p * C, op, ": tokens must be (B, T, p*p*C) = (B, T, ", p * p * C,
              "), got ", y.sizes());
  TORCH_CHECK(y.is_floating_point(), op, ": tokens must be floating point, got ", y.scalar_type());
  const auto G = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(y.size(1)))));
  TORCH_CHECK(G * G == y.size(1), op, ": the token count must be a square number, got ", y.size(1));
  return G;
}

// Side of the square patch grid of an image (B, C, G*p, G*p).
inline int64_t check_image(const char* op, const at::Tensor& x, int64_t p) {
  TORCH_CHECK(p >= 1, op, ": patch size must be positive, got ", p);
  TORCH_CHECK(x.dim() == 4 && x.size(2) == x.size(3) && x.size(2) % p == 0, op,
              ": image must be (B, C, H, H) with H a multiple of ", p, ", got ", x.sizes());
  TORCH_CHECK(x.is_floating_point(), op, ": image must be floating point, got ", x.scalar_type());
  return x.size(2) / p;
}

inline void check_cfg(const at::Tensor& y, int64_t C, int64_t guided) {
  TORCH_CHECK(y.size(0) % 2 == 0, "unpatchify_cfg: the batch must be [cond; uncond], of even size, got ", y.size(0));
  TORCH_CHECK(guided >= 0 && guided <= C, "unpatchify_cfg: guided_channels must lie in [0, ", C, "], got ", guided);
}

}  // namespace ditfast
