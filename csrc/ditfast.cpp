// Schema of every ditfast op, declared once, plus the Python module stub for `import ditfast._C`.
// Device implementations live in cpu/ and cuda/ and register with TORCH_LIBRARY_IMPL.
#include <Python.h>
#include <torch/library.h>

#ifdef WITH_CUDA
#include <cuda.h>  // CUDA_VERSION
#endif

namespace ditfast {

// CUDA version the CUDA ops were built with (e.g. 13000), or 0 for a CPU-only build.
int64_t cuda_version() {
#ifdef WITH_CUDA
  return CUDA_VERSION;
#else
  return 0;
#endif
}

}  // namespace ditfast

TORCH_LIBRARY(ditfast, m) {
  // Sinusoidal timestep features: t (B,) -> (B, dim) = [cos(t*f), sin(t*f)] (+ a zero column
  // when dim is odd), f_i = max_period^(-i/(dim/2)); float32 out, as DiT's TimestepEmbedder.
  m.def("timestep_embedding(Tensor t, int dim, float max_period=10000.0) -> Tensor");
  // Patch embedding (DiT's PatchEmbed + position add): x (B,C,H,W), weight (D,C,p,p), bias (D),
  // pos_embed (1,T,D) -> (B,T,D), tokens row-major over the (H/p, W/p) grid, patch values in
  // (c, kh, kw) order; all one dtype, fp32 math. Backward: dx, dweight, dbias, dpos_embed for the
  // true entries of output_mask (empty tensors for the others).
  m.def("patch_embed(Tensor x, Tensor weight, Tensor? bias=None, Tensor? pos_embed=None) -> Tensor");
  m.def("patch_embed_backward(Tensor grad, Tensor x, Tensor weight, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  // Token-major (B, G*G, p*p*C), per-token order (i, j, c) <-> image (B, C, G*p, G*p): DiT's
  // unpatchify (einsum nhwpqc->nchpwq) and its inverse.
  m.def("unpatchify(Tensor tokens, int p, int C) -> Tensor");
  m.def("patchify(Tensor image, int p) -> Tensor");
  // unpatchify fused with classifier-free guidance on a [cond; uncond] batch (2N, G*G, p*p*C):
  // channels [0, guided_channels) become uncond + cfg_scale*(cond - uncond) (fp32 math), the
  // others pass through. Returns (N, C, G*p, G*p): guided + cond values; with full_batch
  // (2N, ...), exactly DiT.forward_with_cfg's output: second half guided + uncond values.
  m.def("unpatchify_cfg(Tensor tokens, int p, int C, float cfg_scale, int guided_channels, bool full_batch) -> Tensor");
  m.def("_cuda_version() -> int", &ditfast::cuda_version);
}

// Importing the module loads the library, which runs the registrations above.
static struct PyModuleDef ditfast_C_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&ditfast_C_module); }
