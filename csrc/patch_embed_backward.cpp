// ditfast::patch_embed_backward, for every device: the gradients of patch_embed written with ATen
// ops (two GEMMs on unfolded views, two reductions), so cuBLAS/oneDNN do the reductions over
// tokens. Only the forward is a custom kernel.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/matmul.h>
#include <torch/library.h>

#include <array>
#include <tuple>

namespace ditfast {
namespace {

// grad (B, T, D), x (B, C, H, W), weight (D, C, p, p) -> (dx, dweight, dbias, dpos_embed); an
// output whose output_mask entry is false comes back as an empty tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> patch_embed_backward(const at::Tensor& grad,
                                                                                const at::Tensor& x,
                                                                                const at::Tensor& weight,
                                                                                std::array<bool, 4> output_mask) {
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4, "patch_embed_backward: x and weight must be 4-D");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t D = weight.size(0), p = weight.size(2);
  TORCH_CHECK(p > 0 && H % p == 0 && W % p == 0 && weight.size(1) == C && weight.size(3) == p,
              "patch_embed_backward: weight ", weight.sizes(), " does not fit x ", x.sizes());
  const int64_t gh = H / p, gw = W / p, T = gh * gw, K = C * p * p;
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == B && grad.size(1) == T && grad.size(2) == D,
              "patch_embed_backward: grad must be (", B, ", ", T, ", ", D, "), got ", grad.sizes());
  const at::Tensor g = grad.reshape({B * T, D});
  at::Tensor dx = at::empty({0}, grad.options());
  at::Tensor dweight = dx, dbias = dx, dpos = dx;
  if (output_mask[0]) {
    // d patches (B*T, K) = g @ W; rows are tokens (b, gh, gw), columns (c, kh, kw): fold back.
    const at::Tensor dpatch = at::matmul(g, weight.reshape({D, K}));
    dx = dpatch.view({B, gh, gw, C, p, p}).permute({0, 3, 1, 4, 2, 5}).reshape({B, C, H, W});
  }
  if (output_mask[1]) {
    const at::Tensor patches = x.reshape({B, C, gh, p, gw, p}).permute({0, 2, 4, 1, 3, 5}).reshape({B * T, K});
    dweight = at::matmul(g.t(), patches).view({D, C, p, p});
  }
  if (output_mask[2]) dbias = grad.sum(at::IntArrayRef{0, 1});
  if (output_mask[3]) dpos = grad.sum(at::IntArrayRef{0}, /*keepdim=*/true);
  return {dx, dweight, dbias, dpos};
}

}  // namespace

TORCH_LIBRARY_IMPL(ditfast, CompositeExplicitAutograd, m) { m.impl("patch_embed_backward", &patch_embed_backward); }

}  // namespace ditfast
