"""Sinusoidal timestep features: the compiled ``ditfast::timestep_embedding`` op and its reference."""

from __future__ import annotations

import math

import torch

from .._ext import extension_loaded, op_available, warn_fallback
from .dispatch import CompiledBackend, Dispatcher, EagerBackend, register

__all__ = ["timestep_embedding", "timestep_embedding_ref"]


# Which a DiT's TimestepEmbedder runs (see ditfast.ops.dispatch); "auto": compiled on CUDA only.
TIMESTEP = register(Dispatcher("timestep", [EagerBackend(), CompiledBackend()], {"cuda": ["compiled", "eager"], "cpu": ["eager"]},
                               "DITFAST_TIMESTEP_BACKEND", ["eager"]))  # fmt: skip


def timestep_embedding_ref(t: torch.Tensor, dim: int, max_period: float = 10000.0, freq_shift: float = 0.0) -> torch.Tensor:
    """(B,) timesteps (may be fractional) -> (B, dim) float32 ``[cos(t*f), sin(t*f)]``.

    ``f_i = max_period ** (-i / (dim // 2 - freq_shift))`` for i < dim // 2, computed in float32
    exactly as DiT's TimestepEmbedder does (``freq_shift`` 0); an odd ``dim`` gets a trailing zero
    column. ``freq_shift`` 1 is diffusers' DiT (``Timesteps(flip_sin_to_cos=True,
    downscale_freq_shift=1)``), bit for bit.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / (half - freq_shift))
    args = t[:, None].float() * freqs.to(device=t.device)[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """:func:`timestep_embedding_ref` computed by ``ditfast._C`` in one kernel where available."""
    if t.dim() != 1:
        raise ValueError(f"t must be a 1-D tensor of timesteps (B,), got shape {tuple(t.shape)}")
    if dim < 1:
        raise ValueError(f"dim must be positive, got {dim}")
    if op_available(t.device):
        return torch.ops.ditfast.timestep_embedding(t, dim, max_period)
    warn_fallback("timestep_embedding", t.device.type)
    return timestep_embedding_ref(t, dim, max_period)


if extension_loaded():

    @torch.library.register_fake("ditfast::timestep_embedding")
    def _timestep_embedding_fake(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        return t.new_empty((t.shape[0], dim), dtype=torch.float32)
