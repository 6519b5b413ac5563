"""How exactly a DiT crosses between ditfast and diffusers' DiTTransformer2DModel, CPU fp32.

    python benchmarks/bench_diffusers_export.py [--batch 16] [--out diffusers_export_cpu.csv] [--cases ...]

Cases (each one row: the two models' outputs on the same random inputs, x ~ N(0, 1), t uniform in
0..999, labels uniform in 0..num_classes-1, from a generator seeded with --input-seed):

- ``digits``: the bundled trained official-math DiT (``ditfast/assets/digits_dit.safetensors`` via
  ``ditfast.load_model``) exported with ``ditfast.save_diffusers`` and loaded by
  ``DiTTransformer2DModel.from_pretrained``; direction ditfast->diffusers.
- ``random-*``: small official-math DiTs whose every trainable weight is random (seeded; the
  zero-initialised adaLN and final layers too, so the output is not ~0), exported the same way.
- ``native-*``: a DiTTransformer2DModel with random weights (each block's embedder a copy of block
  0's, as in a converted official checkpoint) saved by ``save_pretrained`` and loaded by
  ``ditfast.load_model``; direction diffusers->ditfast.
- ``roundtrip-*``: that loaded model with its weights changed (random again) and exported back with
  ``save_diffusers``; direction diffusers->ditfast->diffusers.

Columns: ``max_rel_diff`` = max|a-b| / max|b| (b: the source side's output), ``max_abs_diff``,
``bit_identical`` (torch.equal). The file is rewritten on each run (the cases are deterministic),
with the environment columns of ``_results.py`` and the diffusers version.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _results import RESULTS_DIR, atomic_write, environment  # noqa: E402

import ditfast  # noqa: E402

FIELDS = [
    "case", "direction", "config", "weight_seed", "input_seed", "batch", "max_rel_diff", "max_abs_diff",
    "bit_identical", "dtype", "diffusers", "device", "torch", "triton", "git_sha", "date",
]  # fmt: skip

ASSET = os.path.join(os.path.dirname(ditfast.__file__), "assets", "digits_dit.safetensors")

# small official-math DiTs (ditfast.DiT keyword arguments) for the random-weight exports
RANDOM_DITS = {
    "random-p2-h64": dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2, num_classes=10),
    "random-p4-h128": dict(input_size=16, patch_size=4, in_channels=1, hidden_size=128, depth=4, num_heads=4, num_classes=10),
    "random-p2-h96-nosigma": dict(input_size=8, patch_size=2, in_channels=4, hidden_size=96, depth=3, num_heads=3,
                                  num_classes=7, learn_sigma=False),
}  # fmt: skip
RANDOM_SEEDS = (0, 1)

# DiTTransformer2DModel configs for the diffusers-native cases
NATIVE = {
    "p2-sigma": dict(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=2,
                     sample_size=8, patch_size=2, num_embeds_ada_norm=10),
    "p4-nosigma": dict(num_attention_heads=4, attention_head_dim=9, in_channels=4, out_channels=None, num_layers=2,
                       sample_size=8, patch_size=4, num_embeds_ada_norm=7),
}  # fmt: skip


@torch.no_grad()
def randomize_(model: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Every trainable parameter random (the zero-initialised ones too; tests/conftest.py's rule):
    vectors N(0, std^2), matrices N(0, 1/fan_in). The frozen pos_embed is left as it is."""
    gen = torch.Generator().manual_seed(seed)
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        fan_in = p.shape[1] * (p[0, 0].numel() if p.dim() > 2 else 1) if p.dim() >= 2 else 1
        scale = std if p.dim() < 2 else fan_in**-0.5
        p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * scale)
    return model


def inputs(in_channels: int, size: int, num_classes: int, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, in_channels, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, num_classes, (batch,), generator=g)
    return x, t, y


def diff(got: torch.Tensor, ref: torch.Tensor) -> dict:
    a, b = got.detach().double(), ref.detach().double()
    if a.shape != b.shape:
        raise AssertionError(f"output shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    err = (a - b).abs().max().item()
    return dict(max_rel_diff=f"{err / max(b.abs().max().item(), 1e-30):.3e}", max_abs_diff=f"{err:.3e}",
                bit_identical=str(bool(torch.equal(got, ref))))  # fmt: skip


def _dit_config(net) -> str:
    return (f"input {net.x_embedder.img_size[0]}, patch {net.patch_size}, C {net.in_channels}, hidden {net.pos_embed.shape[-1]}, "
            f"depth {len(net.blocks)}, heads {net.num_heads}, learn_sigma {net.learn_sigma}")  # fmt: skip


@torch.no_grad()
def export_case(net, work: str, batch: int, input_seed: int) -> dict:
    """ditfast -> diffusers: save_diffusers, from_pretrained, outputs compared (reference: ditfast)."""
    from diffusers import DiTTransformer2DModel

    net = net.eval()
    folder = ditfast.save_diffusers(net, os.path.join(work, "export"), overwrite=True)
    exported = DiTTransformer2DModel.from_pretrained(folder).eval()
    x, t, y = inputs(net.in_channels, net.x_embedder.img_size[0], exported.config.num_embeds_ada_norm, batch, input_seed)
    return diff(exported(x, t, y).sample, net(x, t, y))


@torch.no_grad()
def native_cases(name: str, config: dict, seed: int, work: str, batch: int, input_seed: int) -> list[dict]:
    from diffusers import DiTTransformer2DModel

    reference = randomize_(DiTTransformer2DModel(**config).eval(), seed=seed)
    state = reference.state_dict()
    for key in state:  # every block's embedders a copy of block 0's (ditfast refuses differing ones)
        if ".norm1.emb." in key and not key.startswith("transformer_blocks.0."):
            state[key].copy_(state["transformer_blocks.0." + key.split(".", 2)[2]])
    folder = os.path.join(work, "native")
    reference.save_pretrained(folder)
    net = ditfast.load_model(folder).eval()
    x, t, y = inputs(config["in_channels"], config["sample_size"], config["num_embeds_ada_norm"], batch, input_seed)
    text = ", ".join(f"{k}={v}" for k, v in config.items())
    rows = [dict(case=f"native-{name}", direction="diffusers->ditfast", config=text, **diff(net(x, t, y), reference(x, t, y).sample))]
    randomize_(net, seed=seed + 100)  # a changed (e.g. fine-tuned) model, exported back
    rows.append(dict(case=f"roundtrip-{name}", direction="diffusers->ditfast->diffusers", config=text + f"; weights re-randomised with seed {seed + 100}",
                     **export_case(net, work, batch, input_seed)))  # fmt: skip
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--input-seed", type=int, default=0)
    p.add_argument("--cases", nargs="+", default=None, help="only these: digits, random, native (default: all)")
    p.add_argument("--out", default="diffusers_export_cpu.csv", help="a name in benchmarks/results/ or a path")
    args = p.parse_args(argv)
    if args.batch < 1:
        p.error("--batch must be at least 1")
    kinds = args.cases or ["digits", "random", "native"]
    if set(kinds) - {"digits", "random", "native"}:
        p.error(f"unknown cases {sorted(set(kinds) - {'digits', 'random', 'native'})}")
    import diffusers
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        if "digits" in kinds:
            net = ditfast.load_model(ASSET)
            rows.append(dict(case="digits", direction="ditfast->diffusers", config=f"ditfast/assets/digits_dit.safetensors: {_dit_config(net)}",
                             weight_seed="trained", **export_case(net, work, args.batch, args.input_seed)))  # fmt: skip
        if "random" in kinds:
            for name, kwargs in RANDOM_DITS.items():
                for seed in RANDOM_SEEDS:
                    net = randomize_(ditfast.DiT(**kwargs), seed=seed)
                    rows.append(dict(case=name, direction="ditfast->diffusers", config=_dit_config(net), weight_seed=str(seed),
                                     **export_case(net, work, args.batch, args.input_seed)))  # fmt: skip
        if "native" in kinds:
            for name, config in NATIVE.items():
                for r in native_cases(name, config, 0, work, args.batch, args.input_seed):
                    rows.append(dict(r, weight_seed="0"))
    env = environment("cpu")
    for r in rows:
        r.update(input_seed=str(args.input_seed), batch=str(args.batch), dtype="float32", diffusers=diffusers.__version__, **env)
        print(f"{r['case']:28s} {r['direction']:30s} max|a-b|/max|b| {r['max_rel_diff']}  bit-identical {r['bit_identical']}")
    out = args.out if os.path.isabs(args.out) or os.path.dirname(args.out) else os.path.join(RESULTS_DIR, args.out)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    print("wrote", atomic_write(out, buf.getvalue()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
