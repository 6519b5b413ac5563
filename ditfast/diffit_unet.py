"""The image-space DiffiT: a U-shaped network whose attention runs on local windows (Hatamizadeh et
al., "DiffiT: Diffusion Vision Transformers for Image Generation", ECCV 2024, image-space model).

The authors released only the latent model; this one follows the paper's description. Shapes in
comments: B batch, C model channels (the same at every resolution), H/W the side at a stage, w the
window, L = w*w tokens per window, Hd heads.

    x (B, C_img, H, W) --conv_in--> (B, C, H, W)
    encoder: per resolution L_s x [ResCell, DiffiTBlock], then conv3x3 stride 2 (resolution / 2)
    decoder: per resolution (lowest first) nearest x2 + conv3x3, concat the encoder's skip,
             conv1x1 2C -> C, then L_s x [ResCell, DiffiTBlock]
    out: GroupNorm -> SiLU -> conv3x3 (zero-initialised) -> (B, C_img, H, W)

- ``ResCell``: ``x = x + conv3x3(swish(GN(x)))`` (GroupNorm, SiLU and the convolution in PyTorch).
- ``DiffiTBlock``: ``x = x + proj(TMSA(LN(x), c)); x = x + MLP(LN(x))`` on the feature map as
  (B, H*W, C) row-major tokens. TMSA adds the time token's projection ``qkv_temb(c)`` to every
  token's qkv and the window's relative position bias to the scores; it attends within
  non-overlapping w x w windows through :func:`ditfast.ops.tmsa.tmsa_attention` (``grid=(H, W)``,
  ``window=w``): the fused kernel gathers a window's tokens by index, so the feature map is never
  copied into window order on that path. :func:`window_partition` / :func:`window_reverse` are the
  explicit partition the tests' reference uses.
- Time token: the network is called with EDM's ``c_noise = ln(sigma) / 4`` (:mod:`ditfast.edm`),
  embedded as in EDM's DDPM++ configuration: the sinusoidal features of c_noise (DiT's
  :class:`~ditfast.models.TimestepEmbedder`, frequencies 10000^(-i/half)), then Linear-SiLU-Linear
  to C. Class-conditional models add a label embedding (c = t_emb + y_emb, as in the latent
  DiffiT), with a null class for classifier-free guidance when ``class_dropout_prob > 0``;
  ``num_classes=0`` is unconditional (the paper's setting).

A stage whose side is smaller than the window attends over its whole side (the window is clipped
to the feature map). The state_dict records ``input_size`` (a buffer) so that a bare state_dict
rebuilds the model alone (:func:`infer_unet_config`).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .errors import check_float, check_int
from .models import BACKENDS, LabelEmbedder, Mlp, TimestepEmbedder
from .ops.tmsa import tmsa_attention

__all__ = [
    "DiffiTUNet", "DiffiTUNet_models", "UNET_CONFIGS", "ResCell", "DiffiTBlock", "WindowTMSA",
    "window_partition", "window_reverse", "infer_unet_config", "is_unet_state_dict",
]  # fmt: skip

# DiffiTUNet(backend=...) -> the request passed to tmsa_attention (ditfast.ops.tmsa.TMSA)
_TMSA_REQUEST = {"auto": "auto", "eager": "eager", "fused": "triton", "triton": "triton"}


def window_partition(x: torch.Tensor, grid: tuple[int, int], window: int) -> torch.Tensor:
    """(B, gh*gw, C) row-major tokens -> (B * nW, w*w, C), the windows in row-major order and each
    window's tokens row-major (a copy). ``window`` must divide both sides of ``grid``."""
    (gh, gw), w = grid, window
    if x.dim() != 3 or x.shape[1] != gh * gw or gh % w or gw % w:
        raise ValueError(f"window_partition needs (B, {gh}*{gw}, C) tokens and a window dividing {grid}, "
                         f"got {tuple(x.shape)} with window {window}")  # fmt: skip
    B, _, C = x.shape
    x = x.reshape(B, gh // w, w, gw // w, w, C).permute(0, 1, 3, 2, 4, 5)  # (B, nH, nW, w, w, C)
    return x.reshape(B * (gh // w) * (gw // w), w * w, C)


def window_reverse(windows: torch.Tensor, grid: tuple[int, int], window: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * nW, w*w, C) -> (B, gh*gw, C) row-major."""
    (gh, gw), w = grid, window
    n = (gh // w) * (gw // w)
    if windows.dim() != 3 or windows.shape[1] != w * w or windows.shape[0] % n:
        raise ValueError(f"window_reverse needs (B * {n}, {w * w}, C) windows for grid {grid} and window {window}, "
                         f"got {tuple(windows.shape)}")  # fmt: skip
    C = windows.shape[-1]
    x = windows.reshape(-1, gh // w, gw // w, w, w, C).permute(0, 1, 3, 2, 4, 5)  # (B, nH, w, nW, w, C)
    return x.reshape(-1, gh * gw, C)


def _groups(channels: int) -> int:
    """GroupNorm groups: 32 where the channels allow it (the usual U-Net setting), else their gcd."""
    return math.gcd(32, channels)


class ResCell(nn.Module):
    """``x = x + conv3x3(swish(GN(x)))`` on a (B, C, H, W) map."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(channels), channels, eps=1e-6)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(F.silu(self.norm(x)))


class WindowTMSA(nn.Module):
    """DiffiT's time-dependent self-attention within non-overlapping w x w windows:
    ``qkv = qkv(x) + qkv_temb(c)``, scores ``scale * q k^T + B[idx]`` (the window's relative
    position bias, a ((2w-1)^2, Hd) table), softmax, ``proj``."""

    def __init__(self, dim: int, num_heads: int, window: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"channels {dim} must be divisible by num_heads {num_heads}")
        self.num_heads, self.window = num_heads, window
        self.qkv = nn.Linear(dim, 3 * dim)
        self.qkv_temb = nn.Linear(dim, 3 * dim, bias=False)  # the time token's share of q, k, v
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.proj = nn.Linear(dim, dim)
        self.backend = "auto"  # tmsa_attention backend request; set by DiffiTUNet.backend

    def forward(self, x: torch.Tensor, c: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        # x: (B, N, C) row-major tokens of a (gh, gw) grid, c: (B, C) -> (B, N, C)
        o = tmsa_attention(self.qkv(x), self.num_heads, qkv_t=self.qkv_temb(c), bias_table=self.relative_position_bias_table,
                           grid=grid, window=self.window, backend=self.backend)  # fmt: skip  (B, N, C), heads merged
        return self.proj(o)


class DiffiTBlock(nn.Module):
    """A DiffiT transformer block on a feature map: LayerNorm -> windowed TMSA with the time token,
    LayerNorm -> MLP, each a residual (LayerNorms without affine, eps 1e-6, as the latent model)."""

    def __init__(self, dim: int, num_heads: int, window: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = WindowTMSA(dim, num_heads, window)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x: (B, C, H, W), c: (B, C) -> (B, C, H, W)
        B, C, H, W = x.shape
        t = x.flatten(2).transpose(1, 2)  # (B, H*W, C) row-major tokens
        t = t + self.attn(self.norm1(t), c, (H, W))
        t = t + self.mlp(self.norm2(t))
        return t.transpose(1, 2).reshape(B, C, H, W)


class Stage(nn.Module):
    """L consecutive [ResCell, DiffiTBlock] pairs at one resolution."""

    def __init__(self, dim: int, depth: int, num_heads: int, window: int, mlp_ratio: float):
        super().__init__()
        self.cells = nn.ModuleList([ResCell(dim) for _ in range(depth)])
        self.blocks = nn.ModuleList([DiffiTBlock(dim, num_heads, window, mlp_ratio) for _ in range(depth)])
        self.window = window

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        for cell, block in zip(self.cells, self.blocks):
            x = block(cell(x), c)  # (B, C, H, W)
        return x


class DiffiTUNet(nn.Module):
    """The image-space DiffiT (see the module docstring): ``forward(x, c_noise, y)`` is EDM's raw
    network F; :class:`ditfast.edm.EDMPrecond` wraps it into the denoiser D(x; sigma).

    ``input_size``: image side (every stage's side must be divisible by its window);
    ``depths``: blocks per resolution, the first at full resolution, each next at half the side;
    ``window``: the attention window (clipped to a stage's side); ``channels``: C at every
    resolution; ``num_classes`` 0: unconditional; ``backend``: "auto" | "eager" | "fused"
    ("triton": its old name) for TMSA and the timestep features, as :attr:`ditfast.DiT.backend`.
    """

    def __init__(self, input_size: int = 32, in_channels: int = 3, channels: int = 128, depths=(2, 2, 2),
                 window: int = 4, num_heads: int = 4, mlp_ratio: float = 4.0, num_classes: int = 0,
                 class_dropout_prob: float = 0.0, frequency_embedding_size: int = 256, *, backend: str = "auto"):  # fmt: skip
        super().__init__()
        for name in ("input_size", "in_channels", "channels", "window", "num_heads", "frequency_embedding_size"):
            check_int(name, locals()[name], min=1)
        if isinstance(depths, (str, bytes)) or not hasattr(depths, "__len__") or not len(depths):
            raise ValueError(f"depths must be a non-empty sequence of block counts, one per resolution, got {depths!r}")
        depths = tuple(check_int(f"depths[{i}]", d, min=1) for i, d in enumerate(depths))
        check_int("num_classes", num_classes, min=0)
        mlp_ratio = check_float("mlp_ratio", mlp_ratio, lo=0, lo_inclusive=False)
        class_dropout_prob = check_float("class_dropout_prob", class_dropout_prob, lo=0, hi=1, hi_inclusive=False)
        if class_dropout_prob and not num_classes:
            raise ValueError(f"class_dropout_prob must be 0 for an unconditional model (num_classes=0), got {class_dropout_prob}")
        sides = [input_size >> s for s in range(len(depths))]
        windows = [min(window, side) for side in sides]
        if input_size % (1 << (len(depths) - 1)) or any(side % w for side, w in zip(sides, windows)):
            raise ValueError(f"input_size {input_size} must halve {len(depths) - 1} time(s) exactly and each side "
                             f"{sides} be divisible by its window {windows} (window {window})")  # fmt: skip
        self.in_channels, self.out_channels, self.channels = in_channels, in_channels, channels
        self.depths, self.window, self.num_heads = depths, window, num_heads
        self.num_classes, self.class_dropout_prob = num_classes, class_dropout_prob
        self.mlp_ratio = mlp_ratio
        self.grad_checkpointing = False
        self.check_label_range = True  # see DiT.check_label_range
        # recorded in the state_dict (load_model reads the size from it); the property reads the int,
        # so a forward never reads a device value on the host (a sync, and a CUDA graph cannot hold it)
        self.register_buffer("input_size_", torch.tensor(input_size, dtype=torch.int64))
        self._input_size = int(input_size)

        self.t_embedder = TimestepEmbedder(channels, frequency_embedding_size)
        self.y_embedder = LabelEmbedder(num_classes, channels, class_dropout_prob) if num_classes else None
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.enc = nn.ModuleList([Stage(channels, d, num_heads, w, mlp_ratio) for d, w in zip(depths, windows)])
        self.down = nn.ModuleList([nn.Conv2d(channels, channels, 3, stride=2, padding=1) for _ in depths[1:]])
        self.up = nn.ModuleList([nn.Conv2d(channels, channels, 3, padding=1) for _ in depths[1:]])
        self.merge = nn.ModuleList([nn.Conv2d(2 * channels, channels, 1) for _ in depths[1:]])
        self.dec = nn.ModuleList([Stage(channels, d, num_heads, w, mlp_ratio) for d, w in zip(depths, windows)])
        self.norm_out = nn.GroupNorm(_groups(channels), channels, eps=1e-6)
        self.conv_out = nn.Conv2d(channels, in_channels, 3, padding=1)
        self.backend = backend
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """xavier Linear weights, zero biases; bias tables N(0, 0.02) (Swin); the output conv zero
        (the network starts at F = 0, so D(x) = c_skip * x)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, WindowTMSA):
                nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @property
    def input_size(self) -> int:
        return self._input_size

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        size = state_dict.get(prefix + "input_size_")
        if isinstance(size, torch.Tensor) and size.numel() == 1 and int(size) != self._input_size:
            error_msgs.append(f"input_size_: the state_dict is of a model for {int(size)}x{int(size)} inputs, "
                              f"this one was built for {self._input_size}x{self._input_size}")  # fmt: skip
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        with torch.no_grad():
            self.input_size_.fill_(self._input_size)  # the record stays the model's own size, whatever was loaded

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this model (backend aside)."""
        return dict(input_size=self.input_size, in_channels=self.in_channels, channels=self.channels,
                    depths=list(self.depths), window=self.window, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                    num_classes=self.num_classes, class_dropout_prob=self.class_dropout_prob,
                    frequency_embedding_size=self.t_embedder.frequency_embedding_size)  # fmt: skip

    @property
    def backend(self) -> str:
        """Which ops run TMSA and the timestep features: "auto", "eager", "fused" (see the class doc)."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {value!r}")
        self._backend = value
        self.t_embedder.backend = value
        for stage in (*self.enc, *self.dec):
            for block in stage.blocks:
                block.attn.backend = _TMSA_REQUEST[value]

    def _check_inputs(self, x, c_noise, y) -> None:
        size, C = self.input_size, self.in_channels
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point() or x.shape[1] != C:
            got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a floating-point (B, {C}, {size}, {size}) image batch, got {got}")
        sides = [x.shape[2] >> s for s in range(len(self.depths))]
        windows = [stage.window for stage in self.enc]
        if x.shape[2] % (1 << (len(self.depths) - 1)) or x.shape[3] != x.shape[2] or any(s % w for s, w in zip(sides, windows)):
            raise ValueError(f"x must be square with a side that halves {len(self.depths) - 1} time(s) into sides "
                             f"divisible by the windows {windows} (e.g. {size}), got {tuple(x.shape)}")  # fmt: skip
        B = x.shape[0]
        if not isinstance(c_noise, torch.Tensor) or c_noise.shape != (B,) or not c_noise.is_floating_point():
            got = f"{tuple(c_noise.shape)} {c_noise.dtype}" if isinstance(c_noise, torch.Tensor) else type(c_noise).__name__
            raise ValueError(f"c_noise must be a floating-point ({B},) tensor (EDM: ln(sigma) / 4), got {got}")
        if self.y_embedder is None:
            if y is not None:
                raise ValueError("y must be None for an unconditional model (num_classes=0)")
            return
        if not isinstance(y, torch.Tensor) or y.shape != (B,) or y.is_floating_point() or y.dtype == torch.bool:
            got = f"{tuple(y.shape)} {y.dtype}" if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"y must be an integer ({B},) tensor of class labels, got {got}")
        if not self.check_label_range or B == 0 or torch.compiler.is_compiling() or (
                y.is_cuda and torch.cuda.is_current_stream_capturing()):  # fmt: skip
            return
        top = self.y_embedder.embedding_table.num_embeddings - 1
        lo, hi = (int(v) for v in torch.aminmax(y))
        if lo < 0 or hi > top:
            raise ValueError(f"labels must lie in [0, {top}], got values in [{lo}, {hi}]")

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, y: torch.Tensor | None = None,
                force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """x (B, C_img, H, W) (EDM: c_in * noisy image), c_noise (B,), y (B,) labels or None ->
        (B, C_img, H, W) the raw network output F. ``force_drop_ids`` as for :meth:`ditfast.DiT.forward`."""
        self._check_inputs(x, c_noise, y)
        c = self.t_embedder(c_noise)  # (B, C)
        if self.y_embedder is not None:
            c = c + self.y_embedder(y, self.training, force_drop_ids)  # (B, C)
        run = (lambda m, *a: checkpoint(m, *a, use_reentrant=False)) if self.grad_checkpointing and torch.is_grad_enabled() \
            else (lambda m, *a: m(*a))  # fmt: skip
        h = self.conv_in(x)  # (B, C, H, W)
        skips = []
        for s, stage in enumerate(self.enc):
            h = run(stage, h, c)  # (B, C, H/2^s, W/2^s)
            if s + 1 < len(self.enc):
                skips.append(h)
                h = self.down[s](h)  # (B, C, H/2^(s+1), ...)
        for s in reversed(range(len(self.dec))):
            if s + 1 < len(self.dec):
                h = self.up[s](F.interpolate(h, scale_factor=2.0, mode="nearest"))  # (B, C, H/2^s, ...)
                h = self.merge[s](torch.cat([h, skips[s]], dim=1))  # (B, 2C, ...) -> (B, C, ...)
            h = run(self.dec[s], h, c)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, C_img, H, W)

    def macs(self, input_size: int | None = None) -> int:
        """Forward multiply-accumulates per image (the DiT paper's convention, :func:`ditfast.gflops`):
        every convolution and Linear, the per-sample time/label projections and both attention
        matmuls (2 * N * L * C per block, L = w*w keys per query); norms, activations, the bias
        gather and residuals are not counted."""
        S = self.input_size if input_size is None else input_size
        C, Ci = self.channels, self.in_channels
        hidden = int(C * self.mlp_ratio)
        freq = self.t_embedder.frequency_embedding_size
        total = freq * C + C * C + S * S * C * Ci * 9 * 2  # time MLP; conv_in and conv_out
        for s, stage in enumerate(self.enc):
            N, L = (S >> s) ** 2, stage.window**2
            per_pair = N * C * C * 9 + 3 * C * C + N * (3 * C * C + C * C + 2 * C * hidden) + 2 * N * L * C
            total += 2 * self.depths[s] * per_pair  # encoder and decoder stages
            if s > 0:  # down conv into side S>>s, up conv at side S>>(s-1), merge at S>>(s-1)
                total += N * C * C * 9 + 4 * N * C * C * 9 + 4 * N * 2 * C * C
        return total


# ----------------------------------------------------------------------------------------------
# Configurations
# ----------------------------------------------------------------------------------------------

# The paper's stage layouts and windows (CIFAR-10: 3 stages 32/16/8, 2 blocks each, window 4;
# FFHQ-64: 4 stages, 1/2/2/2 blocks, window 8). The channel counts and heads are ditfast's choice
# (the paper's text gives none); the digits configurations are small ones for the bundled data.
UNET_CONFIGS: dict[str, dict[str, Any]] = {
    "DiffiT-CIFAR": dict(input_size=32, in_channels=3, channels=128, depths=(2, 2, 2), window=4, num_heads=4),
    "DiffiT-FFHQ64": dict(input_size=64, in_channels=3, channels=128, depths=(1, 2, 2, 2), window=8, num_heads=4),
    "DiffiT-Digits16": dict(input_size=16, in_channels=1, channels=64, depths=(1, 1, 1), window=4, num_heads=2,
                            num_classes=10, class_dropout_prob=0.1),
    "DiffiT-Digits8": dict(input_size=8, in_channels=1, channels=32, depths=(1, 1), window=4, num_heads=2,
                           num_classes=10, class_dropout_prob=0.1),
}  # fmt: skip


def _make(name: str):
    def build(**kwargs) -> DiffiTUNet:
        return DiffiTUNet(**{**UNET_CONFIGS[name], **kwargs})

    build.__name__ = build.__qualname__ = name.replace("-", "_")
    build.__doc__ = f"{name}: {UNET_CONFIGS[name]} (keyword arguments override)."
    return build


DiffiTUNet_models = {name: _make(name) for name in UNET_CONFIGS}


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def is_unet_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state_dict was saved from a :class:`DiffiTUNet` (by its tensor names)."""
    return "conv_in.weight" in state_dict and "input_size_" in state_dict and "enc.0.cells.0.conv.weight" in state_dict


def infer_unet_config(state_dict: Mapping[str, torch.Tensor], class_dropout_prob: float = 0.1) -> dict[str, Any]:
    """:class:`DiffiTUNet` constructor arguments implied by a state_dict's tensors. The label table
    has ``num_classes + 1`` rows when ``class_dropout_prob > 0`` (as :func:`ditfast.checkpoint.infer_config`)."""
    if not is_unet_state_dict(state_dict):
        raise ValueError("not a DiffiTUNet state_dict: it lacks conv_in.weight, input_size_ or enc.0.cells.0.conv.weight")
    channels, in_channels = state_dict["conv_in.weight"].shape[:2]
    depths = []
    while f"enc.{len(depths)}.cells.0.conv.weight" in state_dict:
        s, d = len(depths), 0
        while f"enc.{s}.cells.{d}.conv.weight" in state_dict:
            d += 1
        depths.append(d)
    table = state_dict["enc.0.blocks.0.attn.relative_position_bias_table"]  # ((2w-1)^2, Hd) at full resolution
    window = (math.isqrt(table.shape[0]) + 1) // 2
    config: dict[str, Any] = dict(
        input_size=int(state_dict["input_size_"]), in_channels=int(in_channels), channels=int(channels), depths=depths,
        window=window, num_heads=int(table.shape[1]),
        mlp_ratio=state_dict["enc.0.blocks.0.mlp.fc1.weight"].shape[0] / channels,
        frequency_embedding_size=int(state_dict["t_embedder.mlp.0.weight"].shape[1]), num_classes=0, class_dropout_prob=0.0,
    )  # fmt: skip
    rows = state_dict.get("y_embedder.embedding_table.weight")
    if rows is not None:
        n = rows.shape[0]
        config.update(num_classes=n - 1 if class_dropout_prob > 0 else n, class_dropout_prob=class_dropout_prob)
    return config
