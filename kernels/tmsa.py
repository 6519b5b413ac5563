"""DiffiT's time-dependent self-attention (TMSA): ditfast's flash-attention kernels with a per-sample
time projection, a relative position bias and non-overlapping windows, forward and backward.

Inputs as in ``ditfast.kernels.attention``: ``qkv`` (B, N, 3*D) straight from the qkv GEMM, rows
[q | k | v], head-major, read in place. Three additions, each behind a constexpr so a launch
without it compiles none of its code:

  HAS_QKV_T  ``qkv_t`` (B, 3*D): sample b's q row is added to every q tile as it is loaded (in
             fp32, rounded back to the input dtype as the release's ``qkv_temb + qkv(x)`` does);
             no extra pass over qkv. Its k and v rows need no load at all: k + t_k shifts every
             score of query i by q_i . t_k, which softmax cancels; and P (v + t_v) = P v + t_v as
             the rows of P sum to one, so t_v is added to the output rows as they are stored.
  HAS_BIAS   ``table`` ((2*WH-1)*(2*WW-1), H): the score of local tokens (i, j) gets
             table[(y_i - y_j + WH - 1) * (2*WW - 1) + (x_i - x_j + WW - 1), h], the index
             computed per tile from the two tokens' coordinates in their window and the value
             gathered from the small table (no N x N bias exists anywhere).
  WINDOWED   attention within each WH x WW window of the GH x GW token grid: a program owns a
             block of one window's L = WH*WW local tokens and maps local index l to the row-major
             token row (wy*WH + l // WW) * GW + wx*WW + l % WW; qkv and the output stay in
             row-major token order (no copy into window order). Without it the window is the
             whole grid and local index = token row.

Why a module beside ``kernels/attention.py`` and not more flags on its kernels: the windowed
program-to-token mapping and the bias gradient change the kernels' structure (grid, loop bounds,
an extra kernel), and the plain kernel's compiled code, its AOT table and its tests stay exactly
as they are; everything that is the same (row loads/stores, head-dim layouts, autotune configs
and their per-arch pruning, launch helpers) is imported from there.

Backward, deterministic (no atomics anywhere):
  1. delta = rowsum(dO * (O - t_v))     ``_tmsa_bwd_preprocess_kernel`` (per token row)
  2. dk, dv  ``_tmsa_bwd_kernel`` DKDV=True: one program per key block of one window
  3. dq      the same kernel, DKDV=False: one program per query block of one window
  4. dbias   ``_tmsa_dbias_kernel``: one program per (head, query block, key block) of the local
             L x L score matrix; it loops over batch and windows in a fixed order, recomputes the
             P and dP tiles and sums dS = P * (dP - delta) into an (H, L, L) fp32 buffer (two more
             matmuls per tile than steps 2-3 need: the price of not keeping a (B, H, N, L) dS)
  5. dtable  ``_tmsa_bias_reduce_kernel``: one program per table entry (dy, dx) sums its fixed set
             of (i, j) pairs of the buffer, in a fixed order, for all heads at once.
The time projection's gradient is d(qkv) summed over tokens (a torch sum over step 2-3's output,
in ``ditfast.ops.tmsa``). Every step is a fixed reduction order: bitwise reproducible.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention import (
    _TUNE_KEY,
    _block_of_program,
    _cuda_configs,
    _grid,
    _last_dim_unit,
    _launch,
    _load_rows,
    _store_rows,
    dot_precision,
    head_blocks,
    HEAD_LAYOUT,
    LOG2E,
    prune_configs,
)
from . import attention as _attention

__all__ = ["tmsa_fwd", "tmsa_bwd", "tmsa_ref"]


# ------------------------------------------------------------------------------------------
# Kernel helpers
# ------------------------------------------------------------------------------------------


@triton.jit
def _token_rows(local, win, GW, WW, NWX, WH, WINDOWED: tl.constexpr):
    """Row-major token rows of the local indices ``local`` of window ``win`` (identity if not WINDOWED)."""
    rows = local
    if WINDOWED:
        rows = ((win // NWX) * WH + local // WW) * GW + (win % NWX) * WW + local % WW
    return rows


@triton.jit
def _load_q(BASE, T_BASE, rows, row_mask, stride_n, cols, DH: tl.constexpr, HAS_QKV_T: tl.constexpr):
    """A q tile of one head with the sample's time projection row added (rows past the window hold
    the projection alone: every use masks them)."""
    x = _load_rows(BASE, rows, row_mask, stride_n, cols, DH)
    if HAS_QKV_T:
        t = tl.load(T_BASE + cols, mask=cols < DH, other=0.0).to(tl.float32)
        x = (x.to(tl.float32) + t[None, :]).to(BASE.dtype.element_ty)
    return x


@triton.jit
def _rel_coord(local, N, WW):
    """y * (2*WW - 1) + x of each local token (clamped into the window): the table index of a pair
    (i, j) is rel(i) - rel(j) + (WH - 1) * (2*WW - 1) + WW - 1, one subtraction per score."""
    loc = tl.minimum(local, N - 1)
    return (loc // WW) * (2 * WW - 1) + loc % WW


@triton.jit
def _program_of(L, NW, BLOCK: tl.constexpr):
    """(local block, window, b*H + h) of this program: axis 0 holds B*H*NW*cdiv(L, BLOCK) programs,
    the blocks of one window adjacent, then the windows of one (batch, head)."""
    n_blocks = tl.cdiv(L, BLOCK)
    pid = tl.program_id(0)
    rest = pid // n_blocks
    return pid % n_blocks, rest % NW, rest // NW


@triton.jit
def _bases(QKV, QKV_T, bh, H, stride_qkv_b, stride_t_b, DH: tl.constexpr):
    b = (bh // H).to(tl.int64)
    h = bh % H
    q_base = QKV + b * stride_qkv_b + h * DH
    t_base = QKV_T + b * stride_t_b + h * DH
    return b, h, q_base, t_base


# ------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------


@triton.jit
def _tmsa_fwd_kernel(
    QKV,  # (B, N_TOKENS, 3*H*DH) packed projections [q | k | v], head-major; unit stride along the last dim
    QKV_T,  # (B, 3*H*DH) time projection, unit last stride (HAS_QKV_T; else any pointer, unread)
    TABLE,  # ((2*WH-1)*(2*WW-1), H) relative position bias, contiguous (HAS_BIAS; else unread)
    OUT,  # (B, N_TOKENS, H*DH) out: attention output, heads concatenated; unit last stride
    LSE,  # (B, H, N_TOKENS) fp32 out, contiguous: natural-log logsumexp per query row
    N,  # L = WH*WW tokens per window (the attention length)
    N_TOKENS,  # tokens per sample, GH*GW
    H,  # heads
    GW,  # grid width (tokens per grid row)
    WW,  # window width
    NWX,  # windows per grid row, GW // WW
    NW,  # windows per sample
    stride_qkv_b,  # batch stride of QKV (elements)
    stride_qkv_n,  # token stride of QKV
    stride_t_b,  # batch stride of QKV_T
    stride_out_b,  # batch stride of OUT
    stride_out_n,  # token stride of OUT
    qk_scale,  # softmax scale * log2(e)
    DH: tl.constexpr,  # head dim
    WH,  # window height
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per inner step
    BLOCK_D0: tl.constexpr,  # main head-dim block
    BLOCK_D1: tl.constexpr,  # tail head-dim block ("split" layout), 0 for none
    PRECISION: tl.constexpr,  # tl.dot input_precision for fp32 inputs
    HAS_QKV_T: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WINDOWED: tl.constexpr,
):
    pid_m, win, bh = _program_of(N, NW, BLOCK_M)
    b, h, q_base, tq = _bases(QKV, QKV_T, bh, H, stride_qkv_b, stride_t_b, DH)
    D = H * DH
    k_base, v_base = q_base + D, q_base + 2 * D
    ql = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # local query indices
    row_mask = ql < N
    rows = _token_rows(ql, win, GW, WW, NWX, WH, WINDOWED)
    if HAS_BIAS:  # this block's half of the table offsets: (rel(i) + C) * H + h
        q_rel = (_rel_coord(ql, N, WW) + (WH - 1) * (2 * WW - 1) + WW - 1) * H + h
    d0 = tl.arange(0, BLOCK_D0)
    q0 = _load_q(q_base, tq, rows, row_mask, stride_qkv_n, d0, DH, HAS_QKV_T)
    acc0 = tl.zeros([BLOCK_M, BLOCK_D0], dtype=tl.float32)
    if BLOCK_D1 > 0:
        d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
        q1 = _load_q(q_base, tq, rows, row_mask, stride_qkv_n, d1, DH, HAS_QKV_T)
        acc1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    for start_n in range(0, N, BLOCK_N):
        kl = start_n + tl.arange(0, BLOCK_N)
        col_mask = kl < N
        cols = _token_rows(kl, win, GW, WW, NWX, WH, WINDOWED)
        k0 = _load_rows(k_base, cols, col_mask, stride_qkv_n, d0, DH)
        s = tl.dot(q0, tl.trans(k0), input_precision=PRECISION)
        if BLOCK_D1 > 0:
            k1 = _load_rows(k_base, cols, col_mask, stride_qkv_n, d1, DH)
            s += tl.dot(q1, tl.trans(k1), input_precision=PRECISION)
        s = s * qk_scale
        if HAS_BIAS:
            k_rel = _rel_coord(kl, N, WW) * H
            s += tl.load(TABLE + (q_rel[:, None] - k_rel[None, :])).to(tl.float32) * 1.4426950408889634
        s = tl.where(col_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # every key block holds a real key: finite
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v0 = _load_rows(v_base, cols, col_mask, stride_qkv_n, d0, DH)
        acc0 = acc0 * alpha[:, None] + tl.dot(p.to(v0.dtype), v0, input_precision=PRECISION)
        if BLOCK_D1 > 0:
            v1 = _load_rows(v_base, cols, col_mask, stride_qkv_n, d1, DH)
            acc1 = acc1 * alpha[:, None] + tl.dot(p.to(v1.dtype), v1, input_precision=PRECISION)
        m_i = m_new

    o_base = OUT + b * stride_out_b + h * DH
    inv_l = 1.0 / l_i
    o0 = acc0 * inv_l[:, None]
    if HAS_QKV_T:  # P (v + t_v) = P v + t_v: the rows of P sum to one
        o0 += tl.load(tq + 2 * D + d0, mask=d0 < DH, other=0.0).to(tl.float32)[None, :]
    _store_rows(o_base, o0, rows, row_mask, stride_out_n, d0, DH)
    if BLOCK_D1 > 0:
        o1 = acc1 * inv_l[:, None]
        if HAS_QKV_T:
            o1 += tl.load(tq + 2 * D + d1, mask=d1 < DH, other=0.0).to(tl.float32)[None, :]
        _store_rows(o_base, o1, rows, row_mask, stride_out_n, d1, DH)
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    tl.store(LSE + bh.to(tl.int64) * N_TOKENS + rows, lse, mask=row_mask)


@triton.jit
def _tmsa_bwd_preprocess_kernel(
    OUT,  # (B, N_TOKENS, H*DH) forward output; unit last stride
    DOUT,  # (B, N_TOKENS, H*DH) its gradient; unit last stride
    QKV_T,  # (B, 3*H*DH) time projection (HAS_QKV_T; its v part was added to OUT)
    DELTA,  # (B, H, N_TOKENS) fp32 out, contiguous: rowsum(dO * (O - t_v)) per head
    N_TOKENS,
    H,
    stride_out_b,
    stride_out_n,
    stride_dout_b,
    stride_dout_n,
    stride_t_b,
    DH: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next_power_of_2(DH)
    HAS_QKV_T: tl.constexpr,
):
    pid_m, bh = _block_of_program(N_TOKENS, BLOCK_M)
    b = (bh // H).to(tl.int64)
    h = bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N_TOKENS
    d = tl.arange(0, BLOCK_D)
    o = _load_rows(OUT + b * stride_out_b + h * DH, rows, row_mask, stride_out_n, d, DH).to(tl.float32)
    if HAS_QKV_T:  # the kernels' dP = dO (v)^T leaves out t_v, and so must delta: sum_j P dP = dO . (O - t_v)
        o -= tl.load(QKV_T + b * stride_t_b + 2 * H * DH + h * DH + d, mask=d < DH, other=0.0).to(tl.float32)[None, :]
    do = _load_rows(DOUT + b * stride_dout_b + h * DH, rows, row_mask, stride_dout_n, d, DH).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * N_TOKENS + rows, tl.sum(o * do, axis=1), mask=row_mask)


@triton.jit
def _tmsa_bwd_kernel(
    QKV,  # (B, N_TOKENS, 3*H*DH) packed projections, as in the forward
    QKV_T,  # (B, 3*H*DH) time projection (HAS_QKV_T)
    TABLE,  # ((2*WH-1)*(2*WW-1), H) bias table, contiguous (HAS_BIAS)
    DOUT,  # (B, N_TOKENS, H*DH) gradient of the output; unit last stride
    LSE,  # (B, H, N_TOKENS) fp32 from the forward
    DELTA,  # (B, H, N_TOKENS) fp32 rowsum(dO * O)
    DQKV,  # (B, N_TOKENS, 3*H*DH) out, contiguous: k and v parts (DKDV) or the q part
    N,  # L tokens per window
    N_TOKENS,
    H,
    GW,
    WW,
    NWX,
    NW,
    stride_qkv_b,
    stride_qkv_n,
    stride_t_b,
    stride_dout_b,
    stride_dout_n,
    sm_scale,  # softmax scale
    qk_scale,  # sm_scale * log2(e)
    DH: tl.constexpr,
    WH,  # window height
    BLOCK_M: tl.constexpr,  # queries: per inner step (DKDV), per program (not DKDV)
    BLOCK_N: tl.constexpr,  # keys: per program (DKDV), per inner step (not DKDV)
    BLOCK_D0: tl.constexpr,
    BLOCK_D1: tl.constexpr,
    PRECISION: tl.constexpr,
    HAS_QKV_T: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WINDOWED: tl.constexpr,
    DKDV: tl.constexpr,  # True: a program owns BLOCK_N keys -> dk, dv; False: BLOCK_M queries -> dq
):
    pid, win, bh = _program_of(N, NW, BLOCK_N if DKDV else BLOCK_M)
    b, h, q_base, tq = _bases(QKV, QKV_T, bh, H, stride_qkv_b, stride_t_b, DH)
    D = H * DH
    k_base, v_base = q_base + D, q_base + 2 * D
    C = (WH - 1) * (2 * WW - 1) + WW - 1  # table index of (i, j) = rel(i) - rel(j) + C
    do_base = DOUT + b * stride_dout_b + h * DH
    dq_base = DQKV + b * N_TOKENS * 3 * D + h * DH
    stat_base = bh.to(tl.int64) * N_TOKENS
    d0 = tl.arange(0, BLOCK_D0)
    if BLOCK_D1 > 0:
        d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)

    if DKDV:
        kl = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = kl < N
        cols = _token_rows(kl, win, GW, WW, NWX, WH, WINDOWED)
        if HAS_BIAS:
            k_rel = _rel_coord(kl, N, WW) * H
        k0 = _load_rows(k_base, cols, col_mask, stride_qkv_n, d0, DH)
        v0 = _load_rows(v_base, cols, col_mask, stride_qkv_n, d0, DH)
        dk0 = tl.zeros([BLOCK_N, BLOCK_D0], dtype=tl.float32)
        dv0 = tl.zeros([BLOCK_N, BLOCK_D0], dtype=tl.float32)
        if BLOCK_D1 > 0:
            k1 = _load_rows(k_base, cols, col_mask, stride_qkv_n, d1, DH)
            v1 = _load_rows(v_base, cols, col_mask, stride_qkv_n, d1, DH)
            dk1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=tl.float32)
            dv1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=tl.float32)
        for start_m in range(0, N, BLOCK_M):
            ql = start_m + tl.arange(0, BLOCK_M)
            row_mask = ql < N
            rows = _token_rows(ql, win, GW, WW, NWX, WH, WINDOWED)
            q0 = _load_q(q_base, tq, rows, row_mask, stride_qkv_n, d0, DH, HAS_QKV_T)
            do0 = _load_rows(do_base, rows, row_mask, stride_dout_n, d0, DH)
            lse2 = tl.load(LSE + stat_base + rows, mask=row_mask, other=0.0) * 1.4426950408889634
            delta = tl.load(DELTA + stat_base + rows, mask=row_mask, other=0.0)
            s_t = tl.dot(k0, tl.trans(q0), input_precision=PRECISION)  # (keys, queries)
            dp_t = tl.dot(v0, tl.trans(do0), input_precision=PRECISION)
            if BLOCK_D1 > 0:
                q1 = _load_q(q_base, tq, rows, row_mask, stride_qkv_n, d1, DH, HAS_QKV_T)
                do1 = _load_rows(do_base, rows, row_mask, stride_dout_n, d1, DH)
                s_t += tl.dot(k1, tl.trans(q1), input_precision=PRECISION)
                dp_t += tl.dot(v1, tl.trans(do1), input_precision=PRECISION)
            s_t = s_t * qk_scale
            if HAS_BIAS:
                q_rel = (_rel_coord(ql, N, WW) + C) * H + h
                s_t += tl.load(TABLE + (q_rel[None, :] - k_rel[:, None])).to(tl.float32) * 1.4426950408889634
            p_t = tl.where(row_mask[None, :], tl.exp2(s_t - lse2[None, :]), 0.0)
            ds_t = p_t * (dp_t - delta[None, :])
            dv0 += tl.dot(p_t.to(do0.dtype), do0, input_precision=PRECISION)
            dk0 += tl.dot(ds_t.to(q0.dtype), q0, input_precision=PRECISION)
            if BLOCK_D1 > 0:
                dv1 += tl.dot(p_t.to(do1.dtype), do1, input_precision=PRECISION)
                dk1 += tl.dot(ds_t.to(q1.dtype), q1, input_precision=PRECISION)
        _store_rows(dq_base + D, dk0 * sm_scale, cols, col_mask, 3 * D, d0, DH)
        _store_rows(dq_base + 2 * D, dv0, cols, col_mask, 3 * D, d0, DH)
        if BLOCK_D1 > 0:
            _store_rows(dq_base + D, dk1 * sm_scale, cols, col_mask, 3 * D, d1, DH)
            _store_rows(dq_base + 2 * D, dv1, cols, col_mask, 3 * D, d1, DH)
    else:
        ql = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = ql < N
        rows = _token_rows(ql, win, GW, WW, NWX, WH, WINDOWED)
        q0 = _load_q(q_base, tq, rows, row_mask, stride_qkv_n, d0, DH, HAS_QKV_T)
        do0 = _load_rows(do_base, rows, row_mask, stride_dout_n, d0, DH)
        dq0 = tl.zeros([BLOCK_M, BLOCK_D0], dtype=tl.float32)
        if BLOCK_D1 > 0:
            q1 = _load_q(q_base, tq, rows, row_mask, stride_qkv_n, d1, DH, HAS_QKV_T)
            do1 = _load_rows(do_base, rows, row_mask, stride_dout_n, d1, DH)
            dq1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
        lse2 = tl.load(LSE + stat_base + rows, mask=row_mask, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + stat_base + rows, mask=row_mask, other=0.0)
        if HAS_BIAS:
            q_rel = (_rel_coord(ql, N, WW) + C) * H + h
        for start_n in range(0, N, BLOCK_N):
            kl = start_n + tl.arange(0, BLOCK_N)
            col_mask = kl < N
            cols = _token_rows(kl, win, GW, WW, NWX, WH, WINDOWED)
            k0 = _load_rows(k_base, cols, col_mask, stride_qkv_n, d0, DH)
            v0 = _load_rows(v_base, cols, col_mask, stride_qkv_n, d0, DH)
            s = tl.dot(q0, tl.trans(k0), input_precision=PRECISION)
            dp = tl.dot(do0, tl.trans(v0), input_precision=PRECISION)
            if BLOCK_D1 > 0:
                k1 = _load_rows(k_base, cols, col_mask, stride_qkv_n, d1, DH)
                v1 = _load_rows(v_base, cols, col_mask, stride_qkv_n, d1, DH)
                s += tl.dot(q1, tl.trans(k1), input_precision=PRECISION)
                dp += tl.dot(do1, tl.trans(v1), input_precision=PRECISION)
            s = s * qk_scale
            if HAS_BIAS:
                k_rel = _rel_coord(kl, N, WW) * H
                s += tl.load(TABLE + (q_rel[:, None] - k_rel[None, :])).to(tl.float32) * 1.4426950408889634
            p = tl.where(col_mask[None, :], tl.exp2(s - lse2[:, None]), 0.0)
            ds = p * (dp - delta[:, None])
            dq0 += tl.dot(ds.to(k0.dtype), k0, input_precision=PRECISION)
            if BLOCK_D1 > 0:
                dq1 += tl.dot(ds.to(k1.dtype), k1, input_precision=PRECISION)
        _store_rows(dq_base, dq0 * sm_scale, rows, row_mask, 3 * D, d0, DH)
        if BLOCK_D1 > 0:
            _store_rows(dq_base, dq1 * sm_scale, rows, row_mask, 3 * D, d1, DH)


@triton.jit
def _tmsa_dbias_kernel(
    QKV,  # (B, N_TOKENS, 3*H*DH) packed projections
    QKV_T,  # (B, 3*H*DH) time projection (HAS_QKV_T)
    TABLE,  # ((2*WH-1)*(2*WW-1), H) bias table, contiguous
    DOUT,  # (B, N_TOKENS, H*DH) gradient of the output
    LSE,  # (B, H, N_TOKENS) fp32
    DELTA,  # (B, H, N_TOKENS) fp32
    DBUF,  # (H, L, L) fp32 out, contiguous: dS summed over batch and windows
    N,  # L tokens per window
    N_TOKENS,
    H,
    GW,
    WW,
    NWX,
    NW,
    B,  # batch
    stride_qkv_b,
    stride_qkv_n,
    stride_t_b,
    stride_dout_b,
    stride_dout_n,
    qk_scale,
    DH: tl.constexpr,
    WH,  # window height
    BLOCK_M: tl.constexpr,  # local queries per program
    BLOCK_N: tl.constexpr,  # local keys per program
    BLOCK_D0: tl.constexpr,
    BLOCK_D1: tl.constexpr,
    PRECISION: tl.constexpr,
    HAS_QKV_T: tl.constexpr,
    WINDOWED: tl.constexpr,
):
    n_m = tl.cdiv(N, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    pid_n = pid % n_n
    pid_m = (pid // n_n) % n_m
    h = pid // (n_n * n_m)
    ql = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    kl = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = ql < N
    col_mask = kl < N
    mask = row_mask[:, None] & col_mask[None, :]
    q_rel = (_rel_coord(ql, N, WW) + (WH - 1) * (2 * WW - 1) + WW - 1) * H + h
    bias2 = tl.load(TABLE + (q_rel[:, None] - (_rel_coord(kl, N, WW) * H)[None, :])).to(tl.float32) * 1.4426950408889634
    D = H * DH
    d0 = tl.arange(0, BLOCK_D0)
    if BLOCK_D1 > 0:
        d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for b in range(0, B):  # fixed order over samples, then windows: deterministic
        bh = b * H + h
        b64, _, q_base, tq = _bases(QKV, QKV_T, bh, H, stride_qkv_b, stride_t_b, DH)
        k_base, v_base = q_base + D, q_base + 2 * D
        do_base = DOUT + b64 * stride_dout_b + h * DH
        stat_base = bh.to(tl.int64) * N_TOKENS
        for win in range(0, NW):
            rows = _token_rows(ql, win, GW, WW, NWX, WH, WINDOWED)
            cols = _token_rows(kl, win, GW, WW, NWX, WH, WINDOWED)
            q0 = _load_q(q_base, tq, rows, row_mask, stride_qkv_n, d0, DH, HAS_QKV_T)
            k0 = _load_rows(k_base, cols, col_mask, stride_qkv_n, d0, DH)
            s = tl.dot(q0, tl.trans(k0), input_precision=PRECISION)
            do0 = _load_rows(do_base, rows, row_mask, stride_dout_n, d0, DH)
            v0 = _load_rows(v_base, cols, col_mask, stride_qkv_n, d0, DH)
            dp = tl.dot(do0, tl.trans(v0), input_precision=PRECISION)
            if BLOCK_D1 > 0:
                q1 = _load_q(q_base, tq, rows, row_mask, stride_qkv_n, d1, DH, HAS_QKV_T)
                k1 = _load_rows(k_base, cols, col_mask, stride_qkv_n, d1, DH)
                s += tl.dot(q1, tl.trans(k1), input_precision=PRECISION)
                do1 = _load_rows(do_base, rows, row_mask, stride_dout_n, d1, DH)
                v1 = _load_rows(v_base, cols, col_mask, stride_qkv_n, d1, DH)
                dp += tl.dot(do1, tl.trans(v1), input_precision=PRECISION)
            lse2 = tl.load(LSE + stat_base + rows, mask=row_mask, other=0.0) * 1.4426950408889634
            delta = tl.load(DELTA + stat_base + rows, mask=row_mask, other=0.0)
            p = tl.where(mask, tl.exp2(s * qk_scale + bias2 - lse2[:, None]), 0.0)
            acc += p * (dp - delta[:, None])
    ptrs = DBUF + (h.to(tl.int64) * N + ql.to(tl.int64)[:, None]) * N + kl[None, :]
    tl.store(ptrs, acc, mask=mask)


@triton.jit
def _tmsa_bias_reduce_kernel(
    DBUF,  # (H, L, L) fp32, contiguous: dS summed over batch and windows (local query, local key)
    DTABLE,  # ((2*WH-1)*(2*WW-1), H) fp32 out, contiguous: the table's gradient
    N,  # L = WH*WW
    H,
    WW,
    WH,  # window height
    BLOCK_P: tl.constexpr,  # query positions per step
    BLOCK_H: tl.constexpr,  # next_power_of_2(H)
):
    t = tl.program_id(0)  # the table entry (dy + WH - 1) * (2*WW - 1) + (dx + WW - 1)
    dy = t // (2 * WW - 1) - (WH - 1)
    dx = t % (2 * WW - 1) - (WW - 1)
    hs = tl.arange(0, BLOCK_H)
    h_mask = hs < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for start in range(0, N, BLOCK_P):  # every query i whose partner j = i - (dy, dx) is in the window
        i = start + tl.arange(0, BLOCK_P)
        yj = i // WW - dy
        xj = i % WW - dx
        ok = (i < N) & (yj >= 0) & (yj < WH) & (xj >= 0) & (xj < WW)
        j = yj * WW + xj
        ptrs = DBUF + (hs.to(tl.int64)[None, :] * N + i[:, None]) * N + j[:, None]
        acc += tl.sum(tl.load(ptrs, mask=ok[:, None] & h_mask[None, :], other=0.0), axis=0)
    tl.store(DTABLE + t.to(tl.int64) * H + hs, acc, mask=h_mask)


# ------------------------------------------------------------------------------------------
# Launch configuration: the attention kernel's configs and pruning, keyed on the flags too
# ------------------------------------------------------------------------------------------


# Configs that the attention kernels' pruning keeps but that spill registers in these kernels (the
# bias offsets, the time-projection row and the window index arithmetic cost registers), measured
# with ``python -m ditfast.kernels.aot --kernel _tmsa`` (triton 3.9, time projection and bias on,
# global and windowed): (role, dtype class, precision, BLOCK_D0, BLOCK_D1, arch major) -> the
# (per-program block, inner block, num_warps, num_stages) that spilled (or asked for more shared
# memory than a block may have) there.
TMSA_SPILLS: dict[tuple, set] = {
    ('dbias', '16bit', 'ieee', 64, 16, 8): {(32, 32, 4, 3), (64, 32, 4, 4), (64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 8, 4)},
    ('dbias', '16bit', 'ieee', 64, 16, 9): {(32, 32, 4, 3), (64, 64, 4, 3), (64, 128, 4, 2), (128, 128, 8, 2)},
    ('dbias', '16bit', 'ieee', 128, 0, 9): {(64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 8, 4)},
    ('dbias', 'fp32', 'ieee', 64, 16, 8): {(32, 32, 8, 2)},
    ('dbias', 'fp32', 'tf32', 64, 16, 8): {(32, 16, 4, 2), (32, 32, 4, 2), (64, 32, 8, 3)},
    ('dbias', 'fp32', 'tf32', 64, 16, 9): {(32, 32, 4, 2), (32, 32, 8, 2)},
    ('dkdv', '16bit', 'ieee', 64, 16, 8): {(64, 32, 4, 4)},
    ('dkdv', '16bit', 'ieee', 64, 16, 9): {(32, 32, 4, 3), (64, 64, 4, 3)},
    ('dkdv', 'fp32', 'ieee', 64, 16, 8): {(16, 32, 4, 2), (32, 16, 4, 2), (32, 32, 8, 2)},
    ('dkdv', 'fp32', 'ieee', 64, 16, 9): {(32, 16, 4, 2), (32, 32, 8, 2)},
    ('dq', '16bit', 'ieee', 64, 16, 8): {(64, 64, 4, 3), (128, 64, 8, 4)},
    ('dq', '16bit', 'ieee', 64, 16, 9): {(64, 128, 4, 2), (128, 128, 8, 2)},
    ('dq', '16bit', 'ieee', 128, 0, 8): {(64, 32, 8, 3)},
    ('dq', '16bit', 'ieee', 128, 0, 9): {(128, 64, 8, 4)},
    ('dq', 'fp32', 'ieee', 64, 16, 8): {(16, 32, 4, 2)},
    ('fwd', '16bit', 'ieee', 64, 16, 8): {(64, 64, 4, 3), (64, 128, 4, 2), (128, 64, 8, 4), (128, 128, 8, 2)},
    ('fwd', '16bit', 'ieee', 64, 16, 9): {(32, 32, 4, 3), (64, 128, 4, 2), (128, 32, 4, 3), (128, 64, 4, 3), (128, 128, 8, 2)},
    ('fwd', '16bit', 'ieee', 128, 0, 8): {(64, 64, 4, 3), (128, 64, 8, 4)},
    ('fwd', '16bit', 'ieee', 128, 0, 9): {(64, 128, 4, 2), (128, 64, 8, 4)},
    ('fwd', 'fp32', 'ieee', 64, 16, 8): {(16, 16, 4, 2), (64, 32, 8, 2)},
}  # fmt: skip
# fp32 candidates beyond the attention kernels' short lists, for the roles where every listed one
# spilled here; (precision, role) -> shapes as above.
TMSA_FP32_EXTRA = {
    ("ieee", "dkdv"): [(16, 16, 4, 2), (16, 16, 8, 2)],
    ("tf32", "dbias"): [(32, 32, 8, 2), (32, 16, 4, 2), (16, 16, 4, 2), (16, 32, 4, 2), (32, 32, 4, 2)],
}


def _configs(role: str) -> list[triton.Config]:
    """The attention kernels' candidates of ``role`` (dbias: the dq role's) plus TMSA_FP32_EXTRA."""
    base = _cuda_configs("dq" if role == "dbias" else role)
    big, small = _attention._ROLE_BLOCKS["dq" if role == "dbias" else role]
    have = {_attention._shape(c, "dq" if role == "dbias" else role) for c in base}
    extra = dict.fromkeys(c for (_, r), cs in TMSA_FP32_EXTRA.items() if r == role for c in cs if c not in have)
    return base + [triton.Config({big: a, small: b}, num_warps=w, num_stages=st) for a, b, w, st in extra]


def _role_of(kwargs) -> str:
    return "dbias" if "DKDV" not in kwargs and "HAS_BIAS" not in kwargs else "fwd" if "DKDV" not in kwargs else "dkdv" if kwargs["DKDV"] else "dq"


def prune_tmsa(configs, named_args, arch=None, **kwargs):
    """The attention kernels' pruning (``attention.prune_configs``; the dbias kernel as the dq role:
    it holds q, dO, two (P, I) tiles and an fp32 (P, I) accumulator), minus the configs measured to
    spill in these kernels (TMSA_SPILLS); at least one is always kept."""
    role = _role_of(kwargs)
    meta = dict(kwargs, DKDV=False) if role == "dbias" else kwargs
    keep = prune_configs(configs, named_args, arch=arch, **meta)
    arch = arch or _attention.device_arch(named_args["QKV"])
    if arch is None:
        return keep
    shape_role = "dq" if role == "dbias" else role
    elem = "fp32" if named_args["QKV"].element_size() == 4 else "16bit"
    if elem == "fp32":  # prune_configs keeps only its own fp32 lists: add ours (within its block cap)
        cap = max(64, triton.next_power_of_2(named_args["N"]))
        extra = TMSA_FP32_EXTRA.get((kwargs["PRECISION"], role), [])
        keep = [c for c in configs if c in keep or (_attention._shape(c, shape_role) in extra and max(c.kwargs.values()) <= cap)]
    spills = TMSA_SPILLS.get((role, elem, kwargs["PRECISION"], kwargs["BLOCK_D0"], kwargs["BLOCK_D1"], arch[0]), set())
    fits = [c for c in keep if _attention._shape(c, shape_role) not in spills]
    return fits or keep[:1]


_KEY = _TUNE_KEY + ["HAS_QKV_T", "HAS_BIAS", "WINDOWED"]
_PRUNE = {"early_config_prune": prune_tmsa}
_fwd_tuned = triton.autotune(_configs("fwd"), key=_KEY, prune_configs_by=_PRUNE)(_tmsa_fwd_kernel)
_dkdv_tuned = triton.autotune(_configs("dkdv"), key=_KEY, prune_configs_by=_PRUNE)(_tmsa_bwd_kernel)
_dq_tuned = triton.autotune(_configs("dq"), key=_KEY, prune_configs_by=_PRUNE)(_tmsa_bwd_kernel)
_dbias_tuned = triton.autotune(_configs("dbias"), key=_TUNE_KEY + ["HAS_QKV_T", "WINDOWED"],
                               prune_configs_by=_PRUNE)(_tmsa_dbias_kernel)  # fmt: skip


def _geometry(grid, window):
    (gh, gw), (wh, ww) = grid, window
    L, nwx = wh * ww, gw // ww
    nw = (gh // wh) * nwx
    return L, gw, ww, nwx, nw, wh, (wh, ww) != (gh, gw)


def _meta(qkv, num_heads, head_layout):
    dh = qkv.shape[-1] // (3 * num_heads)
    block_d0, block_d1 = head_blocks(dh, head_layout or _attention.HEAD_LAYOUT)
    return dh, dict(DH=dh, BLOCK_D0=block_d0, BLOCK_D1=block_d1, PRECISION=dot_precision(qkv.dtype))


def _optional(t, like):
    """The tensor (unit last stride), or ``like`` as a never-read stand-in pointer."""
    return like if t is None else _last_dim_unit(t)


# ------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------


def tmsa_fwd(qkv, num_heads: int, grid, window, scale: float, qkv_t=None, table=None, head_layout=None):
    """TMSA forward of packed ``qkv`` (B, N, 3*H*Dh) on the ``grid`` (gh, gw) in ``window`` (wh, ww)
    windows -> (out (B, N, H*Dh) in qkv's dtype, lse (B, H, N) fp32)."""
    qkv = _last_dim_unit(qkv)
    B, N_tok, _ = qkv.shape
    H = num_heads
    dh, meta = _meta(qkv, H, head_layout)
    L, gw, ww, nwx, nw, wh, windowed = _geometry(grid, window)
    out = _attention._empty((B, N_tok, H * dh), device=qkv.device, dtype=qkv.dtype)
    lse = _attention._empty((B, H, N_tok), device=qkv.device, dtype=torch.float32)
    if B * N_tok == 0:
        return out, lse
    qkv_t, table_ = _optional(qkv_t, qkv), (qkv if table is None else table.contiguous())
    _launch(
        _tmsa_fwd_kernel, _fwd_tuned, lambda bm, bn: _grid(L, bm, B * H * nw), qkv.is_cuda,
        qkv, qkv_t, table_, out, lse, L, N_tok, H, gw, ww, nwx, nw,
        qkv.stride(0), qkv.stride(1), qkv_t.stride(0), out.stride(0), out.stride(1), scale * LOG2E,
        **meta, WH=wh, HAS_QKV_T=qkv_t is not qkv, HAS_BIAS=table is not None, WINDOWED=windowed,
    )  # fmt: skip
    return out, lse


def tmsa_bwd(dout, qkv, out, lse, num_heads: int, grid, window, scale: float, qkv_t=None, table=None,
             head_layout=None):  # fmt: skip
    """Gradients of :func:`tmsa_fwd`: (dqkv (B, N, 3*H*Dh) in qkv's dtype, dtable (T, H) fp32 or None).
    d(qkv_t) is ``dqkv.sum(1)`` (the caller's)."""
    qkv, out, dout = _last_dim_unit(qkv), _last_dim_unit(out), _last_dim_unit(dout)
    B, N_tok, _ = qkv.shape
    H = num_heads
    dh, meta = _meta(qkv, H, head_layout)
    L, gw, ww, nwx, nw, wh, windowed = _geometry(grid, window)
    dqkv = _attention._empty((B, N_tok, 3 * H * dh), device=qkv.device, dtype=qkv.dtype)
    T = (2 * wh - 1) * (2 * ww - 1)
    dtable = None if table is None else _attention._empty((T, H), device=qkv.device, dtype=torch.float32)
    if B * N_tok == 0:
        if dtable is not None:
            dtable.zero_()
        return dqkv, dtable
    delta = _attention._empty((B, H, N_tok), device=qkv.device, dtype=torch.float32)
    block_pre = 64 if qkv.is_cuda else 16
    qkv_t_, table_ = _optional(qkv_t, qkv), (qkv if table is None else table.contiguous())
    _tmsa_bwd_preprocess_kernel[_grid(N_tok, block_pre, B * H)](
        out, dout, qkv_t_, delta, N_tok, H, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), qkv_t_.stride(0),
        DH=dh, BLOCK_M=block_pre, BLOCK_D=max(16, triton.next_power_of_2(dh)), HAS_QKV_T=qkv_t is not None,
    )  # fmt: skip
    flags = dict(WH=wh, HAS_QKV_T=qkv_t is not None, WINDOWED=windowed)
    args = (qkv, qkv_t_, table_, dout, lse, delta, dqkv, L, N_tok, H, gw, ww, nwx, nw,
            qkv.stride(0), qkv.stride(1), qkv_t_.stride(0), dout.stride(0), dout.stride(1), scale, scale * LOG2E)  # fmt: skip
    grid_kv = lambda bm, bn: _grid(L, bn, B * H * nw)  # noqa: E731
    grid_q = lambda bm, bn: _grid(L, bm, B * H * nw)  # noqa: E731
    # dk/dv with TF32 dots spilled registers in every tried config (split head blocks, sm_80 and
    # sm_90, see TMSA_FP32_EXTRA): that kernel runs its fp32 dots exactly ("ieee") instead
    meta_kv = dict(meta, PRECISION="ieee") if meta["PRECISION"] == "tf32" else meta
    _launch(_tmsa_bwd_kernel, _dkdv_tuned, grid_kv, qkv.is_cuda, *args, **meta_kv, **flags, HAS_BIAS=table is not None, DKDV=True)
    _launch(_tmsa_bwd_kernel, _dq_tuned, grid_q, qkv.is_cuda, *args, **meta, **flags, HAS_BIAS=table is not None, DKDV=False)
    if table is not None:
        dbuf = _attention._empty((H, L, L), device=qkv.device, dtype=torch.float32)
        _launch(
            _tmsa_dbias_kernel, _dbias_tuned,
            lambda bm, bn: (H * triton.cdiv(L, bm) * triton.cdiv(L, bn),), qkv.is_cuda,
            qkv, qkv_t_, table_, dout, lse, delta, dbuf, L, N_tok, H, gw, ww, nwx, nw, B,
            qkv.stride(0), qkv.stride(1), qkv_t_.stride(0), dout.stride(0), dout.stride(1), scale * LOG2E,
            **meta, **flags,
        )  # fmt: skip
        _tmsa_bias_reduce_kernel[(T,)](dbuf, dtable, L, H, ww, WH=wh, BLOCK_P=64 if qkv.is_cuda else 16,
                                       BLOCK_H=max(2, triton.next_power_of_2(H)))  # fmt: skip
    return dqkv, dtable


def tmsa_ref(qkv, num_heads, grid, window, scale, qkv_t=None, table=None):
    """The op's plain-PyTorch reference (``ditfast.ops.tmsa.tmsa_attention_ref``), beside the kernel."""
    from ditfast.ops.tmsa import tmsa_attention_ref

    return tmsa_attention_ref(qkv, num_heads, qkv_t=qkv_t, bias_table=table, grid=grid, window=window, scale=scale)
