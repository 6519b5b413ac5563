"""Sampling DiT: ``ditfast sample ...`` and ``torchrun --nproc_per_node=N -m ditfast.sample_ddp ...``.

    ditfast sample --model DiT-XL/2 --ckpt DiT-XL-2-256x256.pt --vae sd-vae-ft-ema/ \\
        --num-samples 50000 --cfg-scale 1.5 --sampler ddpm --steps 250 --out samples/
    ditfast sample --ckpt DiT-XL-2-256/ --num-samples 8     # a diffusers pipeline folder: its transformer/ and vae/
    ditfast sample --model DiffiT-XL/2 --ckpt diffit_256.safetensors --vae sd-vae-ft-ema/ \
        --cfg-scale 4.4 --steps 250 --out samples/       # the release's power-cosine guidance at 256px
    ditfast sample --ckpt runs/diffit-unet/checkpoints/0001000.pt --sampler edm-heun --steps 18 \
        --cfg-scale 1 --out samples/                      # an image-space DiffiT: EDM's Heun sampler

The options fill a :class:`ditfast.sampling.SampleConfig` and :func:`ditfast.sampling.run` makes the
samples (what it writes to ``--out DIR``, and how restarts and ranks share the work, is described
there); the denoising loop itself is :class:`ditfast.engine.SamplingEngine`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from .cli import ArgumentParser, command, device_arg, float_in, folder_arg, int_at_least
from .diffit import CFG_SCHEDULES
from .interop.diffusers import pipeline_vae
from .models import BACKENDS
from .edm import EDM_SAMPLERS
from .samplers import SAMPLERS
from .sampling import MODES, PRECISIONS, SampleConfig, run

__all__ = ["build_parser", "main"]


def _labels(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"labels must be integers separated by commas, got {text!r}") from None


def build_parser(prog: str = "ditfast sample") -> argparse.ArgumentParser:
    d = SampleConfig()
    p = ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="registry name, DiT-... or DiffiT-... (default DiT-XL/2, or inferred from --ckpt)")
    p.add_argument("--ckpt", default=None, help="checkpoint (official .pt, training checkpoint, .safetensors, or a diffusers DiT "
                   "folder / pipeline root); none: random weights")
    p.add_argument("--input-size", type=int_at_least(1), default=None, help="latent side (random weights: default 32)")
    p.add_argument("--num-classes", type=int_at_least(1), default=None, help="classes (random weights: default 1000)")
    p.add_argument("--in-channels", type=int_at_least(1), default=None, help="latent channels (random weights: default 4)")
    p.add_argument("--vae", default=None, help="local diffusers AutoencoderKL folder (sd-vae-ft-ema/-mse); default: the vae/ of "
                   "a diffusers pipeline --ckpt, else none (latents out)")
    p.add_argument("--labels", type=_labels, default=None, help="class labels, e.g. 207,360,387; sample i gets labels[i %% len]; default random")
    p.add_argument("--num-samples", type=int_at_least(1), default=None, help="default: the number of labels, else 16")
    p.add_argument("--sampler", choices=(*SAMPLERS, *EDM_SAMPLERS), default=d.sampler,
                   help="edm-heun: EDM's Heun sampler, for the image-space DiffiT (DiffiT-CIFAR, DiffiT-Digits16, ...)")
    p.add_argument("--steps", type=int_at_least(1), default=d.steps,
                   help="model evaluations (1..1000; ddpm/ddim >= 2); edm-heun: N sigma steps, 2N - 1 evaluations")
    p.add_argument("--eta", type=float_in(0, 1), default=d.eta, help="DDIM noise scale, in [0, 1] (0: deterministic DDIM)")
    p.add_argument("--cfg-scale", type=float_in(1), default=d.cfg_scale, help="classifier-free guidance scale (>= 1; 1 = off)")
    p.add_argument("--guide-all-channels", action="store_true", help="guide all eps channels (diffusers) instead of the official first 3")
    p.add_argument("--cfg-schedule", choices=CFG_SCHEDULES, default=d.cfg_schedule,
                   help="DiffiT's guidance scale over the steps: auto (the release: power-cosine at latent side <= 32, "
                        "i.e. 256px, constant above), power-cosine, constant; a DiT is always constant")
    p.add_argument("--clip-denoised", action="store_true", help="clamp the x0 prediction to [-1, 1] (pixel-space models)")
    p.add_argument("--s-churn", type=float_in(0), default=d.s_churn, help="edm-heun: stochasticity S_churn (0: deterministic)")
    p.add_argument("--s-min", type=float_in(0), default=d.s_min, help="edm-heun: churn only where sigma >= S_min")
    p.add_argument("--s-max", type=float, default=d.s_max, help="edm-heun: churn only where sigma <= S_max (default inf)")
    p.add_argument("--s-noise", type=float_in(0), default=d.s_noise, help="edm-heun: scale S_noise of the churn noise")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--precision", choices=("auto", *PRECISIONS), default=d.precision, help="auto: bf16 on CUDA, fp32 on CPU; fp64 is a slow reference mode")
    p.add_argument("--batch-size", type=int_at_least(1), default=d.batch_size, help="per rank, before CFG doubling")
    p.add_argument("--mode", choices=MODES, default=d.mode, help="auto: graph on CUDA, eager on CPU")
    p.add_argument("--backend", choices=BACKENDS, default=d.backend, help="the model's ops other than attention (fused: the Triton and ditfast._C kernels; triton: its old name)")
    p.add_argument("--out", type=folder_arg, default=d.out, help="output folder")
    p.add_argument("--shard-size", type=int_at_least(1), default=d.shard_size, help="samples per shard file (restart granularity)")
    p.add_argument("--max-shards", type=int_at_least(1), default=None, help="stop after this many shards per rank; rerun to continue")
    p.add_argument("--png", action=argparse.BooleanOptionalAction, default=d.png, help="per-image PNGs and grid.png")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=d.progress)
    p.add_argument("--device", type=device_arg, default=None, help="default: cuda (LOCAL_RANK) when available, else cpu")
    return p


@command("ditfast sample")
def main(argv: list[str] | None = None, prog: str = "ditfast sample") -> int:
    args = build_parser(prog).parse_args(argv)
    if args.vae is None and args.ckpt is not None:
        args.vae = pipeline_vae(args.ckpt)  # a diffusers pipeline root's vae/, or None
    cfg = SampleConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SampleConfig)})
    result = run(cfg)
    return 0 if result["complete"] or cfg.max_shards else 1


if __name__ == "__main__":
    sys.exit(main())
