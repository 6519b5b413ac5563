"""The DiT model: a drop-in for the official ``models.py`` of facebookresearch/DiT.

Module names, parameter names and shapes, constructor arguments and defaults follow the
official release exactly, so an official checkpoint loads with ``strict=True`` and gives the
same outputs. Shapes in comments: B batch, C channels, H/W latent side, p patch size,
T = (H/p)*(W/p) tokens, D hidden size, Hd heads, Dh head dim.

``DiT(..., block=...)`` also builds the paper's three other block designs (Section 3, Figure 5),
which the official release does not ship: "adaLN" (:class:`AdaLNBlock`), "cross-attention"
(:class:`CrossAttentionBlock`) and "in-context" (:class:`ViTBlock`); the default "adaLN-Zero" is
the released model (:class:`DiTBlock`).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import ops
from .attention import attention, check_backend_name, cross_attention
from .errors import check_bool, check_choice, check_float, check_int
from .ops import modulate, timestep_embedding_ref

__all__ = [
    "DiT",
    "DiT_models",
    "get_2d_sincos_pos_embed",
    "modulate",
    "adaln_fused",
    "timestep_compiled",
    "patch_ops_enabled",
    "BACKENDS",
    "BLOCKS",
    "SIZES",
    "TimestepEmbedder",
    "LabelEmbedder",
    "PatchEmbed",
    "Attention",
    "CrossAttention",
    "Mlp",
    "DiTBlock",
    "AdaLNBlock",
    "ViTBlock",
    "CrossAttentionBlock",
    "FinalLayer",
]


# DiT(backend=...): one switch for every fast op but attention (which has attn_backend). "fused"
# asks for every fused/compiled kernel (an error where one cannot run); "triton" is its old name.
BACKENDS = ("auto", "eager", "fused", "triton")
_OP_REQUEST = {  # DiT backend -> the request passed to each op's dispatcher (ditfast.ops.dispatch)
    "auto": {"adaln": "auto", "patch": "auto", "timestep": "auto"},
    "eager": {"adaln": "eager", "patch": "eager", "timestep": "eager"},
    "fused": {"adaln": "triton", "patch": "compiled", "timestep": "compiled"},
}
_OP_REQUEST["triton"] = _OP_REQUEST["fused"]


def adaln_fused(backend: str, device: torch.device, dtype: torch.dtype = torch.float32, hidden: int = 0) -> bool:
    """Whether the adaLN LayerNorm/modulation/gated residuals of a (hidden,)-wide ``dtype`` residual
    stream on ``device`` run as fused Triton kernels for DiT ``backend``: never with "eager" (the
    official math), always with "fused" (an error naming the reason where they cannot run), with
    "auto" as ``ops.ADALN`` decides (``DITFAST_ADALN_BACKEND``, else the kernels on CUDA)."""
    return ops.ADALN.choose(_OP_REQUEST[backend]["adaln"], ops.AdaLNProblem, str(device), dtype, hidden) == "triton"


def patch_ops_enabled(backend: str, device: torch.device) -> bool:
    """Whether DiT embeds patches and unpatchifies with the compiled ops of :mod:`ditfast.ops.patch`
    (one kernel each; the CFG combine fused into unpatchify): never with "eager" (official math),
    always with "fused", with "auto" as ``ops.PATCH`` decides (``DITFAST_PATCH_BACKEND``, else
    compiled on CUDA when ``ditfast._C`` has CUDA ops)."""
    return ops.PATCH.choose(_OP_REQUEST[backend]["patch"], ops.dispatch.OpProblem, str(device)) == "compiled"


def timestep_compiled(backend: str, device: torch.device) -> bool:
    """Whether the timestep features come from ``ditfast._C`` for DiT ``backend`` (``ops.TIMESTEP``)."""
    return ops.TIMESTEP.choose(_OP_REQUEST[backend]["timestep"], ops.dispatch.OpProblem, str(device)) == "compiled"


class TimestepEmbedder(nn.Module):
    """Scalar diffusion timesteps -> (B, D): sinusoidal features, then Linear-SiLU-Linear.

    ``freq_shift`` (default 0, the official features) divides the frequency exponent by
    ``frequency_embedding_size // 2 - freq_shift``; diffusers' DiT uses 1. Only the official
    features have a compiled kernel; other shifts always run the eager reference.
    """

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, freq_shift: float = 0.0):
        super().__init__()
        self.freq_shift = freq_shift
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size
        self.backend = "auto"  # set by DiT; see timestep_compiled()

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
        """(B,) timesteps (may be fractional) -> (B, dim) features ``[cos(t*f), sin(t*f)]``."""
        return timestep_embedding_ref(t, dim, max_period)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        if self.freq_shift:  # diffusers' features (see timestep_embedding_ref)
            t_freq = timestep_embedding_ref(t, self.frequency_embedding_size, freq_shift=self.freq_shift)
        elif timestep_compiled(self.backend, t.device):  # the same features from ditfast._C, one kernel
            t_freq = ops.timestep_embedding(t, self.frequency_embedding_size)  # (B, 256) float32
        else:
            t_freq = self.timestep_embedding(t, self.frequency_embedding_size)  # (B, 256) float32
        # in the MLP's dtype (a no-op for fp32 weights, as in the official model; lets a model cast to
        # float64 or to bf16 without autocast run)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (B, D)


class LabelEmbedder(nn.Module):
    """Class labels -> (B, D), with label dropout for classifier-free guidance.

    The table has ``num_classes + 1`` rows when ``dropout_prob > 0``; row ``num_classes`` is the
    "null" class that the unconditional half of a CFG batch uses.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replace labels by the null class: at random while training, or where force_drop_ids == 1."""
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        use_dropout = self.dropout_prob > 0
        if (train and use_dropout) or (force_drop_ids is not None):
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, T, D): a Conv2d with kernel = stride = p, tokens in row-major order."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, bias: bool = True):
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, T, D)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (rows [q | k | v], head-major)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.backend = "auto"  # attention backend (see ditfast.attention); set by DiT(attn_backend=...)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)  # (B, T, 3D), each token [q | k | v], each head-major
        # softmax(q k^T * scale) v per head; on CPU "auto" is exactly F.scaled_dot_product_attention
        x = attention(qkv, self.num_heads, scale=self.scale, backend=self.backend)  # (B, T, D)
        return self.proj(x)


class CrossAttention(nn.Module):
    """Multi-head attention of the image tokens (queries) to the conditioning tokens (keys, values)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)  # rows [k | v], each head-major
        self.proj = nn.Linear(dim, dim)
        self.backend = "auto"  # cross-attention backend (see ditfast.attention); set by DiT(attn_backend=...)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        # x: (B, T, D) image tokens, cond: (B, M, D) conditioning tokens -> (B, T, D)
        x = cross_attention(self.q(x), self.kv(cond), self.num_heads, scale=self.scale, backend=self.backend)
        return self.proj(x)


class Mlp(nn.Module):
    """fc1 (D -> hidden) -> GELU (tanh approximation) -> fc2 (hidden -> D)."""

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    """What every block design has: norm1 -> self-attention and norm2 -> MLP, each a pre-norm residual.

    The LayerNorms (eps 1e-6) are affine-free where adaLN regresses their scale and shift from c, and
    standard affine LayerNorms in the designs without modulation, as in a standard ViT block.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, affine_norms: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=affine_norms, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=affine_norms, eps=1e-6)
        self.mlp = Mlp(in_features=hidden_size, hidden_features=int(hidden_size * mlp_ratio))
        self.backend = "auto"  # set by DiT; see adaln_fused()


class DiTBlock(_Block):
    """A transformer block with adaLN-Zero conditioning: six (B, D) vectors from c per block."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__(hidden_size, num_heads, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x: (B, T, D) tokens, c: (B, D) conditioning -> (B, T, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        if not adaln_fused(self.backend, x.device, x.dtype, x.shape[-1]):  # the official block
            x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
            x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
            return x
        # the same math in three fused kernels: norm1 + modulation; the attention's gated residual
        # with norm2 + modulation (one pass over x); the MLP's gated residual
        h = ops.adaln_layernorm(x, shift_msa, scale_msa, self.norm1.eps)  # modulate(norm1(x))
        x, h = ops.gated_residual_adaln(x, self.attn(h), gate_msa, shift_mlp, scale_mlp, self.norm2.eps)
        return ops.gated_residual(x, self.mlp(h), gate_mlp)


class AdaLNBlock(_Block):
    """A transformer block with adaLN conditioning (the paper's "adaLN" design): four (B, D) vectors
    from c per block, the shift and scale of both LayerNorms, and no gates."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__(hidden_size, num_heads, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 4 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x: (B, T, D) tokens, c: (B, D) conditioning -> (B, T, D)
        shift_msa, scale_msa, shift_mlp, scale_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
        if not adaln_fused(self.backend, x.device, x.dtype, x.shape[-1]):
            x = x + self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
            x = x + self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
            return x
        # fused: norm1 + modulation; the attention's residual (no gate) with norm2 + modulation
        h = ops.adaln_layernorm(x, shift_msa, scale_msa, self.norm1.eps)
        x, h = ops.gated_residual_adaln(x, self.attn(h), None, shift_mlp, scale_mlp, self.norm2.eps)
        return x + self.mlp(h)


def _affine(norm: nn.LayerNorm, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A standard LayerNorm's weight and bias as the (shift, scale) the adaLN kernels take (B, D)."""
    return ops.affine_modulation(norm.weight, norm.bias, x.shape[0])


class ViTBlock(_Block):
    """A standard ViT block (the paper's "in-context" design: t and y ride along as two extra tokens)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__(hidden_size, num_heads, mlp_ratio, affine_norms=True)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, T + 2, D) tokens, the two conditioning ones among them -> (B, T + 2, D); c is unused
        if not adaln_fused(self.backend, x.device, x.dtype, x.shape[-1]):
            x = x + self.attn(self.norm1(x))
            x = x + self.mlp(self.norm2(x))
            return x
        # fused: norm1; the attention's residual with norm2 (the LayerNorms' affine as a modulation)
        h = ops.adaln_layernorm(x, *_affine(self.norm1, x), self.norm1.eps)
        x, h = ops.gated_residual_adaln(x, self.attn(h), None, *_affine(self.norm2, x), self.norm2.eps)
        return x + self.mlp(h)


class CrossAttentionBlock(ViTBlock):
    """A standard ViT block with a multi-head cross-attention layer after its self-attention: the
    image tokens attend to the conditioning sequence [t; y] (the paper's "cross-attention" design)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__(hidden_size, num_heads, mlp_ratio)
        self.norm_cross = nn.LayerNorm(hidden_size, eps=1e-6)
        self.cross_attn = CrossAttention(hidden_size, num_heads)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x: (B, T, D) tokens, c: (B, 2, D) conditioning tokens [t; y] -> (B, T, D)
        if not adaln_fused(self.backend, x.device, x.dtype, x.shape[-1]):
            x = x + self.attn(self.norm1(x))
            x = x + self.cross_attn(self.norm_cross(x), c)
            x = x + self.mlp(self.norm2(x))
            return x
        # fused: each residual with the next LayerNorm in one kernel
        h = ops.adaln_layernorm(x, *_affine(self.norm1, x), self.norm1.eps)
        x, h = ops.gated_residual_adaln(x, self.attn(h), None, *_affine(self.norm_cross, x), self.norm_cross.eps)
        x, h = ops.gated_residual_adaln(x, self.cross_attn(h, c), None, *_affine(self.norm2, x), self.norm2.eps)
        return x + self.mlp(h)


# DiT(block=...): the paper's four block designs, and whether the final LayerNorm is adaptive
BLOCKS: dict[str, type[nn.Module]] = {
    "adaLN-Zero": DiTBlock, "adaLN": AdaLNBlock, "cross-attention": CrossAttentionBlock, "in-context": ViTBlock,
}  # fmt: skip
_ADAPTIVE = ("adaLN-Zero", "adaLN")


class FinalLayer(nn.Module):
    """LayerNorm -> Linear to p*p*C_out values per token. The LayerNorm is adaptive (shift, scale
    regressed from c) in the adaLN designs, a standard affine one in the others."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, adaptive: bool = True):
        super().__init__()
        self.adaptive = adaptive
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=not adaptive, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        if adaptive:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))
        self.backend = "auto"  # set by DiT; see adaln_fused()

    def forward(self, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        fused = adaln_fused(self.backend, x.device, x.dtype, x.shape[-1])
        if not self.adaptive:
            h = ops.adaln_layernorm(x, *_affine(self.norm_final, x), self.norm_final.eps) if fused else self.norm_final(x)
            return self.linear(h)  # (B, T, p*p*C_out)
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        if fused:
            h = ops.adaln_layernorm(x, shift, scale, self.norm_final.eps)  # one kernel
        else:
            h = modulate(self.norm_final(x), shift, scale)
        return self.linear(h)  # (B, T, p*p*C_out)


def _check_config(input_size, patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio,
                  class_dropout_prob, num_classes, learn_sigma, backend, attn_backend, block) -> None:
    """Refuse a DiT configuration before anything is built: a TypeError for a wrong type, a
    ValueError for a value out of range or inconsistent with another, each naming the argument.
    ``depth`` 0 (no blocks: patch embedding, conditioning and final layer only) is allowed."""
    input_size = check_int("input_size", input_size, min=1)
    patch_size = check_int("patch_size", patch_size, min=1)
    check_int("in_channels", in_channels, min=1)
    hidden_size = check_int("hidden_size", hidden_size, min=4)
    check_int("depth", depth, min=0)
    num_heads = check_int("num_heads", num_heads, min=1)
    mlp_ratio = check_float("mlp_ratio", mlp_ratio, lo=0, lo_inclusive=False)
    check_float("class_dropout_prob", class_dropout_prob, 0.0, 1.0)
    check_int("num_classes", num_classes, min=1)
    check_bool("learn_sigma", learn_sigma)
    check_choice("backend", backend, BACKENDS)
    check_choice("block", block, BLOCKS)
    try:
        check_backend_name(attn_backend)
    except (TypeError, ValueError) as e:
        raise ValueError(f"attn_backend: {e}") from None
    if input_size % patch_size:
        raise ValueError(f"input_size {input_size} must be a multiple of patch_size {patch_size}")
    if hidden_size % 4:
        # the 2D sin-cos position embedding splits D into four equal parts
        raise ValueError(f"hidden_size must be a multiple of 4, got {hidden_size}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
    if int(hidden_size * mlp_ratio) < 1:
        raise ValueError(f"mlp_ratio {mlp_ratio} gives an MLP of int({hidden_size} * {mlp_ratio}) = 0 hidden units")


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone (Peebles & Xie, ICCV 2023).

    Same constructor, defaults, submodules and state_dict keys as the official ``DiT`` class.
    ``forward(x, t, y)`` maps latents (B, C, H, W), timesteps (B,) in [0, 1000) and labels (B,)
    in [0, num_classes] (``num_classes`` = the null class) to (B, C_out, H, W), where
    C_out = 2*C with ``learn_sigma`` (eps and the variance interpolation v) and C otherwise.
    Inputs outside that contract are refused with a ValueError before any work: x of another rank,
    shape, device or dtype than the parameters (outside autocast), boolean/complex t, NaN or
    infinite t, t outside [0, ``num_timesteps``) (fractional t is allowed), non-integer or
    out-of-range y. The value checks cost one device-to-host read (``check_label_range``).
    Constructor arguments are checked for type, range and consistency (:func:`_check_config`).

    ``block`` (keyword-only) picks one of the paper's four block designs (Section 3.2, Figure 5):
    "adaLN-Zero" (default: the released model, state_dict and outputs unchanged), "adaLN" (the
    LayerNorms' shift and scale regressed from c = t + y, no gates), "cross-attention" (standard
    blocks with a cross-attention layer to the sequence [t; y]) and "in-context" (standard ViT
    blocks; t and y appended as two tokens, dropped after the last block). The final LayerNorm is
    adaptive in the two adaLN designs and a standard affine one in the others. Initialisation: the
    official one throughout (xavier Linears, zero final linear layer); only adaLN-Zero zero-initialises
    the modulation (of every block and of the final layer), which makes each block the identity at
    the start. adaLN keeps the default xavier init there, as the paper zero-initialises only for
    adaLN-Zero; LayerNorm weights start at 1, biases at 0.

    ``timestep_freq_shift`` and ``mlp_norm_eps`` (keyword-only) are numeric settings for models
    converted from diffusers' ``DiTTransformer2DModel`` (:mod:`ditfast.interop.diffusers`, which
    sets them to 1 and the folder's ``norm_eps``): the timestep features' frequency shift (see
    :class:`TimestepEmbedder`) and the eps of each block's LayerNorm before the MLP. The defaults,
    0 and 1e-6, are the official math; neither setting adds a state_dict key, and both are kept as
    attributes of the same names.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        *,
        backend: str = "auto",
        attn_backend: str = "auto",
        block: str = "adaLN-Zero",
        timestep_freq_shift: float = 0.0,
        mlp_norm_eps: float = 1e-6,
    ):
        super().__init__()
        # numeric settings of models converted from diffusers (ditfast.interop.diffusers); the
        # defaults are the official math. They add no state_dict keys.
        self.timestep_freq_shift = check_float("timestep_freq_shift", timestep_freq_shift, 0.0, 127.0)
        self.mlp_norm_eps = check_float("mlp_norm_eps", mlp_norm_eps, 0.0, 1.0, lo_inclusive=False)
        _check_config(input_size, patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio,
                      class_dropout_prob, num_classes, learn_sigma, backend, attn_backend, block)
        self.block = block
        self.grad_checkpointing = False  # recompute each block in backward (less memory, ~1.3x compute)
        # Check the label values on every forward (one device-to-host read of min/max). Callers that
        # validate labels once up front, such as the sampling engine, turn it off: per step, that
        # read stalls the host until the GPU catches up and breaks the launch pipelining.
        self.check_label_range = True
        # The length of the diffusion the model was trained on: forward refuses timesteps outside
        # [0, num_timesteps) (checked with the labels, under check_label_range). 1000 is the DiT
        # schedule (create_diffusion's default); set it for a model trained with another
        # diffusion_steps, or to None to check only that timesteps are finite and >= 0.
        self.num_timesteps: int | None = 1000
        self.input_size = input_size
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.class_dropout_prob = class_dropout_prob

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size, freq_shift=timestep_freq_shift)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        # Fixed sin-cos embedding; a frozen Parameter so it is saved in the state_dict like the official one.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([BLOCKS[block](hidden_size, num_heads, mlp_ratio=mlp_ratio) for _ in range(depth)])
        for b in self.blocks:  # the LayerNorm before each MLP (the eager and the fused path read .eps)
            b.norm2.eps = mlp_norm_eps
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, adaptive=block in _ADAPTIVE)
        self.backend = backend
        self.attn_backend = attn_backend
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The official initialisation: xavier Linear/patch weights, zero adaLN (adaLN-Zero only) and output layers."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)

        grid = int(self.x_embedder.num_patches**0.5)
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid)
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))

        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        if self.block == "adaLN-Zero":  # zero modulation: every block starts as the identity
            for block in self.blocks:
                nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
                nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
            nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, p*p*C_out) with per-token channel order (p, q, c) -> (B, C_out, H, W)."""
        c = self.out_channels
        p = self.x_embedder.patch_size[0]
        h = w = int(x.shape[1] ** 0.5)
        if h * w != x.shape[1] or x.shape[2] != p * p * c:
            raise ValueError(
                f"unpatchify expects (B, T, {p * p * c}) with T a square number, got {tuple(x.shape)}"
            )
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> None:
        """Raise ValueError, saying what was expected, for inputs the model cannot take."""
        size = self.x_embedder.img_size[0]
        expected = f"(B, {self.in_channels}, {size}, {size})"
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a 4-D latent batch {expected}, got {got}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if x.shape[1] != self.in_channels or tuple(x.shape[2:]) != (size, size):
            raise ValueError(f"x must have shape {expected} for this model, got {tuple(x.shape)}")
        weight = self.x_embedder.proj.weight
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(f"x has dtype {x.dtype} but the model's parameters are {weight.dtype}: cast x "
                            f"(x.to({weight.dtype})) or the model (model.to({x.dtype})), or run under torch.autocast")
        if x.device != weight.device:
            raise ValueError(f"x is on {x.device} but the model is on {weight.device}")
        batch = x.shape[0]
        for name, v in (("t", t), ("y", y)):
            if not isinstance(v, torch.Tensor) or v.dim() != 1 or v.shape[0] != batch:
                got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"{name} must be a 1-D tensor with one entry per sample ({batch},), got {got}")
            if v.device != x.device:
                raise ValueError(f"{name} is on {v.device} but x is on {x.device}")
        if t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"t must hold real (integer or floating-point) timesteps, got dtype {t.dtype}")
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise ValueError(f"y must hold integer class labels, got dtype {y.dtype}")
        # Value ranges need the values; skip while tracing or capturing a CUDA graph (no host sync).
        if torch.compiler.is_compiling() or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
            return
        if batch == 0 or not self.check_label_range:
            return
        # one device-to-host read for both ranges (min/max propagate NaN)
        t_lo, t_hi, lo, hi = torch.stack([*torch.aminmax(t.double()), *torch.aminmax(y.double())]).tolist()
        if not (math.isfinite(t_lo) and math.isfinite(t_hi)):
            raise ValueError("t must hold finite timesteps, got NaN or infinity")
        top_t = self.num_timesteps
        if t_lo < 0 or (top_t is not None and t_hi >= top_t):
            expected = f"[0, {top_t})" if top_t is not None else ">= 0"
            raise ValueError(f"t must lie in {expected} (the model's training diffusion steps; see "
                             f"DiT.num_timesteps), got values in [{t_lo:g}, {t_hi:g}]")
        top = self.y_embedder.embedding_table.num_embeddings - 1
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi > top:
            null = f" ({self.num_classes} is the null class)" if top == self.num_classes else ""
            raise ValueError(f"y: labels must lie in [0, {top}]{null}, got values in [{lo}, {hi}]")

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, force_drop_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B, C, H, W) latents, t (B,) timesteps, y (B,) labels -> (B, C_out, H, W).

        ``force_drop_ids`` (B,) (not in the official signature, which is otherwise unchanged): where 1,
        the label is replaced by the null class; when given, no random label dropout happens, so a
        trainer can draw the dropout itself (reproducible across ranks and resumes).
        """
        x = self.forward_tokens(x, t, y, force_drop_ids)  # (B, T, p*p*C_out)
        if patch_ops_enabled(self.backend, x.device):
            return ops.unpatchify(x, self.patch_size, self.out_channels)
        return self.unpatchify(x)  # (B, C_out, H, W)

    def forward_tokens(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, force_drop_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The model up to its final linear layer: (B, T, p*p*C_out) tokens, before unpatchify."""
        self._check_inputs(x, t, y)
        if patch_ops_enabled(self.backend, x.device):
            x = ops.patch_embed(x, self.x_embedder.proj.weight, self.x_embedder.proj.bias, self.pos_embed)
        else:
            x = self.x_embedder(x) + self.pos_embed  # (B, T, D)
        t = self.t_embedder(t)  # (B, D)
        y = self.y_embedder(y, self.training, force_drop_ids)  # (B, D)
        if self.block == "in-context":  # two more tokens, no other conditioning
            x, c = torch.cat([x, t.unsqueeze(1), y.unsqueeze(1)], dim=1), None  # (B, T + 2, D)
        elif self.block == "cross-attention":
            c = torch.stack([t, y], dim=1)  # (B, 2, D): the sequence the image tokens attend to
        else:
            c = t + y  # (B, D)
        checkpointed = self.grad_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, c, use_reentrant=False) if checkpointed else block(x, c)  # (B, T, D) or T + 2
        if self.block == "in-context":
            x = x[:, :-2]  # (B, T, D): the two conditioning tokens dropped
        return self.final_layer(x, c)  # (B, T, p*p*C_out)

    @property
    def backend(self) -> str:
        """Which ops run everything but attention (adaLN LayerNorm/modulation/gated residuals, patch
        embedding, unpatchify, timestep features): "auto", "eager", "fused" ("triton": old name).

        "eager" is the official PyTorch math; "fused" the Triton kernels and ``ditfast._C`` ops (an
        error where one cannot run); "auto" (default) lets each op's dispatcher pick
        (``ditfast.ops.dispatch``: the fast kernels on CUDA, the official math on the CPU). See
        :func:`adaln_fused`, :func:`patch_ops_enabled`, :func:`timestep_compiled`.
        """
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {value!r}")
        self._backend = value
        for module in (*self.blocks, self.final_layer, self.t_embedder):
            module.backend = value

    @property
    def attn_backend(self) -> str:
        """Which attention backend the blocks use: "auto" (default: ``DITFAST_ATTN_BACKEND`` if set,
        else the fastest that fits, see ``ditfast.attention.PRIORITY``) or a name from
        ``ditfast.attention.BACKENDS`` ("flash-attn", "sdpa-math", "triton", ...) to force one. The
        cross-attention layers (block="cross-attention") take the same request through their own
        dispatcher (``ditfast.attention.CROSS_ATTENTION``), where "triton" cannot run."""
        return self._attn_backend

    @attn_backend.setter
    def attn_backend(self, value: str) -> None:
        self._attn_backend = check_backend_name(value)
        for block in self.blocks:
            block.attn.backend = value
            if isinstance(block, CrossAttentionBlock):
                block.cross_attn.backend = value

    def cfg_channels(self, guide_all_channels: bool = False) -> int:
        """How many leading output channels classifier-free guidance combines: 3 under the official
        rule, ``in_channels`` (every eps channel) with ``guide_all_channels``. Raises ValueError for a
        model that cannot be guided: one without a null class (trained with class_dropout_prob = 0),
        or one whose learned-sigma output would put variance channels among the 3 the official rule
        guides (``in_channels`` < 3: guiding the variance interpolation is meaningless)."""
        check_bool("guide_all_channels", guide_all_channels)
        if self.y_embedder.embedding_table.num_embeddings <= self.num_classes:
            raise ValueError("classifier-free guidance (cfg scale > 1) needs a model with a null class "
                             "(trained with class_dropout_prob > 0)")  # fmt: skip
        if guide_all_channels:
            return self.in_channels
        if self.learn_sigma and self.in_channels < 3:
            raise ValueError(f"the official CFG rule guides 3 eps channels but the model has {self.in_channels} "
                             f"(channels {self.in_channels}.. are its learned variance, which must not be guided); "
                             "use guide_all_channels=True (--guide-all-channels)")  # fmt: skip
        return min(3, self.in_channels)

    def forward_with_cfg(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        cfg_scale: float,
        guide_all_channels: bool = False,
        full_batch: bool = True,
    ) -> torch.Tensor:
        """Classifier-free guidance on a [cond; uncond] batch.

        Only the first half of ``x`` is used (duplicated), as in the official code. With the default
        ``guide_all_channels=False`` the official rule applies: only output channels ``[:3]`` are
        guided, everything else passes through from the model (kept for exact reproducibility of the
        published FIDs). ``guide_all_channels=True`` guides all ``in_channels`` eps channels (what
        diffusers does) and passes through only the variance channels. ``full_batch=False`` (not in
        the official signature) returns only the first half, what a sampler steps with; the fused
        unpatchify then writes only that half.
        """
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] % 2:
            got = (x.shape[0] if x.dim() else 0) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"forward_with_cfg expects an even batch x = [cond; uncond], got batch {got}")
        if not isinstance(cfg_scale, torch.Tensor):  # a 0-dim tensor (a CUDA graph's refreshed scalar) passes as is
            check_float("cfg_scale", cfg_scale)
        n_guided = self.cfg_channels(guide_all_channels)
        check_bool("full_batch", full_batch)
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        if patch_ops_enabled(self.backend, x.device):  # the lines below, fused into the unpatchify pass
            tokens = self.forward_tokens(combined, t, y)
            n_guided = min(n_guided, self.out_channels)
            return ops.unpatchify_cfg(tokens, self.patch_size, self.out_channels, cfg_scale, n_guided, full_batch=full_batch)
        model_out = self.forward(combined, t, y)
        eps, rest = model_out[:, :n_guided], model_out[:, n_guided:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        out = torch.cat([eps, rest], dim=1)
        return out if full_batch else out[: len(half)]


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """(grid_size**2, embed_dim) float64 MAE-style 2D sin-cos table, token index h*G + w.

    The first half of the channels encodes the column (w) coordinate, the second half the row (h).
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be a multiple of 4, got {embed_dim}")
    coords = np.arange(grid_size, dtype=np.float64)
    col = np.tile(coords, grid_size)  # w of token h*G + w
    row = np.repeat(coords, grid_size)  # h of token h*G + w
    return np.concatenate([_sincos_1d(embed_dim // 2, col), _sincos_1d(embed_dim // 2, row)], axis=1)


def _sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, embed_dim) ``[sin(pos*omega), cos(pos*omega)]``, omega_i = 10000^(-2i/embed_dim)."""
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


# ----------------------------------------------------------------------------------------------
# Configs: the official registry, names and functions.
# ----------------------------------------------------------------------------------------------

# name -> (depth, hidden size, heads) of the paper's four model sizes
SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}


def registry_builder(cls: type, name: str, size: str, patch: int) -> Callable[..., nn.Module]:
    """``{name}_{size}_{patch}(**kwargs)``: ``cls`` at one of :data:`SIZES` and a patch size (the
    registries of DiT and DiffiT are built with it)."""
    depth, hidden, heads = SIZES[size]

    def build(**kwargs) -> nn.Module:
        return cls(depth=depth, hidden_size=hidden, patch_size=patch, num_heads=heads, **kwargs)

    build.__name__ = build.__qualname__ = f"{name}_{size}_{patch}"
    build.__doc__ = f"{name}-{size}/{patch}: depth {depth}, hidden {hidden}, {heads} heads, patch {patch}."
    return build


def _make(size: str, patch: int) -> Callable[..., DiT]:
    return registry_builder(DiT, "DiT", size, patch)


DiT_XL_2, DiT_XL_4, DiT_XL_8 = _make("XL", 2), _make("XL", 4), _make("XL", 8)
DiT_L_2, DiT_L_4, DiT_L_8 = _make("L", 2), _make("L", 4), _make("L", 8)
DiT_B_2, DiT_B_4, DiT_B_8 = _make("B", 2), _make("B", 4), _make("B", 8)
DiT_S_2, DiT_S_4, DiT_S_8 = _make("S", 2), _make("S", 4), _make("S", 8)

DiT_models = {
    "DiT-XL/2": DiT_XL_2, "DiT-XL/4": DiT_XL_4, "DiT-XL/8": DiT_XL_8,
    "DiT-L/2": DiT_L_2, "DiT-L/4": DiT_L_4, "DiT-L/8": DiT_L_8,
    "DiT-B/2": DiT_B_2, "DiT-B/4": DiT_B_4, "DiT-B/8": DiT_B_8,
    "DiT-S/2": DiT_S_2, "DiT-S/4": DiT_S_4, "DiT-S/8": DiT_S_8,
}  # fmt: skip

__all__ += [f.__name__ for f in DiT_models.values()]


def heads_for_hidden(hidden_size: int) -> int:
    """The registry's rule for the number of heads: as the registry for its four widths, else D/64."""
    for _, hidden, heads in SIZES.values():
        if hidden == hidden_size:
            return heads
    if hidden_size % 64:
        raise ValueError(
            f"cannot infer num_heads for hidden size {hidden_size} (not a registry width and not a "
            "multiple of 64): pass num_heads explicitly"
        )
    return hidden_size // 64
