"""``ditfast demo``: class-conditional digits from the bundled DiT, with speed and a quality figure.

The bundled model (``ditfast/assets/digits_dit.safetensors``, trained by ``ditfast train`` on the
bundled digits; ``digits_dit.json`` beside it records how) samples one row per digit with
classifier-free guidance. On a GPU the script times the fast path (the fused kernels in bf16)
against the reference path (the official math: eager fp32) on the same seed; on a CPU, where the
fused kernels cannot run, it times the one path it runs and compares nothing. It writes the PNG
grid (``--out``; an existing file is replaced only with ``--overwrite``) and scores the samples:
the accuracy with which a classifier trained on the real digits recognises the requested digit in
each sample.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from .checkpoint import load_model
from .cli import ArgumentParser, command, device_arg, float_in, int_at_least
from .data import pixels_to_uint8
from .data.classifier import DigitClassifier
from .diffusion import create_diffusion
from .errors import resolve_device
from .files import check_output_file
from .flops import fmt_sig
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


REFERENCE = ("fp32 eager, the official math", torch.float32, "eager")


def _paths(device: torch.device, skip_reference: bool) -> dict[str, tuple[str, torch.dtype, str]]:
    """The paths to time, {name: (description, autocast dtype, model backend)}: on a GPU the fast
    path (bf16, fused kernels where Triton runs) and, unless skipped, the reference path; on a CPU
    only the reference path, since the fast path needs CUDA (timing it would time the same math twice)."""
    if device.type != "cuda":
        return {"reference": REFERENCE}
    fast = "bf16, Triton adaLN kernels" if adaln_fused("auto", device) else "bf16, eager (Triton unavailable)"
    return {"fast": (fast, torch.bfloat16, "auto"), **({} if skip_reference else {"reference": REFERENCE})}


@command("ditfast demo")
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="ditfast demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="ditfast_digits.png", help="PNG grid to write (default: %(default)s); its folder must exist")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--per-class", type=int_at_least(1), default=10, help="samples per digit (one row each)")
    parser.add_argument("--steps", type=int_at_least(1), default=50, help="DDIM steps (1..1000)")
    parser.add_argument("--cfg-scale", type=float_in(1), default=None, help="classifier-free guidance scale (>= 1); default: the bundled model's recipe value")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", type=device_arg, default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--skip-reference", action="store_true", help="on a GPU: do not time the reference path as well")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="a progress bar (stderr) while sampling")
    args = parser.parse_args(argv)
    if args.steps > 1000:
        parser.error(f"argument --steps: expected an integer in [1, 1000], got {args.steps}")
    check_output_file(args.out, args.overwrite, "--out")  # before any work
    with open(BUNDLED_RECIPE) as f:
        recipe = json.load(f)
    if args.cfg_scale is None:
        args.cfg_scale = recipe["demo_cfg_scale"]

    device = resolve_device(args.device)
    if args.skip_reference and device.type != "cuda":
        raise ValueError("--skip-reference: without a GPU the reference path is the only one that runs")
    model = load_bundled_model(device)
    labels = torch.arange(10).repeat_interleave(args.per_class)
    print(f"bundled model: {recipe['description']}; trained {recipe['steps']} steps on {recipe['device']}")

    paths = _paths(device, args.skip_reference)
    if "fast" not in paths:
        print("no GPU: the fast path (ditfast's fused kernels in bf16) needs CUDA, so only the reference path runs "
              "(fp32 eager, the official math); there is nothing to compare it with")  # fmt: skip
    timings, samples = {}, None
    for name, (what, dtype, backend) in paths.items():
        model.backend = backend
        sample_digits(model, labels[:2], steps=2, dtype=dtype, seed=args.seed)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = sample_digits(model, labels, steps=args.steps, cfg_scale=args.cfg_scale, seed=args.seed, dtype=dtype,
                            progress=args.progress)  # fmt: skip
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        timings[name] = len(labels) / elapsed
        print(f"{name:>9} path ({what}): {fmt_sig(timings[name])} images/s ({len(labels)} images, {args.steps} steps, {fmt_sig(elapsed)} s)")
        samples = out if samples is None else samples

    grid = make_grid(pixels_to_uint8(samples.cpu()), nrow=args.per_class, pad=2, scale=4)
    save_png(args.out, grid)
    clf = DigitClassifier(model.input_size)
    acc = clf.score(samples, labels)
    print(f"wrote {args.out}: {len(labels)} samples, one row per digit 0-9, {args.steps} DDIM steps, cfg {args.cfg_scale}")
    print(f"quality: a logistic-regression classifier (held-out accuracy {clf.accuracy:.1%} on real digits) "
          f"recognises the requested digit in {acc:.1%} of the samples")  # fmt: skip
    if len(timings) == 2:  # two different paths ran
        print(f"speed-up of the fast path over the reference path: {timings['fast'] / timings['reference']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
