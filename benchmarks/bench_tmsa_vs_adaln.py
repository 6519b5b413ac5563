"""The DiffiT paper's "TMSA vs DiT modulation" comparison at the scale of the bundled digits.

    python benchmarks/bench_tmsa_vs_adaln.py [--archs DiT DiffiT] [--size B/4] [--eval-steps 2000 4000 6000]
                                             [--num-samples 500] [--spread-arch DiT]
                                             [--work runs/tmsa_vs_adaln] [--out benchmarks/results/tmsa_vs_adaln_cpu.csv]

Two ways of letting the timestep (and class) into a transformer block, at one model size (``--size``,
a model of the Gflops study, :data:`bench_gflops_fid.MODELS`; default B/4: depth 4, hidden 128, 2
heads, patch 4): ``DiT`` (:class:`ditfast.DiT`, adaLN-Zero blocks: the time-and-class token
modulates LayerNorm outputs and gates the residuals) and ``DiffiT`` (:class:`ditfast.DiffiT`,
time-dependent self-attention: the same token is projected into q, k and v, with a learned relative
position bias on the scores; plain LayerNorms, no adaLN). Both have the same width, depth, heads and
patch and train with the Gflops study's recipe (the same steps, batch, learning rate, EMA decay and
seed), each evaluated at every length of ``--eval-steps``: trained to the first, its EMA weights
exported and scored, then resumed (exactly) to the next. Evaluations run length by length, so a
partial run already compares the two at the shorter lengths. To use two cores, run ``--train-only
--archs DiT`` and ``--train-only --archs DiffiT`` in two processes first.

Each evaluation samples ``--num-samples`` images (no guidance, labels 0-9 in turn) and scores them
against the real digits as the Gflops study does (FID, sFID, precision, recall) plus how often the
demo's digit classifier recognises the requested digit; each row carries the model's forward Gflops
(``ditfast.gflops``) and trainable parameters. ``--spread-arch`` is also sampled with the other
``--seeds`` at the longest length: the seed-to-seed spread that says whether a FID gap means something.

Resumable like the Gflops study: ``--work`` holds models of one training recipe (a settings file
refuses another), finished exports and samples are reused, and a row already in ``--out``
(:data:`FIELDS`) is not measured again. The DiT here is the block-design study's adaLN-Zero model
under the same name and recipe, so ``--work runs/block_design`` reuses its training and samples.
Writes the rows, a plot (FID vs training steps, one line per model; ``--plot``, default beside
``--out``) and prints a markdown table for the README with a line per training length saying which
model has the lower FID and whether the gap exceeds the seed spread.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_gflops_fid as gf  # noqa: E402
from _results import RESULTS_DIR  # noqa: E402
from report import markdown_table  # noqa: E402

import ditfast  # noqa: E402

ARCHS = ("DiT", "DiffiT")  # adaLN-Zero modulation; time-dependent self-attention (TMSA)
FIELDS = [
    "arch", "model", "gflops", "params", "train_steps", "fid", "sfid", "precision", "recall", "recognised",
    "num_samples", "sampler", "seed", "device", "torch", "triton", "git_sha", "date",
]  # fmt: skip
ROW_KEY = ("arch", "model", "train_steps", "seed", "sampler", "num_samples", "device")


def fid_of(rows: list[dict], seed: int) -> dict[tuple[str, int], float]:
    return gf.fid_by_length(rows, "arch", seed)


def seed_spread(rows: list[dict], args: argparse.Namespace) -> list[float]:
    """The spread model's FIDs over the seeds at the longest length."""
    return [float(r["fid"]) for r in rows if r["arch"] == args.spread_arch and int(r["train_steps"]) == args.eval_steps[-1]]


def verdicts(rows: list[dict], args: argparse.Namespace) -> list[str]:
    """Per training length: whether DiffiT's FID (first seed) is below DiT's, by how much, and whether
    the gap exceeds the seed-to-seed spread (max - min over ``--seeds``, measured at the longest length)."""
    fid = fid_of(rows, args.seeds[0])
    last = seed_spread(rows, args)
    spread = max(last) - min(last) if len(last) > 1 else None
    lines = []
    for steps in args.eval_steps:
        if ("DiT", steps) not in fid or ("DiffiT", steps) not in fid:
            continue
        dit, diffit = fid["DiT", steps], fid["DiffiT", steps]
        gap = abs(dit - diffit)
        who = "DiffiT beats DiT" if diffit < dit else "DiT beats DiffiT" if dit < diffit else "DiffiT ties DiT"
        if spread is None:
            call = "no seed spread measured (give --seeds two or more)"
        elif gap > spread:
            call = f"the gap exceeds the seed spread ({spread:.2f})"
        else:
            call = f"the gap is within the seed spread ({spread:.2f}): too close to call"
        lines.append(f"at {steps} steps, FID: DiffiT {diffit:.2f} vs DiT {dit:.2f}: {who} by {gap:.2f}; {call}")
    if spread is not None:
        lines.append(f"seed spread: {args.spread_arch} at {args.eval_steps[-1]} steps, FID over seeds {', '.join(map(str, args.seeds))}: "
                     f"{', '.join(f'{v:.2f}' for v in last)} (spread {spread:.2f}, sd {statistics.stdev(last):.2f})")  # fmt: skip
    cost = {r["arch"]: r for r in rows}
    if "DiT" in cost and "DiffiT" in cost:
        (pd, gd), (pf, gfl) = ((int(cost[a]["params"]), float(cost[a]["gflops"])) for a in ("DiT", "DiffiT"))
        lines.append(f"cost: DiffiT {pf:,} parameters vs DiT {pd:,} ({pf / pd - 1:+.1%}), "
                     f"{gfl:.4f} vs {gd:.4f} forward Gflops ({gfl / gd - 1:+.1%})")  # fmt: skip
    return lines


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    """The README table: a row per model, FID at every length, the rest at the longest (first seed)."""
    seed, final = args.seeds[0], args.eval_steps[-1]
    fid = fid_of(rows, seed)
    at_final = {r["arch"]: r for r in rows if int(r["seed"]) == seed and int(r["train_steps"]) == final}
    spread = seed_spread(rows, args)
    body = []
    for arch in [a for a in ARCHS if a in at_final]:
        r = at_final[arch]
        fids = [f"{fid[arch, s]:.2f}" if (arch, s) in fid else "" for s in args.eval_steps]
        if arch == args.spread_arch and len(spread) > 1:
            fids[-1] = f"{statistics.fmean(spread):.2f} ± {statistics.stdev(spread):.2f} ({len(spread)} seeds)"
        body.append([r["model"], f"{float(r['gflops']):.4f}", f"{int(r['params']):,}", *fids, f"{float(r['sfid']):.2f}",
                     f"{float(r['precision']):.3f}", f"{float(r['recall']):.3f}", f"{float(r['recognised']):.1%}"])  # fmt: skip
    header = ["model", "Gflops", "params", *(f"FID, {s} steps" for s in args.eval_steps), "sFID", "precision", "recall", "recognised"]
    return markdown_table(header, body)


def plot(rows: list[dict], args: argparse.Namespace, path: str) -> str:
    """FID vs training steps, one line per model (first seed); the spread model's other seeds as dots."""
    title = f"TMSA vs adaLN-Zero, {args.size} on 16x16 digits ({gf.sampler_name(args)})"
    return gf.plot_fid_by_length(rows, "arch", {"DiT": "DiT (adaLN-Zero)", "DiffiT": "DiffiT (TMSA)"}, title, args, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS), help="default: %(default)s")
    p.add_argument("--size", default="B/4", choices=list(gf.MODELS), help="the width, depth, heads and patch of both (default: %(default)s)")
    p.add_argument("--eval-steps", type=int, nargs="+", default=[2000, 4000, 6000], help="training lengths evaluated, ascending")
    p.add_argument("--spread-arch", default="DiT", choices=list(ARCHS), help="the model whose seed spread is measured")
    p.add_argument("--out", default=None, help="results CSV (default: benchmarks/results/tmsa_vs_adaln_{gpu|cpu}.csv); rows "
                   "already in it are not measured again: give another file to re-measure after a code change")
    p.add_argument("--plot", default=None, help="PNG of FID vs training steps (default: beside --out)")
    gf.add_study_arguments(p, work=os.path.join("runs", "tmsa_vs_adaln"))
    args = p.parse_args(argv)
    gf.check_eval_steps(p, args, args.archs, args.spread_arch, "archs")
    gf.check_study_arguments(p, args)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    args.steps = args.eval_steps[-1]  # one work folder holds every length: the recipe without its length
    gf.check_study(args.work, {k: v for k, v in gf.train_settings(args).items() if k != "steps"})
    specs = {a: dataclasses.replace(gf.MODELS[args.size], arch=a) for a in args.archs}
    out = args.out or os.path.join(RESULTS_DIR, f"tmsa_vs_adaln_{'gpu' if cuda else 'cpu'}.csv")
    plot_path = args.plot or f"{os.path.splitext(out)[0]}.png"
    models = {a: specs[a].describe() for a in args.archs}
    rows = gf.run_length_study(args, "arch", specs, models, args.spread_arch, out, FIELDS, ROW_KEY, device)
    if args.train_only:
        return 0
    print(markdown(rows, args))
    print("\n".join(verdicts(rows, args)))
    print(plot(rows, args, plot_path))
    print(f"{len(rows)} rows in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
