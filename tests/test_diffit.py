"""DiffiT (ditfast.DiffiT): names and shapes against the release's facts, fp32 equality with an
independent statement of the release's math (random non-zero weights), strict loading of a
state_dict in the release's naming, guidance schedules, checkpoints, Gflops, sampling and training."""

from __future__ import annotations

import inspect
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ditfast import DiT_models, DiffiT, DiffiT_models, Diffit, gflops, load_model, ops, sample
from ditfast.checkpoint import infer_config, is_diffit
from ditfast.cli import main as cli_main
from ditfast.diffit import cfg_schedule_for, power_cosine_scale
from ditfast.engine import SamplingEngine
from ditfast.samplers import make_plan
from conftest import assert_close, max_rel_error, randomize_

D, DEPTH, HEADS, P, SIDE, C, CLASSES = 64, 2, 4, 2, 8, 4, 10  # tiny: quick under the Triton interpreter
W = SIDE // P  # token grid side = attention window
T = W * W
needs_triton = pytest.mark.skipif(ops.triton_status("cpu") is not None, reason=f"Triton kernels unavailable: {ops.triton_status('cpu')}")


def tiny(**kw) -> DiffiT:
    config = dict(input_size=SIDE, patch_size=P, in_channels=C, hidden_size=D, depth=DEPTH, num_heads=HEADS,
                  num_classes=CLASSES)  # fmt: skip
    return DiffiT(**{**config, **kw})


def inputs(B: int = 2, side: int = SIDE):
    t = torch.tensor([3, 700, 999, 250, 500, 0][:B])
    y = torch.tensor([1, CLASSES, 4, 7, 0, 9][:B])
    return torch.randn(B, C, side, side), t, y


# ------------------------------------------------------------------------------------------
# The release's facts, written out: names, shapes, the Swin index, the sin-cos table
# ------------------------------------------------------------------------------------------


def expected_shapes(depth: int, D: int, heads: int, p: int, w: int, C: int = 4, classes: int = 1000, sigma=True) -> dict:
    out = p * p * C * (2 if sigma else 1)
    shapes = {
        "pos_embed": (1, w * w, D), "x_embedder.proj.weight": (D, C, p, p), "x_embedder.proj.bias": (D,),
        "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (classes + 1, D),
        "final_layer.linear.weight": (out, D), "final_layer.linear.bias": (out,),
    }  # fmt: skip
    per_block = {
        "attn.qkv_temb.weight": (3 * D, D), "attn.qkv_temb.bias": (3 * D,),
        "attn.relative_position_bias_table": ((2 * w - 1) ** 2, heads),
        "attn.relative_position_index": (w * w, w * w),
        "attn.qkv.weight": (3 * D, D), "attn.qkv.bias": (3 * D,), "attn.proj.weight": (D, D), "attn.proj.bias": (D,),
        "mlp.fc1.weight": (4 * D, D), "mlp.fc1.bias": (4 * D,), "mlp.fc2.weight": (D, 4 * D), "mlp.fc2.bias": (D,),
    }  # fmt: skip
    for i in range(depth):
        shapes |= {f"blocks.{i}.{k}": v for k, v in per_block.items()}
    return shapes


def swin_index(w: int) -> torch.Tensor:
    """Swin's recipe: pairwise coordinate differences, shifted to start at 0, row offset scaled by 2w-1."""
    coords = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")).flatten(1)  # (2, w*w)
    diff = (coords[:, :, None] - coords[:, None, :]) + (w - 1)  # (2, L, L), each in [0, 2w-2]
    return diff[0] * (2 * w - 1) + diff[1]


def release_pos_embed(D: int, g: int) -> np.ndarray:
    """The release's 2D sin-cos table: meshgrid(w, h); the first D/2 channels from grid[0] (w)."""

    def one(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.stack(np.meshgrid(np.arange(g, dtype=np.float32), np.arange(g, dtype=np.float32)), axis=0)
    return np.concatenate([one(D // 2, grid[0]), one(D // 2, grid[1])], axis=1)


def release_state_dict(depth=DEPTH, D=D, heads=HEADS, p=P, w=W, C=C, classes=CLASSES, seed=0) -> dict:
    """A state_dict in the release's naming with random non-zero weights (the final layer and the
    bias tables too), its fixed pos_embed and Swin index."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in expected_shapes(depth, D, heads, p, w, C, classes).items():
        if name == "pos_embed":
            sd[name] = torch.from_numpy(release_pos_embed(D, w)).float().unsqueeze(0)
        elif name.endswith("relative_position_index"):
            sd[name] = swin_index(w)
        elif name.endswith("relative_position_bias_table"):
            sd[name] = torch.randn(shape, generator=g) * 0.5  # large enough to change the attention
        elif len(shape) >= 2:
            fan_in = math.prod(shape[1:])
            sd[name] = torch.randn(shape, generator=g) * fan_in**-0.5
        else:
            sd[name] = torch.randn(shape, generator=g) * 0.05
    return sd


def release_forward(sd: dict, x, t, y, heads: int) -> torch.Tensor:
    """The release's DiffiT.forward (eval: no label dropout), stated with functional ops on ``sd``."""
    weight = lambda k: sd[k + ".weight"]  # noqa: E731
    lin = lambda h, k: F.linear(h, sd[k + ".weight"], sd[k + ".bias"])  # noqa: E731
    p = weight("x_embedder.proj").shape[-1]
    D = sd["pos_embed"].shape[-1]
    h = F.conv2d(x, weight("x_embedder.proj"), sd["x_embedder.proj.bias"], stride=p).flatten(2).transpose(1, 2) + sd["pos_embed"]
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    c = lin(F.silu(lin(t_freq, "t_embedder.mlp.0")), "t_embedder.mlp.2") + sd["y_embedder.embedding_table.weight"][y]
    B, N, _ = h.shape
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        b = f"blocks.{i}."
        a = F.layer_norm(h, (D,), eps=1e-6)
        qkv = lin(c, b + "attn.qkv_temb").unsqueeze(1) + lin(a, b + "attn.qkv")
        q, k, v = qkv.reshape(B, N, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        s = (q * (D // heads) ** -0.5) @ k.transpose(-2, -1)
        index = sd[b + "attn.relative_position_index"]  # the release reads its buffer
        s = s + sd[b + "attn.relative_position_bias_table"][index.view(-1)].view(N, N, heads).permute(2, 0, 1).unsqueeze(0)
        o = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, N, D)
        h = h + lin(o, b + "attn.proj")
        m = F.layer_norm(h, (D,), eps=1e-6)
        h = h + lin(F.gelu(lin(m, b + "mlp.fc1"), approximate="tanh"), b + "mlp.fc2")
    out = lin(F.silu(F.layer_norm(h, (D,), eps=1e-6)), "final_layer.linear")
    g, c_out = math.isqrt(N), out.shape[-1] // (p * p)
    return out.reshape(B, g, g, p, p, c_out).permute(0, 5, 1, 3, 2, 4).reshape(B, c_out, g * p, g * p)


def release_cfg(sd: dict, x, t, y, heads: int, cfg_scale, input_size: int, steps=1000, scale_pow=4.0):
    """The release's forward_with_cfg: first half duplicated, 3 channels guided; power-cosine scale
    of the first half's t for input_size <= 32, else constant."""
    half = x[: len(x) // 2]
    out = release_forward(sd, torch.cat([half, half]), t, y, heads)
    eps, rest = out[:, :3], out[:, 3:]
    cond, uncond = eps.split(len(eps) // 2)
    if input_size <= 32:
        s = (cfg_scale - 1) * 0.5 * (1 - torch.cos(math.pi * (1 - t / steps) ** scale_pow)) + 1
        s = s[: len(half)].view(-1, 1, 1, 1)
    else:
        s = cfg_scale
    guided = uncond + s * (cond - uncond)
    return torch.cat([torch.cat([guided, guided]), rest], dim=1)


# ------------------------------------------------------------------------------------------
# Constructor, names, shapes, counts
# ------------------------------------------------------------------------------------------


def test_constructor_signature_and_defaults_are_the_releases():
    sig = inspect.signature(DiffiT)
    release = dict(input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=30, num_heads=16, mlp_ratio=4.0,
                   mask_ratio=None, decode_layer=None, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True)  # fmt: skip
    positional = [n for n, p in sig.parameters.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert positional == list(release)
    assert {n: sig.parameters[n].default for n in release} == release
    assert {n for n, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY} == {"backend", "attn_backend"}


def test_xl2_names_shapes_and_parameter_count_against_the_facts():
    with torch.device("meta"):  # no 560M parameters allocated
        model, dit, default = Diffit(), DiT_models["DiT-XL/2"](), DiffiT()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = expected_shapes(28, 1152, 16, 2, 16)
    assert shapes == expected
    assert len(default.blocks) == 30 and len(model.blocks) == 28  # the class default vs the released Diffit()
    buffers = dict(model.named_buffers())
    assert set(buffers) == {f"blocks.{i}.attn.relative_position_index" for i in range(28)}
    assert all(b.dtype == torch.int64 for b in buffers.values())
    assert not model.pos_embed.requires_grad
    # parameters: everything but the index buffers, by the facts' formula
    n_facts = sum(math.prod(s) for k, s in expected.items() if not k.endswith("relative_position_index"))
    n_model = sum(p.numel() for p in model.parameters())
    n_dit = sum(p.numel() for p in dit.parameters())
    assert n_model == n_facts
    ratio = n_model / n_dit
    print(f"DiffiT-XL/2 {n_model:,} parameters vs DiT-XL/2 {n_dit:,}: ratio {ratio:.4f} ({1 - ratio:.1%} fewer)")
    assert 0.82 < ratio < 0.85  # the paper: about 17% fewer (no adaLN)


def test_registry_mirrors_dits_sizes():
    assert set(DiffiT_models) == {n.replace("DiT-", "DiffiT-") for n in DiT_models}
    with torch.device("meta"):
        for name, build in DiffiT_models.items():
            m, d = build(), DiT_models[name.replace("DiffiT-", "DiT-")]()
            assert (len(m.blocks), m.pos_embed.shape[-1], m.num_heads, m.patch_size) == (len(d.blocks), d.pos_embed.shape[-1], d.num_heads, d.patch_size)
            assert m.window_size == 32 // m.patch_size
        xl2 = DiffiT_models["DiffiT-XL/2"]()
    assert {k: v.shape for k, v in xl2.state_dict().items()} == {k: torch.Size(s) for k, s in expected_shapes(28, 1152, 16, 2, 16).items()}


def test_init_follows_the_release():
    model = tiny()
    assert torch.equal(model.blocks[0].attn.relative_position_index, swin_index(W))
    assert torch.allclose(model.pos_embed[0].double(), torch.from_numpy(release_pos_embed(D, W)), atol=1e-6)
    assert not model.final_layer.linear.weight.any() and not model.final_layer.linear.bias.any()
    for block in model.blocks:
        for lin in (block.attn.qkv_temb, block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
            bound = math.sqrt(6 / (lin.in_features + lin.out_features))  # xavier uniform
            assert lin.weight.abs().max() <= bound and lin.weight.abs().max() > 0.5 * bound and not lin.bias.any()
        table = block.attn.relative_position_bias_table
        assert 0.01 < table.std() < 0.03 and table.abs().max() <= 2.0  # trunc-normal std 0.02
    assert abs(model.y_embedder.embedding_table.weight.std() - 0.02) < 0.005
    assert model.y_embedder.embedding_table.num_embeddings == CLASSES + 1
    assert abs(model.t_embedder.mlp[0].weight.std() - 0.02) < 0.003
    assert all(not m.elementwise_affine and m.eps == 1e-6 for m in model.modules() if isinstance(m, torch.nn.LayerNorm))


@pytest.mark.parametrize("kwargs, error", [
    (dict(input_size=9), ValueError), (dict(num_heads=3), ValueError), (dict(hidden_size=66, num_heads=2), ValueError),
    (dict(depth=-1), ValueError), (dict(patch_size=2.0), TypeError), (dict(backend="cuda"), ValueError),
    (dict(attn_backend="flash"), ValueError), (dict(learn_sigma=1), TypeError),
])  # fmt: skip
def test_bad_configs_are_refused_naming_the_argument(kwargs, error):
    with pytest.raises(error):
        tiny(**kwargs)


# ------------------------------------------------------------------------------------------
# Equality with the release's math (fp32, 1e-5), every backend
# ------------------------------------------------------------------------------------------

BACKEND_CASES = [
    pytest.param(dict(backend="eager"), id="eager"),
    pytest.param(dict(backend="auto"), id="auto"),
    pytest.param(dict(backend="eager", attn_backend="sdpa"), id="sdpa"),
    pytest.param(dict(backend="fused"), id="fused", marks=needs_triton),
]


def _loaded(**kw) -> tuple[DiffiT, dict]:
    sd = release_state_dict()
    model = tiny(**kw).eval()
    model.load_state_dict(sd, strict=True)
    return model, sd


@pytest.mark.parametrize("kw", BACKEND_CASES)
def test_forward_matches_the_release_math(kw):
    model, sd = _loaded(**kw)
    x, t, y = inputs(3)
    with torch.no_grad():
        got, want = model(x, t, y), release_forward(sd, x, t, y, HEADS)
    assert want.abs().max() > 0.1  # non-trivial output (non-zero final layer)
    assert max_rel_error(got, want) < 1e-5
    assert_close(got, want, what=f"DiffiT forward {kw}")


@pytest.mark.parametrize("kw", BACKEND_CASES)
@pytest.mark.parametrize("schedule", ["power-cosine", "constant"])
def test_forward_with_cfg_matches_the_release_math(kw, schedule):
    model, sd = _loaded(**kw)
    x, t, y = inputs(4)
    with torch.no_grad():
        got = model.forward_with_cfg(x, t, y, 4.4, cfg_schedule=schedule)
        # the release picks by input size: <= 32 power-cosine; stand in for a 512px model with 33
        want = release_cfg(sd, x, t, y, HEADS, 4.4, SIDE if schedule == "power-cosine" else 33)
        assert_close(got, want, what=f"forward_with_cfg {schedule} {kw}")
        assert_close(model.forward_with_cfg(x, t, y, 4.4, cfg_schedule=schedule, full_batch=False), want[:2], what="first half")
        if kw.get("backend") == "fused":  # (slow under the interpreter; the rest is backend-independent code)
            return
        if schedule == "power-cosine":  # "auto" at latent side 8 is the power-cosine schedule
            assert_close(model.forward_with_cfg(x, t, y, 4.4), want, what="auto")
        # no cfg_scale: the plain forward
        assert_close(model.forward_with_cfg(x, t, y), release_forward(sd, x, t, y, HEADS), what="cfg_scale None")


def test_auto_schedule_is_constant_above_latent_side_32():
    sd = release_state_dict(w=5, p=8, D=32, heads=2)
    model = DiffiT(input_size=40, patch_size=8, hidden_size=32, depth=DEPTH, num_heads=2, num_classes=CLASSES).eval()
    model.load_state_dict(sd, strict=True)
    x, t, y = inputs(4, side=40)
    with torch.no_grad():
        assert_close(model.forward_with_cfg(x, t, y, 1.49), release_cfg(sd, x, t, y, 2, 1.49, 40), what="auto at 40")
        assert_close(model(x, t, y), release_forward(sd, x, t, y, 2), what="forward, window 5")


@needs_triton
def test_fused_backward_matches_eager():
    x, t, y = inputs(2)
    grads = {}
    for backend in ("eager", "fused"):
        model, _ = _loaded(backend=backend)
        model.train()
        model(x, t, y, force_drop_ids=torch.zeros(2, dtype=torch.long)).square().mean().backward()
        grads[backend] = {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
    for name, g in grads["eager"].items():
        assert_close(grads["fused"][name], g, kind="bwd", what=name)


def test_label_dropout_and_force_drop_ids():
    model, sd = _loaded(backend="eager")
    x, t, y = inputs(2)
    with torch.no_grad():
        dropped = model(x, t, y, force_drop_ids=torch.tensor([1, 1]))
        assert_close(dropped, release_forward(sd, x, t, torch.full_like(y, CLASSES), HEADS), what="force_drop_ids")


# ------------------------------------------------------------------------------------------
# The relative position index and the power-cosine schedule
# ------------------------------------------------------------------------------------------


def test_a_non_canonical_relative_position_index_is_refused():
    sd = release_state_dict()
    sd["blocks.1.attn.relative_position_index"] = swin_index(W).flip(0)
    with pytest.raises(ValueError, match="blocks.1.attn.relative_position_index is not the canonical"):
        tiny().load_state_dict(sd, strict=True)
    with pytest.raises(ValueError, match="relative_position_index is not the canonical"):
        load_model(sd)


def test_power_cosine_schedule_values():
    t = torch.tensor([0, 250, 500, 750, 1000])
    got = power_cosine_scale(4.4, t)
    want = [1 + 3.4 * 0.5 * (1 - math.cos(math.pi * (1 - v / 1000) ** 4)) for v in (0, 250, 500, 750, 1000)]
    assert torch.allclose(got.double(), torch.tensor(want, dtype=torch.float64), atol=1e-6)
    assert abs(got[0] - 4.4) < 1e-6 and abs(got[-1] - 1.0) < 1e-6 and abs(got[2] - 1.0326652) < 1e-6
    assert bool((got[1:] <= got[:-1]).all())  # full guidance at the end of sampling (t -> 0), none at the start
    assert torch.allclose(power_cosine_scale(2.0, torch.tensor([400]), diffusion_steps=800, scale_pow=2.0),
                          torch.tensor([1 + 0.5 * (1 - math.cos(math.pi * 0.25))]))  # fmt: skip
    assert cfg_schedule_for(32) == "power-cosine" and cfg_schedule_for(64) == "constant"
    assert cfg_schedule_for(64, "power-cosine") == "power-cosine"
    with pytest.raises(ValueError, match="cfg schedule must be one of"):
        cfg_schedule_for(32, "cosine")


# ------------------------------------------------------------------------------------------
# Unmodulated fused LayerNorm / residual ops (what DiffiT's blocks call)
# ------------------------------------------------------------------------------------------


@needs_triton
def test_unmodulated_layernorm_ops():
    x, r = torch.randn(2, 5, 72, requires_grad=True), torch.randn(2, 5, 72, requires_grad=True)
    h = ops.adaln_layernorm(x, None, None)
    assert_close(h, F.layer_norm(x, (72,), eps=1e-6), what="LN(x)")
    s, h2 = ops.gated_residual_adaln(x, r, None, None, None)
    ref_s = x + r
    assert_close(s, ref_s, what="x + y")
    assert_close(h2, F.layer_norm(ref_s, (72,), eps=1e-6), what="LN(x + y)")
    (h2 * torch.randn_like(h2)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert_close(ops.adaln_layernorm_ref(x, None, None), F.layer_norm(x, (72,), eps=1e-6), what="ref")
    with pytest.raises(ValueError, match="both"):
        ops.adaln_layernorm(x, torch.zeros(2, 72), None)


# ------------------------------------------------------------------------------------------
# Checkpoints: bare state_dict, training checkpoint, safetensors
# ------------------------------------------------------------------------------------------


def test_infer_config_reads_heads_from_the_bias_table():
    sd = release_state_dict()
    assert is_diffit(sd) and not is_diffit(tiny_dit_state_dict())
    config = infer_config(sd)
    assert config == dict(input_size=SIDE, patch_size=P, in_channels=C, hidden_size=D, depth=DEPTH, num_heads=HEADS,
                          class_dropout_prob=0.1, num_classes=CLASSES, learn_sigma=True, mlp_ratio=4.0)  # fmt: skip
    with pytest.raises(ValueError, match="contradicts"):
        infer_config(sd, num_heads=2)


def tiny_dit_state_dict():
    from ditfast import DiT

    return DiT(input_size=SIDE, patch_size=P, hidden_size=D, depth=1, num_heads=2, num_classes=CLASSES).state_dict()


@pytest.mark.parametrize("form", ["bare", "training", "safetensors", "dict"])
def test_load_model_recognises_diffit_checkpoints(tmp_path, form):
    sd = release_state_dict()
    if form == "bare":
        source = tmp_path / "diffit.pt"
        torch.save(sd, source)
    elif form == "training":
        source = tmp_path / "0000010.pt"
        args = {"model": "DiffiT-S/2", "hidden_size": D, "depth": DEPTH, "num_heads": HEADS, "patch_size": P,
                "mlp_ratio": 4.0, "block": "adaLN-Zero", "learn_sigma": True, "class_dropout_prob": 0.1}  # fmt: skip
        torch.save({"model": sd, "ema": sd, "opt": {}, "args": args, "step": 10}, source)
    elif form == "safetensors":
        from safetensors.torch import save_file

        source = tmp_path / "diffit_256.safetensors"
        save_file(sd, str(source))
    else:
        source = sd
    model = load_model(source)
    assert isinstance(model, DiffiT) and not model.training
    assert (len(model.blocks), model.num_heads, model.input_size, model.num_classes) == (DEPTH, HEADS, SIDE, CLASSES)
    x, t, y = inputs(2)
    with torch.no_grad():
        assert_close(model(x, t, y), release_forward(sd, x, t, y, HEADS), what=f"load_model {form}")


def test_load_model_into_a_given_diffit_and_by_name():
    sd = release_state_dict()
    model = load_model(sd, model=tiny())
    assert isinstance(model, DiffiT)
    with pytest.raises(ValueError, match="does not match"):
        load_model(sd, model="DiffiT-S/2")  # 12 blocks of width 384: the error lists the mismatches


# ------------------------------------------------------------------------------------------
# Gflops
# ------------------------------------------------------------------------------------------


def _diffit_macs(depth, D, p, side, C=4, c_out=8) -> int:
    """The counting rule of ditfast.gflops for a DiffiT, written out."""
    T = (side // p) ** 2
    per_block = 3 * D * D + T * D * 3 * D + 2 * T * T * D + T * D * D + 2 * T * D * 4 * D
    return T * D * C * p * p + 256 * D + D * D + depth * per_block + T * D * p * p * c_out


def test_gflops_counts_diffit():
    xl = gflops("DiffiT-XL/2")
    assert xl == _diffit_macs(28, 1152, 2, 32) / 1e9
    with torch.device("meta"):
        assert gflops(Diffit()) == xl
    dit = gflops("DiT-XL/2")
    print(f"Gflops at 256px: DiffiT-XL/2 {xl:.2f}, DiT-XL/2 {dit:.2f}; at 512px DiffiT-XL/2 {gflops('DiffiT-XL/2', 512):.2f}")
    assert abs(xl - dit) < 0.2  # the paper: the same Gflops
    assert gflops("DiffiT-XL/2", 512) == _diffit_macs(28, 1152, 2, 64) / 1e9
    assert gflops(tiny()) == _diffit_macs(DEPTH, D, P, SIDE) / 1e9
    with pytest.raises(ValueError):
        gflops(tiny(), 256)
    with pytest.raises(ValueError):
        gflops("DiffiT-XL/2", block="adaLN")


# ------------------------------------------------------------------------------------------
# Sampling: ditfast.sample, the engine's timesteps, the CLI
# ------------------------------------------------------------------------------------------


class _RecordingDiffiT(DiffiT):
    """Records the timesteps forward_with_cfg is called with."""

    seen: list

    def forward_with_cfg(self, x, t, y, *args, **kwargs):
        self.seen.append((t.clone(), kwargs.get("cfg_schedule")))
        return super().forward_with_cfg(x, t, y, *args, **kwargs)


def test_the_engine_passes_original_timesteps_and_the_schedule():
    model = randomize_(_RecordingDiffiT(input_size=SIDE, patch_size=P, in_channels=C, hidden_size=D, depth=1,
                                        num_heads=HEADS, num_classes=CLASSES)).eval()  # fmt: skip
    model.seen = []
    plan = make_plan("ddpm", 5, learned_sigma=True)
    engine = SamplingEngine(model, plan, batch_size=2, cfg_scale=4.4, cfg_schedule="power-cosine")
    engine.run(torch.randn(2, C, SIDE, SIDE), torch.tensor([1, 2]), torch.randn(5, 2, C, SIDE, SIDE))
    seen_t = torch.stack([t[0] for t, _ in model.seen])
    assert torch.equal(seen_t, plan.timesteps) and int(plan.timesteps[0]) > 900  # the 0..999 scale, not 0..4
    assert {s for _, s in model.seen} == {"power-cosine"}
    from ditfast import DiT

    with pytest.raises(ValueError, match="DiffiT's"):
        SamplingEngine(DiT(input_size=SIDE, hidden_size=D, depth=1, num_heads=2, num_classes=CLASSES), plan,
                       batch_size=2, cfg_scale=2.0, cfg_schedule="power-cosine")  # fmt: skip


def test_sample_with_diffit_on_cpu():
    model = randomize_(tiny(depth=1)).eval()
    common = dict(labels=[1, 2, 3], steps=3, cfg_scale=4.4, batch_size=2, device="cpu")
    runs = {s: sample(model, cfg_schedule=s, **common) for s in ("auto", "power-cosine", "constant")}
    for out in runs.values():
        assert out.latents.shape == (3, C, SIDE, SIDE) and torch.isfinite(out.latents).all() and out.images is None
    assert torch.equal(runs["auto"].latents, runs["power-cosine"].latents)  # latent side 8 <= 32
    assert not torch.allclose(runs["power-cosine"].latents, runs["constant"].latents)
    # batch-size independence holds for DiffiT too (per-sample scale from per-sample t)
    assert_close(sample(model, cfg_schedule="power-cosine", **{**common, "batch_size": 3}).latents,
                 runs["power-cosine"].latents, rtol=1e-4, atol=1e-4, what="batch size")  # fmt: skip
    by_name = sample("DiffiT-S/8", num_samples=1, steps=2, cfg_scale=1.0, input_size=16, num_classes=5, device="cpu")
    assert by_name.latents.shape == (1, 4, 16, 16)


def test_sample_cli_with_a_diffit_checkpoint(tmp_path, capsys):
    from safetensors.torch import save_file

    ckpt = tmp_path / "diffit_256.safetensors"
    save_file(release_state_dict(), str(ckpt))
    out = tmp_path / "samples"
    argv = ["sample", "--model", "DiffiT-XL/2", "--ckpt", str(ckpt), "--num-samples", "2", "--steps", "3"]
    # a registry name whose sizes do not fit the file is refused with the mismatches
    assert cli_main(argv + ["--out", str(out / "bad"), "--no-progress"]) == 2
    argv = ["sample", "--ckpt", str(ckpt), "--num-samples", "2", "--steps", "3", "--cfg-scale", "4.4", "--cfg-schedule",
            "power-cosine", "--batch-size", "2", "--out", str(out), "--no-progress", "--device", "cpu"]  # fmt: skip
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "DiffiT (depth 2" in printed and "cfg 4.4 (power-cosine)" in printed
    with np.load(out / "samples.npz") as f:
        assert f["arr_0"].shape == (2, C, SIDE, SIDE) and np.isfinite(f["arr_0"]).all()
    assert json.loads((out / "sample_config.json").read_text())["cfg_schedule"] == "power-cosine"


# ------------------------------------------------------------------------------------------
# Training through the CLI, then sampling the checkpoint
# ------------------------------------------------------------------------------------------


def test_train_a_tiny_diffit_then_sample(tmp_path, capsys):
    run, export = tmp_path / "run", tmp_path / "m.safetensors"
    argv = ["train", "--model", "DiffiT-S/4", "--image-size", "8", "--patch-size", "2", "--hidden-size", "48",
            "--depth", "2", "--num-heads", "3", "--global-batch", "8", "--steps", "3", "--log-every", "1",
            "--out", str(run), "--export", str(export), "--no-progress"]  # fmt: skip
    assert cli_main(argv) == 0
    assert "training DiffiT (depth 2, hidden 48, 3 heads, patch 2" in capsys.readouterr().out
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all(math.isfinite(r["loss"]) for r in log)
    ckpt = torch.load(run / "checkpoints" / "0000003.pt", weights_only=True)
    assert "blocks.1.attn.relative_position_bias_table" in ckpt["ema"]
    for source in (run / "checkpoints" / "0000003.pt", export):
        model = load_model(source)
        assert isinstance(model, DiffiT) and (len(model.blocks), model.num_heads, model.patch_size) == (2, 3, 2)
    assert not torch.equal(ckpt["model"]["final_layer.linear.weight"], torch.zeros_like(ckpt["model"]["final_layer.linear.weight"]))
    out = tmp_path / "samples"
    argv = ["sample", "--ckpt", str(run / "checkpoints" / "0000003.pt"), "--num-samples", "2", "--steps", "2",
            "--cfg-scale", "1.5", "--guide-all-channels", "--batch-size", "2", "--out", str(out), "--no-progress", "--no-png"]  # fmt: skip
    assert cli_main(argv) == 0
    with np.load(out / "samples.npz") as f:
        assert f["arr_0"].shape == (2, 8, 8, 1) and f["arr_0"].dtype == np.uint8
    # a DiT block design with a DiffiT is refused
    assert cli_main(["train", "--model", "DiffiT-S/2", "--block", "adaLN", "--steps", "1", "--out", str(tmp_path / "x"),
                     "--no-progress"]) == 2  # fmt: skip
