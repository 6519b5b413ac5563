"""ditfast's Triton attention kernel on packed qkv (ditfast.kernels.attention / ditfast.ops.attention).

Forward output, logsumexp and the packed gradient dqkv against fp64 math attention on random
inputs, with every output buffer NaN-poisoned. Without a GPU the kernels run in Triton's
interpreter (TRITON_INTERPRET=1, set by tests/conftest.py) on small shapes; on a GPU the same
tests run on CUDA with DiT-sized shapes and the low-precision dtypes.
"""

from __future__ import annotations

import pytest
import torch

from ditfast import ops
from ditfast.ops.attention import packed_attention_ref
from conftest import TOLERANCES, assert_close, skip_module_unless_triton_runs

kernels = pytest.importorskip("ditfast.kernels.attention", reason="triton is not installed")

CUDA = torch.cuda.is_available()
DEVICE = skip_module_unless_triton_runs()

# (B, N, H, Dh): Dh 64 and 72 (DiT's head dims; 72 is not a power of two), N of one token, odd,
# and a whole number of blocks. The interpreter is slow (~3 ms per program), so the CPU set is small.
if CUDA:
    SHAPES = [(1, 1, 2, 64), (2, 17, 2, 72), (3, 77, 4, 64), (2, 256, 16, 72), (1, 1024, 16, 72), (2, 256, 12, 64)]
    LOW_PRECISION = [torch.bfloat16, torch.float16]
else:
    SHAPES = [(1, 1, 2, 64), (2, 17, 2, 72), (1, 64, 2, 72), (2, 17, 2, 64)]
    LOW_PRECISION = [torch.float16]  # bf16: see test_bfloat16_needs_a_gpu


@pytest.fixture
def poison(monkeypatch):
    """Every kernel output buffer starts as NaN, so an element the kernel fails to write fails."""

    def nan_empty(*args, **kwargs):
        return torch.empty(*args, **kwargs).fill_(float("nan"))

    monkeypatch.setattr(kernels, "_empty", nan_empty)


def make_qkv(B, N, H, Dh, dtype, seed=0):
    """Random packed qkv (B, N, 3*H*Dh) and an upstream gradient (B, N, H*Dh), rounded to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(B, N, 3 * H * Dh, generator=g, dtype=torch.float64) * 1.5).to(dtype)
    dout = torch.randn(B, N, H * Dh, generator=g, dtype=torch.float64).to(dtype)
    return qkv.to(DEVICE), dout.to(DEVICE)


def reference(qkv, dout, num_heads):
    """fp64 math attention of the same (rounded) inputs: out, logsumexp (B, H, N), dqkv."""
    x = qkv.detach().double().requires_grad_()
    B, N, three_d = x.shape
    Dh = three_d // (3 * num_heads)
    out = packed_attention_ref(x, num_heads)
    out.backward(dout.double())
    q, k, _ = x.detach().reshape(B, N, 3, num_heads, Dh).permute(2, 0, 3, 1, 4).unbind(0)
    lse = torch.logsumexp((q @ k.transpose(-2, -1)) * Dh**-0.5, dim=-1)
    return out.detach(), lse, x.grad


def run_kernels(qkv, dout, num_heads, layout=None):
    scale = (qkv.shape[-1] // (3 * num_heads)) ** -0.5
    out, lse = kernels.attention_fwd(qkv, num_heads, scale, layout)
    dqkv = kernels.attention_bwd(dout, qkv, out, lse, num_heads, scale, layout)
    return out, lse, dqkv


def scaled_close(got, ref, dtype, kind, what):
    """The table's tolerance, atol relative to the reference's largest value."""
    rtol, atol = TOLERANCES[(kind, dtype)]
    assert_close(got, ref, dtype=dtype, rtol=rtol, atol=atol * max(1.0, ref.abs().max().item()), what=what)


def layouts_for(Dh):
    return ["split", "pad"] if kernels.head_blocks(Dh, "split") != kernels.head_blocks(Dh, "pad") else ["split"]


CASES = [(shape, layout) for shape in SHAPES for layout in layouts_for(shape[3])]


@pytest.mark.parametrize("shape,layout", CASES, ids=lambda c: "B{}N{}H{}Dh{}".format(*c) if isinstance(c, tuple) else c)
def test_fp32_forward_backward_against_fp64(poison, shape, layout):
    B, N, H, Dh = shape
    qkv, dout = make_qkv(B, N, H, Dh, torch.float32)
    out, lse, dqkv = run_kernels(qkv, dout, H, layout)
    ref_out, ref_lse, ref_dqkv = reference(qkv, dout, H)
    assert out.shape == (B, N, H * Dh) and lse.shape == (B, H, N) and dqkv.shape == qkv.shape
    assert out.dtype == dqkv.dtype == torch.float32 and lse.dtype == torch.float32
    what = f"{shape} {layout}"
    scaled_close(out, ref_out.float(), torch.float32, "fwd", f"out {what}")
    scaled_close(lse, ref_lse.float(), torch.float32, "fwd", f"logsumexp {what}")
    for i, part in enumerate("qkv"):
        sl = slice(i * H * Dh, (i + 1) * H * Dh)
        scaled_close(dqkv[..., sl], ref_dqkv[..., sl].float(), torch.float32, "bwd", f"d{part} {what}")


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_low_precision_error_at_most_twice_plain_pytorch(poison, dtype):
    """Against fp64 math, the kernel's error is at most ~2x the official math run in ``dtype``."""
    shapes = SHAPES if CUDA else [(2, 17, 2, 72)]
    for B, N, H, Dh in shapes:
        qkv, dout = make_qkv(B, N, H, Dh, dtype)
        out, _, dqkv = run_kernels(qkv, dout, H)
        ref_out, _, ref_dqkv = reference(qkv, dout, H)
        eager = qkv.detach().clone().requires_grad_()
        eager_out = packed_attention_ref(eager, H)
        eager_out.backward(dout)
        for kind, got, plain, ref in (("fwd", out, eager_out, ref_out), ("bwd", dqkv, eager.grad, ref_dqkv)):
            assert got.dtype == dtype
            what = f"{kind} {(B, N, H, Dh)} {dtype}"
            scaled_close(got, ref, dtype, kind, what)
            err = (got.double() - ref).abs().max().item()
            err_plain = (plain.double() - ref).abs().max().item()
            assert err <= 2 * err_plain + 1e-6, f"{what}: error {err:.3e} vs plain PyTorch {err_plain:.3e}"


def test_bfloat16_needs_a_gpu():
    if CUDA:
        pytest.skip("on CUDA bf16 is covered by test_low_precision_error_at_most_twice_plain_pytorch")
    pytest.skip(
        "bf16 runs on CUDA only: Triton's interpreter multiplies bf16 tl.dot operands as their raw "
        "uint16 bit patterns (triton 3.9), so its bf16 results are garbage"
    )


def test_strided_inputs_and_other_head_dims(poison):
    """qkv and dout as views with padded rows (token strides != width), head dims 40 and 16."""
    for B, N, H, Dh in [(2, 9, 2, 40), (1, 5, 3, 16)]:
        big, big_dout = make_qkv(B, N, H, Dh + 8, torch.float32, seed=3)
        qkv = big[..., : 3 * H * Dh]  # stride (N*3*H*(Dh+8), 3*H*(Dh+8), 1)
        dout = big_dout[..., : H * Dh]
        assert not qkv.is_contiguous() and not dout.is_contiguous()
        out, lse, dqkv = run_kernels(qkv, dout, H)
        ref_out, ref_lse, ref_dqkv = reference(qkv, dout, H)
        scaled_close(out, ref_out.float(), torch.float32, "fwd", f"strided out Dh={Dh}")
        scaled_close(dqkv, ref_dqkv.float(), torch.float32, "bwd", f"strided dqkv Dh={Dh}")


def test_results_do_not_depend_on_the_rest_of_the_launch():
    """Each (sample, head) is reduced by its own programs in a fixed order: a sample's output, lse
    and gradients are bit-identical whether it runs alone or in a batch (another grid, other
    neighbours). A kernel that mixed programs' work or raced on shared partials would fail this."""
    qkv, dout = make_qkv(3, 17, 2, 72, torch.float32, seed=5)
    batch = run_kernels(qkv, dout, 2)
    for i in range(3):
        alone = run_kernels(qkv[i : i + 1].clone(), dout[i : i + 1].clone(), 2)
        for name, a, b in zip(("out", "lse", "dqkv"), alone, batch):
            assert torch.equal(a[0], b[i]), f"sample {i} {name}: alone != in a batch of 3"


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device: concurrent streams")
def test_gradients_are_deterministic_under_concurrent_streams():
    qkv, dout = make_qkv(8, 256, 16, 72, torch.bfloat16, seed=5)
    ref = run_kernels(qkv, dout, 16)
    streams = [torch.cuda.Stream() for _ in range(4)]
    results = []
    for stream in streams:  # four copies of the same launches in flight together
        with torch.cuda.stream(stream):
            results.append(run_kernels(qkv, dout, 16))
    torch.cuda.synchronize()
    for got in results:
        for a, b in zip(got, ref):
            assert torch.equal(a, b)


def test_custom_op_autograd_matches_reference():
    qkv, dout = make_qkv(2, 17, 2, 72, torch.float32, seed=7)
    x = qkv.clone().requires_grad_()
    out = ops.packed_attention(x, 2)
    out.backward(dout)
    ref_out, _, ref_dqkv = reference(qkv, dout, 2)
    scaled_close(out.detach(), ref_out.float(), torch.float32, "fwd", "op out")
    scaled_close(x.grad, ref_dqkv.float(), torch.float32, "bwd", "op dqkv")


def test_opcheck():
    qkv, _ = make_qkv(1, 5, 2, 16, torch.float32, seed=9)
    torch.library.opcheck(torch.ops.ditfast.attn_packed_fwd.default, (qkv.requires_grad_(), 2, 0.25))


def test_head_blocks():
    assert kernels.head_blocks(72, "split") == (64, 16)
    assert kernels.head_blocks(72, "pad") == (128, 0)
    assert kernels.head_blocks(64, "split") == kernels.head_blocks(64, "pad") == (64, 0)
    assert kernels.head_blocks(96, "split") == (64, 32)
    assert kernels.head_blocks(8, "split") == (16, 0)  # tl.dot needs blocks of at least 16
    with pytest.raises(ValueError, match="head_layout must be one of"):
        kernels.head_blocks(72, "halve")


def test_bad_inputs():
    qkv = torch.randn(2, 3, 3 * 2 * 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"\(B, N, 3\*H\*Dh\)"):
        ops.packed_attention(qkv[0], 2)
    with pytest.raises(ValueError, match="positive multiple of 12"):
        ops.packed_attention(qkv[..., :-1], 4)
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        ops.packed_attention(qkv, 0)
    with pytest.raises(ValueError, match="floating-point"):
        ops.packed_attention(qkv.long(), 2)
    with pytest.raises(ValueError, match="head dims up to 256"):
        ops.packed_attention(torch.randn(1, 2, 3 * 264, device=DEVICE), 1)


def test_autotuned_launch_path(monkeypatch, poison):
    """The CUDA path (autotuned kernels, grids from the chosen config) run in the interpreter with
    a stand-in timer, so a launch-argument mistake on that path fails here too, without a GPU."""
    import triton

    timed = []

    def fake_bench(fn, quantiles=None, **kwargs):
        fn()
        timed.append(fn)
        return [1.0, 1.0, 1.0] if quantiles else 1.0

    def tuned(big, small, kernel):
        configs = [triton.Config({big: 16, small: 16}), triton.Config({big: 32, small: 16}), triton.Config({big: 128, small: 64})]
        return triton.autotune(configs, key=kernels._TUNE_KEY, prune_configs_by=kernels._PRUNE, do_bench=fake_bench)(kernel)

    monkeypatch.setattr(kernels, "_fwd_tuned", tuned("BLOCK_M", "BLOCK_N", kernels._attn_fwd_kernel))
    monkeypatch.setattr(kernels, "_dkdv_tuned", tuned("BLOCK_N", "BLOCK_M", kernels._attn_bwd_kernel))
    monkeypatch.setattr(kernels, "_dq_tuned", tuned("BLOCK_M", "BLOCK_N", kernels._attn_bwd_kernel))
    launch = kernels._launch
    monkeypatch.setattr(kernels, "_launch", lambda raw, tuned_, grid_of, on_cuda, *a, **m: launch(raw, tuned_, grid_of, True, *a, **m))
    qkv, dout = make_qkv(2, 17, 2, 72, torch.float32, seed=11)
    out, lse, dqkv = run_kernels(qkv, dout, 2)
    assert len(timed) == 6  # 3 kernels x 2 configs: the 128-row config is pruned at N=17
    ref_out, ref_lse, ref_dqkv = reference(qkv, dout, 2)
    scaled_close(out, ref_out.float(), torch.float32, "fwd", "autotuned out")
    scaled_close(dqkv, ref_dqkv.float(), torch.float32, "bwd", "autotuned dqkv")


class _GridRecorder:
    """Stands in for a kernel (``kernel[grid](...)``): records the grid of every config it could
    launch with (``blocks``: the autotuner's config blocks, or one empty dict) instead of running."""

    def __init__(self, blocks, grids):
        self.blocks, self.grids = blocks, grids

    def __getitem__(self, grid):
        def launch(*args, **meta):
            for blocks in self.blocks:
                self.grids.append(grid({**meta, **blocks}) if callable(grid) else grid)

        return launch


@pytest.mark.parametrize("tuned", [False, True], ids=["interpreter-blocks", "autotuned"])
def test_grid_within_cuda_limits_for_a_large_cfg_batch(monkeypatch, tuned):
    """A CFG-doubled batch of 4096 at 16 heads is 65536 (batch, head) pairs: more than CUDA's 65535
    on grid axes 1 and 2. Every launch (each autotune config) must fit: axis 0 < 2^31, others <= 65535."""
    B, N, H, Dh = 4096, 256, 16, 72
    grids = []
    tuned_configs = 0
    for name in ("_fwd_tuned", "_dkdv_tuned", "_dq_tuned"):
        configs = getattr(kernels, name).configs
        tuned_configs += len(configs)
        monkeypatch.setattr(kernels, name, _GridRecorder([c.kwargs for c in configs], grids))
    for name in ("_attn_fwd_kernel", "_attn_bwd_kernel", "_attn_bwd_preprocess_kernel"):
        monkeypatch.setattr(kernels, name, _GridRecorder([{}], grids))
    if tuned:  # the CUDA path, as test_autotuned_launch_path forces it
        launch = kernels._launch
        monkeypatch.setattr(kernels, "_launch", lambda raw, tuned_, grid_of, on_cuda, *a, **m: launch(raw, tuned_, grid_of, True, *a, **m))
    qkv = torch.empty(B, N, 3 * H * Dh, device="meta")  # shapes and strides only: nothing runs
    out, lse = kernels.attention_fwd(qkv, H, Dh**-0.5)
    kernels.attention_bwd(torch.empty_like(out), qkv, out, lse, H, Dh**-0.5)
    assert len(grids) == (1 + tuned_configs if tuned else 4)  # preprocess + 3 kernels (each config when tuned)
    for grid in grids:
        assert 1 <= len(grid) <= 3 and all(isinstance(g, int) and g >= 1 for g in grid), grid
        assert grid[0] < 2**31 and all(g <= 65535 for g in grid[1:]), f"grid {grid} exceeds CUDA's limits"
        assert grid[0] * (grid[1] if len(grid) > 1 else 1) * (grid[2] if len(grid) > 2 else 1) >= B * H


def test_grid_too_large_is_a_clear_error():
    with pytest.raises(ValueError, match="exceeds CUDA's"):
        kernels._grid(2**20, 16, 2**20)


@pytest.mark.parametrize("dtype,allow_tf32,expected", [
    (torch.float32, False, "ieee"), (torch.float32, True, "tf32"),
    (torch.float16, True, "ieee"), (torch.float16, False, "ieee"),
])  # fmt: skip
def test_fp32_dots_follow_torch_tf32_switch(monkeypatch, dtype, allow_tf32, expected):
    """fp32 inputs get tl.dot input_precision "tf32" exactly when torch.backends.cuda.matmul.allow_tf32
    is set (16-bit inputs are unaffected), chosen by the launcher as the PRECISION constexpr. The
    interpreter computes tf32 dots in full fp32, so the results are also checked here."""
    saved = torch.backends.cuda.matmul.allow_tf32  # a property of torch's cuBLAS module: monkeypatch cannot restore it
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    try:
        _check_precision(monkeypatch, dtype, expected)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _check_precision(monkeypatch, dtype, expected):
    seen = []
    launch = kernels._launch
    monkeypatch.setattr(kernels, "_launch", lambda *a, **meta: (seen.append(meta["PRECISION"]), launch(*a, **meta)))
    qkv, dout = make_qkv(1, 17, 2, 16, dtype, seed=13)
    out, _, dqkv = run_kernels(qkv, dout, 2)
    assert seen == [expected] * 3  # forward, dk/dv, dq
    ref_out, _, ref_dqkv = reference(qkv, dout, 2)
    tol = torch.float16 if CUDA and expected == "tf32" else dtype  # TF32 keeps fp16's 10-bit mantissa
    scaled_close(out, ref_out.to(dtype), tol, "fwd", f"out {dtype} {expected}")
    scaled_close(dqkv, ref_dqkv.to(dtype), tol, "bwd", f"dqkv {dtype} {expected}")
