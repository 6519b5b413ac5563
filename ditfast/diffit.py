"""DiffiT: a drop-in for the latent model of NVlabs/DiffiT (``diffit/diffit.py``).

DiffiT (Hatamizadeh et al., "DiffiT: Diffusion Vision Transformers for Image Generation", ECCV 2024)
is a DiT-shaped latent model in which time enters the attention instead of adaLN: the "time token"
c = t_emb + y_emb adds a per-sample projection to the queries, keys and values of every block's
time-dependent self-attention (TMSA), whose scores also carry a learned Swin-style relative position
bias. No adaLN, no gates; affine-free LayerNorms (eps 1e-6) before attention and MLP.

Module names, parameter and buffer names and shapes, constructor arguments and defaults follow the
release, so its state_dict (and ``diffit_256/512.safetensors``) loads with ``strict=True`` and gives
its outputs. Shapes in comments: B batch, C channels, H/W latent side, p patch size, w = H/p the
token grid side (the attention window of the latent model), T = w*w tokens, D hidden size, Hd heads.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from . import ops
from .errors import check_bool, check_float, check_int
from .models import (
    BACKENDS, DiT, LabelEmbedder, Mlp, PatchEmbed, TimestepEmbedder, adaln_fused, get_2d_sincos_pos_embed,
    patch_ops_enabled, registry_builder, SIZES,
)  # fmt: skip
from .ops.tmsa import TMSA as TMSA_DISPATCHER, relative_position_index, tmsa_attention

__all__ = [
    "DiffiT", "Diffit", "DiffiT_models", "DiffiTAttention", "DiffiTBlock", "DiffiTFinalLayer",
    "CFG_SCHEDULES", "cfg_schedule_for", "power_cosine_scale",
]  # fmt: skip

# Guidance schedules of DiffiT.forward_with_cfg: "auto" is the release's rule (power-cosine for
# latents of side <= 32, i.e. 256px images; a constant scale above, i.e. 512px).
CFG_SCHEDULES = ("auto", "power-cosine", "constant")
LATENT_SIZE_THRESHOLD = 32

# DiffiT(backend=...) -> the TMSA dispatcher's request (ditfast.ops.tmsa), unless attn_backend forces one.
_TMSA_REQUEST = {"auto": "auto", "eager": "eager", "fused": "triton", "triton": "triton"}


def cfg_schedule_for(input_size: int, schedule: str = "auto") -> str:
    """The guidance schedule a DiffiT of latent side ``input_size`` uses for ``schedule``."""
    if schedule not in CFG_SCHEDULES:
        raise ValueError(f"cfg schedule must be one of {CFG_SCHEDULES}, got {schedule!r}")
    if schedule != "auto":
        return schedule
    return "power-cosine" if input_size <= LATENT_SIZE_THRESHOLD else "constant"


def power_cosine_scale(cfg_scale: float, t: torch.Tensor, diffusion_steps: int = 1000, scale_pow: float = 4.0) -> torch.Tensor:
    """The release's per-sample guidance scale (B,) for timesteps t (B,) on the original
    ``diffusion_steps`` scale: ``1 + (w - 1) * 0.5 * (1 - cos(pi * (1 - t/steps)^scale_pow))``.

    It is w at t = 0 and 1 at t = steps: full guidance at the end of sampling, none at the start.
    """
    phase = ((1 - t / diffusion_steps) ** scale_pow) * math.pi
    scale_step = 0.5 * (1 - torch.cos(phase))
    return (cfg_scale - 1) * scale_step + 1


class DiffiTAttention(nn.Module):
    """Time-dependent multi-head self-attention (TMSA) with a relative position bias.

    ``qkv = qkv(x) + qkv_temb(c)`` (the paper's q = x_s W_qs + x_t W_qt, likewise k and v), scores
    ``(q * scale) k^T + B`` with B gathered from ``relative_position_bias_table`` ((2w-1)^2, Hd) by
    ``relative_position_index`` (w*w, w*w). The op (:func:`ditfast.ops.tmsa.tmsa_attention`)
    computes that index from the tokens' coordinates, so a loaded index must be the canonical one.
    """

    def __init__(self, dim: int, temb_dim: int, num_heads: int, window_size: int = 16, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv_temb = nn.Linear(temb_dim, dim * 3)
        self.window_size = (window_size, window_size)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(self.window_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.backend = "auto"  # TMSA backend request; set by DiffiT

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x: (B, T, D) tokens of the w x w grid, c: (B, D) time token -> (B, T, D)
        qkv = self.qkv(x)  # (B, T, 3D), each token [q | k | v], each head-major
        x = tmsa_attention(qkv, self.num_heads, qkv_t=self.qkv_temb(c), bias_table=self.relative_position_bias_table,
                           grid=self.window_size, scale=self.scale, backend=self.backend)  # (B, T, D)  # fmt: skip
        return self.proj(x)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        index = state_dict.get(prefix + "relative_position_index")
        if isinstance(index, torch.Tensor):
            with torch.device("cpu"):  # (the model may be being built on the meta device)
                canonical = relative_position_index(self.window_size)
            # (a shape mismatch is left to load_state_dict's own report)
            if index.shape == canonical.shape and not torch.equal(index.detach().cpu().long(), canonical):
                bad = int((index.detach().cpu().long() != canonical).sum())
                raise ValueError(
                    f"{prefix}relative_position_index is not the canonical Swin/DiffiT index of a "
                    f"{self.window_size[0]}x{self.window_size[1]} window (entry (i, j) = (y_i - y_j + w - 1) * (2w - 1) "
                    f"+ (x_i - x_j + w - 1)): {bad} of {canonical.numel()} entries differ. The attention computes the "
                    "index from the tokens' coordinates and cannot use another one"
                )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


class DiffiTBlock(nn.Module):
    """``x = x + attn(norm1(x), c)``, ``x = x + mlp(norm2(x))``: affine-free LayerNorms, no adaLN."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, window_size: int = 16):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = DiffiTAttention(hidden_size, hidden_size, num_heads, window_size=window_size, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(in_features=hidden_size, hidden_features=int(hidden_size * mlp_ratio))
        self.backend = "auto"  # set by DiffiT; see ditfast.models.adaln_fused()

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x: (B, T, D) tokens, c: (B, D) time token -> (B, T, D)
        if not adaln_fused(self.backend, x.device, x.dtype, x.shape[-1]):  # the release's block
            x = x + self.attn(self.norm1(x), c)
            x = x + self.mlp(self.norm2(x))
            return x
        # the same math with the fused LayerNorm kernels, unmodulated: norm1; the attention's residual
        # with norm2 (one pass over x)
        h = ops.adaln_layernorm(x, None, None, self.norm1.eps)
        x, h = ops.gated_residual_adaln(x, self.attn(h, c), None, None, None, self.norm2.eps)
        return x + self.mlp(h)


class DiffiTFinalLayer(nn.Module):
    """LayerNorm (no affine) -> SiLU -> Linear (zero-initialised) to p*p*C_out values per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.silu = nn.SiLU()
        self.backend = "auto"  # set by DiffiT; see ditfast.models.adaln_fused()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if adaln_fused(self.backend, x.device, x.dtype, x.shape[-1]):
            h = ops.adaln_layernorm(x, None, None, self.norm_final.eps)
        else:
            h = self.norm_final(x)
        return self.linear(self.silu(h))  # (B, T, p*p*C_out)


class DiffiT(nn.Module):
    """DiffiT, the class-conditional latent model of the release (same constructor and state_dict).

    ``forward(x, t, y)`` maps latents (B, C, H, W), timesteps (B,) in [0, 1000) and labels (B,) in
    [0, num_classes] (``num_classes`` = the null class) to (B, C_out, H, W), C_out = 2C with
    ``learn_sigma``. The attention window is the whole token grid (w = input_size // patch_size:
    16 at 256px, 32 at 512px): global attention with a learned relative bias. ``mask_ratio`` and
    ``decode_layer`` are accepted for the release's signature and unused, as there.

    Keyword-only, as for :class:`ditfast.DiT`: ``backend`` ("auto", "eager", "fused") picks the ops
    -- the unmodulated LayerNorms and residuals (fused LayerNorm kernels), patch embedding,
    unpatchify and timestep features as DiT does, and TMSA through ``ditfast.ops.tmsa`` ("eager":
    its reference, the release's math; "fused": the Triton kernel; "auto": its dispatcher).
    ``attn_backend`` ("auto" or a TMSA backend name: "triton", "sdpa", "eager") forces the
    attention backend whatever ``backend`` says.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 30,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        mask_ratio=None,
        decode_layer=None,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        *,
        backend: str = "auto",
        attn_backend: str = "auto",
    ):
        super().__init__()
        input_size, patch_size = check_int("input_size", input_size, min=1), check_int("patch_size", patch_size, min=1)
        hidden_size, num_heads = check_int("hidden_size", hidden_size, min=4), check_int("num_heads", num_heads, min=1)
        check_int("in_channels", in_channels, min=1)
        check_int("depth", depth, min=0)
        check_int("num_classes", num_classes, min=1)
        check_float("mlp_ratio", mlp_ratio, lo=0, lo_inclusive=False)
        check_float("class_dropout_prob", class_dropout_prob, 0.0, 1.0)
        check_bool("learn_sigma", learn_sigma)
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} must be a multiple of patch_size {patch_size}")
        if hidden_size % 4:
            raise ValueError(f"hidden_size must be a multiple of 4 (the 2D sin-cos position embedding), got {hidden_size}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
        self.grad_checkpointing = False  # recompute each block in backward (see DiT)
        self.check_label_range = True  # check label and timestep values in forward (see DiT)
        self.num_timesteps: int | None = 1000  # forward refuses t outside [0, num_timesteps) (see DiT)
        self.input_size = input_size
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.class_dropout_prob = class_dropout_prob
        self.window_size = input_size // patch_size  # the token grid: global attention

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            [DiffiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio, window_size=self.window_size) for _ in range(depth)]
        )
        self.final_layer = DiffiTFinalLayer(hidden_size, patch_size, self.out_channels)
        self.backend = backend
        self.attn_backend = attn_backend
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The release's initialisation: xavier Linears (zero bias) and patch projection, sin-cos
        position table, N(0, 0.02) label table and timestep MLP, zero final linear layer; the
        relative position bias tables keep their trunc-normal (std 0.02) draw."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], int(self.x_embedder.num_patches**0.5))
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    # the same unpatchify and input checks as DiT (they read only the sizes both models have)
    unpatchify = DiT.unpatchify
    _check_inputs = DiT._check_inputs
    cfg_channels = DiT.cfg_channels

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, enable_mask: bool = False, *,
        force_drop_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """x (B, C, H, W) latents, t (B,) timesteps, y (B,) labels -> (B, C_out, H, W).

        ``enable_mask`` is reserved in the release (unused). ``force_drop_ids`` (B,) (not in the
        release): where 1 the label becomes the null class, and no random label dropout happens.
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
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)  # (B, D) time token
        checkpointed = self.grad_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, c, use_reentrant=False) if checkpointed else block(x, c)  # (B, T, D)
        return self.final_layer(x)  # (B, T, p*p*C_out)

    @property
    def backend(self) -> str:
        """Which ops run: "auto", "eager" (the release's math), "fused" ("triton": its old name); see the class."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {value!r}")
        self._backend = value
        for module in (*self.blocks, self.final_layer, self.t_embedder):
            module.backend = value
        self._set_tmsa_backend()

    @property
    def attn_backend(self) -> str:
        """"auto" (TMSA as ``backend`` says) or a TMSA backend name forced for every block."""
        return self._attn_backend

    @attn_backend.setter
    def attn_backend(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"attn_backend must be a str, got {type(value).__name__}")
        try:
            self._attn_backend = TMSA_DISPATCHER.check_name(value)
        except ValueError as e:
            raise ValueError(f"attn_backend: {e}") from None
        self._set_tmsa_backend()

    def _set_tmsa_backend(self) -> None:
        request = getattr(self, "_attn_backend", "auto")
        request = _TMSA_REQUEST[self._backend] if request == "auto" else request
        for block in self.blocks:
            block.attn.backend = request

    def forward_with_cfg(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        cfg_scale: float | None = None,
        diffusion_steps: int = 1000,
        scale_pow: float = 4.0,
        *,
        cfg_schedule: str = "auto",
        guide_all_channels: bool = False,
        full_batch: bool = True,
    ) -> torch.Tensor:
        """The release's classifier-free guidance on a [cond; uncond] batch.

        ``cfg_scale=None``: the plain forward. Otherwise the first half of ``x`` is duplicated and
        run with ``t`` and ``y``; the first 3 output channels are guided, ``uncond + w_t * (cond -
        uncond)``, the rest pass through. ``cfg_schedule`` (not in the release, whose rule is
        "auto"): "power-cosine" gives w_t = :func:`power_cosine_scale` of the first half's ``t``
        (which must be on the original ``diffusion_steps`` scale), "constant" w_t = cfg_scale, "auto"
        power-cosine for ``input_size <= 32`` and constant above. ``guide_all_channels`` and
        ``full_batch`` (not in the release) as for :meth:`ditfast.DiT.forward_with_cfg`.
        """
        schedule = cfg_schedule_for(self.input_size, cfg_schedule)
        if cfg_scale is None:
            return self.forward(x, t, y)  # (the release's split and concat of channels is a no-op)
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] % 2:
            got = (x.shape[0] if x.dim() else 0) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"forward_with_cfg expects an even batch x = [cond; uncond], got batch {got}")
        if not isinstance(cfg_scale, torch.Tensor):  # a 0-dim tensor (a CUDA graph's refreshed scalar) passes as is
            check_float("cfg_scale", cfg_scale)
        check_float("scale_pow", scale_pow)
        check_int("diffusion_steps", diffusion_steps, min=1)
        n_guided = self.cfg_channels(guide_all_channels)
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        if schedule == "constant" and patch_ops_enabled(self.backend, x.device):  # combine fused into unpatchify
            tokens = self.forward_tokens(combined, t, y)
            n_guided = min(n_guided, self.out_channels)
            return ops.unpatchify_cfg(tokens, self.patch_size, self.out_channels, cfg_scale, n_guided, full_batch=full_batch)
        model_out = self.forward(combined, t, y)
        eps, rest = model_out[:, :n_guided], model_out[:, n_guided:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        if schedule == "power-cosine":
            scale = power_cosine_scale(cfg_scale, t[: len(half)], diffusion_steps, scale_pow)  # (B/2,)
            # the per-sample scale stays in (at least) fp32, as in the release, and the combine runs
            # there; one rounding back to the model's dtype
            scale = scale.to(torch.promote_types(eps.dtype, torch.float32)).view(-1, 1, 1, 1)
            half_eps = (uncond_eps + scale * (cond_eps - uncond_eps)).to(eps.dtype)
        else:
            half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        out = torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)
        return out if full_batch else out[: len(half)]


# ----------------------------------------------------------------------------------------------
# Configs: DiT's four sizes (depth, hidden, heads) at patch 2, 4 and 8; DiffiT-XL/2 is the release's.
# ----------------------------------------------------------------------------------------------


def _make(size: str, patch: int) -> Callable[..., DiffiT]:
    return registry_builder(DiffiT, "DiffiT", size, patch)


# "DiffiT-XL/2" ... "DiffiT-S/8", as DiT's registry; the functions DiffiT_XL_2 ... DiffiT_S_8 as module names
DiffiT_models = {f"DiffiT-{size}/{patch}": _make(size, patch) for size in SIZES for patch in (2, 4, 8)}
globals().update({f.__name__: f for f in DiffiT_models.values()})
__all__ += [f.__name__ for f in DiffiT_models.values()]


def Diffit(**kwargs) -> DiffiT:
    """The release's configuration (its ``Diffit``): depth 28, hidden 1152, patch 2, 16 heads = DiffiT-XL/2."""
    return DiffiT(depth=28, hidden_size=1152, patch_size=2, num_heads=16, **kwargs)
