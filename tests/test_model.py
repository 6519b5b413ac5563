"""ditfast.DiT against the published DiT's facts: names, shapes, initialisation and exact math."""

from __future__ import annotations

import math

import pytest
import torch

import ditfast
from ditfast import DiT, DiT_models
from conftest import assert_close, max_rel_error, randomize_

# ------------------------------------------------------------------------------------------
# An independent, plain statement of the official DiT forward (from the reference facts),
# written with explicit reshapes and matmuls instead of the model's modules.
# ------------------------------------------------------------------------------------------


def ref_pos_embed(D: int, G: int, dtype=torch.float64) -> torch.Tensor:
    quarter = D // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    out = torch.empty(G * G, D, dtype=torch.float64)
    for h in range(G):
        for w in range(G):
            tok = h * G + w
            out[tok, :quarter] = torch.sin(w * omega)
            out[tok, quarter : 2 * quarter] = torch.cos(w * omega)
            out[tok, 2 * quarter : 3 * quarter] = torch.sin(h * omega)
            out[tok, 3 * quarter :] = torch.cos(h * omega)
    return out.to(dtype)


def ref_t_freq(t: torch.Tensor, dtype) -> torch.Tensor:
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1).to(dtype)


def ref_layernorm(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-6)


def ref_gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def ref_forward(sd: dict, cfg: dict, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The official forward in eval mode, stated from the facts, in x's dtype."""
    dt = x.dtype
    W = {k: v.to(dt) for k, v in sd.items()}
    B, C, S, _ = x.shape
    p, D, H = cfg["patch_size"], cfg["hidden_size"], cfg["num_heads"]
    G, Dh = S // p, D // H
    T = G * G
    # patchify: token h*G+w holds x[:, :, h*p:(h+1)*p, w*p:(w+1)*p] flattened as (c, kh, kw)
    patches = x.reshape(B, C, G, p, G, p).permute(0, 2, 4, 1, 3, 5).reshape(B, T, C * p * p)
    h = patches @ W["x_embedder.proj.weight"].reshape(D, -1).T + W["x_embedder.proj.bias"]
    h = h + W["pos_embed"]
    silu = torch.nn.functional.silu
    tf = ref_t_freq(t, dt)
    temb = silu(tf @ W["t_embedder.mlp.0.weight"].T + W["t_embedder.mlp.0.bias"])
    temb = temb @ W["t_embedder.mlp.2.weight"].T + W["t_embedder.mlp.2.bias"]
    c = temb + W["y_embedder.embedding_table.weight"][y]
    for i in range(cfg["depth"]):
        pre = f"blocks.{i}."
        mod = silu(c) @ W[pre + "adaLN_modulation.1.weight"].T + W[pre + "adaLN_modulation.1.bias"]
        sh1, sc1, g1, sh2, sc2, g2 = (mod[:, j * D : (j + 1) * D, None].transpose(1, 2) for j in range(6))
        a = ref_layernorm(h) * (1 + sc1) + sh1
        qkv = a @ W[pre + "attn.qkv.weight"].T + W[pre + "attn.qkv.bias"]  # (B, T, 3D) = [q|k|v]
        q, k, v = (qkv[..., j * D : (j + 1) * D].reshape(B, T, H, Dh).transpose(1, 2) for j in range(3))
        att = torch.softmax((q @ k.transpose(-1, -2)) * Dh**-0.5, dim=-1) @ v  # (B, H, T, Dh)
        att = att.transpose(1, 2).reshape(B, T, D) @ W[pre + "attn.proj.weight"].T + W[pre + "attn.proj.bias"]
        h = h + g1 * att
        m = ref_layernorm(h) * (1 + sc2) + sh2
        m = ref_gelu_tanh(m @ W[pre + "mlp.fc1.weight"].T + W[pre + "mlp.fc1.bias"])
        h = h + g2 * (m @ W[pre + "mlp.fc2.weight"].T + W[pre + "mlp.fc2.bias"])
    mod = silu(c) @ W["final_layer.adaLN_modulation.1.weight"].T + W["final_layer.adaLN_modulation.1.bias"]
    sh, sc = mod[:, None, :D], mod[:, None, D:]
    out = (ref_layernorm(h) * (1 + sc) + sh) @ W["final_layer.linear.weight"].T + W["final_layer.linear.bias"]
    Co = out.shape[-1] // (p * p)
    img = torch.empty(B, Co, S, S, dtype=dt)
    for hh in range(G):
        for ww in range(G):
            tok = out[:, hh * G + ww].reshape(B, p, p, Co)  # channel order (p, q, c)
            img[:, :, hh * p : (hh + 1) * p, ww * p : (ww + 1) * p] = tok.permute(0, 3, 1, 2)
    return img


# ------------------------------------------------------------------------------------------
# Names, shapes and counts
# ------------------------------------------------------------------------------------------

CONFIGS = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}


def expected_shapes(depth, D, p, input_size=32, C=4, classes=1000, learn_sigma=True):
    Co = 2 * C if learn_sigma else C
    T = (input_size // p) ** 2
    shapes = {
        "pos_embed": (1, T, D),
        "x_embedder.proj.weight": (D, C, p, p),
        "x_embedder.proj.bias": (D,),
        "t_embedder.mlp.0.weight": (D, 256),
        "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D),
        "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (classes + 1, D),
        "final_layer.linear.weight": (p * p * Co, D),
        "final_layer.linear.bias": (p * p * Co,),
        "final_layer.adaLN_modulation.1.weight": (2 * D, D),
        "final_layer.adaLN_modulation.1.bias": (2 * D,),
    }
    for i in range(depth):
        for name, shape in {
            "attn.qkv.weight": (3 * D, D), "attn.qkv.bias": (3 * D,),
            "attn.proj.weight": (D, D), "attn.proj.bias": (D,),
            "mlp.fc1.weight": (4 * D, D), "mlp.fc1.bias": (4 * D,),
            "mlp.fc2.weight": (D, 4 * D), "mlp.fc2.bias": (D,),
            "adaLN_modulation.1.weight": (6 * D, D), "adaLN_modulation.1.bias": (6 * D,),
        }.items():  # fmt: skip
            shapes[f"blocks.{i}.{name}"] = shape
    return shapes


@pytest.mark.parametrize("name", sorted(DiT_models))
def test_state_dict_keys_and_shapes(name):
    size, p = name[4:].split("/")
    depth, D, heads = CONFIGS[size]
    with torch.device("meta"):
        model = DiT_models[name](input_size=32, num_classes=1000)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected_shapes(depth, D, int(p))
    assert model.num_heads == heads and model.blocks[0].attn.head_dim == D // heads
    assert getattr(ditfast, f"DiT_{size}_{p}") is DiT_models[name]


def test_registry_is_complete_and_constructor_defaults():
    assert sorted(DiT_models) == sorted(f"DiT-{s}/{p}" for s in CONFIGS for p in (2, 4, 8))
    import inspect

    sig = inspect.signature(DiT).parameters
    params = {k: v.default for k, v in sig.items() if v.kind is not inspect.Parameter.KEYWORD_ONLY}
    # ditfast's additions are keyword-only, so every official call still means the same
    assert [k for k, v in sig.items() if v.kind is inspect.Parameter.KEYWORD_ONLY] == ["backend", "attn_backend", "block", "timestep_freq_shift", "mlp_norm_eps"]
    assert params == dict(
        input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
        mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True,
    )  # fmt: skip
    assert ditfast.DiT is DiT


def test_xl2_parameter_count_and_frozen_pos_embed():
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"](input_size=32, num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == 675_129_632
    assert isinstance(model.pos_embed, torch.nn.Parameter) and not model.pos_embed.requires_grad
    assert "pos_embed" in model.state_dict()


def test_no_sigma_and_no_dropout_variants():
    model = DiT(input_size=8, patch_size=2, hidden_size=64, depth=1, num_heads=2, learn_sigma=False,
                class_dropout_prob=0.0, num_classes=10)  # fmt: skip
    sd = model.state_dict()
    assert model.out_channels == 4 and sd["final_layer.linear.weight"].shape == (16, 64)
    assert sd["y_embedder.embedding_table.weight"].shape == (10, 64)


def test_initialisation():
    model = DiT(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    for name, p in model.named_parameters():
        if "adaLN_modulation" in name or name.startswith("final_layer.linear"):
            assert torch.count_nonzero(p) == 0, name
        elif name.endswith(".bias"):
            assert torch.count_nonzero(p) == 0, name
    assert_close(model.pos_embed[0], ref_pos_embed(64, 4, torch.float32), what="pos_embed")
    assert abs(model.y_embedder.embedding_table.weight.std().item() - 0.02) < 0.005
    # xavier_uniform bound for qkv: sqrt(6 / (fan_in + fan_out))
    bound = math.sqrt(6 / (64 + 192))
    w = model.blocks[0].attn.qkv.weight
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    # a fresh model outputs zeros (adaLN-Zero and zero final layer)
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([1, 500]), torch.tensor([0, 3]))
    assert torch.count_nonzero(out) == 0


def test_pos_embed_matches_independent_formula_at_xl_width():
    model = DiT(input_size=16, patch_size=2, hidden_size=1152, depth=0, num_heads=16, num_classes=10)
    assert_close(model.pos_embed[0], ref_pos_embed(1152, 8, torch.float32), what="pos_embed D=1152")


def test_timestep_embedding_is_cos_first():
    t = torch.tensor([0, 1, 250, 999])
    emb = ditfast.models.TimestepEmbedder.timestep_embedding(t, 256)
    assert_close(emb, ref_t_freq(t, torch.float32), what="timestep embedding")
    assert torch.equal(emb[0, :128], torch.ones(128)) and torch.equal(emb[0, 128:], torch.zeros(128))


# ------------------------------------------------------------------------------------------
# Exact math
# ------------------------------------------------------------------------------------------

MATH_CASES = [
    # (input_size, patch, hidden, depth, heads, batch, learn_sigma)  -> tokens, head dim
    (8, 2, 128, 2, 2, 1, True),  # T=16, Dh=64, batch 1
    (16, 2, 144, 2, 2, 3, True),  # T=64, Dh=72 (hidden not a power of two), odd batch
    (18, 2, 128, 1, 2, 2, False),  # T=81 (odd token count), no learned sigma
    (16, 4, 96, 2, 6, 2, True),  # patch 4
]


@pytest.mark.parametrize("case", MATH_CASES, ids=lambda c: f"S{c[0]}p{c[1]}D{c[2]}H{c[4]}B{c[5]}")
def test_forward_matches_official_math_fp32(case):
    S, p, D, depth, H, B, learn_sigma = case
    cfg = dict(input_size=S, patch_size=p, hidden_size=D, depth=depth, num_heads=H, num_classes=10, learn_sigma=learn_sigma)
    model = randomize_(DiT(**cfg)).eval()
    x = torch.randn(B, 4, S, S)
    t = torch.randint(0, 1000, (B,))
    y = torch.randint(0, 11, (B,))  # includes the null class 10 sometimes
    y[0] = 10
    with torch.no_grad():
        out = model(x, t, y)
        sd = model.state_dict()
        ref32 = ref_forward(sd, cfg, x, t, y)
        ref64 = ref_forward(sd, cfg, x.double(), t, y)
    assert out.shape == (B, 8 if learn_sigma else 4, S, S)
    assert ref64.abs().max() > 0.1, "degenerate test: the reference output is ~zero"
    assert max_rel_error(out, ref32) < 1e-5
    assert max_rel_error(out, ref64) < 1e-5
    assert_close(out, ref64.float(), rtol=1e-4, atol=1e-5 * ref64.abs().max().item(), what="DiT vs official math")


def test_unpatchify_matches_einsum_order():
    model = DiT(input_size=8, patch_size=4, hidden_size=32, depth=0, num_heads=2, num_classes=3)
    B, G, p, C = 2, 2, 4, 8
    seq = torch.randn(B, G * G, p * p * C)
    out = model.unpatchify(seq)
    expected = torch.einsum("nhwpqc->nchpwq", seq.reshape(B, G, G, p, p, C)).reshape(B, C, G * p, G * p)
    assert torch.equal(out, expected)
    assert out[1, 5, 1 * p + 2, 0 * p + 3] == seq[1, 1 * G + 0, (2 * p + 3) * C + 5]


def test_forward_with_cfg_official_and_all_channels():
    model = randomize_(DiT(input_size=8, patch_size=2, hidden_size=64, depth=1, num_heads=2, num_classes=10)).eval()
    z = torch.randn(3, 4, 8, 8)
    x = torch.cat([z, torch.randn_like(z)])  # second half must be ignored
    t = torch.tensor([10, 20, 30] * 2)
    y = torch.tensor([1, 2, 3, 10, 10, 10])
    scale = 4.0
    with torch.no_grad():
        full = model(torch.cat([z, z]), t, y)
        official = model.forward_with_cfg(x, t, y, scale)
        all_ch = model.forward_with_cfg(x, t, y, scale, guide_all_channels=True)
    cond, uncond = full[:3], full[3:]
    guided = uncond + scale * (cond - uncond)
    for out, n in ((official, 3), (all_ch, 4)):
        assert_close(out[:3, :n], guided[:, :n], what=f"guided channels ({n})")
        assert_close(out[3:, :n], guided[:, :n], what="guided half duplicated")
        assert_close(out[:, n:], full[:, n:], what="pass-through channels")
    assert not torch.allclose(official[:, 3], all_ch[:, 3])
    for backend in ("eager", "fused"):  # full_batch=False: the first half, through both unpatchify paths
        model.backend = backend
        with torch.no_grad():
            half = model.forward_with_cfg(x, t, y, scale, full_batch=False)
        assert half.shape == (3, 8, 8, 8)
        assert_close(half, official[:3], rtol=1e-5, atol=1e-5, what=f"full_batch=False ({backend})")


def test_label_dropout_only_when_training_or_forced():
    emb = DiT(input_size=8, patch_size=2, hidden_size=32, depth=0, num_heads=2, num_classes=10).y_embedder
    labels = torch.randint(0, 10, (4000,))
    dropped = emb.token_drop(labels)
    frac = (dropped == 10).float().mean().item()
    assert 0.08 < frac < 0.12 and torch.equal(dropped[dropped != 10], labels[dropped != 10])
    assert torch.equal(emb(labels, train=False), emb.embedding_table(labels))
    forced = torch.tensor([1, 0, 1, 0])
    assert emb.token_drop(labels[:4], forced).tolist() == [10, labels[1].item(), 10, labels[3].item()]


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small():
    return DiT(input_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=10).eval()


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: (torch.randn(2, 4, 8), torch.zeros(2), torch.zeros(2, dtype=torch.long)), r"4-D latent batch \(B, 4, 8, 8\)"),
        (lambda: (torch.randn(2, 3, 8, 8), torch.zeros(2), torch.zeros(2, dtype=torch.long)), r"shape \(B, 4, 8, 8\)"),
        (lambda: (torch.randn(2, 4, 16, 16), torch.zeros(2), torch.zeros(2, dtype=torch.long)), r"shape \(B, 4, 8, 8\)"),
        (lambda: (torch.zeros(2, 4, 8, 8, dtype=torch.long), torch.zeros(2), torch.zeros(2, dtype=torch.long)), "floating-point"),
        (lambda: (torch.randn(2, 4, 8, 8), torch.zeros(3), torch.zeros(2, dtype=torch.long)), r"t must be .* \(2,\)"),
        (lambda: (torch.randn(2, 4, 8, 8), torch.zeros(2), torch.zeros(1, dtype=torch.long)), r"y must be .* \(2,\)"),
        (lambda: (torch.randn(2, 4, 8, 8), torch.zeros(2), torch.tensor([0, 11])), r"labels must lie in \[0, 10\]"),
        (lambda: (torch.randn(2, 4, 8, 8), torch.zeros(2), torch.tensor([-1, 0])), r"labels must lie in \[0, 10\]"),
        (lambda: (torch.randn(2, 4, 8, 8), torch.zeros(2), torch.zeros(2)), "integer class labels"),
    ],
    ids=["rank", "channels", "spatial", "int-x", "t-len", "y-len", "label-high", "label-neg", "float-y"],
)
def test_bad_input_is_refused_with_what_was_expected(small, make, match):
    with pytest.raises(ValueError, match=match):
        small(*make())


def test_forward_with_cfg_refuses_odd_batch(small):
    with pytest.raises(ValueError, match="even batch"):
        small.forward_with_cfg(torch.randn(3, 4, 8, 8), torch.zeros(3), torch.zeros(3, dtype=torch.long), 1.5)


def test_null_class_is_accepted_and_out_of_range_without_dropout_row():
    model = DiT(input_size=8, patch_size=2, hidden_size=32, depth=0, num_heads=2, num_classes=10, class_dropout_prob=0.0)
    x, t = torch.randn(1, 4, 8, 8), torch.zeros(1)
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        model(x, t, torch.tensor([10]))
    model(x, t, torch.tensor([9]))
