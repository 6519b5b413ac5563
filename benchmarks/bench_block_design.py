"""The DiT paper's block-design study (Section 3.2, Figure 5) at the scale of the bundled digits.

    python benchmarks/bench_block_design.py [--designs adaLN-Zero adaLN cross-attention in-context] [--size B/4]
                                            [--eval-steps 2000 4000 6000] [--num-samples 500]
                                            [--work runs/block_design] [--out benchmarks/results/block_design_cpu.csv]

The four ways the paper conditions a transformer block on the timestep and class
(``ditfast.DiT(block=...)``): adaLN-Zero, adaLN, cross-attention and in-context, at one model size
(``--size``, a model of the Gflops study, :data:`bench_gflops_fid.MODELS`; default B/4: depth 4,
hidden 128, 2 heads, patch 4), each trained with the Gflops study's recipe (the same steps, batch,
learning rate, EMA decay and seed) and evaluated at every length of ``--eval-steps``: trained to the
first, its EMA weights exported and scored, then resumed (exactly) to the next. Evaluations run length
by length, so a partial run already compares the designs at the shorter lengths. To use two cores,
run ``--train-only`` with half of ``--designs`` in each of two processes first.

Each evaluation samples ``--num-samples`` images (no guidance, labels 0-9 in turn) and scores them
against the real digits as the Gflops study does (FID, sFID, precision, recall) plus how often the
demo's digit classifier recognises the requested digit; each row carries the design's forward Gflops
(the paper's convention) and trainable parameters. ``--spread-design`` is also sampled with the other
``--seeds`` at the longest length: the seed-to-seed spread that says which FID gaps mean something.

Resumable like the Gflops study: ``--work`` holds models of one training recipe (a settings file
refuses another), finished exports and samples are reused, and a row already in ``--out``
(:data:`FIELDS`) is not measured again. Writes the rows, a plot (FID vs training steps, one line per
design; ``--plot``, default beside ``--out``) and prints a markdown table for the README with a line
on where the ordering agrees with the paper's (adaLN-Zero best, then adaLN, cross-attention,
in-context, at every training length).
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
from ditfast.models import BLOCKS  # noqa: E402

PAPER_ORDER = ("adaLN-Zero", "adaLN", "cross-attention", "in-context")  # best FID first (Figure 5)
FIELDS = [
    "block", "model", "gflops", "params", "train_steps", "fid", "sfid", "precision", "recall", "recognised",
    "num_samples", "sampler", "seed", "device", "torch", "triton", "git_sha", "date",
]  # fmt: skip
ROW_KEY = ("block", "model", "train_steps", "seed", "sampler", "num_samples", "device")


def fid_of(rows: list[dict], seed: int) -> dict[tuple[str, int], float]:
    return gf.fid_by_length(rows, "block", seed)


def ordering(rows: list[dict], args: argparse.Namespace) -> list[str]:
    """Per training length: the designs by FID (first seed) against the paper's order, and the gaps
    between neighbours that the seed-to-seed spread makes too small to call."""
    fid = fid_of(rows, args.seeds[0])
    last = [float(r["fid"]) for r in rows if r["block"] == args.spread_design and int(r["train_steps"]) == args.eval_steps[-1]]
    spread = max(last) - min(last) if len(last) > 1 else None
    lines = []
    for steps in args.eval_steps:
        got = sorted((d for d in PAPER_ORDER if (d, steps) in fid), key=lambda d: fid[d, steps])
        paper = [d for d in PAPER_ORDER if d in got]
        if len(got) < 2:
            continue
        verdict = "agrees with the paper" if got == paper else f"disagrees with the paper ({' < '.join(paper)})"
        close = [f"{a} / {b}" for a, b in zip(got, got[1:]) if spread is not None and fid[b, steps] - fid[a, steps] <= spread]
        note = f"; within the seed spread ({spread:.2f}): {', '.join(close)}" if close else ""
        lines.append(f"at {steps} steps, FID: {' < '.join(f'{d} {fid[d, steps]:.2f}' for d in got)}: {verdict}{note}")
    if spread is not None:
        lines.append(f"seed spread: {args.spread_design} at {args.eval_steps[-1]} steps, FID over seeds {', '.join(map(str, args.seeds))}: "
                     f"{', '.join(f'{v:.2f}' for v in last)} (spread {spread:.2f}, sd {statistics.stdev(last):.2f})")  # fmt: skip
    return lines


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    """The README table: a row per design, FID at every length, the rest at the longest (first seed)."""
    seed, final = args.seeds[0], args.eval_steps[-1]
    fid = fid_of(rows, seed)
    at_final = {r["block"]: r for r in rows if int(r["seed"]) == seed and int(r["train_steps"]) == final}
    spread = [float(r["fid"]) for r in rows if r["block"] == args.spread_design and int(r["train_steps"]) == final]
    body = []
    for design in [d for d in PAPER_ORDER if d in at_final]:
        r = at_final[design]
        fids = [f"{fid[design, s]:.2f}" if (design, s) in fid else "" for s in args.eval_steps]
        if design == args.spread_design and len(spread) > 1:
            fids[-1] = f"{statistics.fmean(spread):.2f} ± {statistics.stdev(spread):.2f} ({len(spread)} seeds)"
        body.append([design, f"{float(r['gflops']):.4f}", f"{int(r['params']):,}", *fids, f"{float(r['sfid']):.2f}",
                     f"{float(r['precision']):.3f}", f"{float(r['recall']):.3f}", f"{float(r['recognised']):.1%}"])  # fmt: skip
    header = ["design", "Gflops", "params", *(f"FID, {s} steps" for s in args.eval_steps), "sFID", "precision", "recall", "recognised"]
    return markdown_table(header, body)


def plot(rows: list[dict], args: argparse.Namespace, path: str) -> str:
    """FID vs training steps, one line per design (first seed); the spread design's other seeds as dots."""
    title = f"block design, DiT-{args.size} on 16x16 digits ({gf.sampler_name(args)})"
    return gf.plot_fid_by_length(rows, "block", {d: d for d in PAPER_ORDER}, title, args, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--designs", nargs="+", default=list(PAPER_ORDER), choices=list(BLOCKS), help="default: %(default)s")
    p.add_argument("--size", default="B/4", choices=list(gf.MODELS), help="the model size of every design (default: %(default)s)")
    p.add_argument("--eval-steps", type=int, nargs="+", default=[2000, 4000, 6000], help="training lengths evaluated, ascending")
    p.add_argument("--spread-design", default="adaLN-Zero", choices=list(BLOCKS), help="the design whose seed spread is measured")
    p.add_argument("--out", default=None, help="results CSV (default: benchmarks/results/block_design_{gpu|cpu}.csv); rows "
                   "already in it are not measured again: give another file to re-measure after a code change")
    p.add_argument("--plot", default=None, help="PNG of FID vs training steps (default: beside --out)")
    gf.add_study_arguments(p, work=os.path.join("runs", "block_design"))
    args = p.parse_args(argv)
    gf.check_eval_steps(p, args, args.designs, args.spread_design, "designs")
    gf.check_study_arguments(p, args)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    args.steps = args.eval_steps[-1]  # one work folder holds every length: the recipe without its length
    gf.check_study(args.work, {k: v for k, v in gf.train_settings(args).items() if k != "steps"})
    specs = {d: dataclasses.replace(gf.MODELS[args.size], block=d) for d in args.designs}
    out = args.out or os.path.join(RESULTS_DIR, f"block_design_{'gpu' if cuda else 'cpu'}.csv")
    plot_path = args.plot or f"{os.path.splitext(out)[0]}.png"
    models = {d: gf.MODELS[args.size].describe() for d in args.designs}
    rows = gf.run_length_study(args, "block", specs, models, args.spread_design, out, FIELDS, ROW_KEY, device)
    if args.train_only:
        return 0
    print(markdown(rows, args))
    print("\n".join(ordering(rows, args)))
    print(plot(rows, args, plot_path))
    print(f"{len(rows)} rows in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
