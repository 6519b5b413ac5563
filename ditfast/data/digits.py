"""The bundled digits dataset: 1,797 handwritten digits, 8x8, 10 classes, no download.

``digits.npz`` beside this file is scikit-learn's bundled copy of the UCI "Optical Recognition of
Handwritten Digits" test set (E. Alpaydin, C. Kaynak, 1998; CC BY 4.0), stored as uint8 with
values 0..16 (``images`` (1797, 8, 8)) and ``labels`` (1797,). It was written by
``export_from_sklearn()`` below with scikit-learn 1.9.1; scikit-learn is not needed to use it.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from ..files import atomic_write

__all__ = ["DIGITS_PATH", "load_digits", "digits_to_pixels", "pixels_to_uint8", "export_from_sklearn"]

DIGITS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.npz")
NUM_CLASSES = 10


def load_digits(size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (1797, 1, size, size) float32 in [-1, 1], labels (1797,) int64).

    The 8x8 originals (0..16) are scaled to [-1, 1] and upsampled bilinearly to ``size``.
    """
    with np.load(DIGITS_PATH) as f:
        images, labels = f["images"], f["labels"]
    return digits_to_pixels(torch.from_numpy(images), size), torch.from_numpy(labels.astype(np.int64))


def digits_to_pixels(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 8, 8) values 0..16 -> (N, 1, size, size) float32 in [-1, 1]."""
    if size < 8:
        raise ValueError(f"digits are 8x8; size must be >= 8, got {size}")
    x = images.float().unsqueeze(1) / 8.0 - 1.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.clamp(-1, 1)


def pixels_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images (N, C, H, W) -> uint8 NHWC, the ADM convention ``clamp(127.5*x + 128, 0, 255)``."""
    return (127.5 * x + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def export_from_sklearn(path: str = DIGITS_PATH) -> None:
    """Write ``digits.npz`` from scikit-learn's bundled copy (how the shipped file was made)."""
    from sklearn.datasets import load_digits as sk_load_digits

    d = sk_load_digits()
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez_compressed would append .npz to a name
            np.savez_compressed(f, images=d.images.astype(np.uint8), labels=d.target.astype(np.uint8))

    atomic_write(path, write)
