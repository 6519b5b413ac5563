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

Cross-attention (the DiT paper's "cross-attention" block design) has its own entry point and
dispatcher, ``CROSS_ATTENTION`` ("cross-attention", ``DITFAST_CROSS_ATTN_BACKEND``):

    cross_attention(q, kv, num_heads, *, scale=None, backend="auto")  -> (B, N, H*Dh)

``q`` is the query Linear's output (B, N, H*Dh) of the image tokens, ``kv`` the key/value Linear's
output (B, M, 2*H*Dh) of the M conditioning tokens, rows [k | v], each head-major. The same
backends serve it, each with its own cross-attention call: flash-attn's
``flash_attn_kvpacked_func`` reads q and the packed kv in place, xformers and the SDPA kernels take
strided views of separate q, k, v. ditfast's Triton kernel does not fit (its reason says why: it
reads q, k and v from one packed qkv tensor of the same tokens).

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
from .errors import check_float

__all__ = [
    "attention",
    "cross_attention",
    "cross_attention_ref",
    "select_backend",
    "select_cross_backend",
    "check_backend_name",
    "describe",
    "AttentionProblem",
    "AttentionBackend",
    "AttentionBackendError",
    "BACKENDS",
    "PRIORITY",
    "ENV_VAR",
    "ATTENTION",
    "CROSS_ATTENTION",
    "CROSS_BACKENDS",
    "CROSS_PRIORITY",
    "CROSS_ENV_VAR",
]

ENV_VAR = "DITFAST_ATTN_BACKEND"
CROSS_ENV_VAR = "DITFAST_CROSS_ATTN_BACKEND"

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
# Cross-attention (N queries, 2 keys): PROVISIONAL, NOT MEASURED either; the self-attention order
# without ditfast's Triton kernel, which cannot run it.
CROSS_PRIORITY: dict[str, list[str]] = {device: [n for n in names if n != "triton"] for device, names in PRIORITY.items()}

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
    cross_unsupported: str | None = None  # why its kernel cannot run cross-attention (None: it can)

    def __init__(self, cross: bool = False):
        self.cross = cross  # an entry of the cross-attention dispatcher (its calls are cross_attend)

    def device_reasons(self, device):
        reasons = super().device_reasons(device)
        return [self.cross_unsupported, *reasons] if self.cross and self.cross_unsupported else reasons

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

    def cross_attend(self, q: torch.Tensor, kv: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
        """q (B, N, H*Dh), packed kv (B, M, 2*H*Dh) -> (B, N, H*Dh)."""
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

    def cross_attend(self, q, kv, num_heads, scale):
        from flash_attn import flash_attn_kvpacked_func

        # q (B, N, H, Dh) and kv (B, M, 2, H, Dh), both views in place
        out = flash_attn_kvpacked_func(q.unflatten(-1, (num_heads, -1)), kv.unflatten(-1, (2, num_heads, -1)), softmax_scale=scale)
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

    def cross_attend(self, q, kv, num_heads, scale):
        from xformers.ops import memory_efficient_attention

        k, v = kv.unflatten(-1, (2, num_heads, -1)).unbind(2)  # each (B, M, H, Dh), strided views
        return memory_efficient_attention(q.unflatten(-1, (num_heads, -1)), k, v, scale=scale).flatten(2)


_TORCH_CHECKS = {  # torch's own verdict per forced kernel (torch.backends.cuda.can_use_*)
    "FLASH_ATTENTION": "can_use_flash_attention",
    "EFFICIENT_ATTENTION": "can_use_efficient_attention",
    "CUDNN_ATTENTION": "can_use_cudnn_attention",
}


def _sdpa_views(qkv: torch.Tensor, num_heads: int):
    """q, k, v as (B, H, N, Dh) strided views of packed qkv, exactly as the official model makes them."""
    B, N, three_d = qkv.shape
    return qkv.reshape(B, N, 3, num_heads, three_d // (3 * num_heads)).permute(2, 0, 3, 1, 4).unbind(0)


def _sdpa_cross_views(q: torch.Tensor, kv: torch.Tensor, num_heads: int):
    """q (B, H, N, Dh), k and v (B, H, M, Dh): strided views of the query and packed kv projections."""
    k, v = kv.unflatten(-1, (2, num_heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
    return q.unflatten(-1, (num_heads, -1)).transpose(1, 2), k, v


class SDPABackend(AttentionBackend):
    """torch's F.scaled_dot_product_attention, with torch's own kernel choice or one kernel forced."""

    def __init__(self, name: str, kernel: str | None, cross: bool = False, **declarations):
        """``kernel``: an ``SDPBackend`` member name to force (e.g. "FLASH_ATTENTION"), None for torch's choice."""
        super().__init__(cross)
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
            q, k, v = self._probe(problem)
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

    def _probe(self, problem):
        """q, k, v laid out as this backend's calls make them from Linear outputs of this problem's
        layout: a short sequence (no check depends on N), 2 keys for cross-attention."""
        def linear_out(tokens: int, parts: int) -> torch.Tensor:
            return torch.empty(1, tokens, parts * problem.num_heads * problem.head_dim, device=problem.device,
                               dtype=problem.dtype, requires_grad=problem.needs_grad)  # fmt: skip

        if self.cross:
            return _sdpa_cross_views(linear_out(64, 1), linear_out(2, 2), problem.num_heads)
        return _sdpa_views(linear_out(64, 3), problem.num_heads)

    def _sdpa(self, q, k, v, scale):
        if self.kernel_name is None:
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        with sdpa_kernel(self.kernel):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)

    def __call__(self, qkv, num_heads, scale):
        B, N, three_d = qkv.shape
        out = self._sdpa(*_sdpa_views(qkv, num_heads), scale)  # q, k, v each (B, H, N, Dh)
        return out.transpose(1, 2).reshape(B, N, three_d // 3)  # (B, N, H*Dh)

    def cross_attend(self, q, kv, num_heads, scale):
        B, N, D = q.shape
        out = self._sdpa(*_sdpa_cross_views(q, kv, num_heads), scale)  # (B, H, N, Dh)
        return out.transpose(1, 2).reshape(B, N, D)


class TritonBackend(AttentionBackend):
    """ditfast's Triton kernel: reads packed qkv in place, writes (B, N, H*Dh); forward and backward."""

    name = "triton"
    device_types = ("cuda", "cpu")
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    min_compute_capability = (8, 0)
    max_head_dim = MAX_HEAD_DIM
    cross_unsupported = (
        "ditfast's kernel reads q, k and v from one packed qkv tensor of the same tokens; cross-attention's "
        "queries (the image tokens) and keys/values (the conditioning tokens) are separate tensors of other lengths"
    )

    def device_reasons(self, device):
        reasons = super().device_reasons(device)
        status = ops.triton_status(device)
        if status is not None and device.type in self.device_types:
            reasons.append(status)
        return reasons

    def __call__(self, qkv, num_heads, scale):
        return ops.packed_attention(qkv, num_heads, scale)


def _sdpa_cuda(name: str, kernel: str, dtypes, cc, max_head_dim, cross: bool) -> SDPABackend:
    return SDPABackend(name, kernel, cross, device_types=("cuda",), dtypes=dtypes, min_compute_capability=cc, max_head_dim=max_head_dim)


def _make_backends(cross: bool = False) -> list[AttentionBackend]:
    """Every backend, for the self-attention dispatcher or (``cross``) the cross-attention one."""
    return [
        FlashAttnBackend(cross),
        XFormersBackend(cross),
        SDPABackend("sdpa", None, cross, device_types=None, dtypes=FLOAT_DTYPES),
        _sdpa_cuda("sdpa-flash", "FLASH_ATTENTION", HALF_DTYPES, (8, 0), 256, cross),
        _sdpa_cuda("sdpa-cudnn", "CUDNN_ATTENTION", HALF_DTYPES, (8, 0), 256, cross),
        _sdpa_cuda("sdpa-efficient", "EFFICIENT_ATTENTION", (torch.float16, torch.bfloat16, torch.float32), (5, 0), None, cross),
        SDPABackend("sdpa-math", "MATH", cross, device_types=None, dtypes=FLOAT_DTYPES),
        TritonBackend(cross),
    ]


ATTENTION = register(Dispatcher("attention", _make_backends(), PRIORITY, ENV_VAR, DEFAULT_PRIORITY, error=AttentionBackendError))
BACKENDS: dict[str, AttentionBackend] = ATTENTION.backends
CROSS_ATTENTION = register(Dispatcher("cross-attention", _make_backends(cross=True), CROSS_PRIORITY, CROSS_ENV_VAR,
                                      DEFAULT_PRIORITY, error=AttentionBackendError))  # fmt: skip
CROSS_BACKENDS: dict[str, AttentionBackend] = CROSS_ATTENTION.backends


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
    if scale is not None:
        scale = check_float("scale", scale, lo=0.0, lo_inclusive=False)
    head_dim = qkv.shape[-1] // (3 * num_heads)
    return chosen(qkv, num_heads, head_dim**-0.5 if scale is None else scale)


def _check_cross_inputs(q: torch.Tensor, kv: torch.Tensor, num_heads: int) -> int:
    """The head dim of cross-attention inputs q (B, N, H*Dh), kv (B, M, 2*H*Dh); else a ValueError."""
    for name, t in (("q", q), ("kv", kv)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or not t.is_floating_point():
            got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a floating-point 3-D tensor, got {got}")
    width = q.shape[-1]
    if num_heads < 1 or width % num_heads or width == 0:
        raise ValueError(f"q's width {width} must be a positive multiple of num_heads {num_heads}")
    if kv.shape[0] != q.shape[0] or kv.shape[-1] != 2 * width or kv.dtype != q.dtype or kv.device != q.device:
        raise ValueError(
            f"kv must be (B, M, 2*{width}) = ({q.shape[0]}, M, {2 * width}) of q's dtype {q.dtype} on {q.device}, "
            f"got {tuple(kv.shape)} {kv.dtype} on {kv.device}"
        )
    return width // num_heads


def select_cross_backend(q: torch.Tensor, kv: torch.Tensor, num_heads: int, backend: str = "auto") -> AttentionBackend:
    """The backend ``cross_attention(q, kv, num_heads, backend=backend)`` runs (errors as it would)."""
    head_dim = _check_cross_inputs(q, kv, num_heads)
    CROSS_ATTENTION.check_name(backend)
    needs_grad = (q.requires_grad or kv.requires_grad) and torch.is_grad_enabled()
    return CROSS_BACKENDS[CROSS_ATTENTION.choose(backend, AttentionProblem, str(q.device), q.dtype, num_heads, head_dim, needs_grad)]


def cross_attention(q: torch.Tensor, kv: torch.Tensor, num_heads: int, *, scale: float | None = None,
                    backend: str = "auto") -> torch.Tensor:  # fmt: skip
    """Softmax attention of queries q (B, N, H*Dh) to packed keys/values kv (B, M, 2*H*Dh), rows
    [k | v] each head-major -> (B, N, H*Dh), through the chosen backend.

    ``scale`` defaults to Dh**-0.5. ``backend``: "auto" (``DITFAST_CROSS_ATTN_BACKEND`` if set, else
    the first backend of ``CROSS_PRIORITY[device type]`` that fits) or a name from ``CROSS_BACKENDS``.
    """
    chosen = select_cross_backend(q, kv, num_heads, backend)
    if scale is not None:
        scale = check_float("scale", scale, lo=0.0, lo_inclusive=False)
    head_dim = q.shape[-1] // num_heads
    return chosen.cross_attend(q, kv, num_heads, head_dim**-0.5 if scale is None else scale)


def cross_attention_ref(q: torch.Tensor, kv: torch.Tensor, num_heads: int, scale: float | None = None) -> torch.Tensor:
    """:func:`cross_attention` in plain PyTorch matmuls and softmax, in the inputs' dtype."""
    B, N, D = q.shape
    qh, k, v = _sdpa_cross_views(q, kv, num_heads)  # (B, H, N, Dh), (B, H, M, Dh) twice
    scale = (D // num_heads) ** -0.5 if scale is None else scale
    out = torch.softmax((qh @ k.transpose(-1, -2)) * scale, dim=-1) @ v  # (B, H, N, Dh)
    return out.transpose(1, 2).reshape(B, N, D)


def describe(device: torch.device | str | None = None) -> dict[str, str]:
    """Every backend on ``device`` (default: cuda if available, else cpu): usable, or why not."""
    return ATTENTION.describe(device or ("cuda" if torch.cuda.is_available() else "cpu"))
