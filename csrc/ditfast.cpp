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
  m.def("_cuda_version() -> int", &ditfast::cuda_version);
}

// Importing the module loads the library, which runs the registrations above.
static struct PyModuleDef ditfast_C_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&ditfast_C_module); }
