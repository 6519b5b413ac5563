"""The DiT paper's scaling study at the scale of the bundled digits: Gflops against FID.

    python benchmarks/bench_gflops_fid.py [--models S/4 B/4 S/2 B/2] [--steps 6000] [--num-samples 500]
                                          [--work runs/gflops_fid] [--out benchmarks/results/gflops_fid_cpu.csv]

What it does, in order (every stage is resumable: rerunning with the same settings reuses what is
finished in ``--work``, and a row already in ``--out`` is not measured again):

1. Trains each model (:data:`MODELS`: two widths x two patch sizes, like the paper's S/B x 4/2
   grid, shrunk for 16x16x1 digits) with :func:`ditfast.train.train` on the bundled digits, all
   with the same steps, batch, learning rate, EMA decay and seed. To use two cores, run
   ``--train-only`` with half of ``--models`` in each of two processes first.
2. Computes Inception features of the real digits (the reference set: all 1,797, upsampled to
   16x16, quantised as the samples are).
3. Samples ``--num-samples`` images from each model's EMA weights with :func:`ditfast.sample`
   (no guidance, as the paper's scaling plots; class labels 0-9 in turn, matching the reference's
   class balance; ``--sampler`` with ``--sampling-steps``) and scores them: FID, sFID, precision
   and recall (:mod:`ditfast.metrics`, the ADM evaluator's definitions), and prints how often the
   demo's digit classifier recognises the requested digit (an easier number to picture).
4. For ``--spread-model``: the same FID for every seed of ``--seeds`` on the fast path (the
   seed-to-seed spread) and, on a GPU, for the reference path (eager, official math, fp32/TF32) on
   the first seed. The fast path must not move FID by more than the seed-to-seed spread.

Providers: ``ditfast`` is the library's defaults on the device (on a GPU: bf16, the fused Triton
adaLN kernels, the compiled patch ops, the chosen attention kernel and the CUDA-graph sampling
loop; on a CPU the defaults are the eager fp32 math, the reference's computation, so there the
script measures no reference row and says so); ``reference`` is ``backend="eager"``, torch's SDPA call, fp32 weights (TF32
matmuls on a GPU, as the official sample script), eager loop.

FID here is FID-``num_samples`` against 1,797 real digits: comparable between the rows of one run,
not with the paper's FID-50K on ImageNet. Rows go to ``--out`` (``_results.FID_FIELDS``); a grid
with one row of samples per model goes to ``--grid``; ``benchmarks/report.py`` tabulates and plots.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import os
import re
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _results import FID_FIELDS, RESULTS_DIR, append_rows, atomic_write, environment  # noqa: E402
from report import pyplot, save_figure  # noqa: E402

import ditfast  # noqa: E402
from ditfast.data.classifier import DigitClassifier  # noqa: E402
from ditfast.data.digits import load_digits, pixels_to_uint8  # noqa: E402
from ditfast.imageio import make_grid, save_png  # noqa: E402
from ditfast.metrics import compute_activations, compute_statistics, frechet_distance, precision_recall  # noqa: E402
from ditfast.metrics.npz import write_npz  # noqa: E402
from ditfast.train import TrainConfig, train  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Spec:
    name: str  # paper-style size/patch name, scaled to 16x16x1 digits
    depth: int
    hidden_size: int
    num_heads: int
    patch_size: int
    block: str = "adaLN-Zero"  # the DiT paper's block design (ditfast.DiT(block=...)); named only when not the default
    arch: str = "DiT"  # "DiT" or "DiffiT" (ditfast.DiffiT: TMSA blocks, no adaLN; block stays the default); named only when DiffiT

    def __post_init__(self) -> None:
        if self.arch not in ("DiT", "DiffiT") or (self.arch == "DiffiT" and self.block != "adaLN-Zero"):
            raise ValueError(f"arch must be DiT or DiffiT (a DiffiT has no DiT block design), got {self.arch!r}, block {self.block!r}")

    @property
    def tag(self) -> str:
        return (self.name.replace("/", "-") + ("" if self.block == "adaLN-Zero" else f"_{self.block}")
                + ("" if self.arch == "DiT" else f"_{self.arch}"))  # fmt: skip

    @property
    def label(self) -> str:
        return self.name + ("" if self.block == "adaLN-Zero" else f" {self.block}") + ("" if self.arch == "DiT" else f" {self.arch}")

    def describe(self) -> str:
        design = "" if self.block == "adaLN-Zero" else f", {self.block} blocks"
        return (f"{self.arch}-{self.name} (depth {self.depth}, hidden {self.hidden_size}, {self.num_heads} head(s), "
                f"patch {self.patch_size}{design})")  # fmt: skip


MODELS = {
    s.name: s
    for s in (
        Spec("S/4", 4, 64, 1, 4),
        Spec("B/4", 4, 128, 2, 4),
        Spec("S/2", 4, 64, 1, 2),
        Spec("B/2", 4, 128, 2, 2),
        Spec("L/4", 6, 192, 3, 4),
        Spec("L/2", 6, 192, 3, 2),
    )
}
DEFAULT_MODELS = ["S/4", "B/4", "S/2", "B/2"]
PROVIDERS = ("ditfast", "reference")
STUDY_FILE = "study.json"  # the training settings of a work folder


def train_settings(args: argparse.Namespace) -> dict:
    return dict(steps=args.steps, global_batch=args.batch, lr=args.lr, ema_decay=args.ema_decay, seed=args.train_seed)


def check_study(work: str, settings: dict) -> None:
    """A work folder holds models trained with one set of settings: refuse to mix."""
    path = os.path.join(work, STUDY_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            theirs = json.load(f)
        if theirs != settings:
            diff = ", ".join(f"{k}: {theirs.get(k)!r} there, {v!r} now" for k, v in settings.items() if theirs.get(k) != v)
            raise SystemExit(f"error: {work} holds models trained with other settings ({diff}); use another --work")
    else:
        os.makedirs(work, exist_ok=True)
        atomic_write(path, json.dumps(settings, indent=1) + "\n")


def resume_point(out: str, steps: int) -> str | None:
    """The newest checkpoint of the run in ``out`` at or before ``steps`` (None: start from scratch).
    Training resumes exactly, so a model trained to ``steps`` through any of them is the same."""
    folder = os.path.join(out, "checkpoints")
    names = sorted(n for n in os.listdir(folder) if re.fullmatch(r"\d+\.pt", n)) if os.path.isdir(folder) else []
    before = [n for n in names if int(n[:-3]) <= steps]  # ditfast.train names them by step: 0002000.pt
    return os.path.join(folder, before[-1]) if before else None


def train_model(spec: Spec, args: argparse.Namespace, steps: int | None = None) -> str:
    """Train ``spec`` to ``steps`` (default: ``--steps``), resuming from its newest checkpoint up to
    there, unless its EMA export exists; returns the export (``ema.safetensors``, or with ``steps``
    given ``ema_<steps>steps.safetensors``: one per training length)."""
    out = os.path.join(args.work, spec.tag)
    export = os.path.join(out, "ema.safetensors" if steps is None else f"ema_{steps}steps.safetensors")
    if os.path.isfile(export):
        model = ditfast.load_model(export)
        got = (type(model).__name__, len(model.blocks), model.x_embedder.proj.out_channels, model.num_heads, model.patch_size,
               getattr(model, "block", "adaLN-Zero"))  # fmt: skip
        if got != (spec.arch, spec.depth, spec.hidden_size, spec.num_heads, spec.patch_size, spec.block):
            raise SystemExit(f"error: {export} holds a model with (architecture, depth, hidden, heads, patch, block) = {got}, "
                             f"not {spec.describe()}")  # fmt: skip
        print(f"{spec.describe()}: trained ({export})")
        return export
    s = train_settings(args)
    steps = s["steps"] if steps is None else steps
    cfg = TrainConfig(  # the registry name picks only the architecture: every size below overrides it
        data="digits", image_size=16, model=f"{spec.arch}-S/2", depth=spec.depth, hidden_size=spec.hidden_size, num_heads=spec.num_heads,
        patch_size=spec.patch_size, block=spec.block, steps=steps, global_batch=s["global_batch"], lr=s["lr"],
        ema_decay=s["ema_decay"], seed=s["seed"], log_every=100, ckpt_every=500, out=out, resume=resume_point(out, steps),
        export=export, progress=not args.no_progress,
    )  # fmt: skip
    print(f"{spec.describe()}: training {cfg.steps} steps, batch {cfg.global_batch} -> {out} (from {cfg.resume or 'scratch'})")
    result = train(cfg)
    if not all(torch.isfinite(p).all() for p in result["ema"].parameters()):
        os.unlink(export)  # never score a diverged model on a rerun
        raise SystemExit(f"error: training {spec.label} diverged (last logged loss {result['loss']}); its export was removed")
    return export


def reference_activations(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """Inception (pool, spatial) features of the real digits, cached in the work folder."""
    x, _ = load_digits(16)
    if args.ref_limit:
        x = x[: args.ref_limit]
    path = os.path.join(args.work, f"ref_digits16_{len(x)}.npz")
    if os.path.isfile(path):
        with np.load(path) as f:
            return f["pool"], f["spatial"]
    print(f"reference: Inception features of {len(x)} real digits")
    pool, spatial = compute_activations(pixels_to_uint8(x).numpy(), batch_size=args.inception_batch, progress=not args.no_progress)
    fd, tmp = tempfile.mkstemp(dir=args.work, suffix=".npz")
    with os.fdopen(fd, "wb") as f:
        np.savez(f, pool=pool, spatial=spatial)
    os.replace(tmp, path)
    return pool, spatial


def reference_statistics(args: argparse.Namespace) -> tuple:
    """What :func:`score` compares with: (pool features, pool statistics, spatial statistics) of the real digits."""
    pool, spatial = reference_activations(args)
    return pool, compute_statistics(pool), compute_statistics(spatial)


def prepare(model: ditfast.DiT, provider: str, device: torch.device) -> tuple[str, str]:
    """Set the model's backends for ``provider``; returns (precision, loop mode) for ditfast.sample."""
    if provider == "reference":
        model.backend, model.attn_backend = "eager", "sdpa"
        return ("tf32" if device.type == "cuda" else "fp32"), "eager"
    model.backend, model.attn_backend = "auto", "auto"
    return "auto", "auto"


def sample_images(spec: Spec, export: str, provider: str, seed: int, args: argparse.Namespace, device: torch.device,
                  steps: int | None = None) -> np.ndarray:  # fmt: skip
    """uint8 (N, 16, 16, 1) samples, cached as an ADM .npz in the work folder (named by the model's
    training ``steps`` where one work folder holds several lengths)."""
    trained = "" if steps is None else f"_{steps}steps"
    name = (f"{spec.tag}{trained}_{provider}_{device.type}_{args.sampler}{args.sampling_steps}_cfg{args.cfg_scale:g}"
            f"_n{args.num_samples}_seed{seed}.npz")  # fmt: skip
    path = os.path.join(args.work, "samples", name)
    if os.path.isfile(path):
        with np.load(path) as f:
            return f["arr_0"]
    model = ditfast.load_model(export, device=device)
    precision, mode = prepare(model, provider, device)
    t0 = time.perf_counter()
    gen = ditfast.sample(
        model, labels=range(10), num_samples=args.num_samples, sampler=args.sampler, steps=args.sampling_steps,
        cfg_scale=args.cfg_scale, clip_denoised=True, seed=seed, precision=precision, batch_size=args.sample_batch,
        mode=mode, progress=not args.no_progress,
    )  # fmt: skip
    dt = time.perf_counter() - t0
    at = "" if steps is None else f" ({steps} steps)"
    print(f"  {spec.label}{at} {provider} seed {seed}: {args.num_samples} samples in {dt:.1f} s ({args.num_samples / dt:.1f} images/s)")
    images = gen.images.numpy()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_npz(path, images)
    return images


def score(images: np.ndarray, ref: tuple, args: argparse.Namespace) -> dict:
    """FID, sFID, precision, recall of ``images`` against ``ref`` = (pool features, pool statistics,
    spatial statistics) of the real digits, computed once by the caller."""
    ref_pool, ref_stats, ref_stats_s = ref
    pool, spatial = compute_activations(images, batch_size=args.inception_batch, progress=not args.no_progress)
    prec, rec = precision_recall(ref_pool, pool)
    return dict(fid=frechet_distance(*compute_statistics(pool), *ref_stats),
                sfid=frechet_distance(*compute_statistics(spatial), *ref_stats_s), precision=prec, recall=rec)  # fmt: skip


@functools.cache
def digit_classifier() -> DigitClassifier:
    """The digit classifier of `ditfast demo` (logistic regression on the real digits' pixels), fitted once per process."""
    return DigitClassifier(16)


def recognised(classifier: DigitClassifier, images: np.ndarray) -> float:
    """How often ``classifier`` reads the requested digit in ``images`` (ditfast.sample gave sample i the label i % 10)."""
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    return classifier.score(pixels, torch.arange(len(images)) % 10)


def row_environment(device: torch.device) -> dict[str, str]:
    """``_results.environment`` without the CPU thread count: threads change speed, not samples."""
    env = environment(device)
    env["device"] = re.sub(r" x\d+ threads$", "", env["device"])
    return env


def sampler_name(args: argparse.Namespace) -> str:
    return f"{args.sampler}{args.sampling_steps} cfg{args.cfg_scale:g}"


ROW_KEY = ("model", "provider", "seed", "sampler", "num_samples", "train_steps", "device")


def measured(out: str, key: tuple[str, ...] = ROW_KEY) -> dict[tuple, dict]:
    """Rows already in the results file, by ``key`` (a rerun does not measure them again)."""
    if not os.path.isfile(out):
        return {}
    with open(out, newline="") as f:
        return {tuple(r[k] for k in key): r for r in csv.DictReader(f)}


def runs(models: list[Spec], args: argparse.Namespace, device: torch.device) -> list[tuple[Spec, str, int]]:
    """(model, provider, seed) of every evaluation, the spread model's extra ones last. The
    reference path only on a GPU: on a CPU the library's defaults are the same computation (eager
    fp32, the official math), so a second row would compare it with itself."""
    spread = MODELS[args.spread_model]
    todo = [(m, "ditfast", args.seeds[0]) for m in models]
    todo += [(spread, "ditfast", s) for s in args.seeds[1:]]
    if device.type == "cuda":
        todo.append((spread, "reference", args.seeds[0]))
    return todo


def summarize(rows: list[dict], args: argparse.Namespace, device: torch.device) -> list[str]:
    lines = [f"{'model':<46} {'Gflops':>8} {'provider':>9} {'seed':>4} {'FID':>8} {'sFID':>8} {'prec':>6} {'recall':>6}"]
    for r in rows:
        lines.append(f"{r['model']:<46} {float(r['gflops']):8.4f} {r['provider']:>9} {r['seed']:>4} {float(r['fid']):8.2f} "
                     f"{float(r['sfid']):8.2f} {float(r['precision']):6.3f} {float(r['recall']):6.3f}")  # fmt: skip
    spread_rows = [r for r in rows if r["model"] == MODELS[args.spread_model].describe()]
    fast = [float(r["fid"]) for r in spread_rows if r["provider"] == "ditfast"]
    ref = [float(r["fid"]) for r in spread_rows if r["provider"] == "reference"]
    if len(fast) >= 2 and device.type != "cuda":
        lines.append(f"{args.spread_model}: FID over seeds {', '.join(f'{v:.2f}' for v in fast)} (spread {max(fast) - min(fast):.2f}, "
                     f"sd {statistics.stdev(fast):.2f}); no reference-path row on a CPU: the fast path's defaults there "
                     "are the eager fp32 math, the same computation (the fused kernels are compared on a GPU)")  # fmt: skip
    elif len(fast) >= 2 and ref:
        spread = max(fast) - min(fast)
        moved = abs(fast[0] - ref[0])
        verdict = "within" if moved <= spread else "OUTSIDE"
        lines.append(f"{args.spread_model}: FID over seeds {', '.join(f'{v:.2f}' for v in fast)} (spread {spread:.2f}, "
                     f"sd {statistics.stdev(fast):.2f}); fast path vs reference on seed {args.seeds[0]}: "
                     f"{fast[0]:.2f} vs {ref[0]:.2f}, moved {moved:.2f}: {verdict} the seed-to-seed spread")  # fmt: skip
    return lines


def add_study_arguments(p: argparse.ArgumentParser, work: str) -> None:
    """The options every study on the digits shares: the training recipe, sampling, scoring, files."""
    p.add_argument("--batch", type=int, default=64, help="training batch")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--train-seed", type=int, default=0)
    p.add_argument("--train-only", action="store_true", help="train the models, evaluate nothing")
    p.add_argument("--num-samples", type=int, default=500, help="samples per FID")
    p.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim", "dpm-solver++"])
    p.add_argument("--sampling-steps", type=int, default=100)
    p.add_argument("--cfg-scale", type=float, default=1.0, help="1: no guidance (the paper's scaling plots)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sampling seeds of the spread model; the first for all")
    p.add_argument("--sample-batch", type=int, default=250)
    p.add_argument("--inception-batch", type=int, default=64)
    p.add_argument("--ref-limit", type=int, default=0, help="use only the first N real digits as the reference (0: all; for smoke tests)")
    p.add_argument("--work", default=work, help="checkpoints, samples and caches")
    p.add_argument("--no-progress", action="store_true")


def check_study_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse (``p.error``, before any work) what :func:`add_study_arguments` cannot run with."""
    if args.num_samples < 2 or not 1 <= args.sampling_steps <= 1000 or args.cfg_scale < 1:
        p.error("need --num-samples >= 2, 1 <= --sampling-steps <= 1000 and --cfg-scale >= 1")
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds must differ from each other (they measure the seed-to-seed spread), got {args.seeds}")
    if args.ref_limit < 0 or (args.ref_limit and args.out is None):
        p.error("--ref-limit must be >= 0, and a reduced reference needs its own --out (the results files hold full-reference FIDs)")


# ------------------------------------------------------------------------------------------
# Studies of variants at several training lengths (bench_block_design.py, bench_tmsa_vs_adaln.py):
# one model size, one field of its Spec varied (``column``: the results column naming the variant)
# ------------------------------------------------------------------------------------------


def check_eval_steps(p: argparse.ArgumentParser, args: argparse.Namespace, variants: list[str], spread: str, what: str) -> None:
    """Refuse (``p.error``) repeated variants, a spread variant not among them (unless --train-only:
    half of the variants trained in each of two processes), and --eval-steps that do not ascend from
    >= 1; ``what`` is the option pair's name ("designs", "archs")."""
    if len(set(variants)) != len(variants) or (spread not in variants and not args.train_only):
        p.error(f"--{what} must differ from each other and include --spread-{what[:-1]} {spread}, got {variants}")
    if args.eval_steps[0] < 1 or any(a >= b for a, b in zip(args.eval_steps, args.eval_steps[1:])):
        p.error(f"--eval-steps must be ascending and >= 1, got {args.eval_steps}")


def length_evaluations(variants: list[str], spread: str, args: argparse.Namespace) -> list[tuple[str, int, int]]:
    """(variant, training steps, sampling seed) of every row: length by length, every variant on the
    first seed, then the ``spread`` variant's other seeds at the longest length."""
    todo = [(v, steps, args.seeds[0]) for steps in args.eval_steps for v in variants]
    return todo + [(spread, args.eval_steps[-1], s) for s in args.seeds[1:]]


def fid_by_length(rows: list[dict], column: str, seed: int) -> dict[tuple[str, int], float]:
    """{(variant, training steps): FID} of the rows sampled with ``seed``."""
    return {(r[column], int(r["train_steps"])): float(r["fid"]) for r in rows if int(r["seed"]) == seed}


def run_length_study(args: argparse.Namespace, column: str, specs: dict[str, Spec], models: dict[str, str], spread: str,
                     out: str, fields: list[str], row_key: tuple[str, ...], device: torch.device) -> list[dict]:  # fmt: skip
    """Train each variant of ``specs`` to every --eval-steps length and score it (rows of ``out``
    already measured are reused), or with --train-only just train. ``models`` is each variant's
    "model" column. Rows are appended one by one: a crash keeps every finished row."""
    if args.train_only:
        for steps in args.eval_steps:
            for variant in specs:
                train_model(specs[variant], args, steps)
        return []
    rows, done, cost, ref = [], measured(out, row_key), {}, None
    for variant, steps, seed in length_evaluations(list(specs), spread, args):
        spec, env = specs[variant], row_environment(device)
        row = {column: variant, "model": models[variant], "train_steps": str(steps), "num_samples": str(args.num_samples),
               "sampler": sampler_name(args), "seed": str(seed), "device": env["device"]}  # fmt: skip
        key = tuple(row[k] for k in row_key)
        if key in done:
            row = done[key]
            print(f"  {spec.label} ({steps} steps) seed {seed}: measured before ({out}, {row['date']})")
        else:
            export = train_model(spec, args, steps)
            if variant not in cost:
                model = ditfast.load_model(export)
                cost[variant] = dict(gflops=f"{ditfast.gflops(model):.5f}", params=str(sum(p.numel() for p in model.parameters() if p.requires_grad)))
            images = sample_images(spec, export, "ditfast", seed, args, device, steps=steps)
            if ref is None:  # only where a row is measured
                ref, classifier = reference_statistics(args), digit_classifier()
            row.update(cost[variant], **{k: f"{v:.4f}" for k, v in score(images, ref, args).items()},
                       recognised=f"{recognised(classifier, images):.4f}", **env)  # fmt: skip
            append_rows(out, [row], fields=fields)
            print(f"  {spec.label} ({steps} steps) seed {seed}: FID {float(row['fid']):.2f}, recognised {float(row['recognised']):.1%} "
                  f"(the classifier's held-out accuracy: {classifier.accuracy:.1%})")  # fmt: skip
        rows.append(row)
    return rows


def plot_fid_by_length(rows: list[dict], column: str, labels: dict[str, str], title: str, args: argparse.Namespace, path: str) -> str:
    """FID vs training steps, one line per variant (first seed, in the order of ``labels``: variant ->
    legend text); other seeds as dots. Returns a line for the log."""
    plt = pyplot()
    if plt is None:
        return "no plot: matplotlib is not installed (pip install ditfast[bench])"
    fid = fid_by_length(rows, column, args.seeds[0])
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for variant in [v for v in labels if any(k[0] == v for k in fid)]:
        pts = sorted((s, f) for (v, s), f in fid.items() if v == variant)
        (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=labels[variant])
        others = [(int(r["train_steps"]), float(r["fid"])) for r in rows if r[column] == variant and int(r["seed"]) != args.seeds[0]]
        if others:
            ax.plot(*zip(*others), ls="none", marker=".", color=line.get_color(), label=f"{labels[variant]}, other seeds")
    ax.set(xlabel="training steps", ylabel=f"FID-{args.num_samples}", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)
    plt.close(fig)
    return f"plot: {path}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(MODELS), help="default: %(default)s")
    p.add_argument("--steps", type=int, default=6000, help="training steps of every model")
    p.add_argument("--spread-model", default="B/4", choices=list(MODELS), help="the model whose seed spread and reference-path FID are measured")
    p.add_argument("--out", default=None, help="results CSV (default: benchmarks/results/gflops_fid_{gpu|cpu}.csv); rows "
                   "already in it are not measured again: give another file to re-measure after a code change")
    p.add_argument("--grid", default=None, help="PNG with one row of samples per model (default: beside --out, named by --steps)")
    add_study_arguments(p, work=os.path.join("runs", "gflops_fid"))
    args = p.parse_args(argv)
    if args.spread_model not in args.models:
        p.error(f"--spread-model {args.spread_model} must be one of --models {args.models}")
    if args.steps < 1:
        p.error("need --steps >= 1")
    check_study_arguments(p, args)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    models = [MODELS[m] for m in args.models]
    check_study(args.work, train_settings(args))
    exports = {m.name: train_model(m, args) for m in models}
    if args.train_only:
        return 0

    out = args.out or os.path.join(RESULTS_DIR, f"gflops_fid_{'gpu' if cuda else 'cpu'}.csv")
    grid_path = args.grid or f"{os.path.splitext(out)[0]}_samples_{args.steps}steps.png"
    ref = reference_statistics(args)
    flops = {m.name: ditfast.gflops(ditfast.load_model(exports[m.name])) for m in models}
    rows, grid, done = [], {}, measured(out)
    classifier = digit_classifier()
    per_row = min(20, args.num_samples)
    for spec, provider, seed in runs(models, args, device):
        env = row_environment(device)
        row = dict(model=spec.describe(), gflops=f"{flops[spec.name]:.5f}", num_samples=str(args.num_samples),
                   train_steps=str(args.steps), sampler=sampler_name(args),
                   provider=provider, seed=str(seed), device=env["device"])  # fmt: skip
        key = tuple(row[k] for k in ROW_KEY)
        in_grid = provider == "ditfast" and seed == args.seeds[0]
        if key not in done or in_grid:
            images = sample_images(spec, exports[spec.name], provider, seed, args, device)
        if in_grid:
            grid[spec.name] = torch.from_numpy(images[:per_row])
        if key in done:
            row = done[key]
            print(f"  {spec.name} {provider} seed {seed}: measured before ({out}, {row['date']})")
        else:
            row.update({k: f"{v:.4f}" for k, v in score(images, ref, args).items()}, **env)
            append_rows(out, [row], fields=FID_FIELDS)  # one by one: a crash keeps every finished row
            print(f"  {spec.name} {provider} seed {seed}: FID {float(row['fid']):.2f}; a digit classifier (held-out accuracy "
                  f"{classifier.accuracy:.1%}) recognises the requested digit in {recognised(classifier, images):.1%}")  # fmt: skip
        rows.append(row)
    order = sorted(grid, key=flops.get)
    save_png(grid_path, make_grid(torch.cat([grid[n] for n in order]), nrow=per_row, pad=1, scale=3))
    print("\n".join(summarize(rows, args, device)))
    print(f"{len(rows)} rows in {out}; samples (one row per model, by Gflops: {', '.join(order)}) in {grid_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
