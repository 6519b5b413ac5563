"""ditfast's Triton kernels, installed as ``ditfast.kernels``.

Each op lives in its own module with ``_<op>_fwd_kernel`` / ``_<op>_bwd_kernel`` Triton kernels and
plain launchers; the public, dispatching API is ``ditfast.ops``. Importing this package does not
import triton, so ditfast works without it.
"""
