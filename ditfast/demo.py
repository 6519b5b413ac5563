"""``ditfast demo``: class-conditional digits from the bundled DiT, with speed and a quality figure.

The bundled model (``ditfast/assets/digits_dit.safetensors``, trained by ``ditfast train`` on the
bundled digits; ``digits_dit.json`` beside it records how) samples one row per digit with
classifier-free guidance. The script times the fast path (the best backend and precision for the
device) against the reference path (the official math: eager fp32) on the same seed, writes the
PNG grid, and scores the samples: the accuracy with which a classifier trained on the real digits
recognises the requested digit in each sample.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from .checkpoint import load_model
from .data import pixels_to_uint8
from .data.classifier import DigitClassifier
from .diffusion import create_diffusion
from .imageio import make_grid, save_png
from .models import DiT, adaln_fused

__all__ = ["BUNDLED_MODEL", "load_bundled_model", "sample_digits", "main"]

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
BUNDLED_MODEL = os.path.join(ASSETS, "digits_dit.safetensors")
BUNDLED_RECIPE = os.path.join(ASSETS, "digits_dit.json")


def load_bundled_model(device: torch.device | str = "cpu") -> DiT:
    if not os.path.isfile(BUNDLED_MODEL):
        raise ValueError(f"the bundled digits model is missing ({BUNDLED_MODEL}); reinstall ditfast")
    return load_model(BUNDLED_MODEL, device=device)


@torch.no_grad()
def sample_digits(
    model: DiT,
    labels: torch.Tensor,
    steps: int = 50,
    cfg_scale: float = 4.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> torch.Tensor:
    """Sample one image per label with DDIM (``steps`` steps, eta 0) and CFG on all latent
    channels; returns pixels in [-1, 1], float32 (N, C, H, W)."""
    device = next(model.parameters()).device
    diffusion = create_diffusion(f"ddim{steps}")
    n, size = len(labels), model.input_size
    gen = torch.Generator(device="cpu").manual_seed(seed)
    z = torch.randn(n, model.in_channels, size, size, generator=gen).to(device)
    z = torch.cat([z, z])
    y = torch.cat([labels, torch.full_like(labels, model.num_classes)]).to(device)

    def guided(x, t, y):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            return model.forward_with_cfg(x, t, y, cfg_scale, guide_all_channels=True).float()

    out = diffusion.ddim_sample_loop(guided, z.shape, z, clip_denoised=True, model_kwargs=dict(y=y), device=device, progress=progress)
    return out[:n].float().clamp(-1, 1)


def _fast_path(model: DiT, device: torch.device) -> tuple[str, torch.dtype]:
    """Pick the fastest available configuration: fused kernels and bf16 on a GPU."""
    if device.type == "cuda":
        model.backend = "auto"
        fused = adaln_fused("auto", device)
        return ("bf16, Triton adaLN kernels" if fused else "bf16, eager (triton unavailable)"), torch.bfloat16
    model.backend = "eager"
    return "fp32 eager (no GPU: the fused kernels need CUDA, so it equals the reference path)", torch.float32


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ditfast demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="ditfast_digits.png", help="PNG grid to write (default: %(default)s)")
    parser.add_argument("--per-class", type=int, default=10, help="samples per digit (one row each)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (1..1000)")
    parser.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale (>= 1); default: the bundled model's recipe value")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-reference", action="store_true", help="do not time the reference path")
    args = parser.parse_args(argv)
    with open(BUNDLED_RECIPE) as f:
        recipe = json.load(f)
    if args.cfg_scale is None:
        args.cfg_scale = recipe["demo_cfg_scale"]
    if not 1 <= args.steps <= 1000 or args.cfg_scale < 1 or args.per_class < 1:
        parser.error("need 1 <= --steps <= 1000, --cfg-scale >= 1 and --per-class >= 1")

    device = torch.device(args.device)
    model = load_bundled_model(device)
    labels = torch.arange(10).repeat_interleave(args.per_class)
    print(f"bundled model: {recipe['description']}; trained {recipe['steps']} steps on {recipe['device']}")

    timings = {}
    paths = {"fast": _fast_path(model, device)}
    if not args.skip_reference:
        paths["reference"] = ("fp32 eager, the official math", torch.float32)
    samples = None
    for name, (what, dtype) in paths.items():
        model.backend = "eager" if name == "reference" else model.backend
        sample_digits(model, labels[:2], steps=2, dtype=dtype, seed=args.seed)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = sample_digits(model, labels, steps=args.steps, cfg_scale=args.cfg_scale, seed=args.seed, dtype=dtype)
        if device.type == "cuda":
            torch.cuda.synchronize()
        timings[name] = len(labels) / (time.perf_counter() - t0)
        print(f"{name:>9} path ({what}): {timings[name]:.1f} images/s")
        samples = out if samples is None else samples

    grid = make_grid(pixels_to_uint8(samples.cpu()), nrow=args.per_class, pad=2, scale=4)
    save_png(args.out, grid)
    clf = DigitClassifier(model.input_size)
    acc = clf.score(samples, labels)
    print(f"wrote {args.out}: {len(labels)} samples, one row per digit 0-9, {args.steps} DDIM steps, cfg {args.cfg_scale}")
    print(f"quality: a logistic-regression classifier (held-out accuracy {clf.accuracy:.1%} on real digits) "
          f"recognises the requested digit in {acc:.1%} of the samples")  # fmt: skip
    if "reference" in timings:
        print(f"speed-up of the fast path over the reference path: {timings['fast'] / timings['reference']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
