"""The ADM evaluator's ``.npz`` batches: images and optional precomputed statistics.

A batch holds ``arr_0``, uint8 images (N, H, W, 3) (the format DiT's ``sample_ddp.py`` writes),
and optionally ``mu`` (2048,), ``sigma`` (2048, 2048), ``mu_s`` (2023,), ``sigma_s`` (2023, 2023):
the FID and sFID statistics (ADM's reference batches carry both). Images are streamed from the
file in batches, so a 50,000-image batch never has to fit in memory at once. Writes are atomic.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from ..files import atomic_write
from .inception import POOL_DIM, SPATIAL_DIM
from .scores import Statistics

__all__ = ["NpzBatch", "read_npz", "write_npz", "write_json", "to_uint8_images", "read_image_folder", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
_STAT_SHAPES = {"mu": (POOL_DIM,), "sigma": (POOL_DIM, POOL_DIM), "mu_s": (SPATIAL_DIM,), "sigma_s": (SPATIAL_DIM, SPATIAL_DIM)}


def _check_images_header(path: str, shape: tuple, dtype: np.dtype) -> None:
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3) or shape[0] < 1:
        raise ValueError(
            f"{path}: arr_0 must hold uint8 images of shape (N, H, W, 3) (or (N, H, W, 1)), got {dtype} {tuple(shape)}"
        )


@dataclass
class NpzBatch:
    """An opened ADM ``.npz``: image shape (or None when it holds statistics only) and statistics."""

    path: str
    image_shape: tuple | None
    pool: Statistics | None = None  # from mu, sigma
    spatial: Statistics | None = None  # from mu_s, sigma_s
    _in_memory: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return 0 if self.image_shape is None else int(self.image_shape[0])

    def iter_images(self, batch_size: int) -> Iterator[np.ndarray]:
        """Yield the images in batches of at most ``batch_size``, read from the file as needed."""
        if self.image_shape is None:
            raise ValueError(f"{self.path} has no images (arr_0)")
        if self._in_memory is not None:
            for s in range(0, len(self), batch_size):
                yield self._in_memory[s : s + batch_size]
            return
        n, per_image = len(self), int(np.prod(self.image_shape[1:]))
        with zipfile.ZipFile(self.path) as zf, zf.open("arr_0.npy") as f:
            _read_npy_header(f)
            for s in range(0, n, batch_size):
                count = min(batch_size, n - s)
                data = f.read(count * per_image)
                if len(data) != count * per_image:
                    raise ValueError(f"{self.path}: arr_0 is truncated (image {s + len(data) // per_image} of {n})")
                yield np.frombuffer(data, np.uint8).reshape(count, *self.image_shape[1:])


def _read_npy_header(f) -> tuple[tuple, bool, np.dtype] | None:
    """(shape, fortran_order, dtype) of the .npy stream ``f`` (positioned at the data), or None."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    return None


def read_npz(path: str) -> NpzBatch:
    """Open an ADM batch: validate ``arr_0`` (when present) and the statistics; stream images later.

    Raises ValueError for a file that is not an .npz, holds neither images nor statistics, has
    images that are not uint8 (N, H, W, 1|3), or statistics of the wrong shape / incomplete pairs.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not an .npz file (expected arr_0 images and/or mu, sigma, mu_s, sigma_s)")
    with zipfile.ZipFile(path) as zf:
        names = {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
        image_shape, in_memory = None, None
        if "arr_0" in names:
            with zf.open("arr_0.npy") as f:
                header = _read_npy_header(f)
            if header is None or header[1]:  # unusual .npy version or Fortran order: load it whole
                with np.load(path, allow_pickle=False) as data:
                    in_memory = np.ascontiguousarray(data["arr_0"])
                image_shape, dtype = in_memory.shape, in_memory.dtype
            else:
                image_shape, dtype = header[0], header[2]
            _check_images_header(path, image_shape, dtype)
    stats = {}
    present = names & set(_STAT_SHAPES)
    if present:
        with np.load(path, allow_pickle=False) as data:
            for key in present:
                stats[key] = np.asarray(data[key], np.float64)
                if stats[key].shape != _STAT_SHAPES[key]:
                    raise ValueError(f"{path}: {key} has shape {stats[key].shape}, expected {_STAT_SHAPES[key]}")
    for a, b in (("mu", "sigma"), ("mu_s", "sigma_s")):
        if (a in stats) != (b in stats):
            raise ValueError(f"{path}: has {a if a in stats else b} without {b if a in stats else a}")
    if image_shape is None and not stats:
        raise ValueError(f"{path} holds neither images (arr_0) nor statistics (mu, sigma, mu_s, sigma_s); keys: {sorted(names)}")
    return NpzBatch(
        path,
        tuple(image_shape) if image_shape is not None else None,
        Statistics(stats["mu"], stats["sigma"]) if "mu" in stats else None,
        Statistics(stats["mu_s"], stats["sigma_s"]) if "mu_s" in stats else None,
        in_memory,
    )


def write_npz(path: str, images: np.ndarray | None = None, pool: Statistics | None = None, spatial: Statistics | None = None) -> str:
    """Write an ADM batch atomically (temporary file in the same folder, then rename).

    ``images`` uint8 (N, H, W, 3) go to ``arr_0``; ``pool``/``spatial`` statistics to
    ``mu``/``sigma`` and ``mu_s``/``sigma_s``. The file is uncompressed, as ``np.savez`` writes it.
    """
    arrays = {}
    if images is not None:
        images = np.asarray(images)
        _check_images_header(path, images.shape, images.dtype)
        arrays["arr_0"] = images
    for (k_mu, k_sigma), stats in ((("mu", "sigma"), pool), (("mu_s", "sigma_s"), spatial)):
        if stats is not None:
            arrays[k_mu], arrays[k_sigma] = np.asarray(stats.mu, np.float64), np.asarray(stats.sigma, np.float64)
            for key in (k_mu, k_sigma):
                if arrays[key].shape != _STAT_SHAPES[key]:
                    raise ValueError(f"{key} has shape {arrays[key].shape}, expected {_STAT_SHAPES[key]}")
    if not arrays:
        raise ValueError("nothing to write: give images and/or statistics")
    return _atomic_write(path, lambda f: np.savez(f, **arrays))


def write_json(path: str, obj) -> str:
    """Write ``obj`` as JSON atomically (results of ``ditfast eval --json``)."""
    return _atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def _atomic_write(path: str, write: Callable) -> str:
    """``write(binary file)`` into a temporary file beside ``path``, then rename it over ``path``
    (:func:`ditfast.files.atomic_write`; the folder must exist)."""

    def to_file(tmp: str) -> None:
        with open(tmp, "wb") as f:
            write(f)

    return atomic_write(path, to_file)


def to_uint8_images(samples) -> np.ndarray:
    """Decoded samples (B, C, H, W) in [-1, 1] -> uint8 (B, H, W, C), the rule of DiT's sample_ddp.py:
    ``clamp(127.5 * x + 128, 0, 255)`` truncated to integers."""
    import torch

    x = torch.as_tensor(samples)
    if x.dim() != 4 or not x.is_floating_point() or x.shape[1] not in (1, 3):
        raise ValueError(f"expected float samples of shape (B, 1|3, H, W) in [-1, 1], got {x.dtype} {tuple(x.shape)}")
    return torch.clamp(127.5 * x.float() + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def read_image_folder(folder: str) -> np.ndarray:
    """All images under ``folder`` (recursively, sorted by path) as uint8 (N, H, W, 3) RGB.

    Every image must have the same size (the evaluator compares fixed-resolution batches; resize
    or crop beforehand). Grayscale/palette/RGBA images are converted to RGB by PIL.
    """
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("reading an image folder needs Pillow: pip install pillow (or ditfast[eval])") from exc
    if not os.path.isdir(folder):
        raise ValueError(f"{folder} is not a folder of images")
    paths = sorted(
        os.path.join(root, name)
        for root, _, names in os.walk(folder)
        for name in names
        if name.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not paths:
        raise ValueError(f"{folder} has no images ({', '.join(IMAGE_EXTENSIONS)})")
    images = []
    for p in paths:
        with Image.open(p) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
        if images and arr.shape != images[0].shape:
            raise ValueError(f"{p} is {arr.shape[1]}x{arr.shape[0]} but {paths[0]} is {images[0].shape[1]}x{images[0].shape[0]}: "
                             "all images of a batch must have one size")  # fmt: skip
        images.append(arr)
    return np.stack(images)
