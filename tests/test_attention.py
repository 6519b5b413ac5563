"""Attention dispatch (ditfast.attention): every backend against fp64 math, choice, forcing, errors, DiT wiring.

Backends that cannot run here (flash-attn or xformers not installed, CUDA-only SDPA kernels on a
CPU machine) are reported as skipped with the backend's own reasons.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ditfast import DiT, attention as attn, ops
from ditfast.models import Attention
from ditfast.ops.attention import packed_attention_ref
from conftest import TOLERANCES, assert_close, assert_same_training_signal, randomize_

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
SHAPE = (2, 256, 16, 72) if CUDA else (2, 17, 2, 72)  # (B, N, H, Dh)


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(attn.ENV_VAR, raising=False)


def make_qkv(B, N, H, Dh, dtype=DTYPE, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, 3 * H * Dh, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def problem(qkv, H, needs_grad=True):
    return attn.AttentionProblem(str(qkv.device), qkv.dtype, H, qkv.shape[-1] // (3 * H), needs_grad)


@pytest.mark.parametrize("name", list(attn.BACKENDS))
def test_backend_forward_backward_against_fp64(name):
    B, N, H, Dh = SHAPE
    qkv = make_qkv(B, N, H, Dh)
    reasons = attn.BACKENDS[name].not_supported_reasons(problem(qkv, H))
    if reasons:
        pytest.skip(f"{name} cannot run {problem(qkv, H)}: {'; '.join(reasons)}")
    dout = torch.randn(B, N, H * Dh, device=DEVICE, dtype=DTYPE)
    x = qkv.clone().requires_grad_()
    out = attn.attention(x, H, backend=name)
    out.backward(dout)
    ref = qkv.double().requires_grad_()
    ref_out = packed_attention_ref(ref, H)
    ref_out.backward(dout.double())
    assert out.shape == (B, N, H * Dh) and out.dtype == DTYPE and x.grad.dtype == DTYPE
    for kind, got, want in (("fwd", out, ref_out), ("bwd", x.grad, ref.grad)):
        rtol, atol = TOLERANCES[(kind, DTYPE)]
        assert_close(got, want, dtype=DTYPE, rtol=rtol, atol=atol * max(1.0, want.abs().max().item()), what=f"{name} {kind}")


def test_auto_on_cpu_is_the_official_sdpa_call():
    qkv = make_qkv(2, 17, 2, 72, torch.float32, "cpu")
    assert attn.select_backend(qkv, 2).name == "sdpa"
    B, N, _ = qkv.shape
    q, k, v = qkv.reshape(B, N, 3, 2, 72).permute(2, 0, 3, 1, 4).unbind(0)
    official = F.scaled_dot_product_attention(q, k, v, scale=72**-0.5).transpose(1, 2).reshape(B, N, 144)
    assert torch.equal(attn.attention(qkv, 2), official)


def test_forced_backend_runs_that_backend(monkeypatch):
    qkv = make_qkv(1, 5, 2, 16, torch.float32, "cpu")
    calls = []
    monkeypatch.setattr(ops, "packed_attention", lambda *a: calls.append(a) or packed_attention_ref(*a))
    assert attn.select_backend(qkv, 2, "sdpa-math").name == "sdpa-math"
    attn.attention(qkv, 2, backend="triton")
    assert len(calls) == 1
    attn.attention(qkv, 2, backend="sdpa-math")
    assert len(calls) == 1


def test_environment_variable_forces_a_backend(monkeypatch):
    qkv = make_qkv(1, 5, 2, 16, torch.float32, "cpu")
    monkeypatch.setenv(attn.ENV_VAR, "sdpa-math")
    assert attn.select_backend(qkv, 2).name == "sdpa-math"
    assert attn.select_backend(qkv, 2, "sdpa").name == "sdpa"  # an explicit argument wins
    monkeypatch.setenv(attn.ENV_VAR, "auto")
    assert attn.select_backend(qkv, 2).name == "sdpa"
    monkeypatch.setenv(attn.ENV_VAR, "flash-attn-9")
    with pytest.raises(ValueError, match=f"{attn.ENV_VAR} must be 'auto' or one of"):
        attn.attention(qkv, 2)
    monkeypatch.setenv(attn.ENV_VAR, "sdpa-flash")
    with pytest.raises(attn.AttentionBackendError, match=rf"'sdpa-flash' \(set by {attn.ENV_VAR}="):
        attn.attention(qkv, 2)


def test_unknown_and_unsupported_forced_backends():
    qkv = make_qkv(1, 5, 2, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="attention backend must be 'auto' or one of"):
        attn.attention(qkv, 2, backend="flash")
    with pytest.raises(attn.AttentionBackendError) as err:
        attn.attention(qkv, 2, backend="sdpa-flash")
    msg = str(err.value)
    assert "'sdpa-flash' (set by backend='sdpa-flash') cannot run 2 heads x head dim 16, float32 on cpu" in msg
    assert "runs on cuda tensors, not cpu" in msg and "dtype float32 is not one of float16, bfloat16" in msg
    for name in attn.BACKENDS:  # then every backend's verdict
        assert f"\n  {name}: " in msg


def test_nothing_fits_lists_every_backends_reasons(monkeypatch):
    qkv = make_qkv(1, 5, 2, 16, torch.float32, "cpu")
    monkeypatch.setitem(attn.PRIORITY, "cpu", ["flash-attn", "sdpa-flash", "xformers"])
    with pytest.raises(attn.AttentionBackendError, match="no attention backend can run 2 heads x head dim 16") as err:
        attn.attention(qkv, 2)
    lines = {line.split(":")[0].strip(): line for line in str(err.value).splitlines()[1:]}
    assert set(lines) == set(attn.BACKENDS)
    assert "runs on cuda tensors, not cpu" in lines["flash-attn"]
    if attn.BACKENDS["flash-attn"].unavailable_reason():
        assert "flash_attn is not installed" in lines["flash-attn"] or "fails to import" in lines["flash-attn"]
    assert "could run, but is not in the cpu priority list" in lines["sdpa-math"]
    assert "backend='sdpa-math'" in lines["sdpa-math"]


class _ForwardOnly(attn.AttentionBackend):
    """A stand-in backend: CPU, fp32, head dim <= 32, no backward."""

    name = "forward-only"
    device_types = ("cpu",)
    dtypes = (torch.float32,)
    max_head_dim = 32
    supports_backward = False

    def __call__(self, qkv, num_heads, scale):
        return packed_attention_ref(qkv, num_heads, scale)


def test_declarations_steer_auto(monkeypatch):
    monkeypatch.setitem(attn.BACKENDS, "forward-only", _ForwardOnly())
    monkeypatch.setitem(attn.PRIORITY, "cpu", ["forward-only", "sdpa-math"])
    qkv = make_qkv(1, 5, 2, 16, torch.float32, "cpu")
    assert attn.select_backend(qkv, 2).name == "forward-only"
    assert attn.select_backend(qkv.clone().requires_grad_(), 2).name == "sdpa-math"
    with torch.no_grad():
        assert attn.select_backend(qkv.clone().requires_grad_(), 2).name == "forward-only"
    assert attn.select_backend(qkv.double(), 2).name == "sdpa-math"
    assert attn.select_backend(make_qkv(1, 5, 2, 40, torch.float32, "cpu"), 2).name == "sdpa-math"
    reasons = _ForwardOnly().not_supported_reasons(attn.AttentionProblem("cuda:0", torch.float16, 2, 64, True))
    assert reasons == [
        "runs on cpu tensors, not cuda",
        "dtype float16 is not one of float32",
        "head dim 64 is over its maximum 32",
        "has no backward (the input requires grad)",
    ]


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"\(B, N, 3\*H\*Dh\)"):
        attn.attention(torch.randn(4, 48), 2)
    with pytest.raises(ValueError, match="positive multiple of 6"):
        attn.attention(torch.randn(1, 4, 50), 2)


def test_describe_and_info_list_every_backend():
    from ditfast.info import collect

    described = attn.describe("cpu")
    assert set(described) == set(attn.BACKENDS)
    assert described["sdpa-math"].startswith("usable on cpu")
    assert described["sdpa-flash"] == "not usable: runs on cuda tensors, not cpu"
    info = collect()
    for name in attn.BACKENDS:
        assert info[f"attention {name}"].startswith(("usable", "not usable: "))
    assert "attention auto order" in info


# ------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------


def small_dit(**kw):
    # 2 blocks, 2 heads of DiT-XL's head dim 72, 16 tokens: quick under the Triton interpreter
    model = DiT(input_size=8, patch_size=2, hidden_size=144, depth=2, num_heads=2, num_classes=10, **kw)
    return randomize_(model).to(DEVICE).eval()


@pytest.mark.skipif(ops.triton_status(DEVICE) is not None, reason=f"Triton kernels unavailable: {ops.triton_status(DEVICE)}")
def test_dit_with_triton_attention_matches_math_attention():
    model = small_dit(backend="eager")
    x = torch.randn(3, 4, 8, 8, device=DEVICE)
    t = torch.randint(0, 1000, (3,), device=DEVICE)
    y = torch.randint(0, 11, (3,), device=DEVICE)
    assert_same_training_signal(model, (x, t, y), "attn_backend", "sdpa-math", "triton", "DiT with triton attention")


def test_dit_attn_backend_keyword_and_attribute():
    model = DiT(input_size=8, hidden_size=64, depth=2, num_heads=2, num_classes=10, attn_backend="sdpa-math")
    assert model.attn_backend == "sdpa-math" and all(b.attn.backend == "sdpa-math" for b in model.blocks)
    model.attn_backend = "auto"
    assert all(b.attn.backend == "auto" for b in model.blocks)
    with pytest.raises(ValueError, match="attention backend must be 'auto' or one of"):
        DiT(input_size=8, hidden_size=64, depth=2, num_heads=2, attn_backend="fast")
    with pytest.raises(ValueError, match="attention backend must be 'auto' or one of"):
        model.attn_backend = "fast"


@pytest.mark.parametrize("backend", ["auto", "sdpa-math", "triton"])
def test_compile_fullgraph_attention(backend, monkeypatch):
    monkeypatch.setattr(attn.ATTENTION, "cache", {})  # dynamo traces the backend choice itself, not a cached answer
    if backend == "triton" and ops.triton_status(DEVICE) is not None:
        pytest.skip(f"Triton kernels unavailable: {ops.triton_status(DEVICE)}")
    module = randomize_(Attention(144, num_heads=2, qkv_bias=True)).to(DEVICE)
    module.backend = backend
    x = torch.randn(2, 9, 144, device=DEVICE, requires_grad=True)
    torch._dynamo.reset()
    out = torch.compile(module, fullgraph=True, backend="aot_eager")(x)
    out.square().sum().backward()
    grad, x.grad = x.grad, None
    module.backend = "sdpa-math"
    ref = module(x)
    ref.square().sum().backward()
    assert_close(out, ref, rtol=1e-5, atol=1e-5, what=f"compiled {backend}")
    assert_close(grad, x.grad, kind="bwd", what=f"compiled {backend} dx")


# ------------------------------------------------------------------------------------------
# GPU only
# ------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device: torch's SDPA kernel checks run on CUDA only")
def test_cuda_auto_choice_is_first_fitting_in_priority():
    qkv = make_qkv(2, 256, 16, 72, torch.bfloat16, "cuda").requires_grad_()
    import importlib.util

    chosen = attn.select_backend(qkv, 16)
    # written out, not recomputed from the priority list: on an sm80+ GPU, bf16 with head dim 72 and a
    # backward, flash-attn when it is installed, else torch's FlashAttention-2 kernel
    assert chosen.name == ("flash-attn" if importlib.util.find_spec("flash_attn") else "sdpa-flash")
    # fp64 is only for the math path and torch's own choice
    assert attn.select_backend(qkv.detach().double(), 16).name == "sdpa-math"
