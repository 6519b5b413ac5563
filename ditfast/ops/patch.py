"""DiT's input and output layout ops: patch embedding, unpatchify (and its inverse, patchify) and
unpatchify fused with classifier-free guidance. Compiled ops of ``ditfast._C`` (C++ on CPU, CUDA
kernels on GPU) with a plain-PyTorch reference ``<op>_ref`` beside each.

Public API (argument orders are part of it):

    patch_embed(x, weight, bias=None, pos_embed=None)       (B, C, H, W) -> (B, T, D)
    unpatchify(tokens, patch_size, channels)                 (B, T, p*p*C) -> (B, C, H, W)
    patchify(image, patch_size)                              (B, C, H, W) -> (B, T, p*p*C)
    unpatchify_cfg(tokens, patch_size, channels, cfg_scale, guided_channels=3, full_batch=True)
                                                             (2N, T, p*p*C) -> (2N or N, C, H, W)

Layouts are the official DiT ones: tokens row-major over the (H/p, W/p) patch grid; the patch
embedding weight is a Conv2d's (D, C, p, p), so a patch's values are taken in (c, kh, kw) order;
the model's output tokens hold their p*p*C values in (i, j, c) order (einsum 'nhwpqc->nchpwq').
unpatchify/patchify/unpatchify_cfg take a square patch grid (T = G*G, H = W = G*p).

The compiled ops compute in fp32 (fp64 for fp64 tensors) and round once. ``patch_embed`` and
``unpatchify``/``patchify`` are differentiable (``patch_embed``'s backward gives x, weight, bias and
pos_embed gradients; dweight and dbias are GEMM/reductions through ATen); ``unpatchify_cfg`` is
for sampling and has no backward. When ``ditfast._C`` is missing (or was built without the
device's kernels) the references run instead, after a one-time warning.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .._ext import extension_loaded, op_available, warn_fallback
from .dispatch import CompiledBackend, Dispatcher, EagerBackend, register

__all__ = [
    "patch_embed", "patch_embed_ref",
    "unpatchify", "unpatchify_ref",
    "patchify", "patchify_ref",
    "unpatchify_cfg", "unpatchify_cfg_ref",
]  # fmt: skip

# Which a DiT runs (see ditfast.ops.dispatch): "auto" takes the compiled ops on CUDA only, so on a CPU
# a model computes exactly the official math by default.
PATCH = register(Dispatcher("patch", [EagerBackend(), CompiledBackend()], {"cuda": ["compiled", "eager"], "cpu": ["eager"]},
                            "DITFAST_PATCH_BACKEND", ["eager"]))  # fmt: skip

# ------------------------------------------------------------------------------------------
# References: the official DiT math
# ------------------------------------------------------------------------------------------


def patch_embed_ref(x, weight, bias=None, pos_embed=None):
    """DiT's PatchEmbed (Conv2d, kernel = stride = p, then flatten + transpose) and the position add."""
    out = F.conv2d(x, weight, bias, stride=weight.shape[-1]).flatten(2).transpose(1, 2)  # (B, T, D)
    return out if pos_embed is None else out + pos_embed


def unpatchify_ref(tokens, patch_size: int, channels: int):
    """DiT.unpatchify: (B, G*G, p*p*C) -> (B, C, G*p, G*p) via einsum 'nhwpqc->nchpwq'."""
    p, c = patch_size, channels
    g = math.isqrt(tokens.shape[1])
    x = tokens.reshape(tokens.shape[0], g, g, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], c, g * p, g * p)


def patchify_ref(image, patch_size: int):
    """The inverse of unpatchify: (B, C, G*p, G*p) -> (B, G*G, p*p*C), per-token order (i, j, c)."""
    B, C, H, _ = image.shape
    p, g = patch_size, H // patch_size
    x = image.reshape(B, C, g, p, g, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(B, g * g, p * p * C)


def unpatchify_cfg_ref(tokens, patch_size: int, channels: int, cfg_scale: float, guided_channels: int = 3, full_batch: bool = True):
    """unpatchify, then DiT.forward_with_cfg's combine on the [cond; uncond] batch (input dtype math)."""
    model_out = unpatchify_ref(tokens, patch_size, channels)
    eps, rest = model_out[:, :guided_channels], model_out[:, guided_channels:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    out = torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)
    return out if full_batch else out[: len(out) // 2]


# ------------------------------------------------------------------------------------------
# Public functions: argument checks (ValueError), then the compiled op or the reference
# ------------------------------------------------------------------------------------------


def _describe(t) -> str:
    return f"{tuple(t.shape)} {t.dtype} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__


def _check_float(name: str, t, dims: int, layout: str, device=None) -> None:
    ok = isinstance(t, torch.Tensor) and t.dim() == dims and t.is_floating_point()
    if not ok or (device is not None and t.device != device):
        where = f" on {device}" if device is not None else ""
        raise ValueError(f"{name} must be a floating-point {layout} tensor{where}, got {_describe(t)}")


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


def _grid_side(tokens: torch.Tensor, patch_size: int, channels: int) -> int:
    """G for tokens (B, G*G, p*p*C), or ValueError."""
    _check_float("tokens", tokens, 3, "(B, T, p*p*C)")
    _check_positive(patch_size=patch_size, channels=channels)
    values = patch_size * patch_size * channels
    g = math.isqrt(tokens.shape[1])
    if tokens.shape[2] != values or g * g != tokens.shape[1]:
        raise ValueError(
            f"tokens must be (B, T, p*p*C) = (B, G*G, {values}) for patch_size={patch_size}, "
            f"channels={channels}, got {tuple(tokens.shape)}"
        )
    return g


def _dispatch(op: str, device: torch.device, compiled, reference):
    if op_available(device):
        return compiled()
    warn_fallback(op, device.type)
    return reference()


def patch_embed(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, pos_embed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`patch_embed_ref` in one kernel: x (B, C, H, W), weight (D, C, p, p), bias (D,),
    pos_embed (1, T, D) -> (B, T, D), T = (H/p)*(W/p).

    Tensors of different floating dtypes are first cast to their promoted dtype (the output's).
    """
    _check_float("x", x, 4, "(B, C, H, W)")
    _check_float("weight", weight, 4, "(D, C, p, p)", x.device)
    D, C, p, q = weight.shape
    B, _, H, W = x.shape
    if p != q or x.shape[1] != C or p < 1 or H % p or W % p:
        raise ValueError(f"weight must be (D, C, p, p) with C = x's {x.shape[1]} channels and p dividing H and W {(H, W)}, got {tuple(weight.shape)}")
    T = (H // p) * (W // p)
    if bias is not None:
        _check_float("bias", bias, 1, f"({D},)", x.device)
        if bias.shape[0] != D:
            raise ValueError(f"bias must be ({D},), got {tuple(bias.shape)}")
    if pos_embed is not None:
        _check_float("pos_embed", pos_embed, 3, f"(1, {T}, {D})", x.device)
        if tuple(pos_embed.shape) != (1, T, D):
            raise ValueError(f"pos_embed must be (1, {T}, {D}), got {tuple(pos_embed.shape)}")
    dtype = x.dtype
    for t in (weight, bias, pos_embed):
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    x, weight, bias, pos_embed = (t.to(dtype) if t is not None else None for t in (x, weight, bias, pos_embed))
    return _dispatch(
        "patch_embed", x.device,
        lambda: torch.ops.ditfast.patch_embed(x, weight, bias, pos_embed),
        lambda: patch_embed_ref(x, weight, bias, pos_embed),
    )  # fmt: skip


def unpatchify(tokens: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """:func:`unpatchify_ref` in one pass: (B, G*G, p*p*C) -> (B, C, G*p, G*p)."""
    _grid_side(tokens, patch_size, channels)
    return _dispatch(
        "unpatchify", tokens.device,
        lambda: torch.ops.ditfast.unpatchify(tokens, patch_size, channels),
        lambda: unpatchify_ref(tokens, patch_size, channels),
    )  # fmt: skip


def patchify(image: torch.Tensor, patch_size: int) -> torch.Tensor:
    """:func:`patchify_ref` in one pass: (B, C, G*p, G*p) -> (B, G*G, p*p*C)."""
    _check_float("image", image, 4, "(B, C, H, H)")
    _check_positive(patch_size=patch_size)
    H, W = image.shape[2:]
    if H != W or H % patch_size:
        raise ValueError(f"image must be square with a side divisible by patch_size={patch_size}, got {tuple(image.shape)}")
    return _dispatch(
        "patchify", image.device,
        lambda: torch.ops.ditfast.patchify(image, patch_size),
        lambda: patchify_ref(image, patch_size),
    )  # fmt: skip


def unpatchify_cfg(tokens: torch.Tensor, patch_size: int, channels: int, cfg_scale: float, guided_channels: int = 3, full_batch: bool = True) -> torch.Tensor:
    """unpatchify fused with classifier-free guidance, one pass over the model output.

    ``tokens`` is the final layer's output (2N, G*G, p*p*C) on a [cond; uncond] batch; ``channels``
    is C, the model's output channels (2 * latent channels with learned sigma). Channels
    ``[0, guided_channels)`` become ``uncond + cfg_scale * (cond - uncond)`` (fp32 math); the rest
    (the official rule's unguided 4th eps channel, the variance channels) pass through.
    ``guided_channels=3`` is the official DiT rule, ``guided_channels=C_latent`` guides all eps
    channels as diffusers does.

    Returns (2N, C, H, W) with ``full_batch=True``: exactly ``DiT.forward_with_cfg``'s output, the
    guided channels duplicated into both halves, pass-through channels from each half's own
    sample. ``full_batch=False`` returns only the first N of those samples (guided channels plus
    the conditional pass-through values): the half a sampler keeps, without writing the other.
    """
    _grid_side(tokens, patch_size, channels)
    if tokens.shape[0] % 2:
        raise ValueError(f"tokens must hold an even [cond; uncond] batch, got batch {tokens.shape[0]}")
    if not isinstance(guided_channels, int) or not 0 <= guided_channels <= channels:
        raise ValueError(f"guided_channels must be an int in [0, {channels}], got {guided_channels!r}")
    cfg_scale, full_batch = float(cfg_scale), bool(full_batch)
    return _dispatch(
        "unpatchify_cfg", tokens.device,
        lambda: torch.ops.ditfast.unpatchify_cfg(tokens, patch_size, channels, cfg_scale, guided_channels, full_batch),
        lambda: unpatchify_cfg_ref(tokens, patch_size, channels, cfg_scale, guided_channels, full_batch),
    )  # fmt: skip


# ------------------------------------------------------------------------------------------
# Fake (meta) implementations and autograd of the compiled ops
# ------------------------------------------------------------------------------------------

if extension_loaded():

    @torch.library.register_fake("ditfast::patch_embed")
    def _patch_embed_fake(x, weight, bias=None, pos_embed=None):
        B, _, H, W = x.shape
        D, _, p, _ = weight.shape
        return x.new_empty((B, (H // p) * (W // p), D))

    @torch.library.register_fake("ditfast::patch_embed_backward")
    def _patch_embed_backward_fake(grad, x, weight, output_mask):
        shapes = (x.shape, weight.shape, grad.shape[2:], (1, *grad.shape[1:]))
        return tuple(grad.new_empty(s if need else (0,)) for s, need in zip(shapes, output_mask))

    @torch.library.register_fake("ditfast::unpatchify")
    def _unpatchify_fake(tokens, p, C):
        side = math.isqrt(tokens.shape[1]) * p
        return tokens.new_empty((tokens.shape[0], C, side, side))

    @torch.library.register_fake("ditfast::patchify")
    def _patchify_fake(image, p):
        B, C, H, W = image.shape
        return image.new_empty((B, (H // p) * (W // p), p * p * C))

    @torch.library.register_fake("ditfast::unpatchify_cfg")
    def _unpatchify_cfg_fake(tokens, p, C, cfg_scale, guided_channels, full_batch):
        side = math.isqrt(tokens.shape[1]) * p
        batch = tokens.shape[0] if full_batch else tokens.shape[0] // 2
        return tokens.new_empty((batch, C, side, side))

    def _patch_embed_setup(ctx, inputs, output):
        x, weight, bias, pos_embed = inputs
        ctx.has = (True, True, bias is not None, pos_embed is not None)
        ctx.save_for_backward(x, weight)

    def _patch_embed_backward(ctx, grad):
        x, weight = ctx.saved_tensors
        # needs_input_grad omits trailing arguments left at their default (None)
        needs = tuple(ctx.needs_input_grad) + (False,) * (4 - len(ctx.needs_input_grad))
        mask = [bool(n and has) for n, has in zip(needs, ctx.has)]
        grads = torch.ops.ditfast.patch_embed_backward(grad, x, weight, mask)
        return tuple(g if need else None for g, need in zip(grads, mask))[: len(ctx.needs_input_grad)]

    torch.library.register_autograd("ditfast::patch_embed", _patch_embed_backward, setup_context=_patch_embed_setup)

    def _unpatchify_setup(ctx, inputs, output):
        ctx.p = inputs[1]

    def _unpatchify_backward(ctx, grad):
        return torch.ops.ditfast.patchify(grad, ctx.p), None, None

    torch.library.register_autograd("ditfast::unpatchify", _unpatchify_backward, setup_context=_unpatchify_setup)

    def _patchify_setup(ctx, inputs, output):
        ctx.p, ctx.C = inputs[1], inputs[0].shape[1]

    def _patchify_backward(ctx, grad):
        return torch.ops.ditfast.unpatchify(grad, ctx.p, ctx.C), None

    torch.library.register_autograd("ditfast::patchify", _patchify_backward, setup_context=_patchify_setup)
