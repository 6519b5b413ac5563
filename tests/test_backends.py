"""DiT's backend choice: the fused Triton ops against the official eager math, at model level."""

from __future__ import annotations

import pytest
import torch

from ditfast import DiT_models, ops
from ditfast.models import EAGER_OPS, FUSED_OPS, adaln_ops
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


def test_one_gemm_modulations_equal_per_block_and_track_weight_updates():
    model = small_s2()
    c = torch.randn(2, 384, device=DEVICE)
    with torch.no_grad():
        per_block = model.modulations(c)
        stacked = model.modulations(c, one_gemm=True)
        assert len(per_block) == len(stacked) == 13
        for a, b in zip(per_block, stacked):
            assert len(a) == len(b)
            for u, v in zip(a, b):
                assert_close(v, u, what="modulation vector")
        # the inference cache must notice an in-place weight update (an optimizer step, a load)
        model.blocks[3].adaLN_modulation[1].bias.add_(1.0)
        again = model.modulations(c, one_gemm=True)
        assert_close(again[3][0], stacked[3][0] + 1.0, what="cache refreshed after update")
    # while training, gradients reach the per-block weights through the stacked GEMM
    out = model.modulations(c, one_gemm=True)
    out[5][2].sum().backward()
    assert model.blocks[5].adaLN_modulation[1].weight.grad.abs().sum() > 0
    assert model.blocks[4].adaLN_modulation[1].weight.grad.abs().sum() == 0


def test_backend_choice_and_errors(monkeypatch):
    model = DiT_models["DiT-S/8"](input_size=8, num_classes=10, backend="eager")
    assert all(b.backend == "eager" for b in model.blocks)
    assert adaln_ops("auto", torch.device("cpu")) is EAGER_OPS  # CPU: the interpreter is for tests only
    with pytest.raises(ValueError, match="backend must be one of"):
        model.backend = "cuda-graphs"
    monkeypatch.setattr(ops, "triton_status", lambda device: "triton is not importable (test)")
    model.backend = "triton"
    x, t, y = torch.randn(1, 4, 8, 8), torch.zeros(1), torch.zeros(1, dtype=torch.long)
    with pytest.raises(RuntimeError, match=r"backend='triton' cannot run on cpu: triton is not importable \(test\)"):
        model(x, t, y)
    assert adaln_ops("auto", torch.device("cuda")) is EAGER_OPS  # auto never fails: eager when triton can't run


@needs_triton
def test_fused_block_forward_equals_official_block():
    model = small_s2()
    block = model.blocks[0]
    x = torch.randn(2, 16, 384, device=DEVICE)
    c = torch.randn(2, 384, device=DEVICE)
    block.backend = "eager"
    ref = block(x, c)
    block.backend = "triton"
    assert adaln_ops(block.backend, x.device) is FUSED_OPS
    assert_close(block(x, c), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item(), what="fused DiTBlock")
