"""Parameter counts and analytic forward Gflops of the registry's models, one row per model, block
design and image size.

    python benchmarks/model_sizes.py [--out model_sizes.csv] [--models DiT-XL/2 DiffiT-CIFAR ...]

Parameters: ``sum(p.numel() for p in model.parameters())`` (every parameter, the frozen pos_embed
included, as the DiT paper's 675M for DiT-XL/2 counts it) and the trainable ones, of a model built
on the meta device (no memory allocated; a DiT-XL/2 is 675M parameters), as tests/test_diffit.py and
tests/test_block_variants.py count them (the image-space DiffiTUNets, a few million parameters
whose input size is a buffer, on the CPU). Gflops: ``ditfast.gflops`` (multiply-accumulates per image,
the paper's convention); for a latent model by name and pixel image size (``ditfast/flops.py``,
``DiTShape.macs``), checked equal to the count from the built model; for an image-space DiffiTUNet
from the model (``DiffiTUNet.macs``, ``ditfast/diffit_unet.py``). The ``formula`` column says which.

Nothing is timed, so the values do not depend on the machine; the file is rewritten (not appended
to) on each run, with the environment columns of ``_results.py``.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _results import RESULTS_DIR, atomic_write, environment  # noqa: E402

import ditfast  # noqa: E402
from ditfast import DiT_models, DiffiT_models, DiffiTUNet_models  # noqa: E402

FIELDS = [
    "model", "block", "image_size", "input_size", "params", "trainable_params", "gflops", "formula",
    "device", "torch", "triton", "git_sha", "date",
]  # fmt: skip

BLOCKS = ["adaLN-Zero", "adaLN", "cross-attention", "in-context"]
VAE_DOWNSAMPLE = 8


def default_cases() -> list[tuple[str, str, int]]:
    """(model, block, image size in pixels): every latent DiT and DiffiT at 256 and 512 px, the four
    block designs of every DiT at 256 px, the image-space DiffiTUNets at their own size."""
    cases = []
    for name in DiT_models:
        cases += [(name, block, 256) for block in BLOCKS] + [(name, "adaLN-Zero", 512)]
    for name in DiffiT_models:
        cases += [(name, "TMSA", 256), (name, "TMSA", 512)]
    for name, build in DiffiTUNet_models.items():
        cases.append((name, "TMSA-window", 0))  # 0: the configuration's own input size
    return cases


def measure(name: str, block: str, image_size: int) -> dict:
    if name in DiffiTUNet_models:
        model = DiffiTUNet_models[name]()  # on the CPU (at most a few M parameters): its input size is a buffer
        size = model.input_size
        gflops = ditfast.gflops(model)
        formula = "ditfast.gflops(model) = DiffiTUNet.macs() / 1e9 (ditfast/diffit_unet.py)"
        image_size = size
    elif name in DiffiT_models or name in DiT_models:
        size = image_size // VAE_DOWNSAMPLE
        with torch.device("meta"):
            if name in DiffiT_models:
                model = DiffiT_models[name](input_size=size)
            else:
                model = DiT_models[name](input_size=size, block=block)
        if name in DiffiT_models:
            gflops = ditfast.gflops(name, image_size)
        else:
            gflops = ditfast.gflops(name, image_size, block=block)
        from_model = ditfast.gflops(model)
        if from_model != gflops:
            raise AssertionError(f"{name} {block} {image_size}px: gflops by name {gflops} != from the model {from_model}")
        formula = (f"ditfast.gflops({name!r}, {image_size}" + ("" if name in DiffiT_models else f", block={block!r}")
                   + ") = DiTShape.macs() / 1e9 (ditfast/flops.py); equal to ditfast.gflops(model)")  # fmt: skip
    else:
        raise ValueError(f"unknown model {name!r}")
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return dict(model=name, block=block, image_size=str(image_size), input_size=str(size), params=str(params),
                trainable_params=str(trainable), gflops=repr(gflops), formula=formula)  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="model_sizes.csv", help="a name in benchmarks/results/ or a path")
    p.add_argument("--models", nargs="+", default=None, help="only these models (default: every registry model)")
    args = p.parse_args(argv)
    cases = default_cases()
    if args.models:
        unknown = set(args.models) - {c[0] for c in cases}
        if unknown:
            p.error(f"unknown models {sorted(unknown)}")
        cases = [c for c in cases if c[0] in args.models]
    env = environment("cpu")
    env["device"] = "meta (analytic; no device)"
    rows = [{**measure(*case), **env} for case in cases]
    for r in rows:
        print(f"{r['model']:16s} {r['block']:16s} {r['image_size']:>4s}px  {int(r['params']):>13,} params  {float(r['gflops']):10.5g} Gflops")
    by_key = {(r["model"], r["block"], r["image_size"]): r for r in rows}
    a, b = by_key.get(("DiffiT-XL/2", "TMSA", "256")), by_key.get(("DiT-XL/2", "adaLN-Zero", "256"))
    if a and b:
        ratio = int(a["params"]) / int(b["params"])
        print(f"DiffiT-XL/2 / DiT-XL/2 parameters: {ratio:.4f} ({1 - ratio:.1%} fewer)")
    out = args.out if os.path.isabs(args.out) or os.path.dirname(args.out) else os.path.join(RESULTS_DIR, args.out)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    print("wrote", atomic_write(out, buf.getvalue()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
