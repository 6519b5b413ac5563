"""``ditfast extract-latents``: encode an image folder once into latent shards for training.

    ditfast extract-latents --data IMAGES/ --vae sd-vae-ft-ema/ --image-size 256 --out latents/
    ditfast train --data latents/ ...

Each shard holds ``latents`` (B, 4, S/8, S/8) in float16, ``labels`` and, unless ``--no-flip``,
``latents_flipped`` (the horizontally flipped images' latents, so training can flip at random).
``--vae none`` stores the pixels themselves (a pixel-space model). Shards and ``meta.json`` are
written atomically; a non-empty output folder is refused unless ``--overwrite``, which replaces the
shards there (stale ones of an earlier, larger extraction are removed).
"""

from __future__ import annotations

import argparse
import sys

import torch

from .cli import ArgumentParser, command, device_arg, int_at_least
from .data import check_shard_folder, image_folder_samples, write_latent_shards
from .errors import resolve_device

__all__ = ["extract_latents", "main"]


def extract_latents(data: str, vae: str | None, image_size: int, out: str, batch_size: int = 64, flip: bool = True,
                    seed: int = 0, device: str | None = None, progress: bool = True, overwrite: bool = False) -> int:  # fmt: skip
    """Encode every image under ``data``; returns the number of samples written. A non-empty
    ``out`` is refused unless ``overwrite`` (see :func:`ditfast.data.write_latent_shards`)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    if vae is not None and image_size % 8:
        raise ValueError(f"image size must be a multiple of 8 with a VAE (it downsamples 8x), got {image_size}")
    check_shard_folder(out, overwrite)  # before any work
    samples = image_folder_samples(data, image_size)  # validates the folder before any work
    dev = resolve_device(device)
    model = None
    if vae is not None:
        from .vae import encode, load_vae

        model = load_vae(vae, dev)
    gen = torch.Generator(device=dev).manual_seed(seed)

    def convert(x: torch.Tensor) -> torch.Tensor:
        x = x.to(dev)
        return (encode(model, x, gen) if model is not None else x).half().cpu()

    def batches():
        from tqdm.auto import tqdm

        for start in tqdm(range(0, samples.size, batch_size), desc="extract", unit="batch", disable=not progress):
            idx = torch.arange(start, min(start + batch_size, samples.size))
            x, y = samples.get(idx, None)
            yield convert(x), (convert(x.flip(-1)) if flip else None), y

    meta = dict(num_classes=samples.num_classes, classes=samples.classes, image_size=image_size, vae=vae, source=data)
    return write_latent_shards(out, batches(), meta, overwrite=overwrite)


@command("ditfast extract-latents")
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="ditfast extract-latents", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="image folder: one subfolder of images per class")
    parser.add_argument("--vae", required=True, help="local diffusers AutoencoderKL folder, or 'none' to store pixels")
    parser.add_argument("--image-size", type=int_at_least(1), default=256, help="pixels (a multiple of 8 with a VAE)")
    parser.add_argument("--out", required=True, help="output folder for shard_*.safetensors and meta.json")
    parser.add_argument("--overwrite", action="store_true", help="replace the shards of a non-empty --out")
    parser.add_argument("--batch-size", type=int_at_least(1), default=64)
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True, help="also store flipped latents")
    parser.add_argument("--seed", type=int, default=None, help="seed of the VAE's posterior sample (default 0; only with a VAE)")
    parser.add_argument("--device", type=device_arg, default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    vae = None if args.vae.lower() == "none" else args.vae
    if vae is None and args.seed is not None:
        parser.error("--seed seeds the VAE's posterior sample; with --vae none nothing is random")
    n = extract_latents(args.data, vae, args.image_size, args.out, args.batch_size, args.flip, args.seed or 0, args.device,
                        progress=args.progress, overwrite=args.overwrite)  # fmt: skip
    print(f"wrote {n} samples to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
