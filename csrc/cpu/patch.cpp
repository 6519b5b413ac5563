// CPU implementations of ditfast::patch_embed, ditfast::unpatchify, ditfast::patchify and
// ditfast::unpatchify_cfg (schemas in ditfast.cpp). fp32/fp64/fp16/bf16, fp32 math for 16-bit types.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"

namespace ditfast {
namespace {

constexpr int64_t kGrainValues = 1 << 15;  // values per parallel_for task, roughly

at::Tensor patch_embed_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& pos_embed) {
  const PatchEmbedShape s = check_patch_embed(x, weight, bias, pos_embed);
  at::Tensor out = at::empty({s.B, s.T, s.D}, x.options());
  if (out.numel() == 0) return out;
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor pe = pos_embed.has_value() ? pos_embed->contiguous() : at::Tensor();
  const int64_t p = s.p, D = s.D, K = s.C * p * p, grid_w = s.W / p;
  const int64_t sb = x.stride(0), sc = x.stride(1), sh = x.stride(2), sw = x.stride(3);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "patch_embed_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // Weight transposed to (K, D) in the math type, so the inner loop is a contiguous axpy over D.
    std::vector<acc_t> wt(K * D);
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    for (int64_t d = 0; d < D; ++d)
      for (int64_t k = 0; k < K; ++k) wt[k * D + d] = static_cast<acc_t>(wp[d * K + k]);
    std::vector<acc_t> base(D, acc_t(0));
    if (b.defined()) {
      const scalar_t* bp = b.const_data_ptr<scalar_t>();
      for (int64_t d = 0; d < D; ++d) base[d] = static_cast<acc_t>(bp[d]);
    }
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* pp = pe.defined() ? pe.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, s.B * s.T, std::max<int64_t>(1, kGrainValues / D), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> patch(K), row(D);
      for (int64_t n = begin; n < end; ++n) {
        const int64_t bi = n / s.T, t = n % s.T, gh = t / grid_w, gw = t % grid_w;
        const scalar_t* xb = xp + bi * sb + gh * p * sh + gw * p * sw;
        for (int64_t c = 0; c < s.C; ++c)
          for (int64_t kh = 0; kh < p; ++kh)
            for (int64_t kw = 0; kw < p; ++kw)
              patch[(c * p + kh) * p + kw] = static_cast<acc_t>(xb[c * sc + kh * sh + kw * sw]);
        acc_t* __restrict__ r = row.data();
        const acc_t* __restrict__ bs = base.data();
        if (pp != nullptr) {
          const scalar_t* __restrict__ pt = pp + t * D;
          for (int64_t d = 0; d < D; ++d) r[d] = bs[d] + static_cast<acc_t>(pt[d]);
        } else {
          for (int64_t d = 0; d < D; ++d) r[d] = bs[d];
        }
        for (int64_t k = 0; k < K; ++k) {
          const acc_t v = patch[k];
          const acc_t* __restrict__ wk = wt.data() + k * D;
          for (int64_t d = 0; d < D; ++d) r[d] += v * wk[d];
        }
        scalar_t* __restrict__ o = op + n * D;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(r[d]);
      }
    });
  });
  return out;
}

// Calls f(b, image offset, token offset) for every value of `samples` samples of the square grid:
// image (C, G*p, G*p) value [c, gh*p + i, gw*p + j] <-> token (G*G, p*p*C) value [gh*G + gw, (i*p + j)*C + c],
// offsets within one sample. Parallel over (sample, grid row).
template <typename F>
void for_each_value(int64_t samples, int64_t C, int64_t p, int64_t G, const F& f) {
  const int64_t P = p * p * C, side = G * p;
  const int64_t grain = std::max<int64_t>(1, kGrainValues / (C * p * side));
  at::parallel_for(0, samples * G, grain, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t b = u / G, gh = u % G;
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t i = 0; i < p; ++i) {
          const int64_t img = (c * side + gh * p + i) * side;
          const int64_t tok = gh * G * P + i * p * C + c;
          for (int64_t gw = 0; gw < G; ++gw)
            for (int64_t j = 0; j < p; ++j) f(b, img + gw * p + j, tok + gw * P + j * C);
        }
      }
    }
  });
}

// Copies `samples` samples between the token layout and the image layout (either direction).
void copy_layout(const at::Tensor& src, at::Tensor& out, int64_t samples, int64_t C, int64_t p, int64_t G,
                 bool to_image) {
  const int64_t side = G * p, img_n = C * side * side, tok_n = G * G * p * p * C;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "unpatchify_cpu", [&] {
    const scalar_t* s = src.const_data_ptr<scalar_t>();
    scalar_t* d = out.mutable_data_ptr<scalar_t>();
    for_each_value(samples, C, p, G, [&](int64_t b, int64_t img, int64_t tok) {
      if (to_image) {
        d[b * img_n + img] = s[b * tok_n + tok];
      } else {
        d[b * tok_n + tok] = s[b * img_n + img];
      }
    });
  });
}

at::Tensor unpatchify_cpu(const at::Tensor& tokens, int64_t p, int64_t C) {
  const int64_t G = check_tokens("unpatchify", tokens, p, C);
  at::Tensor out = at::empty({tokens.size(0), C, G * p, G * p}, tokens.options());
  if (out.numel() > 0) copy_layout(tokens.contiguous(), out, tokens.size(0), C, p, G, /*to_image=*/true);
  return out;
}

at::Tensor patchify_cpu(const at::Tensor& image, int64_t p) {
  const int64_t G = check_image("patchify", image, p);
  const int64_t C = image.size(1);
  at::Tensor out = at::empty({image.size(0), G * G, p * p * C}, image.options());
  if (out.numel() > 0) copy_layout(image.contiguous(), out, image.size(0), C, p, G, /*to_image=*/false);
  return out;
}

at::Tensor unpatchify_cfg_cpu(const at::Tensor& tokens, int64_t p, int64_t C, double cfg_scale,
                              int64_t guided_channels, bool full_batch) {
  const int64_t G = check_tokens("unpatchify_cfg", tokens, p, C);
  check_cfg(tokens, C, guided_channels);
  const int64_t half = tokens.size(0) / 2, side = G * p;
  at::Tensor out = at::empty({full_batch ? 2 * half : half, C, side, side}, tokens.options());
  if (out.numel() == 0) return out;
  const at::Tensor y = tokens.contiguous();
  const int64_t img_n = C * side * side, tok_n = G * G * p * p * C, plane = side * side;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "unpatchify_cfg_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = y.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const acc_t scale = static_cast<acc_t>(cfg_scale);
    for_each_value(half, C, p, G, [&](int64_t b, int64_t img, int64_t tok) {
      const scalar_t cond = src[b * tok_n + tok];
      const scalar_t uncond = src[(b + half) * tok_n + tok];
      scalar_t* o = dst + b * img_n + img;
      if (img / plane < guided_channels) {
        const acc_t u = static_cast<acc_t>(uncond);
        const scalar_t guided = static_cast<scalar_t>(u + scale * (static_cast<acc_t>(cond) - u));
        o[0] = guided;
        if (full_batch) o[half * img_n] = guided;
      } else {
        o[0] = cond;
        if (full_batch) o[half * img_n] = uncond;
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ditfast, CPU, m) {
  m.impl("patch_embed", &patch_embed_cpu);
  m.impl("unpatchify", &unpatchify_cpu);
  m.impl("patchify", &patchify_cpu);
  m.impl("unpatchify_cfg", &unpatchify_cfg_cpu);
}

}  // namespace ditfast
