"""Attention backends and the dispatcher that DiT blocks call.

    attention(qkv, num_heads, *, scale=None, backend="auto")  -> (B, N, H*Dh)

``qkv`` is the qkv Linear's output (B, N, 3*H*Dh), rows [q | k | v], each head-major; the result
has the heads concatenated, ready for the output projection. Every backend takes that packed
tensor and returns that layout, so each one pays for exactly the copies its kernel needs:

    name            kernel                                          input / output copies
    flash-attn      flash_attn.flash_attn_qkvpacked_func            none / none (reads (B,N,3,H,Dh))
    xformers        xformers.ops.memory_efficient_attention         none / none (strided (B,N,H,Dh))
    sdpa            F.scaled_dot_product_attention, torch's choice  strided views / (B,H,N,Dh) -> (B,N,H*Dh)
    sdpa-flash      ... forced to torch's FlashAttention-2 kernel   as sdpa
    sdpa-cudnn      ... forced to cuDNN's fused attention           as sdpa
    sdpa-efficient  ... forced to the memory-efficient kernel       as sdpa
    sdpa-math       ... forced to the math (composite) path         as sdpa
    triton          ditfast's Triton kernel (ditfast.ops.attention) none / none, forward and backward

Each backend is a small class declaring the devices, dtypes, minimum CUDA compute capability,
largest head dim and backward support it has; ``not_supported_reasons(problem)`` says in words
why it cannot run a given problem (missing package, device, dtype, ...; on CUDA the SDPA kernels
also ask torch's own ``can_use_*`` checks). ``backend="auto"`` walks ``PRIORITY[device type]``
and takes the first backend with no reasons; a backend name forces that one, and so does the
environment variable ``DITFAST_ATTN_BACKEND`` when the argument is "auto". When the forced
backend cannot run, or no backend in the list can, ``AttentionBackendError`` lists the reasons of
every backend. The choice is made once per (device, dtype, heads, head dim, grad) and cached; under
``torch.compile`` it is made at trace time (the env var is read then) and compiled in as a constant.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import ops
from .ops.attention import MAX_HEAD_DIM, check_packed_qkv
from .ops.dispatch import Backend, BackendError, Dispatcher, dtype_name, register

__all__ = [
    "attention",
    "select_backend",
    "check_backend_name",
    "describe",
    "AttentionProblem",
    "AttentionBackend",
    "AttentionBackendError",
    "BACKENDS",
    "PRIORITY",
    "ENV_VAR",
    "ATTENTION",
]

ENV_VAR = "DITFAST_ATTN_BACKEND"

# Backends tried by backend="auto", per device type, first that fits wins.
#
# CUDA: PROVISIONAL, NOT YET MEASURED. benchmarks/bench_attention.py times every backend on the
# DiT shapes and prints the measured order as a line to paste here. Until then the default is:
# flash-attn first (it reads the packed qkv in place, no copies, and is the reference fused kernel),
# then torch's flash and memory-efficient kernels (torch's long-standing default order; the latter
# also takes fp32), xformers, then cuDNN (torch made it opt-in after correctness bugs in 2.5,
# pytorch#138522, and its default again on sm90/sm100 only from 2.9, pytorch#162073, so it may well
# measure fastest on H100), then ditfast's Triton kernel (unmeasured, so below the mature kernels),
# and the math path last (it always fits).
# CPU: torch's own SDPA choice, i.e. exactly the official model's call; the Triton kernel runs on
# the CPU only under the interpreter (tests), so it is never chosen automatically there.
PRIORITY: dict[str, list[str]] = {
    "cuda": ["flash-attn", "sdpa-flash", "sdpa-efficient", "xformers", "sdpa-cudnn", "triton", "sdpa-math"],
    "cpu": ["sdpa"],
}
DEFAULT_PRIORITY = ["sdpa"]  # any other device type

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HALF_DTYPES = (torch.float16, torch.bfloat16)


class AttentionBackendError(BackendError):
    """No attention backend (or not the forced one) can run the given problem; the message says why."""


@dataclass(frozen=True)
class AttentionProblem:
    """What a backend is asked to run: packed qkv of this dtype on this device."""

    device: str  # e.g. "cuda:0", "cpu"
    dtype: torch.dtype
    num_heads: int
    head_dim: int
    needs_grad: bool  # a backward will be taken through the result

    def __str__(self) -> str:
        grad = "forward+backward" if self.needs_grad else "forward only"
        return f"{self.num_heads} heads x head dim {self.head_dim}, {dtype_name(self.dtype)} on {self.device}, {grad}"


_IMPORT_ERRORS: dict[str, str | None] = {}


def _import_reason(module: str, hint: str) -> str | None:
    """None when ``module`` imports, else why not (checked once; a broken install says its error)."""
    if module not in _IMPORT_ERRORS:
        if importlib.util.find_spec(module.split(".")[0]) is None:
            _IMPORT_ERRORS[module] = f"{module.split('.')[0]} is not installed ({hint})"
        else:
            try:
                importlib.import_module(module)
                _IMPORT_ERRORS[module] = None
            except Exception as exc:  # noqa: BLE001  any import failure is a reason, not a crash
                _IMPORT_ERRORS[module] = f"{module} is installed but fails to import ({type(exc).__name__}: {exc})"
    return _IMPORT_ERRORS[module]


class AttentionBackend(Backend):
    """One way of computing attention on packed qkv; declares, beyond the device, dtype and
    capability of every backend, its largest head dim and whether it has a backward."""

    dtypes = HALF_DTYPES
    max_head_dim: int | None = None
    supports_backward: bool = True

    def declared_reasons(self, problem: AttentionProblem) -> list[str]:
        reasons = []
        if self.max_head_dim is not None and problem.head_dim > self.max_head_dim:
            reasons.append(f"head dim {problem.head_dim} is over its maximum {self.max_head_dim}")
        if problem.needs_grad and not self.supports_backward:
            reasons.append("has no backward (the input requires grad)")
        return reasons

    def summary(self) -> str:
        head = f"head dim <= {self.max_head_dim}" if self.max_head_dim else "any head dim"
        grad = "forward+backward" if self.supports_backward else "forward only"
        return f"{super().summary()}; {head}; {grad}"

    def __call__(self, qkv: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
        """Packed qkv (B, N, 3*H*Dh) -> (B, N, H*Dh)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<attention backend {self.name!r}>"


class FlashAttnBackend(AttentionBackend):
    """flash-attn's FlashAttention-2 on the packed (B, N, 3, H, Dh) view of qkv: no copies."""

    name = "flash-attn"
    min_compute_capability = (8, 0)
    max_head_dim = 256

    def unavailable_reason(self):
        return _import_reason("flash_attn", "pip install flash-attn, or ditfast[flash]")

    def __call__(self, qkv, num_heads, scale):
        from flash_attn import flash_attn_qkvpacked_func

        out = flash_attn_qkvpacked_func(qkv.unflatten(-1, (3, num_heads, -1)), softmax_scale=scale)  # (B, N, H, Dh)
        return out.flatten(2)


class XFormersBackend(AttentionBackend):
    """xformers' memory_efficient_attention on strided (B, N, H, Dh) views of qkv: no copies."""

    name = "xformers"
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    min_compute_capability = (5, 0)

    def unavailable_reason(self):
        return _import_reason("xformers.ops", "pip install xformers, or ditfast[xformers]")

    def __call__(self, qkv, num_heads, scale):
        from xformers.ops import memory_efficient_attention

        q, k, v = qkv.unflatten(-1, (3, num_heads, -1)).unbind(2)  # each (B, N, H, Dh), strided views
        return memory_efficient_attention(q, k, v, scale=scale).flatten(2)


_TORCH_CHECKS = {  # torch's own verdict per forced kernel (torch.backends.cuda.can_use_*)
    "FLASH_ATTENTION": "can_use_flash_attention",
    "EFFICIENT_ATTENTION": "can_use_efficient_attention",
    "CUDNN_ATTENTION": "can_use_cudnn_attention",
}


def _sdpa_views(qkv: torch.Tensor, num_heads: int):
    """q, k, v as (B, H, N, Dh) strided views of packed qkv, exactly as the official model makes them."""
    B, N, three_d = qkv.shape
    return qkv.reshape(B, N, 3, num_heads, three_d // (3 * num_heads)).permute(2, 0, 3, 1, 4).unbind(0)


class SDPABackend(AttentionBackend):
    """torch's F.scaled_dot_product_attention, with torch's own kernel choice or one kernel forced."""

    def __init__(self, name: str, kernel: str | None, **declarations):
        """``kernel``: an ``SDPBackend`` member name to force (e.g. "FLASH_ATTENTION"), None for torch's choice."""
        self.name, self.kernel_name = name, kernel
        self.kernel = getattr(SDPBackend, kernel) if kernel and hasattr(SDPBackend, kernel) else None
        for key, value in declarations.items():
            setattr(self, key, value)

    def unavailable_reason(self):
        if self.kernel_name and self.kernel is None:
            return f"torch {torch.__version__} has no SDPBackend.{self.kernel_name}"
        return None

    def extra_reasons(self, problem):
        """On CUDA, torch's own verdict for this kernel (its debug messages become the reasons)."""
        check = getattr(torch.backends.cuda, _TORCH_CHECKS.get(self.kernel_name or "", ""), None)
        if check is None or torch.device(problem.device).type != "cuda":
            return []
        try:
            # a qkv Linear output of this problem's layout (a short sequence: no check depends on N)
            probe = torch.empty(1, 64, 3 * problem.num_heads * problem.head_dim, device=problem.device,
                                dtype=problem.dtype, requires_grad=problem.needs_grad)  # fmt: skip
            q, k, v = _sdpa_views(probe, problem.num_heads)
            try:
                params = torch.backends.cuda.SDPAParams(q, k, v, None, 0.0, False, False)
            except TypeError:  # torch < 2.5 has no enable_gqa argument
                params = torch.backends.cuda.SDPAParams(q, k, v, None, 0.0, False)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ok = check(params, True)
        except Exception:  # noqa: BLE001  torch's probe API moved: rely on the declarations alone
            return []
        if ok:
            return []
        detail = "; ".join(str(w.message).strip() for w in caught)
        return [f"torch declines these inputs{': ' + detail if detail else ''}"]

    def __call__(self, qkv, num_heads, scale):
        B, N, three_d = qkv.shape
        q, k, v = _sdpa_views(qkv, num_heads)  # each (B, H, N, Dh)
        if self.kernel_name is None:
            out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        else:
            with sdpa_kernel(self.kernel):
                out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        return out.transpose(1, 2).reshape(B, N, three_d // 3)  # (B, N, H*Dh)


class TritonBackend(AttentionBackend):
    """ditfast's Triton kernel: reads packed qkv in place, writes (B, N, H*Dh); forward and backward."""

    name = "triton"
    device_types = ("cuda", "cpu")
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    min_compute_capability = (8, 0)
    max_head_dim = MAX_HEAD_DIM

    def device_reasons(self, device):
        reasons = super().device_reasons(device)
        status = ops.triton_status(device)
        if status is not None and device.type in self.device_types:
            reasons.append(status)
        return reasons

    def __call__(self, qkv, num_heads, scale):
        return ops.packed_attention(qkv, num_heads, scale)


def _sdpa_cuda(name: str, kernel: str, dtypes, cc, max_head_dim) -> SDPABackend:
    return SDPABackend(name, kernel, device_types=("cuda",), dtypes=dtypes, min_compute_capability=cc, max_head_dim=max_head_dim)


def _make_backends() -> list[AttentionBackend]:
    return [
        FlashAttnBackend(),
        XFormersBackend(),
        SDPABackend("sdpa", None, device_types=None, dtypes=FLOAT_DTYPES),
        _sdpa_cuda("sdpa-flash", "FLASH_ATTENTION", HALF_DTYPES, (8, 0), 256),
        _sdpa_cuda("sdpa-cudnn", "CUDNN_ATTENTION", HALF_DTYPES, (8, 0), 256),
        _sdpa_cuda("sdpa-efficient", "EFFICIENT_ATTENTION", (torch.float16, torch.bfloat16, torch.float32), (5, 0), None),
        SDPABackend("sdpa-math", "MATH", device_types=None, dtypes=FLOAT_DTYPES),
        TritonBackend(),
    ]


ATTENTION = register(Dispatcher("attention", _make_backends(), PRIORITY, ENV_VAR, DEFAULT_PRIORITY, error=AttentionBackendError))
BACKENDS: dict[str, AttentionBackend] = ATTENTION.backends


def check_backend_name(name: str) -> str:
    """``name`` if it is "auto" or a backend name, else a ValueError listing the names."""
    return ATTENTION.check_name(name)


def priority(device_type: str) -> list[str]:
    """The backends "auto" tries on ``device_type``, in order."""
    return ATTENTION.device_priority(device_type)


def select_backend(qkv: torch.Tensor, num_heads: int, backend: str = "auto") -> AttentionBackend:
    """The backend ``attention(qkv, num_heads, backend=backend)`` runs (errors as it would)."""
    head_dim = check_packed_qkv(qkv, num_heads)
    check_backend_name(backend)
    needs_grad = qkv.requires_grad and torch.is_grad_enabled()
    return BACKENDS[ATTENTION.choose(backend, AttentionProblem, str(qkv.device), qkv.dtype, num_heads, head_dim, needs_grad)]


def attention(qkv: torch.Tensor, num_heads: int, *, scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Softmax attention of packed qkv (B, N, 3*H*Dh) -> (B, N, H*Dh) through the chosen backend.

    ``scale`` defaults to Dh**-0.5. ``backend``: "auto" (``DITFAST_ATTN_BACKEND`` if set, else the
    first backend of ``PRIORITY[device type]`` that fits) or a name from ``BACKENDS`` to force it.
    """
    chosen = select_backend(qkv, num_heads, backend)
    head_dim = qkv.shape[-1] // (3 * num_heads)
    return chosen(qkv, num_heads, head_dim**-0.5 if scale is None else scale)


def describe(device: torch.device | str | None = None) -> dict[str, str]:
    """Every backend on ``device`` (default: cuda if available, else cpu): usable, or why not."""
    return ATTENTION.describe(device or ("cuda" if torch.cuda.is_available() else "cpu"))
