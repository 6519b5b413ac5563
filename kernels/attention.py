"""Flash-attention kernels on the packed qkv projection: forward, and backward for training.

The input is the output of DiT's qkv Linear as it comes out of the GEMM: ``qkv`` (B, N, 3*D)
with D = H*Dh, each row laid out [q | k | v] and each of those head-major (head h owns columns
h*Dh .. h*Dh+Dh-1). The kernels address q, k and v of head h in place through strides, and the
forward writes ``out`` (B, N, D) with the heads concatenated, which is the input layout of the
output projection. No permute or contiguous copy happens on either side.

Forward (one program per BLOCK_M queries of one (batch, head)): stream over key blocks with an
online softmax kept in fp32 (running max and sum, exp2 with log2(e) folded into the scale);
save the logsumexp of every query row (fp32, natural log) for the backward.

Backward, without atomics (so gradients are bitwise reproducible), in three launches:
  1. preprocess  delta = rowsum(dO * O) per (batch, head, query)                 (B, H, N) fp32
  2. dk, dv      ``_attn_bwd_kernel`` with DKDV=True: one program per BLOCK_N keys loops over all
                 query blocks, recomputes P from the saved logsumexp, accumulates dV += P^T dO
                 and dK += dS^T Q
  3. dq          the same kernel with DKDV=False: one program per BLOCK_M queries loops over all
                 key blocks, dQ += dS K
with dS = P * (dO V^T - delta). dq, dk, dv are written straight into a packed (B, N, 3*D) dqkv,
the gradient layout the qkv Linear's backward consumes. Recomputing S and dP in both (2) and (3)
costs two extra matmuls (7 instead of 5) in exchange for determinism.

Head dims that are not a power of two (DiT-XL's 72) need a layout choice, ``HEAD_LAYOUT``:
  "pad"    one block of next_power_of_2(Dh) columns (72 -> 128), the tail masked off;
  "split"  a power-of-two main block plus a masked tail block (72 -> 64 + 16), each matmul done
           as two dots; less wasted work, more instructions.
Which is faster is measured by benchmarks/bench_attention.py; until then "split" is the default
because it does 80 instead of 128 columns of matmul work at Dh = 72.

All arithmetic of the softmax is fp32; matmuls take the input dtype and accumulate in fp32
(fp32 inputs: TF32 dots if torch.backends.cuda.matmul.allow_tf32, else "ieee"). Offsets are int64.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["attention_fwd", "attention_bwd", "head_blocks", "prune_configs", "live_registers", "dot_precision", "HEAD_LAYOUTS"]

# Every output buffer comes from here, so tests can poison them (NaN) to catch unwritten elements.
_empty = torch.empty

HEAD_LAYOUTS = ("split", "pad")
# Provisional default (see the module docstring). DITFAST_ATTN_HEAD_LAYOUT overrides it at import,
# the launchers take head_layout= per call, and benchmarks/bench_attention.py flips this setting.
HEAD_LAYOUT = os.environ.get("DITFAST_ATTN_HEAD_LAYOUT", "split")

LOG2E = 1.4426950408889634  # (the kernels spell their constants out: jit code reads no plain globals)


# ------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------


@triton.jit
def _load_rows(BASE, rows, row_mask, stride_n, cols, DH: tl.constexpr):
    """(len(rows), len(cols)) tile of one head: BASE[rows * stride_n + cols], zero outside."""
    ptrs = BASE + rows.to(tl.int64)[:, None] * stride_n + cols[None, :]
    return tl.load(ptrs, mask=row_mask[:, None] & (cols < DH)[None, :], other=0.0)


@triton.jit
def _store_rows(BASE, value, rows, row_mask, stride_n, cols, DH: tl.constexpr):
    ptrs = BASE + rows.to(tl.int64)[:, None] * stride_n + cols[None, :]
    tl.store(ptrs, value.to(BASE.dtype.element_ty), mask=row_mask[:, None] & (cols < DH)[None, :])


@triton.jit
def _block_of_program(N, BLOCK: tl.constexpr):
    """(token block, b*H + h) of this program. The grid is one axis of B*H*cdiv(N, BLOCK) programs
    (see ``_grid``), the blocks of one (batch, head) adjacent."""
    n_blocks = tl.cdiv(N, BLOCK)
    pid = tl.program_id(0)
    return pid % n_blocks, pid // n_blocks


@triton.jit
def _head_of_program(QKV, stride_qkv_b, bh, H, DH: tl.constexpr):
    """(batch, head) of the program's ``bh`` = b*H + h and its q, k, v base pointers in QKV."""
    b = (bh // H).to(tl.int64)
    h = bh % H
    q_base = QKV + b * stride_qkv_b + h * DH
    return b, h, q_base, q_base + H * DH, q_base + 2 * H * DH


@triton.jit
def _attn_fwd_kernel(
    QKV,  # (B, N, 3*H*DH) packed projections [q | k | v], head-major; unit stride along the last dim
    OUT,  # (B, N, H*DH) out: attention output, heads concatenated; unit stride along the last dim
    LSE,  # (B, H, N) fp32 out, contiguous: natural-log logsumexp of each query's scaled scores
    N,  # tokens per sample
    H,  # heads
    stride_qkv_b,  # batch stride of QKV (elements)
    stride_qkv_n,  # token stride of QKV
    stride_out_b,  # batch stride of OUT
    stride_out_n,  # token stride of OUT
    qk_scale,  # softmax scale * log2(e): the kernel exponentiates with exp2
    DH: tl.constexpr,  # head dim
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per inner step
    BLOCK_D0: tl.constexpr,  # main head-dim block (a power of two, >= 16)
    BLOCK_D1: tl.constexpr,  # tail head-dim block ("split" layout), 0 for none
    PRECISION: tl.constexpr,  # tl.dot input_precision: "tf32" or "ieee" for fp32 inputs (see dot_precision)
):
    pid_m, bh = _block_of_program(N, BLOCK_M)
    b, h, q_base, k_base, v_base = _head_of_program(QKV, stride_qkv_b, bh, H, DH)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    d0 = tl.arange(0, BLOCK_D0)
    q0 = _load_rows(q_base, rows, row_mask, stride_qkv_n, d0, DH)
    acc0 = tl.zeros([BLOCK_M, BLOCK_D0], dtype=tl.float32)
    if BLOCK_D1 > 0:
        d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
        q1 = _load_rows(q_base, rows, row_mask, stride_qkv_n, d1, DH)
        acc1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    for start_n in range(0, N, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        k0 = _load_rows(k_base, cols, col_mask, stride_qkv_n, d0, DH)
        s = tl.dot(q0, tl.trans(k0), input_precision=PRECISION)
        if BLOCK_D1 > 0:
            k1 = _load_rows(k_base, cols, col_mask, stride_qkv_n, d1, DH)
            s += tl.dot(q1, tl.trans(k1), input_precision=PRECISION)
        s = tl.where(col_mask[None, :], s * qk_scale, float("-inf"))
        # every key block holds at least one real key, so m_new is finite for every row
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
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
    _store_rows(o_base, acc0 * inv_l[:, None], rows, row_mask, stride_out_n, d0, DH)
    if BLOCK_D1 > 0:
        _store_rows(o_base, acc1 * inv_l[:, None], rows, row_mask, stride_out_n, d1, DH)
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # base 2 -> natural log
    tl.store(LSE + bh.to(tl.int64) * N + rows, lse, mask=row_mask)


@triton.jit
def _attn_bwd_preprocess_kernel(
    OUT,  # (B, N, H*DH) forward output; unit stride along the last dim
    DOUT,  # (B, N, H*DH) its gradient; unit stride along the last dim
    DELTA,  # (B, H, N) fp32 out, contiguous: rowsum(dO * O) per head
    N,
    H,
    stride_out_b,
    stride_out_n,
    stride_dout_b,
    stride_dout_n,
    DH: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next_power_of_2(DH)
):
    pid_m, bh = _block_of_program(N, BLOCK_M)
    b = (bh // H).to(tl.int64)
    h = bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    d = tl.arange(0, BLOCK_D)
    o = _load_rows(OUT + b * stride_out_b + h * DH, rows, row_mask, stride_out_n, d, DH).to(tl.float32)
    do = _load_rows(DOUT + b * stride_dout_b + h * DH, rows, row_mask, stride_dout_n, d, DH).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * N + rows, tl.sum(o * do, axis=1), mask=row_mask)


@triton.jit
def _attn_bwd_kernel(
    QKV,  # (B, N, 3*H*DH) packed projections, as in the forward
    DOUT,  # (B, N, H*DH) gradient of the forward output; unit stride along the last dim
    LSE,  # (B, H, N) fp32, from the forward
    DELTA,  # (B, H, N) fp32, from the preprocess
    DQKV,  # (B, N, 3*H*DH) out, contiguous: the k and v parts (DKDV) or the q part (not DKDV)
    N,
    H,
    stride_qkv_b,
    stride_qkv_n,
    stride_dout_b,
    stride_dout_n,
    sm_scale,  # softmax scale (dS -> dK, dQ)
    qk_scale,  # sm_scale * log2(e)
    DH: tl.constexpr,
    BLOCK_M: tl.constexpr,  # queries: per inner step (DKDV), per program (not DKDV)
    BLOCK_N: tl.constexpr,  # keys: per program (DKDV), per inner step (not DKDV)
    BLOCK_D0: tl.constexpr,
    BLOCK_D1: tl.constexpr,
    PRECISION: tl.constexpr,
    DKDV: tl.constexpr,  # True: a program owns BLOCK_N keys -> dk, dv; False: BLOCK_M queries -> dq
):
    pid, bh = _block_of_program(N, BLOCK_N if DKDV else BLOCK_M)
    b, h, q_base, k_base, v_base = _head_of_program(QKV, stride_qkv_b, bh, H, DH)
    D = H * DH
    do_base = DOUT + b * stride_dout_b + h * DH
    dq_base = DQKV + b * N * 3 * D + h * DH
    stat_base = bh.to(tl.int64) * N
    d0 = tl.arange(0, BLOCK_D0)
    if BLOCK_D1 > 0:
        d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)

    if DKDV:
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # this program's keys
        col_mask = cols < N
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
            rows = start_m + tl.arange(0, BLOCK_M)
            row_mask = rows < N
            q0 = _load_rows(q_base, rows, row_mask, stride_qkv_n, d0, DH)
            do0 = _load_rows(do_base, rows, row_mask, stride_dout_n, d0, DH)
            lse2 = tl.load(LSE + stat_base + rows, mask=row_mask, other=0.0) * 1.4426950408889634
            delta = tl.load(DELTA + stat_base + rows, mask=row_mask, other=0.0)
            # transposed scores: (BLOCK_N keys, BLOCK_M queries)
            s_t = tl.dot(k0, tl.trans(q0), input_precision=PRECISION)
            dp_t = tl.dot(v0, tl.trans(do0), input_precision=PRECISION)
            if BLOCK_D1 > 0:
                q1 = _load_rows(q_base, rows, row_mask, stride_qkv_n, d1, DH)
                do1 = _load_rows(do_base, rows, row_mask, stride_dout_n, d1, DH)
                s_t += tl.dot(k1, tl.trans(q1), input_precision=PRECISION)
                dp_t += tl.dot(v1, tl.trans(do1), input_precision=PRECISION)
            # queries past N contribute nothing (their dO and delta are zero; P is zeroed to be explicit)
            p_t = tl.where(row_mask[None, :], tl.exp2(s_t * qk_scale - lse2[None, :]), 0.0)
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
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # this program's queries
        row_mask = rows < N
        q0 = _load_rows(q_base, rows, row_mask, stride_qkv_n, d0, DH)
        do0 = _load_rows(do_base, rows, row_mask, stride_dout_n, d0, DH)
        dq0 = tl.zeros([BLOCK_M, BLOCK_D0], dtype=tl.float32)
        if BLOCK_D1 > 0:
            q1 = _load_rows(q_base, rows, row_mask, stride_qkv_n, d1, DH)
            do1 = _load_rows(do_base, rows, row_mask, stride_dout_n, d1, DH)
            dq1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
        lse2 = tl.load(LSE + stat_base + rows, mask=row_mask, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + stat_base + rows, mask=row_mask, other=0.0)
        for start_n in range(0, N, BLOCK_N):
            cols = start_n + tl.arange(0, BLOCK_N)
            col_mask = cols < N
            k0 = _load_rows(k_base, cols, col_mask, stride_qkv_n, d0, DH)
            v0 = _load_rows(v_base, cols, col_mask, stride_qkv_n, d0, DH)
            s = tl.dot(q0, tl.trans(k0), input_precision=PRECISION)
            dp = tl.dot(do0, tl.trans(v0), input_precision=PRECISION)
            if BLOCK_D1 > 0:
                k1 = _load_rows(k_base, cols, col_mask, stride_qkv_n, d1, DH)
                v1 = _load_rows(v_base, cols, col_mask, stride_qkv_n, d1, DH)
                s += tl.dot(q1, tl.trans(k1), input_precision=PRECISION)
                dp += tl.dot(do1, tl.trans(v1), input_precision=PRECISION)
            p = tl.where(col_mask[None, :], tl.exp2(s * qk_scale - lse2[:, None]), 0.0)  # keys past N: none
            ds = p * (dp - delta[:, None])
            dq0 += tl.dot(ds.to(k0.dtype), k0, input_precision=PRECISION)
            if BLOCK_D1 > 0:
                dq1 += tl.dot(ds.to(k1.dtype), k1, input_precision=PRECISION)
        _store_rows(dq_base, dq0 * sm_scale, rows, row_mask, 3 * D, d0, DH)
        if BLOCK_D1 > 0:
            _store_rows(dq_base, dq1 * sm_scale, rows, row_mask, 3 * D, d1, DH)


# ------------------------------------------------------------------------------------------
# Launch configuration
# ------------------------------------------------------------------------------------------


def head_blocks(head_dim: int, layout: str) -> tuple[int, int]:
    """(BLOCK_D0, BLOCK_D1) covering ``head_dim`` columns: 72 -> (128, 0) padded, (64, 16) split."""
    if layout not in HEAD_LAYOUTS:
        raise ValueError(f"head_layout must be one of {HEAD_LAYOUTS}, got {layout!r}")
    padded = max(16, triton.next_power_of_2(head_dim))  # tl.dot needs every dim >= 16
    if layout == "pad" or padded == head_dim or head_dim <= 16:
        return padded, 0
    main = padded // 2
    return main, max(16, triton.next_power_of_2(head_dim - main))


# Autotuning candidates as (per-program block, inner-loop block, num_warps, num_stages); for dk/dv
# a program owns BLOCK_N keys and loops over BLOCK_M queries, otherwise the reverse.
# bf16/fp16 dots (tensor cores): one list, pruned per GPU by the register estimate below.
_CONFIGS_16BIT = [
    (128, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3), (128, 128, 8, 2),
    (64, 64, 4, 3), (64, 32, 4, 4), (64, 128, 4, 2), (128, 64, 8, 4),
    (64, 32, 8, 3), (32, 32, 4, 3),  # the ones that fit dk/dv at head dim 128 (72 padded) on sm_80
]  # fmt: skip
# fp32 dots ("tf32" on tensor cores, "ieee" as FMA loops that keep whole operand rows in each
# thread) need far smaller tiles; short lists per role, each measured spill-free on sm_80 and
# sm_90 at head blocks 64, 64+16 and 128 (python -m ditfast.kernels.aot --all-configs).
_CONFIGS_FP32 = {
    ("tf32", "fwd"): [(64, 32, 4, 4), (32, 32, 4, 3), (64, 32, 8, 3)],
    ("tf32", "dq"): [(64, 32, 8, 3)],
    ("tf32", "dkdv"): [(32, 16, 4, 3), (16, 16, 4, 3)],
    ("ieee", "fwd"): [(32, 32, 8, 2), (64, 32, 8, 2), (16, 16, 4, 2)],
    ("ieee", "dq"): [(32, 32, 8, 2), (32, 16, 4, 2), (16, 32, 4, 2)],
    ("ieee", "dkdv"): [(32, 16, 4, 2), (32, 32, 8, 2), (16, 32, 4, 2)],
}
_ROLE_BLOCKS = {"fwd": ("BLOCK_M", "BLOCK_N"), "dq": ("BLOCK_M", "BLOCK_N"), "dkdv": ("BLOCK_N", "BLOCK_M")}


def _cuda_configs(role: str) -> list[triton.Config]:
    """Every autotuning candidate of ``role`` ("fwd", "dq", "dkdv"); ``prune_configs`` picks the
    ones for the launch's dtype and GPU."""
    big, small = _ROLE_BLOCKS[role]
    shapes = dict.fromkeys(_CONFIGS_16BIT + [c for (_, r), cs in _CONFIGS_FP32.items() if r == role for c in cs])
    return [triton.Config({big: bm, small: bn}, num_warps=w, num_stages=s) for bm, bn, w, s in shapes]


def _role(meta) -> str:
    return "fwd" if "DKDV" not in meta else "dkdv" if meta["DKDV"] else "dq"


def _shape(config: triton.Config, role: str) -> tuple[int, int, int, int]:
    big, small = _ROLE_BLOCKS[role]
    return config.kwargs[big], config.kwargs[small], config.num_warps, config.num_stages


def device_arch(t: torch.Tensor) -> tuple[int, int] | None:
    """Compute capability of the GPU holding ``t``; None off CUDA (the interpreter)."""
    return torch.cuda.get_device_capability(t.device) if t.is_cuda else None


def live_registers(config: triton.Config, elem_bytes: int, **meta) -> float:
    """Estimated 32-bit registers per thread that one program's live tiles take under ``config``.

    ``meta``: the launch's BLOCK_D0, BLOCK_D1 (and DKDV for the backward). With P the per-program
    block, I the inner block, D = BLOCK_D0 + BLOCK_D1 and e = elem_bytes / 4, a program holds
      forward  acc o (P, D) fp32, q (P, D), scores s and p (P, I)      P*D*(1+e) + P*I*(1+e)
      dq       acc dq (P, D) fp32, q and dO (P, D), s and dP (P, I)    P*D*(1+2e) + 2*P*I
      dk, dv   acc dk, dv (P, D) fp32, k and v (P, D), s and dP (P, I) 2*P*D*(1+e) + 2*P*I
    values, spread over 32 * num_warps threads. A ranking, not a count: ptxas adds addresses and
    pipelining state, and caps a thread at 255 registers (the rest spills to local memory).
    """
    role = _role(meta)
    p, i, warps, _ = _shape(config, role)
    d, e = meta["BLOCK_D0"] + meta["BLOCK_D1"], elem_bytes / 4
    values = {
        "fwd": p * d * (1 + e) + p * i * (1 + e),
        "dq": p * d * (1 + 2 * e) + 2 * p * i,
        "dkdv": 2 * p * d * (1 + e) + 2 * p * i,
    }[role]
    return values / (32 * warps)


# Largest live_registers() of a kept bf16/fp16 config, per GPU generation (9: sm_90; 8: sm_80 and
# anything else). From ptxas (python -m ditfast.kernels.aot --all-configs, triton 3.9): head
# blocks 64, 64+16 and 128, bf16, no config at or under these spilled and the first spills came
# at 184 (sm_80) and 224 (sm_90). wgmma on sm_90 reads an operand straight from shared memory.
REGISTER_BUDGET = {8: 176, 9: 216}


def prune_configs(configs, named_args, arch: tuple[int, int] | None = None, **kwargs):
    """The autotuning candidates that may run for this launch on a GPU of compute capability ``arch``.

    The autotuners' ``early_config_prune``: ``named_args`` are the positional kernel arguments,
    ``kwargs`` the keyword ones (DH, BLOCK_D0, BLOCK_D1, PRECISION, DKDV). ``arch`` defaults to
    the capability of QKV's device; ``python -m ditfast.kernels.aot`` passes it explicitly and
    proves for sm_80 and sm_90 that nothing kept here spills registers.

    Drops blocks far larger than the token count (small test shapes on a GPU). Then, on a GPU
    (``arch`` known): fp32 keeps its short per-role list (_CONFIGS_FP32), bf16/fp16 the configs
    within REGISTER_BUDGET; always at least one, the one needing the fewest registers.
    """
    n = named_args["N"]
    keep = [c for c in configs if max(c.kwargs.values()) <= max(64, triton.next_power_of_2(n))] or configs
    qkv = named_args["QKV"]
    arch = arch or device_arch(qkv)
    if arch is None:  # the interpreter (tests with their own configs): nothing is register-bound
        return keep
    role, elem = _role(kwargs), qkv.element_size()
    need = {c: live_registers(c, elem, **kwargs) for c in keep}
    if elem == 4:
        listed = _CONFIGS_FP32[(kwargs["PRECISION"], role)]
        fits = [c for c in keep if _shape(c, role) in listed]
    else:
        budget = REGISTER_BUDGET[9 if arch[0] == 9 else 8]  # other GPUs get sm_80's, the tighter
        fits = [c for c in keep if _shape(c, role) in _CONFIGS_16BIT and need[c] <= budget]
    return fits or [min(keep, key=need.get)]


_TUNE_KEY = ["N", "DH", "BLOCK_D0", "BLOCK_D1", "PRECISION"]
_PRUNE = {"early_config_prune": prune_configs}
_fwd_tuned = triton.autotune(_cuda_configs("fwd"), key=_TUNE_KEY, prune_configs_by=_PRUNE)(_attn_fwd_kernel)
# the same backward kernel, tuned separately for its two roles (the per-program block differs)
_dkdv_tuned = triton.autotune(_cuda_configs("dkdv"), key=_TUNE_KEY, prune_configs_by=_PRUNE)(_attn_bwd_kernel)
_dq_tuned = triton.autotune(_cuda_configs("dq"), key=_TUNE_KEY, prune_configs_by=_PRUNE)(_attn_bwd_kernel)

# Off the GPU (the interpreter, for tests) one small fixed configuration: autotuning would only
# multiply the interpreter's cost.
_INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16}

MAX_PROGRAMS = 2**31 - 1  # CUDA's limit on grid axis 0 (axes 1 and 2 allow only 65535)


def _grid(N: int, block: int, BH: int) -> tuple[int]:
    """One program per ``block`` tokens of each of the ``BH`` (batch, head) pairs, all on grid axis 0
    (a CFG-doubled batch of 4096 at 16 heads is 65536 pairs, over the 65535 of axes 1 and 2).
    The blocks of one head are adjacent in launch order, so its K and V stay warm in L2."""
    programs = triton.cdiv(N, block) * BH
    if programs > MAX_PROGRAMS:
        raise ValueError(
            f"attention launch of {programs} programs ({BH} batch*heads x {triton.cdiv(N, block)} blocks) exceeds CUDA's {MAX_PROGRAMS}"
        )
    return (programs,)


def _launch(raw, tuned, grid_of, on_cuda: bool, *args, **meta) -> None:
    """``tuned`` on CUDA, else ``raw`` with the interpreter's blocks; ``grid_of(BLOCK_M, BLOCK_N)``."""
    if on_cuda:
        tuned[lambda m: grid_of(m["BLOCK_M"], m["BLOCK_N"])](*args, **meta)
    else:
        raw[grid_of(_INTERPRETER_BLOCKS["BLOCK_M"], _INTERPRETER_BLOCKS["BLOCK_N"])](*args, **meta, **_INTERPRETER_BLOCKS)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input_precision for ``dtype`` inputs. fp32 follows torch's switch for its own fp32
    matmuls, ``torch.backends.cuda.matmul.allow_tf32``: "tf32" (tensor cores, 10-bit mantissa)
    when set, else exact "ieee". bf16/fp16 dots always run on tensor cores; they get "ieee", which
    Triton ignores for them, so they compile to one kernel whatever the switch says."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _last_dim_unit(t: torch.Tensor) -> torch.Tensor:
    """The kernels need unit stride along the last dim (true of Linear outputs and their grads)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _common(qkv: torch.Tensor, num_heads: int, head_layout: str | None):
    B, N, three_d = qkv.shape
    dh = three_d // (3 * num_heads)
    block_d0, block_d1 = head_blocks(dh, head_layout or HEAD_LAYOUT)
    meta = dict(DH=dh, BLOCK_D0=block_d0, BLOCK_D1=block_d1, PRECISION=dot_precision(qkv.dtype))
    return B, N, dh, meta


# ------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------


def attention_fwd(qkv: torch.Tensor, num_heads: int, scale: float, head_layout: str | None = None):
    """Softmax attention of the packed (B, N, 3*H*Dh) ``qkv`` -> (out (B, N, H*Dh), lse (B, H, N) fp32)."""
    qkv = _last_dim_unit(qkv)
    B, N, dh, meta = _common(qkv, num_heads, head_layout)
    H = num_heads
    out = _empty((B, N, H * dh), device=qkv.device, dtype=qkv.dtype)
    lse = _empty((B, H, N), device=qkv.device, dtype=torch.float32)
    if B * N == 0:
        return out, lse
    _launch(
        _attn_fwd_kernel, _fwd_tuned, lambda bm, bn: _grid(N, bm, B * H), qkv.is_cuda,
        qkv, out, lse, N, H, qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1),
        scale * LOG2E, **meta,
    )  # fmt: skip
    return out, lse


def attention_bwd(dout, qkv, out, lse, num_heads: int, scale: float, head_layout: str | None = None):
    """Gradient of ``attention_fwd`` w.r.t. qkv: a packed (B, N, 3*H*Dh) dqkv in qkv's dtype."""
    qkv, out, dout = _last_dim_unit(qkv), _last_dim_unit(out), _last_dim_unit(dout)
    B, N, dh, meta = _common(qkv, num_heads, head_layout)
    H = num_heads
    dqkv = _empty((B, N, 3 * H * dh), device=qkv.device, dtype=qkv.dtype)
    delta = _empty((B, H, N), device=qkv.device, dtype=torch.float32)
    if B * N == 0:
        return dqkv
    block_pre = 64 if qkv.is_cuda else 16
    _attn_bwd_preprocess_kernel[_grid(N, block_pre, B * H)](
        out, dout, delta, N, H, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1),
        DH=dh, BLOCK_M=block_pre, BLOCK_D=max(16, triton.next_power_of_2(dh)),
    )  # fmt: skip
    args = (qkv, dout, lse, delta, dqkv, N, H, qkv.stride(0), qkv.stride(1), dout.stride(0), dout.stride(1),
            scale, scale * LOG2E)  # fmt: skip
    _launch(_attn_bwd_kernel, _dkdv_tuned, lambda bm, bn: _grid(N, bn, B * H), qkv.is_cuda, *args, **meta, DKDV=True)
    _launch(_attn_bwd_kernel, _dq_tuned, lambda bm, bn: _grid(N, bm, B * H), qkv.is_cuda, *args, **meta, DKDV=False)
    return dqkv
