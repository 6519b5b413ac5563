"""Build ditfast and its compiled extension ``ditfast._C``.

The C++ ops are always built (a CppExtension). The CUDA ops are added (a CUDAExtension with
``-DWITH_CUDA``) when the installed torch has CUDA and nvcc is found, or when ``FORCE_CUDA=1``.

Environment knobs:
  FORCE_CUDA=1             build the CUDA ops even if no GPU/CUDA torch is visible at build time
  DITFAST_SKIP_EXT=1       build no extension at all (pure-PyTorch fallbacks are used)
  TORCH_CUDA_ARCH_LIST     GPU architectures, e.g. "8.0;9.0" (default: csrc/build_flags.json)
  MAX_JOBS                 parallel compile jobs (read by torch's ninja build)

Compiler flags live in ``csrc/build_flags.json``, which CI's nvcc check reads too.

Install with ``pip install --no-build-isolation .`` so the build sees the torch you run with.
"""

import glob
import json
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(ROOT, "csrc", "build_flags.json")) as f:
    FLAGS = json.load(f)


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _extensions():
    if _flag("DITFAST_SKIP_EXT"):
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    def rel(pattern):
        return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))

    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    cxx = FLAGS["cxx"]
    with_cuda = _flag("FORCE_CUDA") or (torch.version.cuda is not None and CUDA_HOME is not None)
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", FLAGS["cuda_arch_list"])
        ext = CUDAExtension(
            "ditfast._C",
            sources + rel("csrc/cuda/*.cpp") + rel("csrc/cuda/*.cu"),
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": FLAGS["nvcc"]},
        )
    else:
        ext = CppExtension("ditfast._C", sources, extra_compile_args={"cxx": cxx})
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    package_dir={"ditfast": "ditfast", "ditfast.kernels": "kernels"},
    packages=["ditfast", "ditfast.diffusion", "ditfast.ops", "ditfast.data", "ditfast.metrics", "ditfast.interop", "ditfast.kernels"],
    package_data={"ditfast": ["assets/*.safetensors", "assets/*.json"], "ditfast.data": ["*.npz"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
