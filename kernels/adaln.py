"""Fused adaLN kernels: gated residual, LayerNorm (no affine) and modulation, forward and backward.

One kernel pair serves the three ops of a DiT block (constexpr switches pick the pieces):

    gated_residual_adaln  r = x + gate*y;  h = LN(r) * (1 + scale) + shift   HAS_RESIDUAL, HAS_NORM
    adaln_layernorm                        h = LN(x) * (1 + scale) + shift   HAS_NORM
    gated_residual        r = x + gate*y                                     HAS_RESIDUAL

Without a gate (HAS_GATE off: the ungated residual of the DiT paper's adaLN and standard ViT
blocks) the forward computes r = x + y and reads no gate. The backward needs no switch for it: the
gradient of y is then that of x, which the launch without a residual computes (see
``ditfast.ops.adaln``).

x, y, r, h are (B, N, D) with contiguous rows; gate, shift, scale are (B, D) vectors, one per
sample, passed with their own batch stride (they are usually chunks of the modulation GEMM
output, hence non-contiguous). Statistics and all arithmetic are fp32; row offsets are int64.

The backward reduces dgate, dshift, dscale over N deterministically in two stages: G programs per
sample (G = min(N, G_MAX), so at most G_MAX whatever N is) each loop over the rows n = g, g + G,
g + 2G, ... of their sample, accumulate in registers and write fp32 partial sums to one stacked
(V, B, G, D) buffer (V <= 3 vectors); then one reduction launch sums each over G in a fixed order.
No atomics, and G depends on the shape only, so gradients are bitwise reproducible.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["adaln_fwd", "adaln_bwd"]

# Every output buffer comes from here, so tests can poison them (NaN) to catch unwritten elements.
_empty = torch.empty

# Row groups per sample in the backward: bounds its fp32 partial-sum buffer at (3, B, G_MAX, D),
# against (3, B, N, D) for one group per row; from B = 8 on the backward still runs >= 256 programs.
G_MAX = 32


@triton.jit
def _adaln_fwd_kernel(
    X,  # (B, N, D) residual stream in
    Y,  # (B, N, D) sublayer output (HAS_RESIDUAL)
    GATE,  # (B, D) gate, batch stride stride_gate (HAS_GATE)
    SHIFT,  # (B, D) shift, batch stride stride_shift (HAS_NORM)
    SCALE,  # (B, D) scale, batch stride stride_scale (HAS_NORM)
    R,  # (B, N, D) out: x + gate*y, or x + y without a gate (HAS_RESIDUAL)
    H,  # (B, N, D) out: LN(r)*(1+scale)+shift (HAS_NORM)
    MEAN,  # (B*N,) fp32 out: row means, saved for backward (HAS_NORM)
    RSTD,  # (B*N,) fp32 out: row 1/sqrt(var+eps), saved for backward (HAS_NORM)
    N,  # tokens per sample
    D,  # hidden size
    stride_gate,
    stride_shift,
    stride_scale,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    HAS_GATE: tl.constexpr,  # with HAS_RESIDUAL: y is scaled by the gate
    HAS_NORM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROWS: tl.constexpr,
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    if HAS_GATE:
        gate = tl.load(GATE + b * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        shift = tl.load(SHIFT + b * stride_shift + cols, mask=mask, other=0.0).to(tl.float32)
        scale1 = 1.0 + tl.load(SCALE + b * stride_scale + cols, mask=mask, other=0.0).to(tl.float32)
    for i in range(ROWS):
        n = pid_n * ROWS + i
        if n < N:
            row = b * N + n
            offs = row * D + cols
            r = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
                if HAS_GATE:
                    y = gate * y
                r = r + y
                tl.store(R + offs, r.to(R.dtype.element_ty), mask=mask)
            if HAS_NORM:
                mean = tl.sum(r, axis=0) / D
                diff = tl.where(mask, r - mean, 0.0)
                rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=0) / D + eps)
                tl.store(MEAN + row, mean)
                tl.store(RSTD + row, rstd)
                h = diff * rstd * scale1 + shift
                tl.store(H + offs, h.to(H.dtype.element_ty), mask=mask)


@triton.jit
def _adaln_bwd_kernel(
    DR,  # (B, N, D) grad of r (HAS_DR)
    DH,  # (B, N, D) grad of h (HAS_NORM)
    NORMED,  # (B, N, D) the tensor LayerNorm saw: r with a residual, else x (HAS_NORM)
    Y,  # (B, N, D) sublayer output (HAS_RESIDUAL)
    GATE,  # (B, D) (HAS_RESIDUAL)
    SCALE,  # (B, D) (HAS_NORM)
    MEAN,  # (B*N,) fp32 (HAS_NORM)
    RSTD,  # (B*N,) fp32 (HAS_NORM)
    DX,  # (B, N, D) out: grad of x
    DY,  # (B, N, D) out: grad of y (HAS_RESIDUAL)
    DGATE_PART,  # (B, G, D) fp32 out: partial sums of dr*y, a slice of the stacked buffer (HAS_RESIDUAL)
    DSHIFT_PART,  # (B, G, D) fp32 out: partial sums of dh, a slice of the stacked buffer (HAS_NORM)
    DSCALE_PART,  # (B, G, D) fp32 out: partial sums of dh*xhat, a slice of the stacked buffer (HAS_NORM)
    N,  # tokens per sample
    D,  # hidden size
    G,  # row groups per sample (the grid's first axis): program g covers rows g, g + G, g + 2G, ...
    stride_gate,
    stride_scale,
    HAS_RESIDUAL: tl.constexpr,
    HAS_NORM: tl.constexpr,
    HAS_DR: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_g = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    if HAS_RESIDUAL:
        gate = tl.load(GATE + b * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
        dgate = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_NORM:
        scale1 = 1.0 + tl.load(SCALE + b * stride_scale + cols, mask=mask, other=0.0).to(tl.float32)
        dshift = tl.zeros([BLOCK_D], dtype=tl.float32)
        dscale = tl.zeros([BLOCK_D], dtype=tl.float32)
    for n in range(pid_g, N, G):
        row = b * N + n
        offs = row * D + cols
        dr = tl.zeros([BLOCK_D], dtype=tl.float32)
        if HAS_NORM:
            dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + row)
            rstd = tl.load(RSTD + row)
            xhat = tl.where(mask, (tl.load(NORMED + offs, mask=mask, other=0.0).to(tl.float32) - mean) * rstd, 0.0)
            dshift += dh
            dscale += dh * xhat
            g = dh * scale1
            c1 = tl.sum(g * xhat, axis=0) / D
            c2 = tl.sum(g, axis=0) / D
            dr = tl.where(mask, (g - (xhat * c1 + c2)) * rstd, 0.0)
        if HAS_DR:
            dr += tl.load(DR + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + offs, dr.to(DX.dtype.element_ty), mask=mask)
        if HAS_RESIDUAL:
            y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(DY + offs, (dr * gate).to(DY.dtype.element_ty), mask=mask)
            dgate += dr * y
    part = (b * G + pid_g) * D + cols
    if HAS_RESIDUAL:
        tl.store(DGATE_PART + part, dgate, mask=mask)
    if HAS_NORM:
        tl.store(DSHIFT_PART + part, dshift, mask=mask)
        tl.store(DSCALE_PART + part, dscale, mask=mask)


@triton.jit
def _sum_groups(PART, b, G, D, cols, mask, BLOCK: tl.constexpr):
    """Sample b's partial sums PART[b, :, cols] (PART (B, G, D) fp32) added in the order g = 0..G-1."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for g in range(G):
        acc += tl.load(PART + (b * G + g) * D + cols, mask=mask, other=0.0)
    return acc


@triton.jit
def _adaln_bwd_reduce_kernel(
    DGATE_PART,  # (B, G, D) fp32: partial sums of dr*y (HAS_RESIDUAL)
    DSHIFT_PART,  # (B, G, D) fp32: partial sums of dh (HAS_NORM)
    DSCALE_PART,  # (B, G, D) fp32: partial sums of dh*xhat (HAS_NORM)
    DGATE,  # (B, D) out, gate's dtype: DGATE_PART summed over G (HAS_RESIDUAL)
    DSHIFT,  # (B, D) fp32 out: DSHIFT_PART summed over G (HAS_NORM)
    DSCALE,  # (B, D) fp32 out: DSCALE_PART summed over G (HAS_NORM)
    G,  # row groups per sample
    D,  # hidden size
    HAS_RESIDUAL: tl.constexpr,
    HAS_NORM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cols = pid_d * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    if HAS_RESIDUAL:
        dgate = _sum_groups(DGATE_PART, b, G, D, cols, mask, BLOCK)
        tl.store(DGATE + b * D + cols, dgate.to(DGATE.dtype.element_ty), mask=mask)
    if HAS_NORM:
        tl.store(DSHIFT + b * D + cols, _sum_groups(DSHIFT_PART, b, G, D, cols, mask, BLOCK), mask=mask)
        tl.store(DSCALE + b * D + cols, _sum_groups(DSCALE_PART, b, G, D, cols, mask, BLOCK), mask=mask)


def _bwd_groups(N: int) -> int:
    """Row groups per sample in the backward (its grid's first axis): one per row up to G_MAX."""
    return min(N, G_MAX)


def _launch_params(B: int, N: int, D: int) -> tuple[int, int, int]:
    """(BLOCK_D, ROWS, num_warps): a whole row per program, ROWS consecutive rows per forward
    program, enough programs to fill a GPU (the backward's grid is (_bwd_groups(N), B))."""
    block_d = triton.next_power_of_2(D)
    rows = 1
    while rows < 16 and B * triton.cdiv(N, rows * 2) >= 1024:
        rows *= 2
    num_warps = min(16, max(1, block_d // 256))
    return block_d, rows, num_warps


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(B, N, D) with contiguous rows: a no-op for the usual activations."""
    return t if t.is_contiguous() else t.contiguous()


def _vec(v: torch.Tensor) -> torch.Tensor:
    """(B, D) vector with unit stride along D (views of the modulation GEMM output pass through)."""
    return v if v.stride(-1) == 1 else v.contiguous()


def adaln_fwd(x, y, gate, shift, scale, eps: float, out_dtype: torch.dtype, h_dtype: torch.dtype | None = None):
    """Launch the forward. ``y``/``gate`` None: no residual; ``gate`` alone None: r = x + y (no
    gate); ``shift``/``scale`` None: no norm.

    Returns (r, h, mean, rstd); the pieces an op does not produce are None. r has ``out_dtype``,
    h ``h_dtype`` (None: ``out_dtype``), mean and rstd fp32.
    """
    B, N, D = x.shape
    has_res, has_norm = y is not None, shift is not None
    has_gate = has_res and gate is not None
    x = _rows(x)
    r = _empty((B, N, D), device=x.device, dtype=out_dtype) if has_res else None
    h = _empty((B, N, D), device=x.device, dtype=h_dtype or out_dtype) if has_norm else None
    mean = _empty(B * N, device=x.device, dtype=torch.float32) if has_norm else None
    rstd = _empty(B * N, device=x.device, dtype=torch.float32) if has_norm else None
    if has_res:
        y = _rows(y)
    if has_gate:
        gate = _vec(gate)
    if has_norm:
        shift, scale = _vec(shift), _vec(scale)
    if B * N == 0:
        return r, h, mean, rstd
    block_d, rows, num_warps = _launch_params(B, N, D)
    dummy = x  # stands in for absent pointers; never dereferenced (the constexpr switch is off)
    _adaln_fwd_kernel[(triton.cdiv(N, rows), B)](
        x, y if has_res else dummy, gate if has_gate else dummy,
        shift if has_norm else dummy, scale if has_norm else dummy,
        r if has_res else dummy, h if has_norm else dummy,
        mean if has_norm else dummy, rstd if has_norm else dummy,
        N, D,
        gate.stride(0) if has_gate else 0, shift.stride(0) if has_norm else 0, scale.stride(0) if has_norm else 0,
        eps,
        HAS_RESIDUAL=has_res, HAS_GATE=has_gate, HAS_NORM=has_norm, BLOCK_D=block_d, ROWS=rows, num_warps=num_warps,
    )  # fmt: skip
    return r, h, mean, rstd


def adaln_bwd(dr, dh, normed, y, gate, scale, mean, rstd, x_dtype: torch.dtype):
    """Launch the backward. Returns (dx, dy, dgate, dshift, dscale), None where not applicable.

    ``dr``/``dh``: grads of r and h (either may be None when that output got no gradient; dh may
    be narrower than r, e.g. bf16 under autocast); ``normed``: the tensor LayerNorm saw (needed
    with a norm). ``y``/``gate`` None: no residual. dshift, dscale are fp32; dgate has gate's dtype.
    """
    has_res, has_norm = y is not None, scale is not None and dh is not None
    ref = dr if dr is not None else dh
    B, N, D = ref.shape
    dx = _empty((B, N, D), device=ref.device, dtype=x_dtype)
    dy = _empty((B, N, D), device=ref.device, dtype=y.dtype) if has_res else None
    block_d, _, num_warps = _launch_params(B, N, D)
    G = _bwd_groups(N)
    V = int(has_res) + 2 * int(has_norm)  # vectors to reduce, stacked as [dgate] + [dshift, dscale]
    part = _empty((V, B, G, D), device=ref.device, dtype=torch.float32)
    dgate_p = part[0] if has_res else None
    dshift_p, dscale_p = (part[V - 2], part[V - 1]) if has_norm else (None, None)
    if B * N:
        dummy = ref
        _adaln_bwd_kernel[(G, B)](
            _rows(dr) if dr is not None else dummy, _rows(dh) if has_norm else dummy,
            _rows(normed) if has_norm else dummy, _rows(y) if has_res else dummy,
            _vec(gate) if has_res else dummy, _vec(scale) if has_norm else dummy,
            mean if has_norm else dummy, rstd if has_norm else dummy,
            dx, dy if has_res else dummy,
            dgate_p if has_res else dummy, dshift_p if has_norm else dummy, dscale_p if has_norm else dummy,
            N, D, G,
            _vec(gate).stride(0) if has_res else 0, _vec(scale).stride(0) if has_norm else 0,
            HAS_RESIDUAL=has_res, HAS_NORM=has_norm, HAS_DR=dr is not None,
            BLOCK_D=block_d, num_warps=num_warps,
        )  # fmt: skip
    dgate = _empty((B, D), device=ref.device, dtype=gate.dtype) if has_res else None
    vec = lambda: _empty((B, D), device=ref.device, dtype=torch.float32)  # noqa: E731
    dshift, dscale = (vec(), vec()) if has_norm else (None, None)
    if B * D and V:
        dummy = part
        block = min(1024, triton.next_power_of_2(D))
        _adaln_bwd_reduce_kernel[(triton.cdiv(D, block), B)](
            dgate_p if has_res else dummy, dshift_p if has_norm else dummy, dscale_p if has_norm else dummy,
            dgate if has_res else dummy, dshift if has_norm else dummy, dscale if has_norm else dummy,
            G, D,
            HAS_RESIDUAL=has_res, HAS_NORM=has_norm, BLOCK=block, num_warps=4,
        )  # fmt: skip
    return dx, dy, dgate, dshift, dscale
