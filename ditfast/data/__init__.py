"""Training data for DiT: the bundled digits, image folders (one subfolder per class), and
pre-extracted latent shards (written by ``ditfast extract-latents``).

Every source is a :class:`Samples`: ``get(indices) -> (x, y)`` gives a batch as float32
(B, C, H, W) tensors (pixels in [-1, 1] or latents) and int64 labels. Problems (missing folder,
empty class folders, unreadable images, inconsistent shards) raise ValueError when the source is
opened, before any training starts.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..files import atomic_write, remove_orphans
from .digits import load_digits, pixels_to_uint8

__all__ = ["Samples", "digits_samples", "image_folder_samples", "latent_shard_samples", "write_latent_shards", "pixels_to_uint8"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".gif", ".tif", ".tiff")
SHARD_META = "meta.json"


@dataclass
class Samples:
    """A class-conditional dataset addressed by index."""

    name: str
    size: int  # number of samples
    shape: tuple[int, int, int]  # (C, H, W) of one x
    num_classes: int
    flip_ok: bool  # whether a random horizontal flip keeps the label meaningful
    get: Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]] = field(repr=False)
    # get(indices (B,), flip (B,) bool or None) -> (x (B, C, H, W) float32, y (B,) int64)
    latent: bool = False  # x are VAE latents (already scaled) rather than pixels
    classes: list[str] = field(default_factory=list)


def _in_memory(name, x, y, num_classes, flip_ok, latent=False, classes=(), x_flipped=None) -> Samples:
    def get(idx: torch.Tensor, flip: torch.Tensor | None = None):
        xb = x[idx].float()
        if flip is not None and flip.any():
            flipped = x_flipped[idx].float() if x_flipped is not None else xb.flip(-1)
            xb = torch.where(flip.view(-1, 1, 1, 1), flipped, xb)
        return xb, y[idx]

    return Samples(name, len(y), tuple(x.shape[1:]), num_classes, flip_ok, get, latent, list(classes))


def digits_samples(image_size: int = 16) -> Samples:
    """The bundled digits (1797 images, 10 classes), pixels in [-1, 1]; never flipped (a mirrored
    digit is not the same digit)."""
    x, y = load_digits(image_size)
    return _in_memory("digits", x, y, 10, flip_ok=False, classes=[str(i) for i in range(10)])


def _list_image_folder(root: str) -> tuple[list[str], list[tuple[str, int]]]:
    if not os.path.isdir(root):
        raise ValueError(f"data folder not found: {root} (expected one subfolder of images per class)")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise ValueError(f"{root} has no class subfolders (expected ROOT/<class>/<image files>)")
    files, empty = [], []
    for label, cls in enumerate(classes):
        names = sorted(n for n in os.listdir(os.path.join(root, cls)) if n.lower().endswith(IMAGE_EXTENSIONS))
        if not names:
            empty.append(cls)
        files += [(os.path.join(root, cls, n), label) for n in names]
    if empty:
        raise ValueError(f"class folders without images under {root}: {', '.join(empty)} (extensions {IMAGE_EXTENSIONS})")
    return classes, files


def _load_image(path: str, image_size: int) -> torch.Tensor:
    """RGB image -> (3, S, S) float32 in [-1, 1]: resize the short side, centre crop (ADM style)."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        while min(im.size) >= 2 * image_size:  # box-downsample first, as ADM's centre crop does
            im = im.resize(tuple(s // 2 for s in im.size), resample=Image.BOX)
        scale = image_size / min(im.size)
        im = im.resize(tuple(round(s * scale) for s in im.size), resample=Image.BICUBIC)
        left, top = (im.size[0] - image_size) // 2, (im.size[1] - image_size) // 2
        im = im.crop((left, top, left + image_size, top + image_size))
        data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(image_size, image_size, 3)
    return data.permute(2, 0, 1).float() / 127.5 - 1.0


def image_folder_samples(root: str, image_size: int) -> Samples:
    """ROOT/<class>/<image> as RGB pixels in [-1, 1] at ``image_size`` (read per batch).

    Every file is opened once up front so that an unreadable image fails before training.
    """
    try:
        from PIL import Image
    except ImportError as exc:
        raise ValueError("reading image folders needs Pillow: pip install pillow") from exc
    classes, files = _list_image_folder(root)
    bad = []
    for path, _ in files:
        try:
            with Image.open(path) as im:
                im.verify()
        except Exception as exc:  # PIL raises many types for corrupt files
            bad.append(f"{path} ({type(exc).__name__})")
    if bad:
        raise ValueError(f"{len(bad)} unreadable image(s): " + "; ".join(bad[:10]) + (" ..." if len(bad) > 10 else ""))
    labels = torch.tensor([label for _, label in files])

    def get(idx: torch.Tensor, flip: torch.Tensor | None = None):
        xb = torch.stack([_load_image(files[i][0], image_size) for i in idx.tolist()])
        if flip is not None:
            xb = torch.where(flip.view(-1, 1, 1, 1), xb.flip(-1), xb)
        return xb, labels[idx]

    return Samples(os.path.basename(os.path.normpath(root)), len(files), (3, image_size, image_size), len(classes), True, get, classes=classes)


_SHARD_NAME = r"shard_\d{5}\.safetensors"  # what write_latent_shards writes, besides meta.json


def check_shard_folder(out_dir: str, overwrite: bool = False) -> None:
    """Refuse an output folder for :func:`write_latent_shards` that is a file, or that holds
    anything unless ``overwrite`` (checked before any encoding work)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(f"output folder {out_dir!r} is an existing file; expected a folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(f"output folder {out_dir!r} is not empty; pass --overwrite (overwrite=True) to replace "
                              "the latent shards there, or choose an empty folder")  # fmt: skip


def write_latent_shards(out_dir: str, batches, meta: dict, overwrite: bool = False) -> int:
    """Write (latents, latents_flipped or None, labels) batches as safetensors shards + meta.json.

    Each shard and the metadata are written to a temporary name and renamed, so an interrupted
    extraction never leaves a truncated shard. ``meta.json`` is written last and names the
    shards: a folder without it is not a dataset. A non-empty ``out_dir`` is refused unless
    ``overwrite``; then its old ``meta.json`` is removed first and, once the new shards are
    written, the old shards past the new last one (other files are left alone). Returns the number
    of samples written.
    """
    from safetensors.torch import save_file

    check_shard_folder(out_dir, overwrite)
    os.makedirs(out_dir, exist_ok=True)
    remove_orphans(out_dir, legacy=rf"{_SHARD_NAME}|{re.escape(SHARD_META)}")
    if os.path.isfile(os.path.join(out_dir, SHARD_META)):
        os.remove(os.path.join(out_dir, SHARD_META))
    count, names = 0, []
    for k, (lat, lat_flip, lab) in enumerate(batches):
        tensors = {"latents": lat.contiguous(), "labels": lab.to(torch.int64).contiguous()}
        if lat_flip is not None:
            tensors["latents_flipped"] = lat_flip.contiguous()
        names.append(f"shard_{k:05d}.safetensors")
        atomic_write(os.path.join(out_dir, names[-1]), lambda tmp: save_file(tensors, tmp))
        count += len(lab)
    for name in os.listdir(out_dir):
        if re.fullmatch(_SHARD_NAME, name) and name not in names:
            os.remove(os.path.join(out_dir, name))  # a stale shard of an earlier extraction
    meta = {**meta, "num_samples": count, "shards": names}

    def write_meta(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1)

    atomic_write(os.path.join(out_dir, SHARD_META), write_meta)
    return count


def latent_shard_samples(root: str) -> Samples:
    """Shards written by :func:`write_latent_shards`, loaded into memory."""
    from safetensors.torch import load_file

    meta_path = os.path.join(root, SHARD_META)
    if not os.path.isfile(meta_path):
        raise ValueError(f"{root} is not a latent shard folder (no {SHARD_META}; write one with `ditfast extract-latents`)")
    with open(meta_path) as f:
        meta = json.load(f)
    # meta.json names its shards (older extractions: every shard file in the folder)
    shards = meta.get("shards") or sorted(n for n in os.listdir(root) if n.startswith("shard_") and n.endswith(".safetensors"))
    missing = [n for n in shards if not os.path.isfile(os.path.join(root, n))]
    if missing:
        raise ValueError(f"{root}: meta.json names shards that are missing: {', '.join(missing[:5])}")
    if not shards:
        raise ValueError(f"{root} has {SHARD_META} but no shard_*.safetensors files")
    parts = [load_file(os.path.join(root, n)) for n in shards]
    x = torch.cat([p["latents"] for p in parts])
    y = torch.cat([p["labels"] for p in parts])
    flipped = torch.cat([p["latents_flipped"] for p in parts]) if all("latents_flipped" in p for p in parts) else None
    if len(y) != meta["num_samples"]:
        raise ValueError(f"{root}: meta.json says {meta['num_samples']} samples, the shards hold {len(y)} (incomplete extraction?)")
    return _in_memory(
        os.path.basename(os.path.normpath(root)), x, y, meta["num_classes"], flip_ok=flipped is not None,
        latent=meta.get("vae") is not None, classes=meta.get("classes", []), x_flipped=flipped,
    )  # fmt: skip
