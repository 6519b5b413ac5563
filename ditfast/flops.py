"""Analytic forward cost of a DiT, in the paper's convention (Gflops = 1e9 multiply-accumulates), and
the one-line shape summary that training and sampling print (:func:`describe`)."""

from __future__ import annotations

from dataclasses import dataclass

from .models import BLOCKS, DiT, DiT_models, SIZES

__all__ = ["gflops", "DiTShape", "describe"]

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
    block: str = "adaLN-Zero"  # one of models.BLOCKS

    @classmethod
    def of(cls, model: DiT) -> "DiTShape":
        return cls(
            depth=len(model.blocks),
            hidden_size=model.pos_embed.shape[-1],
            patch_size=model.patch_size,
            input_size=model.x_embedder.img_size[0],
            in_channels=model.in_channels,
            out_channels=model.out_channels,
            mlp_ratio=model.blocks[0].mlp.fc1.out_features / model.pos_embed.shape[-1] if len(model.blocks) else 4.0,
            frequency_embedding_size=model.t_embedder.frequency_embedding_size,
            block=model.block,
        )

    @classmethod
    def named(cls, name: str, image_size: int = 256, block: str = "adaLN-Zero") -> "DiTShape":
        if name not in DiT_models:
            raise ValueError(f"unknown model {name!r}; expected one of {sorted(DiT_models)}")
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
        modulation = {"adaLN-Zero": 6, "adaLN": 4}.get(self.block, 0)  # (B, D) vectors per block
        per_block = (
            modulation * D * D  # adaLN modulation, once per sample
            + S * D * 3 * D  # qkv projection
            + 2 * S * S * D  # Q K^T and attention-weighted V, all heads together
            + S * D * D  # output projection
            + 2 * S * D * hidden_mlp  # fc1 and fc2
        )
        if self.block == "cross-attention":  # T queries, M = 2 conditioning tokens
            M = 2
            per_block += T * D * D + M * D * 2 * D + 2 * T * M * D + T * D * D  # q, kv, QK^T and AV, output
        final = (2 * D * D if modulation else 0) + T * D * p * p * self.out_channels
        return patch + timestep + self.depth * per_block + final


def gflops(model_or_name: DiT | str, image_size: int | None = None, *, block: str | None = None) -> float:
    """Forward Gflops per image of a DiT, as the DiT paper counts them (batch 1, 1 flop = 1 MAC).

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

    ``model_or_name``: a :class:`DiT` instance (its own latent size and block design are used;
    ``image_size`` and ``block`` must be None) or a registry name such as ``"DiT-XL/2"`` with
    ``image_size`` in pixels (default 256; the latent side is image_size / 8) and ``block`` (default
    "adaLN-Zero"). A training step costs about 3x the forward.
    """
    if isinstance(model_or_name, DiT):
        if image_size is not None or block is not None:
            raise ValueError("image_size and block apply to a model name; a DiT instance has its own input size and block")
        shape = DiTShape.of(model_or_name)
    elif isinstance(model_or_name, str):
        shape = DiTShape.named(model_or_name, 256 if image_size is None else image_size, block or "adaLN-Zero")
    else:
        raise ValueError(f"expected a DiT or a model name such as 'DiT-XL/2', got {type(model_or_name).__name__}")
    return shape.macs() / 1e9


# describe() lives here, beside DiTShape.of: both read a DiT's shape, and the trainer and the sampler
# already import this module for gflops, so neither has to reach into the other.
def describe(model: DiT) -> str:
    """e.g. "DiT (depth 6, hidden 128, 2 heads, patch 4, 16x16x1 input)"; other block designs than
    adaLN-Zero are named, e.g. "DiT (in-context blocks, depth 6, ...)"."""
    size = model.x_embedder.img_size[0]
    design = "" if model.block == "adaLN-Zero" else f"{model.block} blocks, "
    return (f"DiT ({design}depth {len(model.blocks)}, hidden {model.pos_embed.shape[-1]}, {model.num_heads} heads, "
            f"patch {model.patch_size}, {size}x{size}x{model.in_channels} input)")  # fmt: skip
