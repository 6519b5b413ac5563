"""DiffiT's time-dependent multi-head self-attention (TMSA) on the packed qkv projection.

    tmsa_attention(qkv, num_heads, *, qkv_t=None, bias_table=None, grid=None, window=None,
                   scale=None, backend="auto")                       -> (B, N, H*Dh)
    tmsa_attention_ref(...same, no backend)                          the release's math in fp32
    relative_position_index(window)                                  (wh*ww, wh*ww) int64

``qkv`` (B, N, 3*D) is the qkv Linear's output, features laid out (3, H, Dh) exactly as
``qkv.reshape(B, N, 3, H, Dh)`` splits them. ``qkv_t`` (B, 3*D), the per-sample time projection
(DiffiT's ``qkv_temb(c)``), is added to every token's row before the split. The scores of head h
between tokens i and j of one window are

    s[h, i, j] = scale * q_i . k_j + bias_table[idx(i, j), h]
    idx(i, j)  = (y_i - y_j + wh - 1) * (2*ww - 1) + (x_i - x_j + ww - 1)

with (y, x) a token's coordinates inside its window: the Swin / DiffiT ``relative_position_index``
(meshgrid "ij", row-major), built by :func:`relative_position_index`. ``grid`` (gh, gw) says how
the N = gh*gw tokens lie (row-major); ``window`` None means the whole grid (global attention, the
latent DiffiT), an int w or (wh, ww) non-overlapping windows dividing the grid: a token attends
only to the tokens of its own window. Input and output stay in row-major token order. ``scale``
defaults to Dh**-0.5. The result is (B, N, D) with the heads merged, in qkv's dtype, and is
differentiable in qkv, qkv_t and bias_table.

Backends (dispatcher ``TMSA`` in the one dispatch layer, env var ``DITFAST_TMSA_BACKEND``):

    name    what runs                                             copies
    triton  ditfast's fused Triton kernel (kernels/attention.py)  none: reads qkv in place, adds
            with the time projection and bias as constexpr        qkv_t on load, gathers the bias
            additions; CUDA, or CPU under TRITON_INTERPRET=1      from the table per tile, finds a
            when forced                                           window's rows by index
    sdpa    torch SDPA with a float attn_mask built from the      qkv + qkv_t (one pass), window
            table; windows by reshaping into window order         order copies in and out, an
                                                                  (H, w*w, w*w) mask
    eager   :func:`tmsa_attention_ref`                            many (alias "ref")

flash-attn and xformers' fast paths take no additive score bias; they are listed so that the
dispatcher's error says so.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .attention import MAX_HEAD_DIM, check_packed_qkv
from .dispatch import Backend, BackendError, Dispatcher, dtype_name, register

__all__ = [
    "tmsa_attention", "tmsa_attention_ref", "relative_position_index", "check_tmsa_inputs",
    "TMSA", "TMSAProblem", "TMSABackendError", "ENV_VAR", "PRIORITY",
]  # fmt: skip

ENV_VAR = "DITFAST_TMSA_BACKEND"


class TMSABackendError(BackendError):
    """No TMSA backend (or not the forced one) can run the given problem; the message says why."""


# ------------------------------------------------------------------------------------------
# Input validation
# ------------------------------------------------------------------------------------------


def _pair(value, name: str) -> tuple[int, int]:
    """(a, b) of positive ints from an int or a pair; else a ValueError naming ``name``."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {value!r}")
    return int(value[0]), int(value[1])


def relative_position_index(window) -> torch.Tensor:
    """The (wh*ww, wh*ww) int64 index into a ((2*wh-1)*(2*ww-1), H) bias table: entry (i, j) is
    (y_i - y_j + wh - 1) * (2*ww - 1) + (x_i - x_j + ww - 1), tokens numbered row-major in the window."""
    wh, ww = _pair(window, "window")
    y, x = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
    y, x = y.flatten(), x.flatten()  # (wh*ww,) coordinates of local token i
    return (y[:, None] - y[None, :] + wh - 1) * (2 * ww - 1) + (x[:, None] - x[None, :] + ww - 1)


@dataclass(frozen=True)
class TMSAShape:
    """The validated geometry of one TMSA call."""

    batch: int
    tokens: int
    num_heads: int
    head_dim: int
    grid: tuple[int, int]  # (gh, gw); (1, N) when neither window nor bias is given and grid is None
    window: tuple[int, int]  # (wh, ww), the whole grid for global attention

    @property
    def windowed(self) -> bool:
        return self.window != self.grid


def check_tmsa_inputs(qkv, num_heads, qkv_t=None, bias_table=None, grid=None, window=None) -> TMSAShape:
    """Validate the inputs of :func:`tmsa_attention`; return their geometry (ValueError/TypeError otherwise)."""
    head_dim = check_packed_qkv(qkv, num_heads)
    B, N, three_d = qkv.shape
    if grid is None:
        if window is not None or bias_table is not None:
            raise ValueError(
                "grid (gh, gw) is required when window or bias_table is given (token coordinates come from it), "
                f"got grid=None with window={window!r}, bias_table={'given' if bias_table is not None else None}"
            )
        grid = (1, N)
    else:
        grid = _pair(grid, "grid")
        if grid[0] * grid[1] != N:
            raise ValueError(f"grid {grid} has {grid[0] * grid[1]} tokens, but qkv has N={N} (qkv shape {tuple(qkv.shape)})")
    win = grid if window is None else _pair(window, "window")
    if grid[0] % win[0] or grid[1] % win[1]:
        raise ValueError(f"window {win} must divide the grid {grid} (gh % wh == 0 and gw % ww == 0)")
    if qkv_t is not None:
        if not isinstance(qkv_t, torch.Tensor):
            raise TypeError(f"qkv_t must be a tensor of shape (B, 3*D) = ({B}, {three_d}) or None, got {type(qkv_t).__name__}")
        if tuple(qkv_t.shape) != (B, three_d) or not qkv_t.is_floating_point():
            raise ValueError(
                f"qkv_t must be a floating-point (B, 3*D) = ({B}, {three_d}) tensor, got {tuple(qkv_t.shape)} {qkv_t.dtype}"
            )
        if qkv_t.device != qkv.device:
            raise ValueError(f"qkv_t must be on qkv's device {qkv.device}, got {qkv_t.device}")
    if bias_table is not None:
        if not isinstance(bias_table, torch.Tensor):
            raise TypeError(f"bias_table must be a tensor or None, got {type(bias_table).__name__}")
        entries = (2 * win[0] - 1) * (2 * win[1] - 1)
        if tuple(bias_table.shape) != (entries, num_heads) or not bias_table.is_floating_point():
            raise ValueError(
                f"bias_table must be a floating-point ((2*wh-1)*(2*ww-1), H) = ({entries}, {num_heads}) tensor for "
                f"window {win}, got {tuple(bias_table.shape)} {bias_table.dtype}"
            )
        if bias_table.device != qkv.device:
            raise ValueError(f"bias_table must be on qkv's device {qkv.device}, got {bias_table.device}")
    return TMSAShape(B, N, num_heads, head_dim, grid, win)


def _scale(shape: TMSAShape, scale) -> float:
    if scale is None:
        return shape.head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    return float(scale)


# ------------------------------------------------------------------------------------------
# Reference: the release's math, in fp32 (fp64 for fp64 inputs)
# ------------------------------------------------------------------------------------------


def _to_windows(t: torch.Tensor, shape: TMSAShape) -> torch.Tensor:
    """(B, N, C) row-major tokens -> (B * nW, wh*ww, C) in window order (a copy)."""
    (gh, gw), (wh, ww) = shape.grid, shape.window
    B, _, C = t.shape
    t = t.reshape(B, gh // wh, wh, gw // ww, ww, C).permute(0, 1, 3, 2, 4, 5)
    return t.reshape(B * (gh // wh) * (gw // ww), wh * ww, C)


def _from_windows(t: torch.Tensor, shape: TMSAShape) -> torch.Tensor:
    """Inverse of :func:`_to_windows`: (B * nW, wh*ww, C) -> (B, N, C)."""
    (gh, gw), (wh, ww) = shape.grid, shape.window
    C = t.shape[-1]
    t = t.reshape(shape.batch, gh // wh, gw // ww, wh, ww, C).permute(0, 1, 3, 2, 4, 5)
    return t.reshape(shape.batch, gh * gw, C)


@functools.lru_cache(maxsize=None)
def _index_on(window: tuple[int, int], device: torch.device) -> torch.Tensor:
    """:func:`relative_position_index` on ``device``, built once per (window, device): no host-to-device
    copy per call (a CUDA graph cannot capture one)."""
    return relative_position_index(window).to(device)


def _bias(bias_table: torch.Tensor, shape: TMSAShape, dtype: torch.dtype) -> torch.Tensor:
    """(H, w*w, w*w) bias from the table (differentiable in the table); an index_select, not a
    tensor-indexing op (whose output shape would depend on the data if the index were boolean)."""
    idx = _index_on(shape.window, bias_table.device)
    L = idx.shape[0]
    return bias_table.to(dtype).index_select(0, idx.view(-1)).view(L, L, -1).permute(2, 0, 1)


def tmsa_attention_ref(qkv, num_heads, *, qkv_t=None, bias_table=None, grid=None, window=None, scale=None):
    """TMSA in plain PyTorch (see the module docstring), computed in fp32 (fp64 for fp64 qkv);
    qkv_t is added in that precision (the release adds it in x's dtype). Returns qkv's dtype."""
    shape = check_tmsa_inputs(qkv, num_heads, qkv_t, bias_table, grid, window)
    scale = _scale(shape, scale)
    dtype = torch.float64 if qkv.dtype == torch.float64 else torch.float32
    x = qkv.to(dtype)
    if qkv_t is not None:
        x = x + qkv_t.to(dtype).unsqueeze(1)  # (B, N, 3D)
    H, Dh = num_heads, shape.head_dim
    xw = _to_windows(x, shape)  # (B*nW, L, 3D)
    q, k, v = xw.reshape(xw.shape[0], xw.shape[1], 3, H, Dh).permute(2, 0, 3, 1, 4).unbind(0)  # (B*nW, H, L, Dh)
    s = (q * scale) @ k.transpose(-2, -1)  # (B*nW, H, L, L)
    if bias_table is not None:
        s = s + _bias(bias_table, shape, dtype).unsqueeze(0)
    o = s.softmax(dim=-1) @ v  # (B*nW, H, L, Dh)
    o = o.transpose(1, 2).reshape(xw.shape[0], xw.shape[1], H * Dh)
    return _from_windows(o, shape).to(qkv.dtype)


# ------------------------------------------------------------------------------------------
# Custom ops around the fused Triton kernels (ditfast.kernels.tmsa)
# ------------------------------------------------------------------------------------------


def _kernels(device: torch.device):
    """``ditfast.kernels.tmsa``, or a RuntimeError saying why it cannot run on ``device``."""
    from .adaln import triton_status

    reason = triton_status(device)
    if reason is not None:
        raise RuntimeError(f"ditfast's Triton TMSA kernel cannot run on {device}: {reason}")
    from ditfast.kernels import tmsa

    return tmsa


@torch.library.custom_op("ditfast::tmsa_fwd", mutates_args=())
def _tmsa_fwd_op(qkv: torch.Tensor, qkv_t: Optional[torch.Tensor], bias_table: Optional[torch.Tensor], num_heads: int,
                 geometry: list[int], scale: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(out (B, N, D) in qkv's dtype, lse (B, H, N) fp32); geometry = [gh, gw, wh, ww]."""
    gh, gw, wh, ww = geometry
    return _kernels(qkv.device).tmsa_fwd(qkv, num_heads, (gh, gw), (wh, ww), scale, qkv_t, bias_table)


@_tmsa_fwd_op.register_fake
def _(qkv, qkv_t, bias_table, num_heads, geometry, scale):
    B, N, three_d = qkv.shape
    return qkv.new_empty((B, N, three_d // 3)), qkv.new_empty((B, num_heads, N), dtype=torch.float32)


@torch.library.custom_op("ditfast::tmsa_bwd", mutates_args=())
def _tmsa_bwd_op(dout: torch.Tensor, qkv: torch.Tensor, qkv_t: Optional[torch.Tensor], bias_table: Optional[torch.Tensor],
                 out: torch.Tensor, lse: torch.Tensor, num_heads: int, geometry: list[int],
                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(dqkv (B, N, 3D) in qkv's dtype, dtable (T, H) fp32; (0, H) when there is no table)."""
    gh, gw, wh, ww = geometry
    dqkv, dtable = _kernels(qkv.device).tmsa_bwd(dout, qkv, out, lse, num_heads, (gh, gw), (wh, ww), scale, qkv_t, bias_table)
    return dqkv, dtable if dtable is not None else qkv.new_zeros((0, num_heads), dtype=torch.float32)


@_tmsa_bwd_op.register_fake
def _(dout, qkv, qkv_t, bias_table, out, lse, num_heads, geometry, scale):
    rows = 0 if bias_table is None else bias_table.shape[0]
    return (torch.empty_like(qkv, memory_format=torch.contiguous_format),
            qkv.new_empty((rows, num_heads), dtype=torch.float32))  # fmt: skip


def _setup_context(ctx, inputs, output):
    qkv, qkv_t, bias_table, num_heads, geometry, scale = inputs
    out, lse = output
    ctx.num_heads, ctx.geometry, ctx.scale = num_heads, geometry, scale
    ctx.has_t, ctx.has_bias = qkv_t is not None, bias_table is not None
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(qkv, qkv_t, bias_table, out, lse)


def _backward(ctx, dout, _dlse):
    qkv, qkv_t, bias_table, out, lse = ctx.saved_tensors
    dout = dout.to(out.dtype)
    dqkv, dtable = torch.ops.ditfast.tmsa_bwd(dout, qkv, qkv_t, bias_table, out, lse, ctx.num_heads, ctx.geometry, ctx.scale)
    # d(qkv_t): d(qkv) summed over tokens, a fixed-order torch reduction (deterministic)
    dt = dqkv.sum(1, dtype=torch.float32).to(qkv_t.dtype) if ctx.has_t else None
    dtab = dtable.to(bias_table.dtype) if ctx.has_bias else None
    return dqkv, dt, dtab, None, None, None


_tmsa_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def fused_tmsa(qkv, shape: TMSAShape, qkv_t, bias_table, scale: float) -> torch.Tensor:
    """TMSA through the fused Triton kernels (validated inputs; see :func:`tmsa_attention`)."""
    geometry = [*shape.grid, *shape.window]
    return torch.ops.ditfast.tmsa_fwd(qkv, qkv_t, bias_table, shape.num_heads, geometry, scale)[0]


# ------------------------------------------------------------------------------------------
# Backends
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TMSAProblem:
    """What a backend is asked to run."""

    device: str
    dtype: torch.dtype
    num_heads: int
    head_dim: int
    has_qkv_t: bool
    has_bias: bool
    windowed: bool
    needs_grad: bool

    def __str__(self) -> str:
        extras = [n for n, on in (("time projection", self.has_qkv_t), ("relative position bias", self.has_bias),
                                  ("windows", self.windowed)) if on]  # fmt: skip
        grad = "forward+backward" if self.needs_grad else "forward only"
        return (f"TMSA {self.num_heads} heads x head dim {self.head_dim} ({', '.join(extras) or 'no extras'}), "
                f"{dtype_name(self.dtype)} on {self.device}, {grad}")  # fmt: skip


class TMSABackend(Backend):
    def __call__(self, qkv, shape: TMSAShape, qkv_t, bias_table, scale: float) -> torch.Tensor:
        raise NotImplementedError


class EagerTMSA(TMSABackend):
    """:func:`tmsa_attention_ref`: the release's math, any device and dtype."""

    name = "eager"
    device_types = None

    def summary(self):
        return "any device; any dtype (the release's PyTorch math, fp32)"

    def __call__(self, qkv, shape, qkv_t, bias_table, scale):
        return tmsa_attention_ref(qkv, shape.num_heads, qkv_t=qkv_t, bias_table=bias_table, grid=shape.grid,
                                  window=shape.window, scale=scale)  # fmt: skip


class SDPATMSA(TMSABackend):
    """torch SDPA with a float attn_mask (H, L, L) gathered from the table; windows are copied into
    window order and back, and qkv_t is added in one pass over qkv (this backend copies)."""

    name = "sdpa"
    device_types = None
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

    def summary(self):
        return f"{super().summary()}; copies qkv (+qkv_t), window order and an (H, w*w, w*w) mask"

    def __call__(self, qkv, shape, qkv_t, bias_table, scale):
        H, Dh = shape.num_heads, shape.head_dim
        x = qkv if qkv_t is None else qkv + qkv_t.to(qkv.dtype).unsqueeze(1)  # (B, N, 3D)
        if shape.windowed:
            x = _to_windows(x, shape)  # (B*nW, L, 3D)
        BW, L, _ = x.shape
        q, k, v = x.reshape(BW, L, 3, H, Dh).permute(2, 0, 3, 1, 4).unbind(0)  # (B*nW, H, L, Dh) views
        mask = None if bias_table is None else _bias(bias_table, shape, qkv.dtype)  # (H, L, L)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # (B*nW, H, L, Dh)
        o = o.transpose(1, 2).reshape(BW, L, H * Dh)
        return _from_windows(o, shape) if shape.windowed else o


class TritonTMSA(TMSABackend):
    """ditfast's fused Triton kernel: reads qkv in place, adds qkv_t on load, the bias per tile from
    the table, a window's rows by index; forward and backward (deterministic table gradient)."""

    name = "triton"
    device_types = ("cuda", "cpu")
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    min_compute_capability = (8, 0)

    def device_reasons(self, device):
        from .adaln import triton_status

        reasons = super().device_reasons(device)
        status = triton_status(device)
        if status is not None and device.type in self.device_types:
            reasons.append(status)
        return reasons

    def declared_reasons(self, problem):
        if problem.head_dim > MAX_HEAD_DIM:
            return [f"head dim {problem.head_dim} is over its maximum {MAX_HEAD_DIM}"]
        return []

    def summary(self):
        return f"{super().summary()}; head dim <= {MAX_HEAD_DIM}; forward+backward; no copies"

    def __call__(self, qkv, shape, qkv_t, bias_table, scale):
        return fused_tmsa(qkv, shape, qkv_t, bias_table, scale)


class NoBiasBackend(TMSABackend):
    """A fast attention kernel that cannot take TMSA's additive score bias (listed for its reason)."""

    def __init__(self, name: str, why: str):
        self.name, self.why = name, why

    def device_reasons(self, device):
        return [self.why]

    def summary(self):
        return self.why


PRIORITY: dict[str, list[str]] = {
    # CUDA: PROVISIONAL, NOT YET MEASURED (benchmarks/bench_tmsa.py times fused vs sdpa vs eager):
    # the fused kernel first (no copies, no mask in memory), SDPA with a mask as the fallback.
    "cuda": ["triton", "sdpa", "eager"],
    # CPU: SDPA with a mask (the Triton kernel runs on the CPU only under the interpreter, tests).
    "cpu": ["sdpa", "eager"],
}
DEFAULT_PRIORITY = ["sdpa", "eager"]

TMSA = register(Dispatcher(
    "tmsa",
    [
        TritonTMSA(), SDPATMSA(), EagerTMSA(),
        NoBiasBackend("flash-attn", "flash-attn's kernels take no additive score bias (TMSA adds a relative "
                                    "position bias to every score) and no per-sample qkv offset"),
        NoBiasBackend("xformers", "xformers' fast memory_efficient_attention paths take no relative position "
                                  "bias table (an attn_bias tensor would be a dense N x N bias in memory)"),
    ],
    PRIORITY, ENV_VAR, DEFAULT_PRIORITY, aliases={"ref": "eager"}, error=TMSABackendError,
))  # fmt: skip
BACKENDS: dict[str, TMSABackend] = TMSA.backends


def select_backend(qkv, num_heads, *, qkv_t=None, bias_table=None, grid=None, window=None, backend="auto") -> TMSABackend:
    """The backend :func:`tmsa_attention` runs for these inputs (errors as it would)."""
    shape = check_tmsa_inputs(qkv, num_heads, qkv_t, bias_table, grid, window)
    return BACKENDS[_choose(qkv, shape, qkv_t, bias_table, backend)]


def _choose(qkv, shape, qkv_t, bias_table, backend) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    TMSA.check_name(backend)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (qkv, qkv_t, bias_table))
    return TMSA.choose(backend, TMSAProblem, str(qkv.device), qkv.dtype, shape.num_heads, shape.head_dim,
                       qkv_t is not None, bias_table is not None, shape.windowed, needs_grad)  # fmt: skip


def tmsa_attention(qkv, num_heads, *, qkv_t=None, bias_table=None, grid=None, window=None, scale=None, backend="auto"):
    """TMSA of packed qkv (B, N, 3*D) -> (B, N, D) through the chosen backend (module docstring).

    ``backend``: "auto" (``DITFAST_TMSA_BACKEND`` if set, else the first of ``PRIORITY[device type]``
    that fits), or "triton", "sdpa", "eager" (alias "ref") to force one.
    """
    shape = check_tmsa_inputs(qkv, num_heads, qkv_t, bias_table, grid, window)
    scale = _scale(shape, scale)
    name = _choose(qkv, shape, qkv_t, bias_table, backend)
    return BACKENDS[name](qkv, shape, qkv_t, bias_table, scale)
