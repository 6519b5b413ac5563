"""Minimal image output without extra dependencies: image grids and PNG files (zlib only)."""

from __future__ import annotations

import os
import struct
import zlib

import torch

from .files import atomic_write

__all__ = ["make_grid", "save_png", "read_png"]


def make_grid(images: torch.Tensor, nrow: int, pad: int = 2, scale: int = 1, fill: int = 255) -> torch.Tensor:
    """uint8 (N, H, W, C) -> one (rows*(H+pad)+pad, nrow*(W+pad)+pad, C) image, row-major, each
    image enlarged ``scale`` times (nearest neighbour) for viewing."""
    if images.dim() != 4 or images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images (N, H, W, C), got {images.dtype} {tuple(images.shape)}")
    if scale > 1:
        images = images.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    n, h, w, c = images.shape
    rows = -(-n // nrow)
    grid = torch.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), fill, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = images[i]
    return grid


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def save_png(path: str, image: torch.Tensor) -> None:
    """Write uint8 (H, W) or (H, W, C) with C in {1, 3, 4} as an 8-bit PNG (temp file, then rename)."""
    if image.dim() == 2:
        image = image.unsqueeze(-1)
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected uint8 (H, W[, 1|3|4]), got {image.dtype} {tuple(image.shape)}")
    h, w, c = image.shape
    color_type = {1: 0, 3: 2, 4: 6}[c]
    rows = image.contiguous().numpy().reshape(h, w * c)
    raw = b"".join(b"\x00" + rows[i].tobytes() for i in range(h))  # filter type 0 per row
    data = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0))
    data += _chunk(b"IDAT", zlib.compress(raw, 6)) + _chunk(b"IEND", b"")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def read_png(path: str) -> torch.Tensor:
    """Read an 8-bit, non-interlaced PNG written with filter type 0 (as :func:`save_png` writes)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG file")
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    w, h, depth, color_type, _, _, interlace = header
    c = {0: 1, 2: 3, 6: 4}.get(color_type)
    if depth != 8 or c is None or interlace:
        raise ValueError(f"{path}: only 8-bit grey/RGB/RGBA non-interlaced PNGs are supported")
    raw = zlib.decompress(idat)
    stride = w * c + 1
    if any(raw[i * stride] != 0 for i in range(h)):
        raise ValueError(f"{path}: only PNG filter type 0 is supported")
    rows = [raw[i * stride + 1 : (i + 1) * stride] for i in range(h)]
    return torch.frombuffer(bytearray(b"".join(rows)), dtype=torch.uint8).view(h, w, c)
