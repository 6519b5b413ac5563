"""DiT's backend choice: the fused Triton ops against the official eager math, at model level."""

from __future__ import annotations

import pytest
import torch

from ditfast import DiT_models, ops
from ditfast.models import adaln_fused
from conftest import assert_close, assert_same_training_signal, randomize_

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(ops.triton_status(DEVICE) is not None, reason=f"Triton kernels unavailable: {ops.triton_status(DEVICE)}")


def small_s2(**kw):
    # DiT-S/2 (depth 12, width 384, 6 heads); a 16-token latent keeps the interpreter fast on CPU
    size = 32 if torch.cuda.is_available() else 8
    # eval(): no random label dropout, so two forwards see the same labels (gradients still flow)
    return randomize_(DiT_models["DiT-S/2"](input_size=size, num_classes=10, **kw)).to(DEVICE).eval()


@needs_triton
def test_triton_backend_matches_eager_outputs_and_parameter_gradients():
    model = small_s2()
    B, size = 3, model.input_size
    x = torch.randn(B, 4, size, size, device=DEVICE)
    t = torch.randint(0, 1000, (B,), device=DEVICE)
    y = torch.randint(0, 11, (B,), device=DEVICE)
    assert_same_training_signal(model, (x, t, y), "backend", "eager", "triton", "DiT-S/2 fused adaLN")


def test_backend_choice_and_errors(monkeypatch):
    import ditfast.ops.adaln as adaln_module

    model = DiT_models["DiT-S/8"](input_size=8, num_classes=10, backend="eager")
    assert all(b.backend == "eager" for b in model.blocks) and model.final_layer.backend == "eager"
    assert adaln_fused("auto", torch.device("cpu")) is False  # CPU: the interpreter is for tests only
    with pytest.raises(ValueError, match="backend must be one of"):
        model.backend = "cuda-graphs"
    monkeypatch.setattr(ops.ADALN, "cache", {})
    monkeypatch.setattr(adaln_module, "triton_status", lambda device: "triton is not importable (test)")
    x, t, y = torch.randn(1, 4, 8, 8), torch.zeros(1), torch.zeros(1, dtype=torch.long)
    for name in ("fused", "triton"):  # "triton" is the old name of "fused"
        model.backend = name
        with pytest.raises(ops.dispatch.BackendError, match=r"adaln backend 'triton' \(set by backend='triton'\) cannot run "
                           r"hidden size 384, float32 on cpu: triton is not importable \(test\)"):  # fmt: skip
            model(x, t, y)
    assert adaln_fused("auto", torch.device("cuda")) is False  # auto never fails: eager when triton can't run


@needs_triton
def test_fused_block_forward_equals_official_block():
    model = small_s2()
    block = model.blocks[0]
    x = torch.randn(2, 16, 384, device=DEVICE)
    c = torch.randn(2, 384, device=DEVICE)
    block.backend = "eager"
    ref = block(x, c)
    block.backend = "triton"
    assert adaln_fused(block.backend, x.device)
    assert_close(block(x, c), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item(), what="fused DiTBlock")


def _inputs(model, B=2):
    size = model.input_size
    return (torch.randn(B, 4, size, size, device=DEVICE), torch.randint(0, 1000, (B,), device=DEVICE),
            torch.randint(0, 11, (B,), device=DEVICE))  # fmt: skip


BACKEND_CHOICES = ["eager", pytest.param("triton", marks=needs_triton)]


@pytest.mark.parametrize("backend", BACKEND_CHOICES)
def test_hooks_on_every_block_and_the_final_layer_fire_once_per_forward(backend):
    model = DiT_models["DiT-S/4"](input_size=8, num_classes=10, backend=backend).to(DEVICE)
    calls = []
    modules = [*model.blocks, model.final_layer, model.blocks[0].attn, model.blocks[0].mlp]
    for i, module in enumerate(modules):
        module.register_forward_hook(lambda mod, args, out, i=i: calls.append(i))
    model(*_inputs(model))
    assert sorted(calls) == list(range(len(modules)))
    if backend == "eager":  # the official modules run, the LayerNorms included
        norms = []
        model.blocks[1].norm2.register_forward_hook(lambda *a: norms.append(1))
        model(*_inputs(model))
        assert norms == [1]


@pytest.mark.parametrize("backend", BACKEND_CHOICES)
def test_per_block_wrappers_checkpointing_and_compile(backend):
    from torch.utils.checkpoint import checkpoint

    model = randomize_(DiT_models["DiT-S/4"](input_size=8, num_classes=10, backend=backend)).to(DEVICE).eval()
    inputs = _inputs(model)
    ref = model(*inputs)

    class Checkpointed(torch.nn.Module):  # what FSDP / activation-checkpoint wrappers do to a block
        def __init__(self, block):
            super().__init__()
            self.block = block

        def forward(self, x, c):
            return checkpoint(self.block, x, c, use_reentrant=False)

    wrapped = DiT_models["DiT-S/4"](input_size=8, num_classes=10, backend=backend).to(DEVICE).eval()
    wrapped.load_state_dict(model.state_dict())
    wrapped.blocks = torch.nn.ModuleList([Checkpointed(b) for b in wrapped.blocks])
    assert_close(wrapped(*inputs), ref, what="checkpoint-wrapped blocks")
    torch._dynamo.reset()
    compiled = DiT_models["DiT-S/4"](input_size=8, num_classes=10, backend=backend).to(DEVICE).eval()
    compiled.load_state_dict(model.state_dict())
    for block in compiled.blocks:
        block.compile(backend="aot_eager", fullgraph=True)
    assert_close(compiled(*inputs), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item(), what="per-block torch.compile")


def test_whole_model_compiles_without_graph_breaks():
    model = randomize_(DiT_models["DiT-S/2"](input_size=8, num_classes=10)).eval()
    x, t, y = (v.cpu() for v in _inputs(model))
    torch._dynamo.reset()
    out = torch.compile(model, fullgraph=True, backend="aot_eager")(x, t, y)
    assert_close(out, model(x, t, y), rtol=1e-5, atol=1e-5 * out.abs().max().item(), what="compiled DiT-S/2")


def test_compiled_timestep_embedding_is_the_fast_path(monkeypatch):
    from ditfast._ext import op_available

    if not op_available(torch.device(DEVICE)):
        pytest.skip("ditfast._C has no ops for this device")
    model = randomize_(DiT_models["DiT-S/8"](input_size=8, num_classes=10))
    t = torch.tensor([0.0, 1.0, 250.5, 999.0])
    model.backend = "eager"
    ref = model.t_embedder(t)
    calls = []
    real = ops.timestep_embedding
    monkeypatch.setattr(ops, "timestep_embedding", lambda *a, **k: calls.append(1) or real(*a, **k))
    model.backend = "triton"  # the compiled ops (patch ops, timestep features) on any device
    assert_close(model.t_embedder(t), ref, rtol=1e-4, atol=1e-4, what="compiled timestep embedding in the model")
    assert calls == [1]
