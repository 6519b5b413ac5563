// C entry points of the emulated launchers, for ctypes (tests only). Each returns the
// launcher's cudaError_t as an int; `sms` is the SM count the launchers see.
#include "emu_runtime.h"
#include "launchers.h"

using ditfast::cuda::DType;

extern "C" {

int emu_launches() { return emu::launches; }

int emu_patch_embed(int dtype, const void* x, int64_t sb, int64_t sc, int64_t sh, int64_t sw, const void* weight,
                    const void* bias, const void* pos, void* out, int64_t B, int64_t C, int64_t H, int64_t W, int64_t p,
                    int64_t D, int sms) {
  emu::sm_count = sms;
  return ditfast::cuda::patch_embed(static_cast<DType>(dtype), x, sb, sc, sh, sw, weight, bias, pos, out, B, C, H, W,
                                    p, D, nullptr);
}

int emu_unpatchify(int dtype, const void* tokens, void* image, int64_t B, int64_t C, int64_t p, int64_t G, int sms) {
  emu::sm_count = sms;
  return ditfast::cuda::unpatchify(static_cast<DType>(dtype), tokens, image, B, C, p, G, nullptr);
}

int emu_patchify(int dtype, const void* image, void* tokens, int64_t B, int64_t C, int64_t p, int64_t G, int sms) {
  emu::sm_count = sms;
  return ditfast::cuda::patchify(static_cast<DType>(dtype), image, tokens, B, C, p, G, nullptr);
}

int emu_unpatchify_cfg(int dtype, const void* tokens, void* image, int64_t half, int64_t C, int64_t p, int64_t G,
                       int64_t guided, double scale, bool full_batch, int sms) {
  emu::sm_count = sms;
  return ditfast::cuda::unpatchify_cfg(static_cast<DType>(dtype), tokens, image, half, C, p, G, guided, scale,
                                       full_batch, nullptr);
}

int emu_timestep_embedding(const float* t, float* out, int64_t batch, int64_t dim, float max_period, int sms) {
  emu::sm_count = sms;
  return ditfast::cuda::timestep_embedding(t, out, batch, dim, max_period, nullptr);
}
}
