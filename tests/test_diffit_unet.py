"""The image-space DiffiT (ditfast.diffit_unet): shapes through the U, the window partition, the
windowed TMSA against a plain reference with explicit windows, backends, cost, loading."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_close, assert_same_training_signal, randomize_
from ditfast.diffit_unet import (
    DiffiTUNet, DiffiTUNet_models, UNET_CONFIGS, WindowTMSA, infer_unet_config, is_unet_state_dict,
    window_partition, window_reverse,
)  # fmt: skip
from ditfast.ops import triton_status

SMALL = dict(channels=16, num_heads=2)  # keeps the paper-sized layouts cheap on the CPU


def _triton_reason() -> str | None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return triton_status(device)


def tiny(name: str = "DiffiT-Digits16", seed: int = 0, **kw) -> DiffiTUNet:
    torch.manual_seed(seed)
    model = randomize_(DiffiTUNet_models[name](**{**SMALL, **kw}), seed=seed).eval()
    with torch.no_grad():
        model.conv_out.weight.mul_(8.0)  # O(1) outputs, so that comparisons are not on ~zero
    return model


def _inputs(model: DiffiTUNet, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    S = model.input_size
    x = torch.randn(batch, model.in_channels, S, S, generator=g)
    c_noise = torch.randn(batch, generator=g)
    y = torch.randint(model.num_classes, (batch,), generator=g) if model.num_classes else None
    return x, c_noise, y


# ------------------------------------------------------------------------------------------
# Shapes
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(UNET_CONFIGS))
def test_shapes_through_the_u(name):
    """Every registry layout at its own resolution, odd batch: output shape = input shape, finite,
    and every stage's window and side as the paper describes."""
    model = tiny(name)
    x, c, y = _inputs(model, 3)
    out = model(x, c, y)
    assert out.shape == x.shape and torch.isfinite(out).all()
    cfg = UNET_CONFIGS[name]
    assert [len(s.blocks) for s in model.enc] == list(cfg["depths"]) == [len(s.blocks) for s in model.dec]
    sides = [cfg["input_size"] >> s for s in range(len(cfg["depths"]))]
    assert [s.window for s in model.enc] == [min(cfg["window"], side) for side in sides]


def test_paper_layouts():
    assert UNET_CONFIGS["DiffiT-CIFAR"]["depths"] == (2, 2, 2) and UNET_CONFIGS["DiffiT-CIFAR"]["window"] == 4
    assert UNET_CONFIGS["DiffiT-FFHQ64"]["depths"] == (1, 2, 2, 2) and UNET_CONFIGS["DiffiT-FFHQ64"]["window"] == 8
    assert UNET_CONFIGS["DiffiT-CIFAR"]["input_size"] == 32 and UNET_CONFIGS["DiffiT-FFHQ64"]["input_size"] == 64


@pytest.mark.parametrize("size", [8, 16, 32])
def test_several_resolutions_and_batch_one(size):
    """One architecture, several input sides (convolutions and windows are size-agnostic)."""
    model = tiny("DiffiT-Digits16", input_size=size, depths=(1, 1) if size == 8 else (1, 1, 1))
    for batch in (1, 3):
        x, c, y = _inputs(model, batch)
        assert model(x, c, y).shape == (batch, 1, size, size)


def test_unconditional_and_zero_output_at_init():
    torch.manual_seed(0)
    model = DiffiTUNet(input_size=16, in_channels=3, channels=16, depths=(1, 2), window=4, num_heads=2)
    assert model.y_embedder is None
    x = torch.randn(3, 3, 16, 16)
    assert torch.equal(model(x, torch.randn(3)), torch.zeros_like(x))  # conv_out zero-initialised
    with pytest.raises(ValueError, match="y must be None"):
        model(x, torch.randn(3), torch.zeros(3, dtype=torch.long))


def test_input_errors():
    with pytest.raises(ValueError, match="input_size"):
        DiffiTUNet(input_size=12, channels=16, depths=(1, 1, 1), window=4, num_heads=2)  # 12 -> 6 -> 3
    with pytest.raises(ValueError, match="num_heads"):
        DiffiTUNet(input_size=16, channels=18, depths=(1,), window=4, num_heads=4)
    with pytest.raises(ValueError, match="class_dropout_prob"):
        DiffiTUNet(input_size=16, channels=16, depths=(1,), num_heads=2, class_dropout_prob=0.1)
    with pytest.raises(ValueError, match=r"depths\[1\] must be an integer >= 1, got 0"):
        DiffiTUNet(input_size=16, channels=16, depths=(1, 0), num_heads=2)
    with pytest.raises(TypeError, match="channels must be an integer"):
        DiffiTUNet(input_size=16, channels=16.0, depths=(1,), num_heads=2)
    with pytest.raises(ValueError, match="depths must be a non-empty sequence"):
        DiffiTUNet(input_size=16, channels=16, depths=(), num_heads=2)
    with pytest.raises(ValueError, match="backend"):
        DiffiTUNet(input_size=16, channels=16, depths=(1,), num_heads=2, backend="fast")
    model = tiny()
    x, c, y = _inputs(model, 2)
    with pytest.raises(ValueError, match=r"x must be a floating-point \(B, 1, 16, 16\)"):
        model(x[:, :1].repeat(1, 3, 1, 1), c, y)
    with pytest.raises(ValueError, match="c_noise"):
        model(x, c[:1], y)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\]"):
        model(x, c, torch.tensor([0, 11]))


# ------------------------------------------------------------------------------------------
# Window partition
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid,window", [((8, 8), 4), ((8, 12), 4), ((4, 4), 4), ((6, 4), 2)])
def test_window_partition_and_inverse(grid, window):
    gh, gw = grid
    x = torch.randn(3, gh * gw, 5)
    parts = window_partition(x, grid, window)
    assert parts.shape == (3 * (gh // window) * (gw // window), window * window, 5)
    # explicit: window (a, b) of sample n holds the tokens (a*w + i, b*w + j), i, j < w, row-major
    n_w = gw // window
    for n in range(3):
        for a in range(gh // window):
            for b in range(n_w):
                k = (n * (gh // window) + a) * n_w + b
                rows = [(a * window + i) * gw + b * window + j for i in range(window) for j in range(window)]
                assert torch.equal(parts[k], x[n, rows])
    assert torch.equal(window_reverse(parts, grid, window), x)
    with pytest.raises(ValueError, match="window_partition"):
        window_partition(x, grid, 3)


# ------------------------------------------------------------------------------------------
# Windowed TMSA against a plain reference with explicit windows
# ------------------------------------------------------------------------------------------


def reference_window_tmsa(attn: WindowTMSA, x: torch.Tensor, c: torch.Tensor, grid) -> torch.Tensor:
    """The module's math written out: window_partition, per window plain softmax attention with
    the bias looked up coordinate by coordinate, window_reverse, proj."""
    H, w = attn.num_heads, attn.window
    B, N, D = x.shape
    Dh = D // H
    qkv = attn.qkv(x) + attn.qkv_temb(c)[:, None]  # (B, N, 3D)
    wins = window_partition(qkv, grid, w)  # (B*nW, L, 3D)
    q, k, v = wins.reshape(wins.shape[0], w * w, 3, H, Dh).permute(2, 0, 3, 1, 4)
    table = attn.relative_position_bias_table
    rows = []
    for i in range(w * w):
        cols = []
        for j in range(w * w):
            (yi, xi), (yj, xj) = divmod(i, w), divmod(j, w)
            cols.append(table[(yi - yj + w - 1) * (2 * w - 1) + (xi - xj + w - 1)])  # (H,)
        rows.append(torch.stack(cols, dim=-1))  # (H, L)
    bias = torch.stack(rows, dim=1)  # (H, L, L)
    s = q @ k.transpose(-1, -2) * Dh**-0.5 + bias
    o = (s.softmax(-1) @ v).transpose(1, 2).reshape(wins.shape[0], w * w, D)
    return attn.proj(window_reverse(o, grid, w))


BACKENDS_TO_TEST = ["eager", "sdpa", "triton"]


@pytest.mark.parametrize("backend", BACKENDS_TO_TEST)
@pytest.mark.parametrize("grid,window", [((8, 8), 4), ((4, 8), 2), ((4, 4), 4)])
def test_window_tmsa_matches_explicit_windows(backend, grid, window):
    """Forward and backward (inputs, time token, bias table, weights) of the model's attention
    layer through tmsa_attention vs the explicit-window reference, fp32."""
    if backend == "triton" and _triton_reason() is not None:
        pytest.skip(f"Triton kernels cannot run here: {_triton_reason()}")
    torch.manual_seed(0)
    attn = WindowTMSA(32, num_heads=2, window=window)
    with torch.no_grad():
        attn.relative_position_bias_table.normal_(std=0.5)  # large enough to matter
    attn.backend = backend
    B, N = 3, grid[0] * grid[1]
    x = torch.randn(B, N, 32, requires_grad=True)
    c = torch.randn(B, 32, requires_grad=True)
    params = [x, c, *attn.parameters()]
    results = []
    for fn in (lambda: attn(x, c, grid), lambda: reference_window_tmsa(attn, x, c, grid)):
        out = fn()
        grads = torch.autograd.grad(out.square().sum() + (out * torch.arange(N)[None, :, None]).mean(), params)
        results.append((out.detach(), grads))
    (out, grads), (ref, ref_grads) = results
    assert_close(out, ref, what=f"{backend} forward")
    names = ["x", "c"] + [n for n, _ in attn.named_parameters()]
    for name, g, r in zip(names, grads, ref_grads):
        assert_close(g, r, kind="bwd", atol=1e-4 * max(r.abs().max().item(), 1e-6), what=f"{backend} grad {name}")


def test_windows_really_are_local():
    """A change in one window leaves every other window's output unchanged (eager and auto)."""
    torch.manual_seed(0)
    attn = WindowTMSA(16, num_heads=2, window=4)
    x = torch.randn(2, 64, 16)
    c = torch.randn(2, 16)
    x2 = x.clone()
    x2[:, 0] += 1.0  # token (0, 0): window (0, 0)
    changed = (attn(x2, c, (8, 8)) - attn(x, c, (8, 8))).abs().amax(dim=(0, 2)).view(8, 8) > 0
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[:4, :4] = True
    assert torch.equal(changed, expected)


def test_backends_give_the_same_training_signal():
    """The whole model, output and every gradient, through the fused path (Triton TMSA, compiled
    timestep features where available) vs eager."""
    if _triton_reason() is not None:
        pytest.skip(f"Triton kernels cannot run here: {_triton_reason()}")
    # 24 channels: GroupNorm groups of 3, so no bias gradient is exactly zero (1-channel groups
    # would cancel the last block's per-channel biases before conv_out)
    model = tiny("DiffiT-Digits8", channels=24).train()
    x, c, y = _inputs(model, 3)
    assert_same_training_signal(model, (x, c, y, torch.zeros(3, dtype=torch.long)), "backend", "eager", "fused", "DiffiT-UNet fused")


def test_auto_backend_matches_eager():
    model = tiny("DiffiT-Digits8", channels=24)
    x, c, y = _inputs(model, 3)
    assert_same_training_signal(model, (x, c, y, torch.zeros(3, dtype=torch.long)), "backend", "eager", "auto", "DiffiT-UNet auto")


def test_grad_checkpointing_same_gradients():
    model = tiny("DiffiT-Digits8")
    x, c, y = _inputs(model, 2)
    grads = []
    for flag in (False, True):
        model.grad_checkpointing = flag
        model.zero_grad()
        model(x, c, y).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert_close(b, a, kind="bwd")


# ------------------------------------------------------------------------------------------
# Cost, config and loading
# ------------------------------------------------------------------------------------------


def _counted_macs(model: DiffiTUNet, x, c, y) -> int:
    """MACs of every Conv2d and Linear as run (forward hooks), plus the attention matmuls."""
    total = 0

    def hook(m, inp, out):
        nonlocal total
        if isinstance(m, torch.nn.Conv2d):
            total += out.numel() // out.shape[0] * m.in_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups
        else:
            total += out.numel() // out.shape[0] * m.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    side = x.shape[-1]
    try:
        model(x[:1], c[:1], y[:1] if y is not None else None)
    finally:
        for h in handles:
            h.remove()
    for s, stage in enumerate(model.enc):
        n = (side >> s) ** 2
        total += 2 * len(stage.blocks) * 2 * n * stage.window**2 * model.channels  # enc + dec, QK^T and AV
    return total


@pytest.mark.parametrize("name", ["DiffiT-Digits16", "DiffiT-CIFAR", "DiffiT-FFHQ64"])
def test_macs_match_a_count_of_the_layers_run(name):
    model = tiny(name)
    x, c, y = _inputs(model, 1)
    assert model.macs() == _counted_macs(model, x, c, y)


def test_infer_config_and_strict_reload():
    model = tiny("DiffiT-Digits16", depths=(1, 2, 1), mlp_ratio=2.0)
    sd = model.state_dict()
    assert is_unet_state_dict(sd)
    cfg = infer_unet_config(sd)
    assert cfg == {**model.config, "depths": [1, 2, 1]}
    again = DiffiTUNet(**cfg)
    again.load_state_dict(sd, strict=True)
    x, c, y = _inputs(model, 2)
    assert torch.equal(again.eval()(x, c, y), model(x, c, y))


def test_input_size_is_a_host_int_and_a_state_dict_for_another_size_is_refused():
    model = tiny("DiffiT-Digits16")
    assert type(model.input_size) is int and model.input_size == 16  # no device read per forward
    sd = model.state_dict()
    assert int(sd["input_size_"]) == 16
    sd["input_size_"] = torch.tensor(32)  # every weight fits (no shape depends on the size): only the record differs
    with pytest.raises(RuntimeError, match="input_size_: the state_dict is of a model for 32x32 inputs, this one was built for 16x16"):
        model.load_state_dict(sd)
    assert model.input_size == 16 and int(model.input_size_) == 16


def test_load_model_recognises_the_checkpoint(tmp_path):
    from ditfast import load_model

    model = tiny("DiffiT-Digits16")
    path = tmp_path / "unet.pt"
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "args": {}, "step": 1}, path)
    loaded = load_model(str(path))
    assert isinstance(loaded, DiffiTUNet) and loaded.config == model.config
    x, c, y = _inputs(model, 2)
    assert torch.equal(loaded(x, c, y), model(x, c, y))
    named = load_model(str(path), model="DiffiT-Digits16", channels=16, num_heads=2)
    assert named.config == model.config
    with pytest.raises(ValueError):
        load_model(str(path), model="DiffiT-Digits16")  # the registry's 64 channels do not match the weights
