"""The compiled op ditfast::timestep_embedding (CPU here; CUDA on a GPU machine)."""

from __future__ import annotations

import warnings

import pytest
import torch

from ditfast import ops
from ditfast._ext import extension_loaded
from conftest import assert_close, expect_extension

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

needs_ext = pytest.mark.skipif(not extension_loaded(), reason="ditfast._C is not built in this environment")


def test_extension_present_where_ci_expects_it():
    if not expect_extension():
        pytest.skip("DITFAST_EXPECT_EXT is not set: the extension is optional here")
    assert extension_loaded(), "CI built ditfast._C, but it does not load"


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dim", [256, 255, 3, 2])
@pytest.mark.parametrize("tdtype", [torch.int64, torch.float32])
def test_matches_reference(device, dim, tdtype):
    t = torch.cat([torch.tensor([0.0, 1.0, 999.0]), torch.rand(29) * 1000]).to(tdtype).to(device)
    out = torch.ops.ditfast.timestep_embedding(t, dim, 10000.0)
    ref = ops.timestep_embedding_ref(t.double(), dim).to(device)
    # args up to ~1000 rad: float32 rounding of the argument dominates the error
    assert_close(out, ref, rtol=0, atol=2e-4, what=f"timestep_embedding dim={dim}")
    # fp64 reference of the math itself, to show the op is at least as accurate as the float32 reference
    half = dim // 2
    freqs = torch.exp(-torch.log(torch.tensor(10000.0, dtype=torch.float64)) * torch.arange(half, dtype=torch.float64) / half)
    args = t.double().cpu()[:, None] * freqs
    exact = torch.cat([torch.cos(args), torch.sin(args), torch.zeros(t.shape[0], dim - 2 * half, dtype=torch.float64)], 1)
    err_op = (out.double().cpu() - exact).abs().max().item()
    err_ref = (ops.timestep_embedding_ref(t, dim).double().cpu() - exact).abs().max().item()
    assert err_op <= 2 * err_ref + 1e-6


@needs_ext
def test_opcheck_and_compile():
    t = torch.tensor([1, 20, 300])
    torch.library.opcheck(torch.ops.ditfast.timestep_embedding.default, (t, 16, 10000.0))
    compiled = torch.compile(lambda t: ops.timestep_embedding(t, 16) * 2, fullgraph=True, backend="eager")
    assert_close(compiled(t), ops.timestep_embedding_ref(t, 16) * 2, rtol=0, atol=1e-5)


def test_fallback_warns_once_and_matches(monkeypatch):
    import ditfast._ext as ext

    monkeypatch.setattr(ext, "_WARNED", set())
    monkeypatch.setattr(ops.timestep, "op_available", lambda device: False)
    t = torch.tensor([5, 6])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = ops.timestep_embedding(t, 8)
        b = ops.timestep_embedding(t, 8)
    assert sum("pure-PyTorch fallback" in str(w.message) for w in caught) == 1
    assert torch.equal(a, ops.timestep_embedding_ref(t, 8)) and torch.equal(a, b)


def test_bad_arguments():
    with pytest.raises(ValueError, match="1-D"):
        ops.timestep_embedding(torch.zeros(2, 2), 8)
    with pytest.raises(ValueError, match="positive"):
        ops.timestep_embedding(torch.zeros(2), 0)
