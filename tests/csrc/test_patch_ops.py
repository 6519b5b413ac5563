"""Patch ops of ditfast._C (patch_embed, unpatchify, patchify, unpatchify_cfg) against the official
PyTorch math: Conv2d PatchEmbed + position add, einsum unpatchify, DiT.forward_with_cfg's combine.

CPU cases run here; the same cases run on CUDA where a GPU and the CUDA ops exist, and are
reported as skipped with the reason otherwise. The CUDA kernels' own sources are also run, on
the CPU, by test_cuda_kernels_emulated.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from ditfast import DiT, models, ops
from ditfast._ext import extension_loaded, op_available
from conftest import TOLERANCES, assert_close, max_rel_error, randomize_


def _cuda_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not op_available(torch.device("cuda")):
        return "ditfast._C was built without CUDA ops"
    return None


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(_cuda_reason() is not None, reason=f"CUDA case: {_cuda_reason()}"))]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# p -> square latent side: p=2 gives 16 tokens, p=4 an odd 9, p=8 four
SIDE = {2: 8, 4: 12, 8: 16}
needs_ext = pytest.mark.skipif(not extension_loaded(), reason="ditfast._C is not built in this environment")


def fresh_nan_pool(nbytes: int, device) -> None:
    """Allocate and free NaN-filled buffers of `nbytes`, so the allocator's next block of that size
    (certain on CUDA's caching allocator, likely for small CPU blocks) holds NaN: an output element
    an op forgets to write then fails the comparison instead of holding stale data."""
    for _ in range(2):
        torch.full((nbytes,), 255, dtype=torch.uint8, device=device)


def within_2x_of_eager(op_out, eager_out, ref64, what: str) -> None:
    """Low-precision result no worse than about 2x plain PyTorch's own error in that dtype."""
    err_op, err_eager = max_rel_error(op_out, ref64), max_rel_error(eager_out, ref64)
    assert err_op <= 2 * err_eager + 1e-6, f"{what}: op error {err_op:.3e} vs eager {err_eager:.3e}"


# ------------------------------------------------------------------------------------------
# patch_embed
# ------------------------------------------------------------------------------------------


def patch_inputs(B, C, p, D, dtype, device, side=None):
    side = side or SIDE[p]
    T = (side // p) ** 2
    x = torch.randn(B, C, side, side, device=device).to(dtype)
    w = (torch.randn(D, C, p, p, device=device) * (C * p * p) ** -0.5).to(dtype)
    b = torch.randn(D, device=device).to(dtype)
    pos = torch.randn(1, T, D, device=device).to(dtype)
    return x, w, b, pos


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [2, 4, 8])
@pytest.mark.parametrize("C", [4, 3, 1, 8])
def test_patch_embed_forward(device, dtype, p, C):
    x, w, b, pos = patch_inputs(3, C, p, 72, dtype, device)
    fresh_nan_pool(3 * pos.numel() * pos.element_size(), device)
    out = torch.ops.ditfast.patch_embed(x, w, b, pos)
    ref64 = ops.patch_embed_ref(x.double(), w.double(), b.double(), pos.double())
    assert out.dtype == dtype
    assert_close(out, ref64, dtype=dtype, what=f"patch_embed p={p} C={C}")
    if dtype != torch.float32:
        within_2x_of_eager(out, ops.patch_embed_ref(x, w, b, pos), ref64, "patch_embed")


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_bias,with_pos", [(False, True), (True, False), (False, False)])
def test_patch_embed_optional_terms_and_odd_width(device, with_bias, with_pos):
    # D=20 is not a multiple of 8 (the CUDA kernel's scalar tail); x is a strided (channels-last) view
    x, w, b, pos = patch_inputs(5, 3, 2, 20, torch.float32, device)
    x = x.contiguous(memory_format=torch.channels_last)
    b, pos = (b if with_bias else None), (pos if with_pos else None)
    out = torch.ops.ditfast.patch_embed(x, w, b, pos)
    assert_close(out, ops.patch_embed_ref(x.double(), w.double(), None if b is None else b.double(), None if pos is None else pos.double()), dtype=torch.float32)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p,C", [(2, 4), (4, 3), (8, 1)])
def test_patch_embed_backward_matches_reference_autograd(device, dtype, p, C):
    x, w, b, pos = patch_inputs(3, C, p, 72, dtype, device)
    leaves = [t.detach().requires_grad_() for t in (x, w, b, pos)]
    out = ops.patch_embed(*leaves)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, grad)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, w, b, pos)]
    want = torch.autograd.grad(ops.patch_embed_ref(*leaves64), leaves64, grad.double())
    for name, g, r in zip(("x", "weight", "bias", "pos_embed"), got, want):
        assert g.dtype == dtype and g.shape == r.shape
        rtol, atol = TOLERANCES[("bwd", dtype)]
        assert_close(g, r, dtype=dtype, kind="bwd", atol=atol * r.abs().max().item(), what=f"d{name}")


@needs_ext
def test_patch_embed_gradcheck_fp64():
    x, w, b, pos = (t.requires_grad_() for t in patch_inputs(2, 3, 2, 8, torch.float64, "cpu", side=4))
    assert torch.autograd.gradcheck(ops.patch_embed, (x, w, b, pos))
    # only some inputs need grads: the op is asked for those alone
    x2, w2 = x.detach(), w.detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda w_: ops.patch_embed(x2, w_, b.detach(), pos.detach()), (w2,))


@needs_ext
def test_patch_embed_backward_computes_only_requested_gradients():
    x, w, _, _ = patch_inputs(2, 4, 2, 16, torch.float32, "cpu")
    grad = torch.randn(2, 16, 16)
    dx, dw, db, dpos = torch.ops.ditfast.patch_embed_backward(grad, x, w, [False, True, False, True])
    assert dx.numel() == 0 and db.numel() == 0
    assert dw.shape == w.shape and dpos.shape == (1, 16, 16)


# ------------------------------------------------------------------------------------------
# unpatchify / patchify
# ------------------------------------------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [2, 4, 8])
@pytest.mark.parametrize("C", [8, 3, 1, 6])
def test_unpatchify_and_patchify_are_the_official_permutation(device, dtype, p, C):
    G = SIDE[p] // p
    tokens = torch.randn(3, G * G, p * p * C, device=device).to(dtype)
    fresh_nan_pool(tokens.numel() * tokens.element_size(), device)
    image = torch.ops.ditfast.unpatchify(tokens, p, C)
    assert torch.equal(image, ops.unpatchify_ref(tokens, p, C))  # a permutation: exact, every element
    fresh_nan_pool(tokens.numel() * tokens.element_size(), device)
    assert torch.equal(torch.ops.ditfast.patchify(image, p), tokens)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_unpatchify_matches_the_model_method_and_backward(device):
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=4)
    tokens = torch.randn(3, 16, 2 * 2 * 8, device=device, requires_grad=True)
    out = ops.unpatchify(tokens, 2, 8)
    assert torch.equal(out, model.unpatchify(tokens))
    grad = torch.randn_like(out)
    (g,) = torch.autograd.grad(out, tokens, grad)
    assert torch.equal(g, ops.patchify_ref(grad, 2))


@needs_ext
def test_unpatchify_patchify_gradcheck_fp64():
    tokens = torch.randn(2, 9, 2 * 2 * 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ops.unpatchify(t, 2, 3), (tokens,))
    image = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: ops.patchify(x, 3), (image,))


# ------------------------------------------------------------------------------------------
# unpatchify_cfg: DiT.forward_with_cfg's combine, fused
# ------------------------------------------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [2, 4, 8])
@pytest.mark.parametrize("latent,rule", [(4, "official"), (4, "all"), (3, "official"), (1, "all"), (8, "official")])
@pytest.mark.parametrize("full_batch", [True, False])
def test_unpatchify_cfg_is_forward_with_cfg_math(device, dtype, p, latent, rule, full_batch):
    C = 2 * latent  # learned sigma: eps channels then variance channels
    guided = min(3, C) if rule == "official" else latent
    G, half = SIDE[p] // p, 3
    tokens = torch.randn(2 * half, G * G, p * p * C, device=device).to(dtype)
    fresh_nan_pool(tokens.numel() * tokens.element_size() // (1 if full_batch else 2), device)
    out = torch.ops.ditfast.unpatchify_cfg(tokens, p, C, 4.0, guided, full_batch)
    ref64 = ops.unpatchify_cfg_ref(tokens.double(), p, C, 4.0, guided, full_batch)
    assert out.shape == ref64.shape == ((2 if full_batch else 1) * half, C, G * p, G * p)
    assert_close(out, ref64, dtype=dtype, atol=TOLERANCES[("fwd", dtype)][1] * 4, what="guided output")
    if dtype != torch.float32:
        within_2x_of_eager(out, ops.unpatchify_cfg_ref(tokens, p, C, 4.0, guided, full_batch), ref64, "unpatchify_cfg")
    # pass-through channels are the model's values, bit for bit: cond half, then (full batch) uncond half
    image = ops.unpatchify_ref(tokens, p, C)
    assert torch.equal(out[:half, guided:], image[:half, guided:])
    if full_batch:
        assert torch.equal(out[half:, guided:], image[half:, guided:])
        assert torch.equal(out[half:, :guided], out[:half, :guided])


@needs_ext
def test_unpatchify_cfg_scale_one_and_zero():
    tokens = torch.randn(4, 16, 2 * 2 * 8)
    image = ops.unpatchify_ref(tokens, 2, 8)
    one = ops.unpatchify_cfg(tokens, 2, 8, 1.0, 3, full_batch=False)
    zero = ops.unpatchify_cfg(tokens, 2, 8, 0.0, 3, full_batch=False)
    assert_close(one, image[:2], rtol=0, atol=1e-6, what="scale 1 = conditional output")
    assert_close(zero[:, :3], image[2:, :3], rtol=0, atol=1e-6, what="scale 0 = unconditional eps")


# ------------------------------------------------------------------------------------------
# Registration: opcheck, torch.compile, fallback, argument errors
# ------------------------------------------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_every_op(device):
    x, w, b, pos = patch_inputs(2, 4, 2, 16, torch.float32, device)
    tokens = torch.randn(4, 9, 2 * 2 * 8, device=device)
    cases = {
        "patch_embed": (x, w, b, pos),
        "patch_embed_backward": (torch.randn(2, 16, 16, device=device), x, w, [True, True, False, True]),
        "unpatchify": (tokens, 2, 8),
        "patchify": (torch.randn(3, 4, 6, 6, device=device), 3),
        "unpatchify_cfg": (tokens, 2, 8, 1.5, 3, True),
    }
    for name, args in cases.items():
        torch.library.opcheck(getattr(torch.ops.ditfast, name).default, args)
    torch.library.opcheck(torch.ops.ditfast.patch_embed.default, (x.requires_grad_(), w.requires_grad_(), None, None))


@needs_ext
def test_compile_fullgraph_forward_and_backward():
    x, w, b, pos = (t.requires_grad_() for t in patch_inputs(2, 4, 2, 16, torch.float32, "cpu"))

    def f(x, w, b, pos):
        h = ops.patch_embed(x, w, b, pos)  # (2, 16, 16) = p*p*C for p=2, C=4
        return ops.unpatchify(h, 2, 4).square().sum() + ops.unpatchify_cfg(h.detach(), 2, 4, 2.0, 3).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(x, w, b, pos)
    grads = torch.autograd.grad(got, (x, w, b, pos))
    want = f(x, w, b, pos)
    want_grads = torch.autograd.grad(want, (x, w, b, pos))
    assert_close(got, want, rtol=1e-5, atol=1e-4)
    for g, r in zip(grads, want_grads):
        assert_close(g, r, kind="bwd")


def test_fallback_warns_once_per_op_and_matches(monkeypatch):
    import ditfast._ext as ext

    monkeypatch.setattr(ext, "_WARNED", set())
    monkeypatch.setattr(ops.patch, "op_available", lambda device: False)
    x, w, b, pos = patch_inputs(2, 4, 2, 16, torch.float32, "cpu")
    tokens = torch.randn(4, 16, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            out = ops.patch_embed(x, w, b, pos)
            img = ops.unpatchify(tokens, 2, 4)
            back = ops.patchify(img, 2)
            cfg = ops.unpatchify_cfg(tokens, 2, 4, 1.5, 3)
    messages = [str(w.message) for w in caught if "pure-PyTorch fallback" in str(w.message)]
    assert len(messages) == 4 and len(set(messages)) == 4
    assert torch.equal(out, ops.patch_embed_ref(x, w, b, pos)) and torch.equal(img, ops.unpatchify_ref(tokens, 2, 4))
    assert torch.equal(back, tokens) and torch.equal(cfg, ops.unpatchify_cfg_ref(tokens, 2, 4, 1.5, 3))


@needs_ext
def test_patch_embed_promotes_mixed_dtypes():
    # a bf16 model run with an fp32 pos_embed: the output takes the promoted dtype, as x + pos_embed does
    x, w, b, pos = patch_inputs(2, 4, 2, 16, torch.bfloat16, "cpu")
    out = ops.patch_embed(x, w, b, pos.float())
    assert out.dtype == torch.float32
    assert_close(out, ops.patch_embed_ref(x.float(), w.float(), b.float(), pos.float()), dtype=torch.bfloat16)


def test_bad_arguments_raise_value_errors():
    x, w, b, pos = patch_inputs(2, 4, 2, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"x must be a floating-point \(B, C, H, W\)"):
        ops.patch_embed(x[0], w, b, pos)
    with pytest.raises(ValueError, match="weight must be"):
        ops.patch_embed(x, w[:, :3], b, pos)
    with pytest.raises(ValueError, match="p dividing H and W"):
        ops.patch_embed(x[..., :7], w, b, None)
    with pytest.raises(ValueError, match=r"bias must be \(16,\)"):
        ops.patch_embed(x, w, b[:5], pos)
    with pytest.raises(ValueError, match=r"pos_embed must be \(1, 16, 16\)"):
        ops.patch_embed(x, w, b, pos[:, :8])
    tokens = torch.randn(4, 16, 16)
    with pytest.raises(ValueError, match=r"\(B, G\*G, 16\)"):
        ops.unpatchify(tokens[:, :15], 2, 4)
    with pytest.raises(ValueError, match="patch_size must be a positive int"):
        ops.unpatchify(tokens, 0, 4)
    with pytest.raises(ValueError, match=r"tokens must be \(B, T, p\*p\*C\)"):
        ops.unpatchify(tokens, 2, 3)
    with pytest.raises(ValueError, match="image must be square"):
        ops.patchify(torch.randn(1, 4, 8, 6), 2)
    with pytest.raises(ValueError, match="even"):
        ops.unpatchify_cfg(tokens[:3], 2, 4, 1.5)
    with pytest.raises(ValueError, match=r"guided_channels must be an int in \[0, 4\]"):
        ops.unpatchify_cfg(tokens, 2, 4, 1.5, 5)


@needs_ext
def test_compiled_op_errors_on_bad_input():
    # the C++ checks stand behind the Python ones (direct torch.ops calls)
    with pytest.raises(RuntimeError, match="square number"):
        torch.ops.ditfast.unpatchify(torch.randn(1, 15, 16), 2, 4)
    with pytest.raises(RuntimeError, match="must have x's dtype"):
        torch.ops.ditfast.patch_embed(torch.randn(1, 4, 4, 4), torch.randn(8, 4, 2, 2).double(), None, None)
    with pytest.raises(RuntimeError, match="guided_channels must lie in"):
        torch.ops.ditfast.unpatchify_cfg(torch.randn(2, 4, 16), 2, 4, 1.0, 5, True)


# ------------------------------------------------------------------------------------------
# DiT wiring
# ------------------------------------------------------------------------------------------


def test_patch_ops_enabled_rules(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not models.patch_ops_enabled("eager", cuda) and not models.patch_ops_enabled("eager", cpu)
    assert models.patch_ops_enabled("triton", cpu)
    assert not models.patch_ops_enabled("auto", cpu)  # CPU "auto" keeps the official math
    import ditfast._ext

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a CUDA machine, as far as dispatch asks
    for built_with_cuda in (True, False):
        monkeypatch.setattr(ops.PATCH, "cache", {})
        monkeypatch.setattr(ditfast._ext, "op_available", lambda device, ok=built_with_cuda: ok)
        assert models.patch_ops_enabled("auto", cuda) is built_with_cuda


@needs_ext
@pytest.mark.parametrize("patch_size,in_channels,learn_sigma", [(2, 4, True), (4, 3, False)])
def test_dit_with_patch_ops_matches_official_math(monkeypatch, patch_size, in_channels, learn_sigma):
    model = DiT(input_size=8, patch_size=patch_size, in_channels=in_channels, hidden_size=64, depth=2, num_heads=2,
                num_classes=10, learn_sigma=learn_sigma, backend="eager")  # fmt: skip
    randomize_(model).eval()
    B = 3
    x = torch.randn(2 * B, in_channels, 8, 8)
    t = torch.randint(0, 1000, (2 * B,))
    y = torch.cat([torch.randint(0, 10, (B,)), torch.full((B,), 10)])
    results = {}
    for fast in (False, True):
        monkeypatch.setattr(models, "patch_ops_enabled", lambda backend, device, fast=fast: fast)
        model.zero_grad(set_to_none=True)
        out = model(x[:B], t[:B], y[:B])
        out.square().mean().backward()
        grads = {n: model.get_parameter(n).grad.clone() for n in ("x_embedder.proj.weight", "x_embedder.proj.bias")}
        with torch.no_grad():
            cfg = [model.forward_with_cfg(x, t, y, 4.0, guide_all_channels=g) for g in (False, True)]
        results[fast] = (out.detach(), grads, cfg)
    (out_e, grads_e, cfg_e), (out_f, grads_f, cfg_f) = results[False], results[True]
    assert out_e.abs().max() > 0.1
    assert_close(out_f, out_e, rtol=1e-4, atol=1e-5, what="DiT output")
    for name in grads_e:
        assert_close(grads_f[name], grads_e[name], kind="bwd", atol=1e-5 * grads_e[name].abs().max().item(), what=name)
    for got, want in zip(cfg_f, cfg_e):
        assert got.shape == want.shape == (2 * B, model.out_channels, 8, 8)
        assert_close(got, want, rtol=1e-4, atol=1e-4, what="forward_with_cfg")
