"""The Stable Diffusion VAE DiT works in, loaded from a local folder (no download).

Latents are ``vae.encode(x).latent_dist.sample() * 0.18215``; decoding divides by the same factor.
The folder is a diffusers ``AutoencoderKL`` (``sd-vae-ft-ema`` / ``sd-vae-ft-mse`` layout:
``config.json`` plus weights); diffusers is needed only when a VAE is used.
"""

from __future__ import annotations

import os

import torch

__all__ = ["LATENT_SCALE", "load_vae", "encode", "decode"]

LATENT_SCALE = 0.18215


def load_vae(path: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """Load an AutoencoderKL from a local folder, in eval mode on ``device``."""
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"VAE folder not found or has no config.json: {path} (expected a diffusers AutoencoderKL folder)")
    try:
        from diffusers.models import AutoencoderKL
    except ImportError as exc:
        raise ValueError("using a VAE needs diffusers: pip install diffusers") from exc
    vae = AutoencoderKL.from_pretrained(path, local_files_only=True, torch_dtype=dtype)
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def encode(vae, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pixels (B, 3, H, W) in [-1, 1] -> scaled latents (B, 4, H/8, W/8), float32."""
    dist = vae.encode(x.to(vae.dtype)).latent_dist
    return dist.sample(generator=generator).float() * LATENT_SCALE


@torch.no_grad()
def decode(vae, z: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> pixels in [-1, 1] (float32, not clamped)."""
    return vae.decode((z / LATENT_SCALE).to(vae.dtype)).sample.float()
