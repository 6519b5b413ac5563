"""The DiT paper's four block designs (DiT(block=...)): parameters, fused = eager, conditioning,
initialisation, Gflops, checkpoints, the CLI and cross-attention's dispatch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ditfast import DiT, DiT_models, gflops, load_model, ops
from ditfast import attention as attn
from ditfast.checkpoint import infer_block
from ditfast.cli import main as cli_main
from conftest import assert_close, assert_same_training_signal, randomize_

BLOCK_NAMES = ["adaLN-Zero", "adaLN", "cross-attention", "in-context"]
D, DEPTH, HEADS, P, SIDE, C, CLASSES = 64, 2, 2, 2, 8, 4, 10  # tiny: quick under the Triton interpreter
T = (SIDE // P) ** 2
needs_triton = pytest.mark.skipif(ops.triton_status("cpu") is not None, reason=f"Triton kernels unavailable: {ops.triton_status('cpu')}")


def tiny(block: str, **kw) -> DiT:
    config = dict(input_size=SIDE, patch_size=P, in_channels=C, hidden_size=D, depth=DEPTH, num_heads=HEADS,
                  num_classes=CLASSES)  # fmt: skip
    return DiT(**{**config, **kw}, block=block)


def inputs(B: int = 2):
    return torch.randn(B, C, SIDE, SIDE), torch.tensor([3, 700, 999][:B]), torch.tensor([1, CLASSES, 4][:B])


# ------------------------------------------------------------------------------------------
# Names, shapes and counts, written out from the paper's description of each design
# ------------------------------------------------------------------------------------------


def expected_shapes(block: str, depth: int, D: int, p: int, T: int, C: int = 4, classes: int = 1000) -> dict:
    shapes = {
        "pos_embed": (1, T, D), "x_embedder.proj.weight": (D, C, p, p), "x_embedder.proj.bias": (D,),
        "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (classes + 1, D),
        "final_layer.linear.weight": (p * p * 2 * C, D), "final_layer.linear.bias": (p * p * 2 * C,),
    }  # fmt: skip
    if block in ("adaLN-Zero", "adaLN"):  # adaptive final LayerNorm: shift, scale
        shapes |= {"final_layer.adaLN_modulation.1.weight": (2 * D, D), "final_layer.adaLN_modulation.1.bias": (2 * D,)}
    else:  # a standard affine LayerNorm
        shapes |= {"final_layer.norm_final.weight": (D,), "final_layer.norm_final.bias": (D,)}
    per_block = {
        "attn.qkv.weight": (3 * D, D), "attn.qkv.bias": (3 * D,), "attn.proj.weight": (D, D), "attn.proj.bias": (D,),
        "mlp.fc1.weight": (4 * D, D), "mlp.fc1.bias": (4 * D,), "mlp.fc2.weight": (D, 4 * D), "mlp.fc2.bias": (D,),
    }  # fmt: skip
    vectors = {"adaLN-Zero": 6, "adaLN": 4}.get(block)  # (B, D) vectors regressed from c per block
    if vectors:
        per_block |= {"adaLN_modulation.1.weight": (vectors * D, D), "adaLN_modulation.1.bias": (vectors * D,)}
    else:
        per_block |= {f"{norm}.{w}": (D,) for norm in ("norm1", "norm2") for w in ("weight", "bias")}
    if block == "cross-attention":
        per_block |= {
            "norm_cross.weight": (D,), "norm_cross.bias": (D,),
            "cross_attn.q.weight": (D, D), "cross_attn.q.bias": (D,),
            "cross_attn.kv.weight": (2 * D, D), "cross_attn.kv.bias": (2 * D,),
            "cross_attn.proj.weight": (D, D), "cross_attn.proj.bias": (D,),
        }  # fmt: skip
    for i in range(depth):
        shapes |= {f"blocks.{i}.{name}": shape for name, shape in per_block.items()}
    return shapes


@pytest.mark.parametrize("block", BLOCK_NAMES)
def test_parameter_names_and_shapes(block):
    model = tiny(block)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected_shapes(block, DEPTH, D, P, T, C, CLASSES)
    assert model.block == block and not model.pos_embed.requires_grad


def test_parameter_counts_of_xl2_against_a_count_by_hand():
    D, L = 1152, 28
    official = 675_129_632  # DiT-XL/2 256px (adaLN-Zero), counting pos_embed
    # from adaLN-Zero: adaLN has 4D instead of 6D modulation outputs per block; in-context has no
    # modulation at all (blocks and final layer) but two affine LayerNorms per block and one at the
    # end; cross-attention adds to in-context per block q, kv, proj and a third affine LayerNorm
    adaln = official - L * (2 * D * D + 2 * D)
    in_context = official - L * (6 * D * D + 6 * D) + L * 4 * D - (2 * D * D + 2 * D) + 2 * D
    cross = in_context + L * ((D * D + D) + (2 * D * D + 2 * D) + (D * D + D) + 2 * D)
    expected = {"adaLN-Zero": official, "adaLN": adaln, "in-context": in_context, "cross-attention": cross}
    for block, count in expected.items():
        with torch.device("meta"):
            model = DiT_models["DiT-XL/2"](block=block)
        assert sum(p.numel() for p in model.parameters()) == count, block


def test_unknown_block_is_refused():
    with pytest.raises(ValueError, match=r"block must be one of 'adaLN-Zero', 'adaLN', 'cross-attention', 'in-context'; got 'adaLN-zero'"):
        tiny("adaLN-zero")


# ------------------------------------------------------------------------------------------
# The fused path equals the eager one, forward and backward, per design
# ------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("block", BLOCK_NAMES)
def test_fused_equals_eager_outputs_and_parameter_gradients(block):
    model = randomize_(tiny(block)).eval()  # random weights everywhere, zero-initialised ones too
    assert_same_training_signal(model, inputs(), "backend", "eager", "fused", f"{block} fused")


@needs_triton
def test_ungated_kernels_do_not_read_a_gate_or_keep_the_sublayer_output(monkeypatch):
    """The adaLN block's fused path: the residual op gets gate=None (no vector of ones) and its
    autograd saves neither the gate nor the sublayer output y."""
    seen = []
    real = torch.ops.ditfast.adaln_fwd

    def spy(x, y, gate, *rest):
        seen.append((y is not None, gate is not None))
        return real(x, y, gate, *rest)

    monkeypatch.setattr(torch.ops.ditfast, "adaln_fwd", spy)
    block = randomize_(tiny("adaLN", backend="fused")).blocks[0]
    x, c = torch.randn(2, T, D, requires_grad=True), torch.randn(2, D)
    block(x, c).sum().backward()
    assert seen == [(False, False), (True, False)]  # norm1 + modulation; residual (no gate) + norm2


# ------------------------------------------------------------------------------------------
# How each design conditions, and how it starts
# ------------------------------------------------------------------------------------------


def record(module: torch.nn.Module, seen: dict, key: str, pick) -> None:
    """seen[key] = pick(args, output) of the module's first forward."""

    def hook(mod, args, out):
        seen.setdefault(key, pick(args, out))

    module.register_forward_hook(hook)


@pytest.mark.parametrize("backend", ["eager", pytest.param("fused", marks=needs_triton)])
def test_in_context_appends_and_drops_exactly_the_two_conditioning_tokens(backend):
    model = randomize_(tiny("in-context", backend=backend)).eval()
    seen = {}
    record(model.blocks[0], seen, "first_in", lambda args, out: args[0])
    record(model.blocks[-1], seen, "last_out", lambda args, out: out)
    record(model.final_layer, seen, "final_in", lambda args, out: args[0])
    x, t, y = inputs()
    with torch.no_grad():
        model(x, t, y)
        tokens = model.x_embedder(x) + model.pos_embed
        t_emb, y_emb = model.t_embedder(t), model.y_embedder(y, False)
    assert seen["first_in"].shape == (2, T + 2, D)
    assert_close(seen["first_in"][:, :T], tokens, what="image tokens")  # (fused: through ops.patch_embed), then t and y
    assert torch.equal(seen["first_in"][:, T], t_emb) and torch.equal(seen["first_in"][:, T + 1], y_emb)
    assert seen["final_in"].shape == (2, T, D)
    assert torch.equal(seen["final_in"], seen["last_out"][:, :T])


def test_cross_attention_blocks_attend_to_t_and_y():
    model = randomize_(tiny("cross-attention")).eval()
    seen = {}
    record(model.blocks[0].cross_attn, seen, "cond", lambda args, out: args[1])
    x, t, y = inputs()
    with torch.no_grad():
        model(x, t, y)
        assert torch.equal(seen["cond"], torch.stack([model.t_embedder(t), model.y_embedder(y, False)], dim=1))


@pytest.mark.parametrize("backend", ["eager", pytest.param("fused", marks=needs_triton)])
def test_zero_initialised_adaln_zero_blocks_are_the_identity(backend):
    model = tiny("adaLN-Zero", backend=backend)  # the official init, untouched
    x, c = torch.randn(2, T, D), torch.randn(2, D)
    with torch.no_grad():
        for block in model.blocks:
            assert torch.equal(block(x, c), x)
        # adaLN keeps the default init of its modulation (the paper zero-initialises only adaLN-Zero)
        other = tiny("adaLN", backend=backend)
        assert other.blocks[0].adaLN_modulation[-1].weight.abs().max() > 0
        assert not torch.allclose(other.blocks[0](x, c), x)
        # every design starts out predicting zero (the zero final linear layer)
        for block in BLOCK_NAMES:
            assert torch.equal(tiny(block, backend=backend)(*inputs()), torch.zeros(2, 2 * C, SIDE, SIDE))


# ------------------------------------------------------------------------------------------
# Gflops
# ------------------------------------------------------------------------------------------

PAPER_XL2_256 = {"in-context": 119.4, "cross-attention": 137.6, "adaLN": 118.6, "adaLN-Zero": 118.6}  # Figure 5


@pytest.mark.parametrize("block", BLOCK_NAMES)
def test_gflops_match_the_paper(block):
    assert abs(gflops("DiT-XL/2", block=block) - PAPER_XL2_256[block]) <= 3e-3 * PAPER_XL2_256[block]
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"](block=block)
    assert gflops(model) == gflops("DiT-XL/2", block=block)


def test_gflops_by_hand_for_a_tiny_model():
    embed = T * D * C * P * P + 256 * D + D * D  # patch embedding, timestep MLP
    out = T * D * P * P * 2 * C  # final linear
    attention = lambda n: n * D * 3 * D + 2 * n * n * D + n * D * D  # noqa: E731  qkv, QK^T and AV, proj
    mlp = lambda n: 2 * n * D * 4 * D  # noqa: E731
    expected = {
        "adaLN-Zero": embed + DEPTH * (6 * D * D + attention(T) + mlp(T)) + 2 * D * D + out,
        "adaLN": embed + DEPTH * (4 * D * D + attention(T) + mlp(T)) + 2 * D * D + out,
        "in-context": embed + DEPTH * (attention(T + 2) + mlp(T + 2)) + out,
        "cross-attention": embed + DEPTH * (attention(T) + (T * D * D + 2 * 2 * D * D + 2 * T * 2 * D + T * D * D) + mlp(T)) + out,
    }
    for block, macs in expected.items():
        assert gflops(tiny(block)) * 1e9 == pytest.approx(macs, rel=1e-12), block
    with pytest.raises(ValueError, match="block must be one of"):
        gflops("DiT-XL/2", block="zero")
    with pytest.raises(ValueError, match="own input size and block"):
        gflops(tiny("adaLN"), block="adaLN")


# ------------------------------------------------------------------------------------------
# Checkpoints: the design is inferred from the tensors, and exports record it
# ------------------------------------------------------------------------------------------


def _same_outputs(a: DiT, b: DiT) -> None:
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.equal(a(x, t, y), b(x, t, y))


@pytest.mark.parametrize("block", BLOCK_NAMES)
def test_load_model_round_trip(tmp_path, block):
    from safetensors import safe_open
    from ditfast.train import export_safetensors

    source = randomize_(tiny(block)).eval()
    assert infer_block(source.state_dict()) == block
    torch.save(source.state_dict(), tmp_path / "m.pt")
    loaded = load_model(tmp_path / "m.pt", num_heads=HEADS)
    assert loaded.block == block
    _same_outputs(loaded, source)
    config = dict(input_size=SIDE, patch_size=P, in_channels=C, hidden_size=D, depth=DEPTH, num_heads=HEADS,
                  num_classes=CLASSES, block=block)  # fmt: skip
    export_safetensors(source, config, str(tmp_path / "m.safetensors"))
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["ditfast_config"])["block"] == block
    loaded = load_model(tmp_path / "m.safetensors")
    assert loaded.block == block
    _same_outputs(loaded, source)


def test_infer_block_edge_cases():
    with torch.device("meta"):
        assert infer_block(tiny("adaLN", depth=0).state_dict()) == "adaLN-Zero"  # same tensors, same function
        assert infer_block(tiny("cross-attention", depth=0).state_dict()) == "in-context"
        odd = tiny("adaLN").state_dict()
    odd["blocks.0.adaLN_modulation.1.weight"] = torch.empty(5 * D, D)
    with pytest.raises(ValueError, match=r"expected \(6D, D\) \(adaLN-Zero\) or \(4D, D\) \(adaLN\)"):
        infer_block(odd)
    # a registry name with an inferred design
    with torch.device("meta"):
        s8 = DiT_models["DiT-S/8"](input_size=8, num_classes=CLASSES, block="in-context").state_dict()
    assert load_model({k: torch.zeros(v.shape) for k, v in s8.items()}, model="DiT-S/8").block == "in-context"


# ------------------------------------------------------------------------------------------
# The CLI: ditfast train --block, then ditfast sample --ckpt
# ------------------------------------------------------------------------------------------


def test_train_then_sample_a_cross_attention_model(tmp_path, capsys):
    run, export = tmp_path / "run", tmp_path / "m.safetensors"
    argv = ["train", "--block", "cross-attention", "--image-size", "8", "--patch-size", "2", "--hidden-size", "64",
            "--depth", "2", "--num-heads", "1", "--global-batch", "8", "--steps", "2", "--log-every", "1",
            "--out", str(run), "--export", str(export), "--no-progress"]  # fmt: skip
    assert cli_main(argv) == 0
    assert "cross-attention blocks" in capsys.readouterr().out
    ckpt = torch.load(run / "checkpoints" / "0000002.pt", weights_only=True)
    assert ckpt["args"]["block"] == "cross-attention" and "blocks.0.cross_attn.kv.weight" in ckpt["ema"]
    assert load_model(export).block == "cross-attention"
    out = tmp_path / "samples"
    argv = ["sample", "--ckpt", str(run / "checkpoints" / "0000002.pt"), "--num-samples", "2", "--sampler", "ddim",
            "--steps", "2", "--cfg-scale", "1.5", "--guide-all-channels", "--batch-size", "2", "--out", str(out), "--no-progress", "--no-png"]  # fmt: skip
    assert cli_main(argv) == 0
    with np.load(out / "samples.npz") as f:
        assert f["arr_0"].shape == (2, 8, 8, 1) and f["arr_0"].dtype == np.uint8
    # a design name the trainer does not know is refused by argparse, listing the four
    assert cli_main(["train", "--block", "adaln-zero"]) == 2
    assert "invalid choice: 'adaln-zero'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# Cross-attention's dispatch
# ------------------------------------------------------------------------------------------


def cross_inputs(dtype=torch.float32, B=2, N=5, M=2, H=2, Dh=8):
    q = torch.randn(B, N, H * Dh, dtype=dtype, requires_grad=True)
    kv = torch.randn(B, M, 2 * H * Dh, dtype=dtype, requires_grad=True)
    return q, kv, H


@pytest.mark.parametrize("name", ["sdpa", "sdpa-math"])
def test_cpu_cross_attention_backends_forward_backward_against_fp64(name):
    q, kv, H = cross_inputs()
    out = attn.cross_attention(q, kv, H, backend=name)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, kv), grad)
    q64, kv64 = (t.detach().double().requires_grad_() for t in (q, kv))
    ref = attn.cross_attention_ref(q64, kv64, H)
    want = torch.autograd.grad(ref, (q64, kv64), grad.double())
    assert_close(out, ref.float(), what=f"{name} forward")
    for g, w, what in zip(got, want, ("dq", "dkv")):
        assert_close(g, w.float(), kind="bwd", what=f"{name} {what}")


def test_cross_attention_ref_is_softmax_over_the_keys_per_head():
    q, kv, H = cross_inputs(torch.float64, B=1, N=3, M=2, H=2, Dh=4)
    k, v = kv[0, :, :8], kv[0, :, 8:]
    for h in range(H):
        cols = slice(4 * h, 4 * h + 4)
        weights = torch.softmax(q[0, :, cols] @ k[:, cols].T / 2.0, dim=-1)  # scale 4**-0.5
        assert_close(attn.cross_attention_ref(q, kv, H)[0, :, cols], weights @ v[:, cols], what=f"head {h}")


def test_cross_attention_dispatch_and_reasons(monkeypatch):
    q, kv, H = cross_inputs()
    assert attn.select_cross_backend(q, kv, H).name == "sdpa"  # CPU auto: torch's own SDPA call
    assert "triton" not in attn.CROSS_PRIORITY["cuda"] and attn.CROSS_PRIORITY["cuda"][0] == "flash-attn"
    with pytest.raises(attn.AttentionBackendError, match="cross-attention backend 'triton'") as err:
        attn.cross_attention(q, kv, H, backend="triton")
    assert "reads q, k and v from one packed qkv tensor of the same tokens" in str(err.value)
    assert "\n  sdpa: fits" in str(err.value)  # and every other backend's verdict
    described = attn.CROSS_ATTENTION.describe("cpu")
    assert described["triton"].startswith("not usable: ditfast's kernel reads q, k and v from one packed qkv")
    assert described["sdpa"].startswith("usable on cpu")
    # the self-attention dispatcher's triton entry is unaffected
    assert "packed qkv" not in attn.ATTENTION.describe("cpu")["triton"]
    monkeypatch.setenv("DITFAST_CROSS_ATTN_BACKEND", "sdpa-math")
    assert attn.select_cross_backend(q, kv, H).name == "sdpa-math"
    from ditfast.info import collect

    info = collect()
    assert info["cross-attention triton"].startswith("not usable") and "cross-attention auto order" in info


def test_cross_attention_bad_inputs():
    q, kv, H = cross_inputs()
    with pytest.raises(ValueError, match=r"kv must be \(B, M, 2\*16\)"):
        attn.cross_attention(q, kv[..., :16], H)
    with pytest.raises(ValueError, match="positive multiple of num_heads 3"):
        attn.cross_attention(q, kv, 3)
    with pytest.raises(ValueError, match="q must be a floating-point 3-D tensor"):
        attn.cross_attention(q[0], kv, H)


def test_dit_attn_backend_reaches_the_cross_attention_layers():
    model = tiny("cross-attention", attn_backend="sdpa-math")
    assert {b.cross_attn.backend for b in model.blocks} == {"sdpa-math"}
    model.attn_backend = "triton"  # a self-attention backend that cannot run cross-attention
    assert {b.cross_attn.backend for b in model.blocks} == {"triton"}
    with pytest.raises(attn.AttentionBackendError, match="cross-attention backend 'triton'"):
        model.blocks[0].cross_attn(torch.randn(2, T, D), torch.randn(2, 2, D))
