"""DiffiT's TMSA op (ditfast.ops.tmsa): the reference against independent statements, the SDPA
backend against the reference, the dispatcher's choices and reasons, and the input checks.
The fused Triton kernel is tested in tests/kernels/test_tmsa_kernel.py."""

from __future__ import annotations

import pytest
import torch

from ditfast.ops import dispatch
from ditfast.ops.tmsa import (
    BACKENDS,
    ENV_VAR,
    TMSA,
    TMSABackendError,
    TMSAProblem,
    relative_position_index,
    select_backend,
    tmsa_attention,
    tmsa_attention_ref,
)
from conftest import assert_close


def make(B, grid, window, H, Dh, dtype=torch.float64, qkv_t=True, bias=True, seed=0):
    """Random qkv (B, N, 3D), qkv_t (B, 3D), bias table, all non-zero (the table at O(1), not 0.02,
    so a wrong index shows)."""
    g = torch.Generator().manual_seed(seed)
    N = grid[0] * grid[1]
    w = grid if window is None else ((window, window) if isinstance(window, int) else window)
    qkv = torch.randn(B, N, 3 * H * Dh, generator=g, dtype=torch.float64).to(dtype)
    t = torch.randn(B, 3 * H * Dh, generator=g, dtype=torch.float64).to(dtype) if qkv_t else None
    table = torch.randn((2 * w[0] - 1) * (2 * w[1] - 1), H, generator=g, dtype=torch.float64).to(dtype) if bias else None
    return qkv, t, table


# ------------------------------------------------------------------------------------------
# The index and the reference
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [(1, 1), (2, 2), (3, 5), (4, 4), (16, 16)])
def test_relative_position_index_matches_a_swin_style_construction(window):
    wh, ww = window
    # Swin's construction: coordinate pairs (2, L), pairwise differences, shifted and combined
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += wh - 1
    rel[:, :, 1] += ww - 1
    rel[:, :, 0] *= 2 * ww - 1
    swin = rel.sum(-1)
    idx = relative_position_index(window)
    assert idx.dtype == torch.int64 and idx.shape == (wh * ww, wh * ww)
    assert torch.equal(idx, swin)
    # and entry by entry from the formula of the docs
    for i in range(wh * ww):
        for j in range(0, wh * ww, max(1, wh * ww // 7)):
            (yi, xi), (yj, xj) = divmod(i, ww), divmod(j, ww)
            assert idx[i, j] == (yi - yj + wh - 1) * (2 * ww - 1) + (xi - xj + ww - 1)
    assert idx.min() == 0 and idx.max() == (2 * wh - 1) * (2 * ww - 1) - 1
    assert torch.equal(relative_position_index(wh), relative_position_index((wh, wh)))


def loops_reference(qkv, H, qkv_t, table, grid, window, scale):
    """TMSA by explicit loops over samples, windows and heads in fp64: the windows' tokens found
    by their grid coordinates, the bias looked up pair by pair from the coordinates."""
    B, N, three_d = qkv.shape
    Dh = three_d // (3 * H)
    gh, gw = grid
    wh, ww = window
    x = qkv.double() + (0 if qkv_t is None else qkv_t.double()[:, None, :])
    out = torch.full((B, N, H * Dh), float("nan"), dtype=torch.float64)
    for b in range(B):
        for wy in range(gh // wh):
            for wx in range(gw // ww):
                coords = [(wy * wh + ly, wx * ww + lx) for ly in range(wh) for lx in range(ww)]
                rows = torch.tensor([y * gw + xx for y, xx in coords])
                bias = torch.zeros(H, len(rows), len(rows), dtype=torch.float64)
                if table is not None:
                    for i, (yi, xi) in enumerate(coords):
                        for j, (yj, xj) in enumerate(coords):
                            bias[:, i, j] = table[(yi - yj + wh - 1) * (2 * ww - 1) + (xi - xj + ww - 1)].double()
                for h in range(H):
                    q = x[b, rows, h * Dh : (h + 1) * Dh]
                    k = x[b, rows, H * Dh + h * Dh : H * Dh + (h + 1) * Dh]
                    v = x[b, rows, 2 * H * Dh + h * Dh : 2 * H * Dh + (h + 1) * Dh]
                    p = torch.softmax(scale * q @ k.T + bias[h], dim=-1)
                    out[b, rows, h * Dh : (h + 1) * Dh] = p @ v
    return out


CASES = [  # (B, grid, window, H, Dh, qkv_t, bias)
    (3, (4, 4), None, 2, 8, True, True),  # global, the latent model
    (2, (4, 6), (2, 3), 2, 8, True, True),  # non-square grid and windows
    (1, (6, 4), 2, 3, 4, False, True),  # int window
    (2, (4, 4), (2, 2), 2, 8, True, False),  # windows, no bias
    (1, (2, 6), (2, 6), 1, 8, False, False),  # window given equal to the grid
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference_against_explicit_window_loops(case):
    B, grid, window, H, Dh, has_t, has_bias = case
    qkv, t, table = make(B, grid, window, H, Dh, qkv_t=has_t, bias=has_bias)
    got = tmsa_attention_ref(qkv, H, qkv_t=t, bias_table=table, grid=grid, window=window, scale=0.37)
    w = grid if window is None else ((window, window) if isinstance(window, int) else window)
    want = loops_reference(qkv, H, t, table, grid, w, 0.37)
    assert got.dtype == torch.float64 and got.shape == (B, grid[0] * grid[1], H * Dh)
    assert_close(got, want, what=f"reference {case}")


def test_reference_global_is_the_release_math():
    """The release's statement (window = grid): qkv + temb, reshape/permute, scores + table[index]."""
    B, g, H, Dh = 2, 4, 2, 8
    qkv, t, table = make(B, (g, g), None, H, Dh, dtype=torch.float32)
    x = (t.unsqueeze(1) + qkv).reshape(B, g * g, 3, H, Dh).permute(2, 0, 3, 1, 4)
    q, k, v = x.unbind(0)
    attn = (q * Dh**-0.5) @ k.transpose(-2, -1)
    rpb = table[relative_position_index(g).view(-1)].view(g * g, g * g, -1).permute(2, 0, 1)
    want = ((attn + rpb.unsqueeze(0)).softmax(-1) @ v).transpose(1, 2).reshape(B, g * g, H * Dh)
    got = tmsa_attention_ref(qkv, H, qkv_t=t, bias_table=table, grid=(g, g))
    assert got.dtype == torch.float32
    assert_close(got, want, what="release math")
    # no grid, no bias: plain attention of the N tokens
    plain = tmsa_attention_ref(qkv, H)
    q, k, v = qkv.view(B, -1, 3, H, Dh).permute(2, 0, 3, 1, 4)  # (B, H, N, Dh) each
    ref_plain = torch.softmax(q @ k.transpose(-2, -1) * Dh**-0.5, -1) @ v
    assert_close(plain, ref_plain.transpose(1, 2).reshape(B, -1, H * Dh), what="plain attention")


def test_reference_is_differentiable_in_all_three():
    qkv, t, table = make(2, (4, 4), (2, 2), 2, 4)
    inputs = [x.requires_grad_() for x in (qkv, t, table)]
    assert torch.autograd.gradcheck(
        lambda a, b, c: tmsa_attention_ref(a, 2, qkv_t=b, bias_table=c, grid=(4, 4), window=2), inputs
    )


# ------------------------------------------------------------------------------------------
# The SDPA backend
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_sdpa_backend_matches_reference_forward_and_backward(case, dtype):
    B, grid, window, H, Dh, has_t, has_bias = case
    tensors = make(B, grid, window, H, Dh, dtype=dtype, qkv_t=has_t, bias=has_bias, seed=1)
    dout = torch.randn(B, grid[0] * grid[1], H * Dh, dtype=dtype)
    results = []
    for backend in ("sdpa", "eager"):
        xs = [None if x is None else x.clone().requires_grad_() for x in tensors]
        out = tmsa_attention(xs[0], H, qkv_t=xs[1], bias_table=xs[2], grid=grid, window=window, backend=backend)
        grads = torch.autograd.grad(out, [x for x in xs if x is not None], dout)
        results.append((out, *grads))
    for name, got, want in zip(["out", "dqkv", "dqkv_t/dtable", "dtable"], *results):
        kind = "fwd" if name == "out" else "bwd"
        assert got.dtype == dtype
        assert_close(got, want, kind=kind, atol=(1e-5 if dtype == torch.float32 else 1e-11) * max(1, want.abs().max().item()),
                     what=f"sdpa {name} {case}")  # fmt: skip


# ------------------------------------------------------------------------------------------
# Dispatch
# ------------------------------------------------------------------------------------------


def test_registered_in_the_one_dispatch_layer():
    assert dispatch.REGISTRY["tmsa"] is TMSA and TMSA.env_var == ENV_VAR == "DITFAST_TMSA_BACKEND"
    assert set(BACKENDS) == {"triton", "sdpa", "eager", "flash-attn", "xformers"}
    assert "tmsa" in dispatch.describe("cpu")


def test_auto_env_var_and_alias(monkeypatch):
    qkv, t, table = make(1, (4, 4), None, 2, 8, dtype=torch.float32)
    kw = dict(qkv_t=t, bias_table=table, grid=(4, 4))
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert select_backend(qkv, 2, **kw).name == "sdpa"  # the CPU's first choice
    assert select_backend(qkv, 2, **kw, backend="ref").name == "eager"
    monkeypatch.setenv(ENV_VAR, "eager")
    assert select_backend(qkv, 2, **kw).name == "eager"
    monkeypatch.setenv(ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match="DITFAST_TMSA_BACKEND must be"):
        select_backend(qkv, 2, **kw)
    with pytest.raises(ValueError, match="tmsa backend must be 'auto' or one of"):
        select_backend(qkv, 2, **kw, backend="flash")
    with pytest.raises(TypeError, match="backend must be a str"):
        select_backend(qkv, 2, **kw, backend=None)


@pytest.mark.parametrize("name,why", [("flash-attn", "no additive score bias"), ("xformers", "no relative position bias")])
def test_backends_without_a_bias_say_so(name, why):
    qkv, t, table = make(1, (4, 4), None, 2, 8, dtype=torch.float16)
    with pytest.raises(TMSABackendError) as info:
        tmsa_attention(qkv, 2, qkv_t=t, bias_table=table, grid=(4, 4), backend=name)
    message = str(info.value)
    assert why in message
    for backend in BACKENDS:  # every backend's reasons are listed
        assert f"  {backend}: " in message
    assert "flash-attn: flash-attn's kernels take no additive score bias" in message


def test_triton_backend_reasons_on_the_cpu():
    """On the CPU the fused kernel runs only under the interpreter and only when forced."""
    from ditfast.ops import triton_status

    reasons = BACKENDS["triton"].not_supported_reasons(TMSAProblem("cpu", torch.float32, 2, 8, True, True, False, False))
    status = triton_status("cpu")
    assert reasons == ([] if status is None else [status])
    assert "triton" not in TMSA.device_priority("cpu")  # never chosen by "auto" on the CPU
    fp64 = BACKENDS["triton"].not_supported_reasons(TMSAProblem("cpu", torch.float64, 2, 8, True, True, False, False))
    assert any("dtype float64 is not one of" in r for r in fp64)


# ------------------------------------------------------------------------------------------
# Bad inputs
# ------------------------------------------------------------------------------------------


def test_bad_inputs_are_refused_clearly():
    qkv, t, table = make(2, (4, 4), None, 2, 8, dtype=torch.float32)
    ok = dict(qkv_t=t, bias_table=table, grid=(4, 4))
    for fn in (tmsa_attention, tmsa_attention_ref):
        with pytest.raises(ValueError, match=r"qkv must be a floating-point \(B, N, 3\*H\*Dh\)"):
            fn(qkv[0], 2, **ok)
        with pytest.raises(ValueError, match="positive multiple of 9"):
            fn(qkv, 3, grid=(4, 4))
        with pytest.raises(ValueError, match=r"grid \(4, 5\) has 20 tokens, but qkv has N=16"):
            fn(qkv, 2, qkv_t=t, grid=(4, 5))
        with pytest.raises(ValueError, match=r"window \(3, 3\) must divide the grid \(4, 4\)"):
            fn(qkv, 2, grid=(4, 4), window=3)
        with pytest.raises(ValueError, match=r"bias_table must be .*\(9, 2\) tensor for window \(2, 2\), got \(49, 2\)"):
            fn(qkv, 2, bias_table=table, grid=(4, 4), window=2)
        with pytest.raises(ValueError, match=r"bias_table must be .*got \(49, 3\)"):
            fn(qkv, 2, bias_table=torch.zeros(49, 3), grid=(4, 4))
        with pytest.raises(ValueError, match=r"qkv_t must be a floating-point \(B, 3\*D\) = \(2, 48\) tensor, got \(2, 1, 48\)"):
            fn(qkv, 2, qkv_t=t[:, None], grid=(4, 4))
        with pytest.raises(TypeError, match="qkv_t must be a tensor"):
            fn(qkv, 2, qkv_t=[1.0], grid=(4, 4))
        with pytest.raises(ValueError, match="grid .* is required when window or bias_table is given"):
            fn(qkv, 2, bias_table=table)
        with pytest.raises(ValueError, match="window must be a positive int or a pair"):
            fn(qkv, 2, grid=(4, 4), window=(2, 0))
        with pytest.raises(ValueError, match="grid must be a positive int or a pair"):
            fn(qkv, 2, grid=(4, 2, 2))
        with pytest.raises(TypeError, match="scale must be a float or None, got str"):
            fn(qkv, 2, grid=(4, 4), scale="0.1")
        with pytest.raises(ValueError, match="num_heads must be a positive int"):
            fn(qkv, 0)
