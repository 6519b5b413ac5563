"""Fused adaLN ops (ditfast.ops / ditfast.kernels.adaln): forward and backward against references.

Without a GPU the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py) on small shapes; on a GPU the same tests run on CUDA with the full shape set.
"""

from __future__ import annotations

import itertools
import os
import math

import pytest
import torch

from ditfast import ops
from conftest import TOLERANCES, assert_close, skip_module_unless_triton_runs

kernels = pytest.importorskip("ditfast.kernels.adaln", reason="triton is not installed")

CUDA = torch.cuda.is_available()
DEVICE = skip_module_unless_triton_runs()

# (B, N, D): D in {384, 1008, 1152} (1152 is not a power of two), N in {1, 7, 256}, B in {1, 3}.
# The interpreter is slow, so the CPU run covers each value at least once; CUDA runs them all.
if CUDA:
    SHAPES = list(itertools.product([1, 3], [1, 7, 256], [384, 1008, 1152])) + [(32, 256, 1152), (4, 1024, 1152)]
else:
    SHAPES = [(1, 1, 384), (3, 7, 1008), (1, 256, 1152), (3, 7, 1152)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
OPS = ["adaln_layernorm", "gated_residual_adaln", "gated_residual"]


@pytest.fixture
def poison(monkeypatch):
    """Every kernel output buffer starts as NaN, so an element the kernel fails to write fails."""

    def nan_empty(*args, **kwargs):
        return torch.empty(*args, **kwargs).fill_(float("nan"))

    monkeypatch.setattr(kernels, "_empty", nan_empty)


def make_inputs(B, N, D, dtype, seed=0):
    """x, y (B, N, D) and gate/shift/scale as strided chunks of one (B, 6D) modulation output."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D, generator=g) * 2 + 0.5
    y = torch.randn(B, N, D, generator=g)
    mod = torch.randn(B, 6 * D, generator=g) * 0.5
    inputs = leaves_like((x, y, mod), lambda t: t.to(device=DEVICE, dtype=dtype))
    assert inputs[3].stride() == (6 * D, 1)  # a strided view, as the model passes them
    return inputs


def leaves_like(inputs, convert):
    """Fresh leaf copies of (x, y, mod) through ``convert``, plus the gate/shift/scale views of mod."""
    x, y, mod = (convert(t.detach()).clone().requires_grad_() for t in inputs[:3])
    D = x.shape[-1]
    return x, y, mod, mod[:, :D], mod[:, 2 * D : 3 * D], mod[:, 4 * D : 5 * D]


def run(op, x, y, gate, shift, scale, impl):
    """Outputs of ``op`` as a tuple, through ``impl`` ("fused" or "ref")."""
    if op == "adaln_layernorm":
        f = ops.adaln_layernorm if impl == "fused" else ops.adaln_layernorm_ref
        return (f(x, shift, scale),)
    if op == "gated_residual_adaln":
        f = ops.gated_residual_adaln if impl == "fused" else ops.gated_residual_adaln_ref
        return f(x, y, gate, shift, scale)
    f = ops.gated_residual if impl == "fused" else ops.gated_residual_ref
    return (f(x, y, gate),)


def forward_backward(op, inputs, impl, grads_out):
    x, y, mod, gate, shift, scale = inputs
    outs = run(op, x, y, gate, shift, scale, impl)
    torch.autograd.backward(outs, [g.to(o.dtype) for o, g in zip(outs, grads_out)])
    used = [x, mod] if op == "adaln_layernorm" else [x, y, mod]
    return [o.detach() for o in outs], [t.grad for t in used]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}N{}D{}".format(*s))
@pytest.mark.parametrize("op", OPS)
def test_forward_backward_against_reference(poison, op, shape, dtype):
    B, N, D = shape
    if dtype != torch.float32 and not CUDA and shape == (1, 256, 1152):
        pytest.skip("interpreter time: low precision at N=256 runs on CUDA only")
    inputs = make_inputs(B, N, D, dtype)
    n_out = 2 if op == "gated_residual_adaln" else 1
    gen = torch.Generator().manual_seed(1)
    grads_out = [torch.randn(B, N, D, generator=gen).to(DEVICE) for _ in range(n_out)]

    got_out, got_grad = forward_backward(op, inputs, "fused", grads_out)
    # reference 1: fp64 math on the same (rounded) inputs
    ref_out, ref_grad = forward_backward(op, leaves_like(inputs, torch.Tensor.double), "ref", [g.double() for g in grads_out])
    # reference 2: plain PyTorch in the same dtype, to bound the low-precision error
    eager_out, eager_grad = forward_backward(op, leaves_like(inputs, lambda t: t), "ref", grads_out)

    names = ["dx", "dmod"] if op == "adaln_layernorm" else ["dx", "dy", "dmod"]
    for kind, got, ref, eager, labels in (
        ("fwd", got_out, ref_out, eager_out, [f"out{i}" for i in range(n_out)]),
        ("bwd", got_grad, ref_grad, eager_grad, names),
    ):
        for g, r, e, label in zip(got, ref, eager, labels):
            assert g.dtype == dtype, f"{label} has dtype {g.dtype}"
            what = f"{op} {label} {tuple(shape)} {dtype}"
            if dtype == torch.float32:
                scale_ = r.abs().max().item()
                rtol, atol = TOLERANCES[(kind, dtype)]
                assert_close(g, r, rtol=rtol, atol=atol * max(1.0, scale_), what=what)
            else:
                err = (g.double() - r).abs().max().item()
                err_eager = (e.double() - r).abs().max().item()
                rtol, atol = TOLERANCES[(kind, dtype)]
                assert_close(g, r, rtol=rtol, atol=atol * max(1.0, r.abs().max().item()), what=what)
                bound = 2 * err_eager + 1e-6
                if dtype == torch.bfloat16 and not CUDA:
                    # Triton's interpreter casts fp32 -> bf16 by truncation (a GPU rounds to nearest
                    # even), which can cost one bf16 ulp of the largest output on top.
                    bound += 2.0 ** (math.floor(math.log2(r.abs().max().item())) - 7)
                assert err <= bound, f"{what}: error {err:.3e} vs plain PyTorch {err_eager:.3e}"


def test_vectors_with_non_unit_stride_and_mixed_dtypes():
    B, N, D = 2, 5, 384
    x = torch.randn(B, N, D, device=DEVICE)  # fp32 residual stream, as under autocast
    y = torch.randn(B, N, D, device=DEVICE, dtype=torch.bfloat16)
    vecs = torch.randn(3, D, B, device=DEVICE, dtype=torch.bfloat16)  # (B, D) views with stride (1, B)
    gate, shift, scale = (v.t() for v in vecs)
    r, h = ops.gated_residual_adaln(x, y, gate, shift, scale)
    r_ref, h_ref = ops.gated_residual_adaln_ref(x.double(), y.double(), gate.double(), shift.double(), scale.double())
    eager_r, eager_h = ops.gated_residual_adaln_ref(x, y, gate, shift, scale)
    assert r.dtype == eager_r.dtype == torch.float32 and h.dtype == eager_h.dtype
    assert_close(r, r_ref.float(), what="r (mixed dtypes)")
    assert_close(h, h_ref.float(), rtol=1e-5, atol=1e-4, what="h (mixed dtypes)")


def test_bad_inputs():
    x = torch.randn(2, 3, 64, device=DEVICE)
    v = torch.randn(2, 64, device=DEVICE)
    with pytest.raises(ValueError, match=r"\(B, N, D\)"):
        ops.adaln_layernorm(x[0], v, v)
    with pytest.raises(ValueError, match=r"shift must be .* \(2, 64\)"):
        ops.adaln_layernorm(x, v[:1], v)
    with pytest.raises(ValueError, match="y must be"):
        ops.gated_residual(x, x[:, :2], v)


@pytest.mark.parametrize("op", OPS)
def test_opcheck(op):
    B, N, D = 2, 3, 64
    x, y = torch.randn(B, N, D, device=DEVICE), torch.randn(B, N, D, device=DEVICE)
    mod = torch.randn(B, 3 * D, device=DEVICE)
    gate, shift, scale = mod[:, :D], mod[:, D : 2 * D], mod[:, 2 * D :]
    args = {
        "adaln_layernorm": (x, None, None, shift, scale, 1e-6),
        "gated_residual_adaln": (x, y, gate, shift, scale, 1e-6),
        "gated_residual": (x, y, gate, None, None, 0.0),
    }[op]
    args = tuple(a.detach().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(torch.ops.ditfast.adaln_fwd.default, args)


# ------------------------------------------------------------------------------------------
# The other block designs: the residual without a gate, a standard LayerNorm as a modulation
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 384), (3, 7, 1008)], ids=lambda s: "B{}N{}D{}".format(*s))
@pytest.mark.parametrize("op", ["gated_residual_adaln", "gated_residual"])
def test_ungated_residual_against_reference(poison, op, shape, dtype):
    """gate=None: r = x + y (the adaLN and standard ViT blocks), forward and backward against fp64."""
    B, N, D = shape
    x, y, mod, _, shift, scale = make_inputs(B, N, D, dtype)
    fused, ref = getattr(ops, op), getattr(ops, f"{op}_ref")
    vectors = (shift, scale) if op == "gated_residual_adaln" else ()
    outs = fused(x, y, None, *vectors)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads_out = [torch.randn_like(o) for o in outs]
    leaves = [x, y, mod]
    got = torch.autograd.grad(outs, leaves, grads_out, allow_unused=True)
    x64, y64, mod64 = (t.detach().double().requires_grad_() for t in leaves)
    vectors64 = (mod64[:, 2 * D : 3 * D], mod64[:, 4 * D : 5 * D]) if vectors else ()
    refs = ref(x64, y64, None, *vectors64)
    refs = refs if isinstance(refs, tuple) else (refs,)
    want = torch.autograd.grad(refs, [x64, y64, mod64], [g.double() for g in grads_out], allow_unused=True)
    for kind, gs, rs, labels in (("fwd", outs, refs, ["r", "h"]), ("bwd", got, want, ["dx", "dy", "dmod"])):
        for g, r, label in zip(gs, rs, labels):
            if r is None:  # no modulation: mod gets no gradient
                assert g is None, label
                continue
            assert g.dtype == dtype, f"{label} has dtype {g.dtype}"
            rtol, atol = TOLERANCES[(kind, dtype)]
            assert_close(g, r, rtol=rtol, atol=atol * max(1.0, r.abs().max().item()), what=f"ungated {op} {label} {shape} {dtype}")
    if op == "gated_residual":
        assert torch.equal(got[0], got[1].to(got[0].dtype))  # dy = dx: the gradient passes through


def test_affine_modulation_is_a_standard_layernorm():
    """A LayerNorm's weight and bias (D,) as stride-0 (B, D) modulation: forward and the weight and
    bias gradients (summed over the batch) against F.layer_norm in fp64."""
    B, N, D = 3, 7, 1008
    x = torch.randn(B, N, D, device=DEVICE, requires_grad=True)
    weight = (1 + 0.5 * torch.randn(D, device=DEVICE)).requires_grad_()
    bias = (0.5 * torch.randn(D, device=DEVICE)).requires_grad_()
    shift, scale = ops.affine_modulation(weight, bias, B)
    assert shift.stride() == scale.stride() == (0, 1)
    h = ops.adaln_layernorm(x, shift, scale)
    grad = torch.randn_like(h)
    got = torch.autograd.grad(h, (x, weight, bias), grad)
    leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    ref = torch.nn.functional.layer_norm(leaves[0], (D,), leaves[1], leaves[2], 1e-6)
    want = torch.autograd.grad(ref, leaves, grad.double())
    assert_close(h, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item(), what="affine LayerNorm")
    for g, w, label in zip(got, want, ["dx", "dweight", "dbias"]):
        assert_close(g, w, kind="bwd", atol=1e-5 * w.abs().max().item(), what=f"affine LayerNorm {label}")


def test_opcheck_ungated():
    B, N, D = 2, 3, 64
    x, y = torch.randn(B, N, D, device=DEVICE, requires_grad=True), torch.randn(B, N, D, device=DEVICE, requires_grad=True)
    shift, scale = (torch.randn(B, D, device=DEVICE, requires_grad=True) for _ in range(2))
    torch.library.opcheck(torch.ops.ditfast.adaln_fwd.default, (x, y, None, shift, scale, 1e-6))
    torch.library.opcheck(torch.ops.ditfast.adaln_fwd.default, (x, y, None, None, None, 0.0))


def test_compile_fullgraph_dit_block_forward_backward():
    from ditfast.models import DiTBlock
    from conftest import randomize_

    block = randomize_(DiTBlock(64, 2)).to(DEVICE)
    block.backend = "triton"
    x = torch.randn(2, 5, 64, device=DEVICE, requires_grad=True)
    c = torch.randn(2, 64, device=DEVICE)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(x, c)
    out.square().sum().backward()
    grad = x.grad.clone()
    x.grad = None
    block.backend = "eager"
    ref = block(x, c)
    ref.square().sum().backward()
    assert_close(out, ref, what="compiled fused block")
    assert_close(grad, x.grad, kind="bwd", what="compiled fused block dx")


@pytest.mark.parametrize("rows", [2, 4])
def test_programs_covering_several_rows(poison, monkeypatch, rows):
    """Small shapes launch one row per program; force several (with a ragged last group) too: ROWS
    consecutive rows per forward program, and G_MAX = rows groups per sample in the backward.
    Determinism across launch parameters: every per-row result (r, h, dx, dy) is bit-identical to
    the default launch's; only the reductions over rows (the vector gradients) change order."""
    B, N, D = 3, 7, 384
    inputs = make_inputs(B, N, D, torch.float32)
    grads_out = [torch.randn(B, N, D, device=DEVICE) for _ in range(2)]
    default_out, default_grad = forward_backward("gated_residual_adaln", leaves_like(inputs, lambda t: t), "fused", grads_out)
    launch = kernels._launch_params
    monkeypatch.setattr(kernels, "_launch_params", lambda B, N, D: (launch(B, N, D)[0], rows, 4))
    monkeypatch.setattr(kernels, "G_MAX", rows)
    got_out, got_grad = forward_backward("gated_residual_adaln", inputs, "fused", grads_out)
    for a, b, label in zip(got_out + got_grad[:2], default_out + default_grad[:2], ["r", "h", "dx", "dy"]):
        assert torch.equal(a, b), f"{label}: rows={rows} differs from the default launch"
    ref_out, ref_grad = forward_backward("gated_residual_adaln", leaves_like(inputs, torch.Tensor.double), "ref", [g.double() for g in grads_out])
    for g, r in zip(got_out + got_grad, ref_out + ref_grad):
        assert_close(g, r.float(), rtol=1e-4, atol=1e-4 * max(1.0, r.abs().max().item()), what=f"rows={rows}")


# ------------------------------------------------------------------------------------------
# Backward: bounded, deterministic partial sums
# ------------------------------------------------------------------------------------------

# (B, N, D) where the backward's programs loop over several rows each (N > G_MAX), with a ragged
# last round at odd N. The interpreter is slow: CPU keeps one (B=1, N=256 runs in the test above).
BWD_SHAPES = [(2, 45, 1152)]
if CUDA:
    BWD_SHAPES += [(1, 256, 1152), (2, 256, 1152), (1, 17, 1152), (2, 17, 1152), (4, 1024, 1152), (2, 4099, 1152)]


@pytest.mark.parametrize("shape", BWD_SHAPES, ids=lambda s: "B{}N{}D{}".format(*s))
def test_backward_row_groups_against_fp64(poison, shape):
    """(Run-to-run determinism needs no test of its own: no atomics, and the partials' order is a
    function of the shape; test_programs_covering_several_rows checks results across launch parameters.)"""
    B, N, D = shape
    gen = torch.Generator().manual_seed(1)
    grads_out = [torch.randn(B, N, D, generator=gen).to(DEVICE) for _ in range(2)]
    inputs = make_inputs(B, N, D, torch.float32)
    _, first = forward_backward("gated_residual_adaln", inputs, "fused", grads_out)
    _, ref = forward_backward("gated_residual_adaln", leaves_like(inputs, torch.Tensor.double), "ref", [g.double() for g in grads_out])
    for a, r, label in zip(first, ref, ["dx", "dy", "dmod"]):
        rtol, atol = TOLERANCES[("bwd", torch.float32)]
        assert_close(a, r, rtol=rtol, atol=atol * max(1.0, r.abs().max().item()), what=f"{label} {shape}")


class _Launches:
    """Stands in for the module's Triton kernels: records (name, grid, args) instead of launching."""

    def __init__(self, monkeypatch):
        self.calls = []
        for name in [n for n in vars(kernels) if n.startswith("_adaln") and n.endswith("_kernel")]:
            monkeypatch.setattr(kernels, name, self._recorder(name))

    def _recorder(self, name):
        launches = self

        class Kernel:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: launches.calls.append((name, grid, args))

        return Kernel()


@pytest.mark.parametrize("op", OPS)
def test_backward_scratch_is_bounded_and_reduced_in_one_launch(monkeypatch, op):
    """At N = 64Ki tokens the fp32 partial sums stay (V, B, G, D) with G <= 32, and one launch after
    the main backward kernel reduces them all. Meta tensors: nothing runs, only sizes are read."""
    B, N, D, cap = 2, 1024 * 64, 1152, 32
    allocated = []

    def empty(*args, **kwargs):
        t = torch.empty(*args, **kwargs)
        allocated.append(t)
        return t

    monkeypatch.setattr(kernels, "_empty", empty)
    launches = _Launches(monkeypatch)
    act = lambda dtype=torch.bfloat16: torch.empty(B, N, D, device="meta", dtype=dtype)  # noqa: E731
    vec = lambda: torch.empty(B, D, device="meta", dtype=torch.bfloat16)  # noqa: E731
    stat = lambda: torch.empty(B * N, device="meta")  # noqa: E731
    has_res, has_norm = op != "adaln_layernorm", op != "gated_residual"
    dx, dy, dgate, dshift, dscale = kernels.adaln_bwd(
        act() if has_res else None, act() if has_norm else None, act(torch.float32) if has_norm else None,
        act() if has_res else None, vec() if has_res else None, vec() if has_norm else None,
        stat() if has_norm else None, stat() if has_norm else None, torch.float32,
    )  # fmt: skip
    assert dx.shape == (B, N, D) and dx.dtype == torch.float32
    for v, present in ((dgate, has_res), (dshift, has_norm), (dscale, has_norm)):
        assert (v is not None) == present and (v is None or v.shape == (B, D))
    outputs = {id(t) for t in (dx, dy, dgate, dshift, dscale) if t is not None}
    scratch = sum(t.numel() for t in allocated if id(t) not in outputs)
    n_vec = int(has_res) + 2 * int(has_norm)
    assert scratch <= n_vec * B * cap * D, f"{scratch} scratch elements > {n_vec} x (B, {cap}, D)"
    assert kernels._bwd_groups(N) <= cap and kernels._bwd_groups(5) == 5
    names = [name for name, _, _ in launches.calls]
    assert names == ["_adaln_bwd_kernel", "_adaln_bwd_reduce_kernel"], names
    assert launches.calls[0][1] == (kernels._bwd_groups(N), B)


# ------------------------------------------------------------------------------------------
# Autocast: h in the autocast dtype, r in the residual stream's
# ------------------------------------------------------------------------------------------


def mixed_inputs(B, N, D, vec_dtype, seed=0):
    """As autocast produces them: fp32 x, bf16 sublayer output y, modulation in ``vec_dtype``."""
    x, y, mod = make_inputs(B, N, D, torch.float32, seed)[:3]
    dtypes = iter([torch.float32, torch.bfloat16, vec_dtype])
    return leaves_like((x, y, mod), lambda t: t.to(next(dtypes)))


@pytest.mark.parametrize("vec_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", ["adaln_layernorm", "gated_residual_adaln"])
def test_autocast_writes_h_in_autocast_dtype(poison, op, vec_dtype):
    B, N, D = 2, 7, 384
    inputs = mixed_inputs(B, N, D, vec_dtype)
    gen = torch.Generator().manual_seed(1)
    n_out = 2 if op == "gated_residual_adaln" else 1
    out_dtypes = [torch.float32, torch.bfloat16] if n_out == 2 else [torch.bfloat16]  # (r,) h
    # rounded to the outputs' dtypes up front, so the fp64 reference sees the same gradients
    grads_out = [torch.randn(B, N, D, generator=gen).to(DEVICE, dt) for dt in out_dtypes]
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got_out, got_grad = forward_backward(op, inputs, "fused", grads_out)
        eager_out, eager_grad = forward_backward(op, leaves_like(inputs, lambda t: t), "ref", grads_out)
    ref_out, ref_grad = forward_backward(op, leaves_like(inputs, torch.Tensor.double), "ref", [g.double() for g in grads_out])

    names = ["dx", "dmod"] if op == "adaln_layernorm" else ["dx", "dy", "dmod"]
    grad_dtypes = [torch.float32, vec_dtype] if op == "adaln_layernorm" else [torch.float32, torch.bfloat16, vec_dtype]
    for kind, got, eager, ref, dtypes, labels in (
        ("fwd", got_out, eager_out, ref_out, out_dtypes, ["r", "h"][-n_out:]),
        ("bwd", got_grad, eager_grad, ref_grad, grad_dtypes, names),
    ):
        for g, e, r, dtype, label in zip(got, eager, ref, dtypes, labels):
            what = f"{op} {label} under autocast, vectors {vec_dtype}"
            assert g.dtype == e.dtype == dtype, f"{what}: fused {g.dtype}, reference {e.dtype}, expected {dtype}"
            rtol, atol = TOLERANCES[(kind, dtype)]
            assert_close(g, r, rtol=rtol, atol=atol * max(1.0, r.abs().max().item()), what=what)


def test_autocast_dit_block_feeds_linears_in_autocast_dtype():
    """Under autocast the fused ops hand the block's Linears bf16 h and keep the residual stream
    fp32; fused (eager and compiled with fullgraph=True) agrees with the official math."""
    from torch._dynamo.backends.debugging import aot_eager

    from ditfast.models import DiTBlock
    from conftest import randomize_

    block = randomize_(DiTBlock(64, 2)).to(DEVICE)
    x = torch.randn(2, 5, 64, device=DEVICE, requires_grad=True)
    c = torch.randn(2, 64, device=DEVICE)
    graphs = []

    def recording_aot_eager(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    results = {}
    for name in ("eager", "triton", "compiled"):
        seen = []
        linears = (block.attn.qkv, block.mlp.fc1) if name != "compiled" else ()  # dynamo would trace hooks
        hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype)) for m in linears]
        block.backend, x.grad = "eager" if name == "eager" else "triton", None
        f = torch.compile(block, fullgraph=True, backend=recording_aot_eager) if name == "compiled" else block
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            out = f(x, c)
        out.square().sum().backward()
        for hook in hooks:
            hook.remove()
        # the official block (eager) hands its Linears fp32 and autocast casts inside them; the
        # fused ops write h in bf16 directly
        expected = torch.float32 if name == "eager" else torch.bfloat16
        assert seen == [expected] * len(linears), f"{name}: Linear inputs {seen}"
        assert out.dtype == x.grad.dtype == torch.float32, f"{name}: out {out.dtype}, dx {x.grad.dtype}"
        results[name] = out.detach(), x.grad.clone()
    # the traced graph applied autocast too: both LayerNorms write h (output 1) in bf16
    adaln = [n for n in graphs[0].graph.nodes if n.op == "call_function" and "ditfast.adaln_fwd" in str(n.target)]
    h_dtypes = [n.meta["example_value"][1].dtype for n in adaln if n.args[3] is not None]
    assert h_dtypes == [torch.bfloat16] * 2, h_dtypes
    out_e, dx_e = results["eager"]
    for name in ("triton", "compiled"):
        out, dx = results[name]
        assert_close(out, out_e, dtype=torch.bfloat16, what=f"{name} block under autocast")
        assert_close(dx, dx_e, dtype=torch.bfloat16, kind="bwd", atol=5e-2 * dx_e.abs().max().item(), what=f"{name} block dx under autocast")


def test_pytorch_fallback_without_the_interpreter():
    """On CPU tensors without TRITON_INTERPRET the ops run their PyTorch statement of the kernels'
    fp32 math (``_adaln_fwd_torch`` / ``_adaln_bwd_torch``); the rest of this file runs the
    interpreter, so a fresh process checks that path, forward and backward, against fp64."""
    import subprocess
    import sys

    code = r"""
import torch
from ditfast import ops
assert ops.triton_status("cpu") is not None, "the interpreter is on: this would not test the fallback"
torch.manual_seed(0)
B, N, D = 2, 17, 48
x, y = torch.randn(B, N, D, requires_grad=True), torch.randn(B, N, D, requires_grad=True)
gate, shift, scale = (torch.randn(B, D, requires_grad=True) for _ in range(3))
args = (x, y, gate, shift, scale)
ungated = lambda op: lambda x, y, shift, scale: op(x, y, None, shift, scale)
for fn, ref, ins in ((ops.gated_residual_adaln, ops.gated_residual_adaln_ref, args),
                     (ops.adaln_layernorm, ops.adaln_layernorm_ref, (x, shift, scale)),
                     (ops.gated_residual, ops.gated_residual_ref, (x, y, gate)),
                     (ungated(ops.gated_residual_adaln), ungated(ops.gated_residual_adaln_ref), (x, y, shift, scale))):
    out = fn(*ins)
    outs = out if isinstance(out, tuple) else (out,)
    d_ins = [t.detach().double().requires_grad_() for t in ins]
    r = ref(*d_ins)
    refs = r if isinstance(r, tuple) else (r,)
    grads = [torch.randn_like(o) for o in outs]
    got = torch.autograd.grad(outs, ins, grads)
    want = torch.autograd.grad(refs, d_ins, [g.double() for g in grads])
    for a, e in zip((*outs, *got), (*refs, *want)):
        err = ((a.double() - e).abs().max() / e.abs().max()).item()
        assert err < 1e-5, (fn.__name__, err)
print("fallback ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and "fallback ok" in proc.stdout, proc.stderr[-2000:]
