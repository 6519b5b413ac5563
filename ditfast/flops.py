"""Analytic forward cost of a DiT, in the paper's convention (Gflops = 1e9 multiply-accumulates), and
the one-line shape summary that training and sampling print (:func:`describe`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import check_int
from .diffit import DiffiT, DiffiT_models
from .diffit_unet import DiffiTUNet
from .models import BLOCKS, DiT, DiT_models, SIZES

__all__ = ["gflops", "DiTShape", "describe", "fmt_sig"]

VAE_DOWNSAMPLE = 8  # the Stable Diffusion VAE maps a 256x256 image to a 32x32 latent


@dataclass(frozen=True)
class DiTShape:
    """What the cost of a DiT forward depends on."""

    depth: int
    hidden_size: int
    patch_size: int
    input_size: int  # latent side
    in_channels: int = 4
    out_channels: int = 8
    mlp_ratio: float = 4.0
    frequency_embedding_size: int = 256
    block: str = "adaLN-Zero"  # one of models.BLOCKS, or "TMSA" for a DiffiT

    @classmethod
    def of(cls, model: DiT | DiffiT) -> "DiTShape":
        return cls(
            depth=len(model.blocks),
            hidden_size=model.pos_embed.shape[-1],
            patch_size=model.patch_size,
            input_size=model.x_embedder.img_size[0],
            in_channels=model.in_channels,
            out_channels=model.out_channels,
            mlp_ratio=model.blocks[0].mlp.fc1.out_features / model.pos_embed.shape[-1] if len(model.blocks) else 4.0,
            frequency_embedding_size=model.t_embedder.frequency_embedding_size,
            block="TMSA" if isinstance(model, DiffiT) else model.block,
        )

    @classmethod
    def named(cls, name: str, image_size: int = 256, block: str = "adaLN-Zero") -> "DiTShape":
        if name in DiffiT_models:
            if block not in ("adaLN-Zero", "TMSA"):
                raise ValueError(f"block applies to DiT names only; {name} is a DiffiT, got block={block!r}")
            depth, hidden, _ = SIZES[name[len("DiffiT-") :].split("/")[0]]
            patch = int(name.split("/")[1])
            if image_size % (VAE_DOWNSAMPLE * patch):
                raise ValueError(f"image_size {image_size} must be a multiple of 8 * patch size for {name}")
            return cls(depth, hidden, patch, image_size // VAE_DOWNSAMPLE, block="TMSA")
        if name not in DiT_models:
            raise ValueError(f"unknown model {name!r}; expected one of {sorted({**DiT_models, **DiffiT_models})}")
        image_size = check_int("image_size", image_size, min=1)
        if image_size % (VAE_DOWNSAMPLE * int(name.split("/")[1])):
            raise ValueError(f"image_size {image_size} must be a multiple of 8 * patch size for {name}")
        if block not in BLOCKS:
            raise ValueError(f"block must be one of {list(BLOCKS)}, got {block!r}")
        depth, hidden, _ = SIZES[name[len("DiT-") :].split("/")[0]]
        return cls(depth, hidden, int(name.split("/")[1]), image_size // VAE_DOWNSAMPLE, block=block)

    def macs(self) -> int:
        """Forward multiply-accumulates for one sample (see :func:`gflops` for the rule)."""
        D, p = self.hidden_size, self.patch_size
        T = (self.input_size // p) ** 2
        hidden_mlp = int(D * self.mlp_ratio)
        patch = T * D * self.in_channels * p * p
        timestep = self.frequency_embedding_size * D + D * D
        S = T + 2 if self.block == "in-context" else T  # tokens through the blocks
        # (B, D) vectors per block from c: adaLN's modulation; DiffiT's qkv_temb(c), the time token's q, k, v
        modulation = {"adaLN-Zero": 6, "adaLN": 4, "TMSA": 3}.get(self.block, 0)
        per_block = (
            modulation * D * D  # adaLN modulation (DiffiT: time projection qkv_temb), once per sample
            + S * D * 3 * D  # qkv projection
            + 2 * S * S * D  # Q K^T and attention-weighted V, all heads together
            + S * D * D  # output projection
            + 2 * S * D * hidden_mlp  # fc1 and fc2
        )
        if self.block == "cross-attention":  # T queries, M = 2 conditioning tokens
            M = 2
            per_block += T * D * D + M * D * 2 * D + 2 * T * M * D + T * D * D  # q, kv, QK^T and AV, output
        final = (2 * D * D if self.block in ("adaLN-Zero", "adaLN") else 0) + T * D * p * p * self.out_channels
        return patch + timestep + self.depth * per_block + final


def gflops(model_or_name: DiT | DiffiT | str, image_size: int | None = None, *, block: str | None = None) -> float:
    """Forward Gflops per image of a DiT or a DiffiT, as the DiT paper counts them (batch 1, 1 flop = 1 MAC).

    Counting rule: multiply-accumulates of every matrix product -- the patch-embedding projection,
    the timestep MLP, per block the adaLN Linear (6*D*D per sample), the qkv projection, both
    attention matmuls (Q K^T and A V, T*T*D each), the output projection and the two MLP Linears,
    and the final layer's adaLN (2*D*D) and output Linear. Element-wise work (LayerNorm, softmax,
    activations, modulation, residuals) and the label lookup are not counted. This reproduces the
    paper's table (e.g. DiT-XL/2 at 256px: 118.64) to within 0.02 Gflops.

    The other block designs (``block``, see :class:`ditfast.DiT`) by the same rule: "adaLN" has a
    4*D*D modulation per block; "in-context" none, T + 2 tokens through every block, and no final
    adaLN; "cross-attention" no adaLN, plus per block the query and output projections (T*D*D each),
    the key/value projection of the 2 conditioning tokens (2*2*D*D) and both attention matmuls over
    2 keys (2*T*D each). At XL/2 256px: adaLN 118.55, in-context 119.35, cross-attention 137.60
    (paper: 118.6, 119.4, 137.6).

    A DiffiT (:class:`ditfast.DiffiT`, names "DiffiT-XL/2" ...) by the same rule: per block the time
    projection qkv_temb (3*D*D per sample) instead of adaLN, then the same qkv projection, attention
    matmuls over all T tokens (the window is the whole grid), output projection and MLP; no final
    adaLN. The relative position bias, added to the scores, is element-wise and not counted. So
    DiffiT = DiT - depth*3*D*D - 2*D*D: DiffiT-XL/2 at 256px is 118.51 (DiT-XL/2: 118.62).

    ``model_or_name``: a :class:`DiT` or :class:`DiffiT` instance (its own latent size and block design are used;
    ``image_size`` and ``block`` must be None) or a registry name such as ``"DiT-XL/2"`` with
    ``image_size`` in pixels (default 256; the latent side is image_size / 8) and ``block`` (default
    "adaLN-Zero"). A training step costs about 3x the forward. An image-space DiffiT
    (:class:`ditfast.diffit_unet.DiffiTUNet`) counts by the same rule (:meth:`DiffiTUNet.macs`).
    """
    if isinstance(model_or_name, DiffiTUNet):
        if image_size is not None or block is not None:
            raise ValueError("image_size and block apply to a model name; a model instance has its own input size and block")
        return model_or_name.macs() / 1e9
    if isinstance(model_or_name, (DiT, DiffiT)):
        if image_size is not None or block is not None:
            raise ValueError("image_size and block apply to a model name; a model instance has its own input size and block")
        shape = DiTShape.of(model_or_name)
    elif isinstance(model_or_name, str):
        shape = DiTShape.named(model_or_name, 256 if image_size is None else image_size, block or "adaLN-Zero")
    else:
        raise ValueError(f"expected a DiT, a DiffiT or a model name such as 'DiT-XL/2', got {type(model_or_name).__name__}")
    return shape.macs() / 1e9


def fmt_sig(x: float, digits: int = 3) -> str:
    """``x`` with ``digits`` significant digits, so a small figure shows its size: 0.0031 ->
    "0.00310" (not "0.00"), 0.4567 -> "0.457", 118.64 -> "119", 12345.6 -> "12300"; below 1e-4 or
    from 1e15 on, scientific notation. NaN and inf as Python writes them."""
    if not math.isfinite(x) or x == 0:
        return f"{x:g}"
    x = float(f"{x:.{digits - 1}e}")  # rounded to the significant digits first (9.996 -> 10.0)
    magnitude = math.floor(math.log10(abs(x)))
    if magnitude < -4 or magnitude >= 15:
        return f"{x:.{digits - 1}e}"
    return f"{x:.{max(digits - 1 - magnitude, 0)}f}"


# describe() lives here, beside DiTShape.of: both read a DiT's shape, and the trainer and the sampler
# already import this module for gflops, so neither has to reach into the other.
def describe(model: DiT | DiffiT) -> str:
    """e.g. "DiT (depth 6, hidden 128, 2 heads, patch 4, 16x16x1 input)"; other block designs than
    adaLN-Zero are named, e.g. "DiT (in-context blocks, depth 6, ...)"; a DiffiT "DiffiT (depth 6, ...)";
    an image-space DiffiT "DiffiT-UNet (blocks 1/1/1, 64 channels, window 4, 2 heads, 16x16x1 input)"."""
    if isinstance(model, DiffiTUNet):
        return (f"DiffiT-UNet (blocks {'/'.join(map(str, model.depths))}, {model.channels} channels, window {model.window}, "
                f"{model.num_heads} head{'s' if model.num_heads != 1 else ''}, "
                f"{model.input_size}x{model.input_size}x{model.in_channels} input)")  # fmt: skip
    size = model.x_embedder.img_size[0]
    diffit = isinstance(model, DiffiT)
    design = "" if diffit or model.block == "adaLN-Zero" else f"{model.block} blocks, "
    return (f"{'DiffiT' if diffit else 'DiT'} ({design}depth {len(model.blocks)}, hidden {model.pos_embed.shape[-1]}, {model.num_heads} head{'s' if model.num_heads != 1 else ''}, "
            f"patch {model.patch_size}, {size}x{size}x{model.in_channels} input)")  # fmt: skip
