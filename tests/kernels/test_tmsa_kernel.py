"""ditfast's fused TMSA kernels (ditfast.kernels.tmsa, through ditfast.ops.tmsa's custom ops).

Forward output and the gradients of qkv, qkv_t and the bias table against the reference's math in
fp64 on the same (rounded) inputs, every kernel output buffer NaN-poisoned. Head dims 64 and 72,
windows equal to the grid (the latent DiffiT) and smaller (non-square too), odd batch, with and
without the time projection and the bias. Without a GPU the kernels run in Triton's interpreter
(TRITON_INTERPRET=1, set by tests/conftest.py) on small shapes; on a GPU at DiffiT's shapes.
"""

from __future__ import annotations

import pytest
import torch

from ditfast.ops.tmsa import tmsa_attention, tmsa_attention_ref
from conftest import TOLERANCES, assert_close, skip_module_unless_triton_runs

kernels = pytest.importorskip("ditfast.kernels.tmsa", reason="triton is not installed")
from ditfast.kernels import attention as attention_kernels  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = skip_module_unless_triton_runs()

# (B, grid, window, H, Dh, qkv_t, bias). The interpreter costs ~3 ms per program: small on the CPU.
if CUDA:
    CASES = [
        (3, (16, 16), None, 16, 72, True, True),  # DiffiT-XL/2 at 256px
        (2, (32, 32), None, 16, 72, True, True),  # ... at 512px
        (3, (32, 32), (8, 8), 4, 64, True, True),  # image-space windows
        (2, (16, 24), (4, 8), 4, 72, True, True),
        (2, (16, 16), (4, 4), 4, 72, False, True),
        (1, (16, 16), None, 4, 64, True, False),
    ]
    LOW_PRECISION = [torch.bfloat16, torch.float16]
else:
    CASES = [
        (1, (8, 8), None, 2, 64, True, True),  # window = grid, 64 tokens (4 blocks of 16)
        (3, (4, 6), None, 2, 72, True, True),  # window = non-square grid, 24 tokens (a partial block)
        (3, (4, 8), (2, 4), 2, 72, True, True),  # non-square windows in a non-square grid, odd batch
        (2, (8, 4), (4, 4), 1, 64, True, False),  # windows, no bias
        (1, (4, 8), (2, 2), 2, 64, False, True),  # windows, no time projection
        (1, (4, 4), None, 2, 72, False, False),  # plain attention through the TMSA kernels
    ]
    LOW_PRECISION = [torch.float16]  # bf16: Triton's interpreter gets bf16 tl.dot wrong (see test_attention_kernel)


@pytest.fixture
def poison(monkeypatch):
    """Every kernel output buffer (out, lse, delta, dqkv, the dS buffer, dtable) starts as NaN."""

    def nan_empty(*args, **kwargs):
        return torch.empty(*args, **kwargs).fill_(float("nan"))

    monkeypatch.setattr(attention_kernels, "_empty", nan_empty)


def window_of(grid, window):
    return grid if window is None else window


def make(case, dtype, seed=0):
    """Random inputs of ``case`` rounded to ``dtype`` (the table stays fp32, as the parameter is),
    and an upstream gradient."""
    B, grid, window, H, Dh, has_t, has_bias = case
    wh, ww = window_of(grid, window)
    g = torch.Generator().manual_seed(seed)
    N = grid[0] * grid[1]
    qkv = torch.randn(B, N, 3 * H * Dh, generator=g, dtype=torch.float64).to(dtype)
    t = (torch.randn(B, 3 * H * Dh, generator=g, dtype=torch.float64) * 0.5).to(dtype) if has_t else None
    table = torch.randn((2 * wh - 1) * (2 * ww - 1), H, generator=g, dtype=torch.float64).float() if has_bias else None
    dout = torch.randn(B, N, H * Dh, generator=g, dtype=torch.float64).to(dtype)
    return [x if x is None else x.to(DEVICE) for x in (qkv, t, table, dout)]


def run(case, qkv, t, table, dout, backend):
    """Output and the gradients of (qkv, qkv_t, table) through ``backend`` (None where absent)."""
    B, grid, window, H, Dh, *_ = case
    xs = [None if x is None else x.detach().clone().requires_grad_() for x in (qkv, t, table)]
    out = tmsa_attention(xs[0], H, qkv_t=xs[1], bias_table=xs[2], grid=grid, window=window, backend=backend)
    present = [x for x in xs if x is not None]
    grads = iter(torch.autograd.grad(out, present, dout))
    return [out.detach()] + [None if x is None else next(grads) for x in xs]


def reference(case, qkv, t, table, dout):
    """The reference's math in fp64 of the same inputs: out, dqkv, dqkv_t, dtable."""
    B, grid, window, H, Dh, *_ = case
    xs = [None if x is None else x.detach().double().requires_grad_() for x in (qkv, t, table)]
    out = tmsa_attention_ref(xs[0], H, qkv_t=xs[1], bias_table=xs[2], grid=grid, window=window)
    present = [x for x in xs if x is not None]
    grads = iter(torch.autograd.grad(out, present, dout.double()))
    return [out.detach()] + [None if x is None else next(grads) for x in xs]


def scaled_close(got, ref, dtype, kind, what):
    rtol, atol = TOLERANCES[(kind, dtype)]
    assert_close(got, ref, dtype=dtype, rtol=rtol, atol=atol * max(1.0, ref.abs().max().item()), what=what)


NAMES = ("out", "dqkv", "dqkv_t", "dtable")


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-{}x{}-w{}-H{}-Dh{}-t{:d}-bias{:d}".format(
    c[0], *c[1], "all" if c[2] is None else "x".join(map(str, c[2])), *c[3:]))  # fmt: skip
def test_fp32_forward_backward_against_reference(poison, case):
    qkv, t, table, dout = make(case, torch.float32)
    got = run(case, qkv, t, table, dout, "triton")
    want = reference(case, qkv, t, table, dout)
    assert got[0].shape == dout.shape and got[0].dtype == torch.float32
    for name, g, w in zip(NAMES, got, want):
        assert (g is None) == (w is None), name
        if g is not None:
            assert g.dtype == (torch.float32), name
            scaled_close(g, w.float(), torch.float32, "fwd" if name == "out" else "bwd", f"{name} {case}")


@pytest.mark.parametrize("layout", ["split", "pad"])
def test_head_layouts_of_72(poison, layout, monkeypatch):
    """Dh = 72 through both head layouts of the attention kernels (split 64+16, padded 128)."""
    monkeypatch.setattr(attention_kernels, "HEAD_LAYOUT", layout)
    case = next(c for c in CASES if c[4] == 72 and c[2] is not None)
    qkv, t, table, dout = make(case, torch.float32, seed=3)
    for name, g, w in zip(NAMES, run(case, qkv, t, table, dout, "triton"), reference(case, qkv, t, table, dout)):
        scaled_close(g, w.float(), torch.float32, "fwd" if name == "out" else "bwd", f"{name} {layout}")


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_low_precision_within_twice_plain_pytorch(poison, dtype):
    """fp16/bf16 qkv: the kernel's error against fp64 is at most ~2x that of the SDPA backend
    (plain PyTorch in ``dtype``) on the same inputs."""
    case = CASES[2]
    qkv, t, table, dout = make(case, dtype, seed=4)
    got = run(case, qkv, t, table, dout, "triton")
    plain = run(case, qkv, t, table.to(dtype), dout, "sdpa")
    want = reference(case, qkv, t, table, dout)
    for name, g, p, w in zip(NAMES, got, plain, want):
        kind = "fwd" if name == "out" else "bwd"
        assert g.dtype == (torch.float32 if name == "dtable" else dtype), name
        err, err_plain = (g.double() - w).abs().max().item(), (p.double() - w).abs().max().item()
        if name != "dtable":  # (the table is fp32: only the 2x bound below applies to it)
            scaled_close(g, w, dtype, kind, f"{name} {dtype}")
        assert err <= 2 * err_plain + 1e-6, f"{name} {dtype}: error {err:.3e} vs plain PyTorch {err_plain:.3e}"


def test_table_gradient_is_deterministic():
    """The table's gradient sums every (sample, window) pair in a fixed order: two runs bitwise equal
    (and so are the other gradients)."""
    case = CASES[2]
    qkv, t, table, dout = make(case, torch.float32, seed=5)
    first = run(case, qkv, t, table, dout, "triton")
    second = run(case, qkv, t, table, dout, "triton")
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), f"{name} differs between two runs"


def test_window_equal_to_grid_is_global_attention():
    """window=None and window=grid launch the same (non-windowed) kernels: identical results."""
    case = CASES[1]
    B, grid, _, H, Dh, *_ = case
    qkv, t, table, _ = make(case, torch.float32, seed=6)
    a = tmsa_attention(qkv, H, qkv_t=t, bias_table=table, grid=grid, backend="triton")
    b = tmsa_attention(qkv, H, qkv_t=t, bias_table=table, grid=grid, window=grid, backend="triton")
    assert torch.equal(a, b)


def test_windows_do_not_see_each_other():
    """Changing the tokens of one window leaves every other window's output bitwise unchanged."""
    case = CASES[2]
    B, grid, window, H, Dh, *_ = case
    qkv, t, table, _ = make(case, torch.float32, seed=7)
    before = tmsa_attention(qkv, H, qkv_t=t, bias_table=table, grid=grid, window=window, backend="triton")
    changed = qkv.clone()
    first_window = [y * grid[1] + x for y in range(window[0]) for x in range(window[1])]
    changed[:, first_window] += 1.0
    after = tmsa_attention(changed, H, qkv_t=t, bias_table=table, grid=grid, window=window, backend="triton")
    others = [i for i in range(grid[0] * grid[1]) if i not in first_window]
    assert torch.equal(before[:, others], after[:, others])
    assert not torch.equal(before[:, first_window], after[:, first_window])


def test_opcheck():
    case = (1, (2, 4), (2, 2), 2, 16, True, True)
    qkv, t, table, _ = make(case, torch.float32, seed=8)
    torch.library.opcheck(torch.ops.ditfast.tmsa_fwd.default,
                          (qkv.requires_grad_(), t.requires_grad_(), table.requires_grad_(), 2, [2, 4, 2, 2], 0.25))  # fmt: skip


def test_reference_beside_the_kernel_is_the_op_reference():
    case = CASES[3]
    B, grid, window, H, Dh, *_ = case
    qkv, t, table, _ = make(case, torch.float64, seed=9)
    assert torch.equal(kernels.tmsa_ref(qkv, H, grid, window, 0.3, t, table),
                       tmsa_attention_ref(qkv, H, qkv_t=t, bias_table=table, grid=grid, window=window, scale=0.3))  # fmt: skip
