"""The dispatch layer every fast op shares: priority, forcing, aliases, the environment variable,
reasons, and each op's expected choice written out by hand."""

from __future__ import annotations

import pytest
import torch

from ditfast import ops
from ditfast.attention import ATTENTION, AttentionProblem
from ditfast.models import adaln_fused, patch_ops_enabled, timestep_compiled
from ditfast.ops.dispatch import REGISTRY, Backend, BackendError, Dispatcher, OpProblem


class _Fake(Backend):
    device_types = None

    def __init__(self, name, ok_dtypes=None, broken=None):
        self.name, self.dtypes, self.broken = name, ok_dtypes, broken

    def unavailable_reason(self):
        return self.broken


def _toy(monkeypatch=None):
    backends = [_Fake("slow"), _Fake("half-only", ok_dtypes=(torch.float16,)), _Fake("missing", broken="pkg is not installed")]
    return Dispatcher("toy", backends, {"cpu": ["missing", "half-only", "slow"]}, "DITFAST_TOY_BACKEND", ["slow"],
                      aliases={"old": "half-only"})  # fmt: skip


def test_auto_takes_the_first_that_fits_in_priority_order(monkeypatch):
    monkeypatch.delenv("DITFAST_TOY_BACKEND", raising=False)
    toy = _toy()
    assert toy.choose("auto", OpProblem, "cpu", torch.float16) == "half-only"  # "missing" is skipped
    assert toy.choose("auto", OpProblem, "cpu", torch.float32) == "slow"  # half-only declines fp32
    assert toy.choose("auto", OpProblem, "meta", torch.float32) == "slow"  # the default list elsewhere
    assert toy.choose("old", OpProblem, "cpu", torch.float16) == "half-only"  # an alias
    monkeypatch.setenv("DITFAST_TOY_BACKEND", "slow")
    assert toy.choose("auto", OpProblem, "cpu", torch.float16) == "slow"  # the variable forces it
    assert toy.choose("half-only", OpProblem, "cpu", torch.float16) == "half-only"  # an argument wins
    monkeypatch.setenv("DITFAST_TOY_BACKEND", "fastest")
    with pytest.raises(ValueError, match=r"DITFAST_TOY_BACKEND must be 'auto' or one of \['slow', 'half-only', 'missing'\]"):
        toy.choose("auto", OpProblem, "cpu", torch.float16)


def test_forced_and_impossible_requests_list_every_backends_reasons(monkeypatch):
    monkeypatch.delenv("DITFAST_TOY_BACKEND", raising=False)
    toy = _toy()
    with pytest.raises(BackendError) as err:
        toy.choose("half-only", OpProblem, "cpu", torch.float32)
    msg = str(err.value)
    assert msg.startswith("toy backend 'half-only' (set by backend='half-only') cannot run float32 on cpu: dtype float32 is not one of float16")
    assert "\n  missing: pkg is not installed" in msg and "\n  slow: fits" in msg
    with pytest.raises(ValueError, match=r"toy backend must be 'auto' or one of .* \(aliases: old=half-only\), got 'new'"):
        toy.choose("new", OpProblem, "cpu", torch.float32)
    monkeypatch.setitem(toy.priority, "cpu", ["missing"])
    with pytest.raises(BackendError, match="no toy backend can run float32 on cpu") as err:
        toy.choose("auto", OpProblem, "cpu", torch.float32)
    assert "slow: could run, but is not in the cpu priority list ['missing']" in str(err.value)


def test_every_fast_op_is_registered_with_the_expected_auto_choice():
    assert set(REGISTRY) == {"adaln", "attention", "cross-attention", "tmsa", "patch", "timestep"}
    expected_cuda_first = {"adaln": "triton", "patch": "compiled", "timestep": "compiled", "attention": "flash-attn",
                           "cross-attention": "flash-attn", "tmsa": "triton"}
    for op, first in expected_cuda_first.items():
        assert REGISTRY[op].device_priority("cuda")[0] == first
    # on a CPU "auto" is the official math everywhere: written out, not recomputed
    cpu = torch.device("cpu")
    assert adaln_fused("auto", cpu, torch.float32, 384) is False
    assert patch_ops_enabled("auto", cpu) is False and timestep_compiled("auto", cpu) is False
    assert ATTENTION.choose("auto", AttentionProblem, "cpu", torch.float32, 6, 64, False) == "sdpa"
    assert patch_ops_enabled("eager", cpu) is False
    if ops.PATCH.backends["compiled"].not_supported_reasons(OpProblem("cpu")) == []:
        assert patch_ops_enabled("fused", cpu) and timestep_compiled("fused", cpu)


def test_environment_variable_reaches_a_model(monkeypatch):
    monkeypatch.setenv("DITFAST_PATCH_BACKEND", "compiled")
    if ops.PATCH.backends["compiled"].not_supported_reasons(OpProblem("cpu")):
        pytest.skip("ditfast._C has no CPU ops here")
    assert patch_ops_enabled("auto", torch.device("cpu")) is True
    assert patch_ops_enabled("eager", torch.device("cpu")) is False  # an explicit model setting wins
