"""adaLN ops of a DiT block: LayerNorm + modulation, gated residuals, and the two fused.

Public API (argument orders are part of it):

    adaln_layernorm(x, shift, scale, eps=1e-6)                  -> h = LN(x)*(1+scale)+shift
    gated_residual_adaln(x, y, gate, shift, scale, eps=1e-6)    -> (r, h), r = x + gate*y, h = LN(r)*(1+scale)+shift
    gated_residual(x, y, gate)                                  -> r = x + gate*y
    affine_modulation(weight, bias, batch)                      -> (shift, scale) of a standard LayerNorm

x, y: (B, N, D); gate, shift, scale: (B, D), applied to every token of their sample (they may be
non-contiguous views, e.g. chunks of the modulation GEMM output, or stride-0 broadcasts).
``gate=None`` means no gate (r = x + y: the adaLN and standard ViT blocks of the DiT paper's other
designs); the kernels then skip it (a constexpr), with no vector of ones read or reduced.
``shift=scale=None`` means an unmodulated LayerNorm, h = LN(x) (DiffiT's blocks); the kernels then
read zero (B, D) stride-0 broadcasts, and LN(x) * (1 + 0) + 0 is LN(x) exactly.
LayerNorm has no affine parameters; a standard LayerNorm's weight and bias enter as a modulation
(:func:`affine_modulation`). Each op has a plain-PyTorch reference ``<op>_ref`` (the official DiT
math, in the inputs' dtypes).

All three run through one custom op, ``torch.ops.ditfast.adaln_fwd`` (absent pieces passed as
None), with an autograd formula that calls ``torch.ops.ditfast.adaln_bwd``. On CUDA tensors the
ops run the Triton kernels of ``ditfast.kernels.adaln``; on CPU tensors they run the Triton
interpreter when ``TRITON_INTERPRET=1`` was set before the kernels were imported, and otherwise a
PyTorch statement of the same fp32 math (``_adaln_fwd_torch`` / ``_adaln_bwd_torch``).

Dtypes (the references follow the same contract): r has the promoted dtype of x, y and gate, as
``x + gate * y`` has, so an fp32 residual stream stays fp32. h goes straight into a Linear, so it is
written in the dtype that Linear computes in: under autocast for its device (and unless the inputs
are float64, which autocast leaves alone) the autocast dtype, otherwise the promoted dtype of all
inputs. Statistics and all arithmetic are fp32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import check_float
from .dispatch import Backend, Dispatcher, EagerBackend, dtype_name, register

__all__ = [
    "modulate",
    "adaln_layernorm", "adaln_layernorm_ref",
    "gated_residual_adaln", "gated_residual_adaln_ref",
    "gated_residual", "gated_residual_ref",
    "affine_modulation",
    "triton_status",
]  # fmt: skip

MAX_HIDDEN = 8192  # the kernels keep a whole row in registers

# ------------------------------------------------------------------------------------------
# Output dtypes
# ------------------------------------------------------------------------------------------


def _promoted(*tensors) -> torch.dtype:
    """The promoted dtype of the tensors given (None entries skipped)."""
    dtype = None
    for t in tensors:
        if t is not None:
            dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    return dtype


def _norm_dtype(x: torch.Tensor, *vectors) -> torch.dtype:
    """dtype of a LayerNorm output h computed from x (and y, gate, shift, scale): the autocast
    dtype under autocast for x's device, as the Linear that consumes h would cast it (float64 is
    left alone, as autocast leaves it), else the promoted dtype. Constant under torch.compile."""
    dtype = _promoted(x, *vectors)
    device = x.device.type
    if dtype != torch.float64 and torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return dtype


# ------------------------------------------------------------------------------------------
# References: the official DiT math
# ------------------------------------------------------------------------------------------


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: ``x * (1 + scale) + shift`` with (B, D) vectors broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def adaln_layernorm_ref(x, shift, scale, eps: float = 1e-6):
    h = F.layer_norm(x, (x.shape[-1],), eps=eps)
    h = h if shift is None and scale is None else modulate(h, shift, scale)
    return h.to(_norm_dtype(x, shift, scale))  # a no-op outside autocast


def gated_residual_ref(x, y, gate):
    return x + y if gate is None else x + gate.unsqueeze(1) * y


def gated_residual_adaln_ref(x, y, gate, shift, scale, eps: float = 1e-6):
    r = gated_residual_ref(x, y, gate)
    return r, adaln_layernorm_ref(r, shift, scale, eps)


# ------------------------------------------------------------------------------------------
# Triton availability
# ------------------------------------------------------------------------------------------

_KERNELS = None
_KERNELS_ERROR: str | None = None
_INTERPRET = False


def _kernels():
    """Import ``ditfast.kernels.adaln`` once; None (with the reason kept) when triton is missing."""
    global _KERNELS, _KERNELS_ERROR, _INTERPRET
    if _KERNELS is None and _KERNELS_ERROR is None:
        try:
            from ditfast.kernels import adaln

            _KERNELS = adaln
            # triton.jit picks the interpreter at decoration time, so this is fixed from now on
            _INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
        except ImportError as exc:
            _KERNELS_ERROR = f"triton is not importable ({exc})"
    return _KERNELS


def triton_status(device: torch.device | str = "cuda") -> str | None:
    """None when the Triton adaLN kernels can run on ``device``, else the reason they cannot."""
    device = torch.device(device)
    if _kernels() is None:
        return _KERNELS_ERROR
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device"
    if device.type == "cpu":
        return None if _INTERPRET else "CPU tensors need TRITON_INTERPRET=1 (set before ditfast.kernels is imported)"
    return f"no Triton kernels for {device.type} tensors"


# ------------------------------------------------------------------------------------------
# Backends of a DiT block's adaLN math (see ditfast.ops.dispatch)
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdaLNProblem:
    """What a block asks of its adaLN ops: a residual stream of this dtype and width on this device."""

    device: str
    dtype: torch.dtype
    hidden: int

    def __str__(self) -> str:
        return f"hidden size {self.hidden}, {dtype_name(self.dtype)} on {self.device}"


class TritonAdaLN(Backend):
    """The fused Triton kernels of this module (on CPU tensors only under Triton's interpreter)."""

    name = "triton"
    device_types = ("cuda", "cpu")
    dtypes = (torch.float32, torch.bfloat16, torch.float16)

    def device_reasons(self, device: torch.device) -> list[str]:
        reasons = super().device_reasons(device)
        status = triton_status(device)
        if status is not None and device.type in self.device_types:
            reasons.append(status)
        return reasons

    def declared_reasons(self, problem: AdaLNProblem) -> list[str]:
        return [f"hidden size {problem.hidden} is over its maximum {MAX_HIDDEN}"] if problem.hidden > MAX_HIDDEN else []

    def summary(self) -> str:
        return f"{super().summary()}; hidden size <= {MAX_HIDDEN}"


# "auto": the kernels on CUDA; on the CPU the official math (the interpreter is for tests).
ADALN = register(Dispatcher("adaln", [EagerBackend(), TritonAdaLN()], {"cuda": ["triton", "eager"], "cpu": ["eager"]},
                            "DITFAST_ADALN_BACKEND", ["eager"]))  # fmt: skip


def _use_triton(x: torch.Tensor) -> bool:
    if triton_status(x.device) is not None:
        return False
    if x.shape[-1] > MAX_HIDDEN:
        raise ValueError(f"the Triton adaLN kernels support hidden sizes up to {MAX_HIDDEN}, got {x.shape[-1]}")
    return True


# ------------------------------------------------------------------------------------------
# The fp32 math of the kernels, in PyTorch (CPU path without the interpreter)
# ------------------------------------------------------------------------------------------


def _adaln_fwd_torch(x, y, gate, shift, scale, eps, out_dtype, h_dtype=None):
    r = x.float()
    if y is not None:
        r = r + (y.float() if gate is None else gate.float().unsqueeze(1) * y.float())
    h = mean = rstd = None
    if shift is not None:
        mean = r.mean(-1, keepdim=True)
        rstd = torch.rsqrt((r - mean).square().mean(-1, keepdim=True) + eps)
        h = ((r - mean) * rstd * (1 + scale.float().unsqueeze(1)) + shift.float().unsqueeze(1)).to(h_dtype or out_dtype)
        mean, rstd = mean.reshape(-1), rstd.reshape(-1)
    return (r.to(out_dtype) if y is not None else None), h, mean, rstd


def _adaln_bwd_torch(dr, dh, normed, y, gate, scale, mean, rstd, x_dtype):
    B, N, D = (dr if dr is not None else dh).shape
    grad = torch.zeros(B, N, D, dtype=torch.float32, device=(dr if dr is not None else dh).device)
    dshift = dscale = dy = dgate = None
    if dh is not None and scale is not None:
        dh32 = dh.float()
        xhat = (normed.float() - mean.view(B, N, 1)) * rstd.view(B, N, 1)
        dshift, dscale = dh32.sum(1), (dh32 * xhat).sum(1)
        g = dh32 * (1 + scale.float().unsqueeze(1))
        grad = (g - xhat * (g * xhat).mean(-1, keepdim=True) - g.mean(-1, keepdim=True)) * rstd.view(B, N, 1)
    if dr is not None:
        grad = grad + dr.float()
    if y is not None:
        dy = (grad * gate.float().unsqueeze(1)).to(y.dtype)
        dgate = (grad * y.float()).sum(1).to(gate.dtype)
    return grad.to(x_dtype), dy, dgate, dshift, dscale


# ------------------------------------------------------------------------------------------
# Custom ops
# ------------------------------------------------------------------------------------------


def _or_empty(t: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return t if t is not None else like.new_empty(0)


@torch.library.custom_op("ditfast::adaln_fwd", mutates_args=())
def _adaln_fwd_op(
    x: torch.Tensor,
    y: Optional[torch.Tensor],
    gate: Optional[torch.Tensor],
    shift: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
    eps: float,
    h_dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(r, h, mean, rstd); r empty without a residual, h/mean/rstd empty without a norm.

    r has the promoted dtype of x, y, gate; h has ``h_dtype`` (None: the promoted dtype of all
    inputs). The public functions pass ``_norm_dtype(...)``, which applies autocast."""
    r_dtype, h_dtype = _promoted(x, y, gate), h_dtype or _promoted(x, y, gate, shift, scale)
    if _use_triton(x):
        outs = _KERNELS.adaln_fwd(x, y, gate, shift, scale, eps, r_dtype, h_dtype=h_dtype)
    else:
        outs = _adaln_fwd_torch(x, y, gate, shift, scale, eps, r_dtype, h_dtype=h_dtype)
    return tuple(_or_empty(t, x) for t in outs)


@_adaln_fwd_op.register_fake
def _(x, y, gate, shift, scale, eps, h_dtype=None):
    B, N, D = x.shape
    r_dtype, h_dtype = _promoted(x, y, gate), h_dtype or _promoted(x, y, gate, shift, scale)
    full = lambda dt: x.new_empty((B, N, D), dtype=dt)  # noqa: E731
    stat = lambda: x.new_empty((B * N,), dtype=torch.float32)  # noqa: E731
    has_norm = shift is not None
    return (
        full(r_dtype) if y is not None else x.new_empty(0),
        full(h_dtype) if has_norm else x.new_empty(0),
        stat() if has_norm else x.new_empty(0),
        stat() if has_norm else x.new_empty(0),
    )


@torch.library.custom_op("ditfast::adaln_bwd", mutates_args=())
def _adaln_bwd_op(
    dr: Optional[torch.Tensor],
    dh: Optional[torch.Tensor],
    normed: Optional[torch.Tensor],
    y: Optional[torch.Tensor],
    gate: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
    mean: Optional[torch.Tensor],
    rstd: Optional[torch.Tensor],
    x_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dy, dgate, dshift, dscale) in fp32 statistics; empty where a piece is absent."""
    ref = dr if dr is not None else dh
    if _use_triton(ref):
        outs = _KERNELS.adaln_bwd(dr, dh, normed, y, gate, scale, mean, rstd, x_dtype)
    else:
        outs = _adaln_bwd_torch(dr, dh, normed, y, gate, scale, mean, rstd, x_dtype)
    return tuple(_or_empty(t, ref) for t in outs)


@_adaln_bwd_op.register_fake
def _(dr, dh, normed, y, gate, scale, mean, rstd, x_dtype):
    ref = dr if dr is not None else dh
    B, N, D = ref.shape
    has_norm = dh is not None and scale is not None
    vec = lambda dt: ref.new_empty((B, D), dtype=dt)  # noqa: E731
    return (
        ref.new_empty((B, N, D), dtype=x_dtype),
        ref.new_empty((B, N, D), dtype=y.dtype) if y is not None else ref.new_empty(0),
        vec(gate.dtype) if y is not None else ref.new_empty(0),
        vec(torch.float32) if has_norm else ref.new_empty(0),
        vec(torch.float32) if has_norm else ref.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    x, y, gate, shift, scale, eps, _h_dtype = inputs
    r, h, mean, rstd = output
    ctx.has_res, ctx.has_norm = y is not None, shift is not None
    # Without a gate, dy = dr = dx: the backward is that of the op without a residual (plus dr), and
    # y (the sublayer output, nothing else keeps it) is not saved.
    ctx.ungated = ctx.has_res and gate is None
    ctx.x_dtype, ctx.y_dtype = x.dtype, (y.dtype if ctx.has_res else None)
    ctx.vec_dtypes = (shift.dtype, scale.dtype) if ctx.has_norm else None
    normed = (r if ctx.has_res else x) if ctx.has_norm else None
    saved_y = None if ctx.ungated else y
    ctx.save_for_backward(normed, saved_y, gate, scale, mean if ctx.has_norm else None, rstd if ctx.has_norm else None)


def _backward(ctx, dr, dh, _dmean, _drstd):
    normed, y, gate, scale, mean, rstd = ctx.saved_tensors
    dx, dy, dgate, dshift, dscale = torch.ops.ditfast.adaln_bwd(
        dr if ctx.has_res else None, dh if ctx.has_norm else None, normed, y, gate, scale, mean, rstd, ctx.x_dtype
    )
    if ctx.has_norm:
        dshift, dscale = dshift.to(ctx.vec_dtypes[0]), dscale.to(ctx.vec_dtypes[1])
    else:
        dshift = dscale = None
    if ctx.ungated:
        dy, dgate = dx.to(ctx.y_dtype), None
    elif not ctx.has_res:
        dy = dgate = None
    return dx, dy, dgate, dshift, dscale, None, None


_adaln_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------
# Public functions
# ------------------------------------------------------------------------------------------


def _check(x: torch.Tensor, y=None, **vectors) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.is_floating_point():
        got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a floating-point (B, N, D) tensor, got {got}")
    B, N, D = x.shape
    if y is not None and (not isinstance(y, torch.Tensor) or y.shape != x.shape or not y.is_floating_point() or y.device != x.device):
        got = f"{tuple(y.shape)} {y.dtype} on {y.device}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"y must be a floating-point tensor of x's shape {tuple(x.shape)} on {x.device}, got {got}")
    for name, v in vectors.items():
        if v is None:  # a gate, or shift and scale together (see _unmodulated)
            continue
        if not isinstance(v, torch.Tensor) or v.shape != (B, D) or not v.is_floating_point() or v.device != x.device:
            got = f"{tuple(v.shape)} {v.dtype} on {v.device}" if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"{name} must be a floating-point (B, D) = ({B}, {D}) tensor on {x.device}, got {got}")


def _check_eps(eps) -> float:
    """LayerNorm's eps: a finite number > 0 (eps <= 0 divides by zero or takes the root of a
    negative variance for a constant row: NaN)."""
    return check_float("eps", eps, lo=0.0, lo_inclusive=False)


def _unmodulated(x: torch.Tensor, shift, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift, scale) as given, or zero (B, D) stride-0 broadcasts when both are None (h = LN(x))."""
    if shift is None and scale is None:
        zero = x.new_zeros(1, x.shape[-1]).expand(x.shape[0], -1)
        return zero, zero
    if shift is None or scale is None:
        raise ValueError("shift and scale must both be (B, D) tensors or both None (an unmodulated LayerNorm), "
                         f"got shift={'None' if shift is None else 'a tensor'}, scale={'None' if scale is None else 'a tensor'}")  # fmt: skip
    return shift, scale


def adaln_layernorm(x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor | None, eps: float = 1e-6) -> torch.Tensor:
    """``LN(x) * (1 + scale) + shift`` (LayerNorm without affine, fp32 statistics) -> (B, N, D);
    ``LN(x)`` when shift and scale are both None."""
    _check(x, shift=shift, scale=scale)
    eps = _check_eps(eps)
    shift, scale = _unmodulated(x, shift, scale)
    return torch.ops.ditfast.adaln_fwd(x, None, None, shift, scale, eps, _norm_dtype(x, shift, scale))[1]


def gated_residual_adaln(x, y, gate, shift, scale, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """``r = x + gate * y`` (``x + y`` when ``gate`` is None) and ``h = LN(r) * (1 + scale) + shift``
    in one pass -> (r, h); ``h = LN(r)`` when shift and scale are both None."""
    _check(x, y, gate=gate, shift=shift, scale=scale)
    eps = _check_eps(eps)
    shift, scale = _unmodulated(x, shift, scale)
    r, h, _, _ = torch.ops.ditfast.adaln_fwd(x, y, gate, shift, scale, eps, _norm_dtype(x, y, gate, shift, scale))
    return r, h


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """``x + gate * y`` (``x + y`` when ``gate`` is None) -> (B, N, D)."""
    _check(x, y, gate=gate)
    return torch.ops.ditfast.adaln_fwd(x, y, gate, None, None, 0.0)[0]


def affine_modulation(weight: torch.Tensor, bias: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A standard LayerNorm's (D,) weight and bias as the (B, D) ``(shift, scale)`` the adaLN ops take.

    ``LN(x) * weight + bias = LN(x) * (1 + (weight - 1)) + bias``: the same kernels then run the
    standard ViT blocks' LayerNorms (alone or fused with the preceding residual). Both are stride-0
    broadcasts over the batch (no copies; the backward sums the per-sample gradients). In floating
    point ``1 + (w - 1)`` is ``w`` exactly for w in [0.5, 2] (Sterbenz), within an ulp elsewhere.
    """
    return bias.expand(batch, -1), (weight - 1).expand(batch, -1)
