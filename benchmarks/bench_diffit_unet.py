"""Issue 20's digits comparison: the image-space DiffiT (EDM training, EDM Heun sampling) beside a
DiT and a latent-style DiffiT of similar Gflops, each trained for the same wall-clock time on the
bundled digits (16x16x1, pixel space).

    python benchmarks/bench_diffit_unet.py [--train-seconds 1800] [--edm-steps 5 10 18]
        [--ddpm-steps 50 250] [--num-samples 500] [--work runs/diffit_unet]
        [--out benchmarks/results/diffit_unet_{gpu|cpu}.csv]

What it does (every stage resumable: a rerun with the same settings reuses what is finished in
``--work``, and a row already in ``--out`` is not measured again):

1. Models (:data:`MODELS`): "DiffiT-UNet" (``DiffiT-Digits16``: 3 stages 16/8/4, one block each,
   window 4, ``--unet-channels`` channels), "DiT" and "DiffiT-latent" (the latent DiffiT's
   architecture on the pixels, patch 2), both ``--depth`` x ``--hidden``. With the defaults all
   three cost about 0.08 Gflops per forward (``ditfast.gflops``; the script prints each).
2. Training (:func:`ditfast.train.train`, same batch, learning rate, EMA decay, seed): each model
   first trains ``--probe-steps`` steps; the steps/s of its last logged window sets its total,
   ``train_seconds * steps/s`` (at least one step past the probe), recorded in ``budget.json``,
   and training resumes to there.
   ``--steps N`` trains every model N steps instead (no timing: the toy-size test).
3. Sampling (:func:`ditfast.sample`, labels 0-9 in turn, no guidance): the image-space DiffiT with
   ``edm-heun`` at each of ``--edm-steps`` (N steps = 2N - 1 model evaluations), the others with
   ``ddpm`` at each of ``--ddpm-steps``.
4. Scoring as ``bench_gflops_fid.py``: FID, sFID, precision, recall against the 1,797 real digits
   (:mod:`ditfast.metrics`), and how often the demo's digit classifier reads the requested digit.

Rows go to ``--out`` (``_results.FID_FIELDS`` plus ``nfe`` and ``train_seconds``); ``--plot``
(default beside ``--out``) plots FID against model evaluations per image, one line per model; the
markdown table is printed and written beside ``--out`` (``.md``) for the README.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _results import FID_FIELDS, RESULTS_DIR, append_rows, atomic_write  # noqa: E402
from bench_gflops_fid import check_study, digit_classifier, measured, recognised, reference_statistics, row_environment, score  # noqa: E402

import ditfast  # noqa: E402
from ditfast.metrics.npz import write_npz  # noqa: E402
from ditfast.train import TrainConfig, train  # noqa: E402

FIELDS = FID_FIELDS + ["nfe", "train_seconds"]
ROW_KEY = ("model", "sampler", "seed", "num_samples", "train_steps", "device")


@dataclasses.dataclass(frozen=True)
class Spec:
    name: str  # row label
    registry: str  # --model of ditfast train
    sampler: str  # "edm-heun" or "ddpm"

    @property
    def tag(self) -> str:
        return self.name


MODELS = {s.name: s for s in (Spec("DiffiT-UNet", "DiffiT-Digits16", "edm-heun"), Spec("DiT", "DiT-S/2", "ddpm"),
                              Spec("DiffiT-latent", "DiffiT-S/2", "ddpm"))}  # fmt: skip


def train_config(spec: Spec, args: argparse.Namespace, steps: int, out: str, resume: str | None) -> TrainConfig:
    sizes = (dict(hidden_size=args.unet_channels) if spec.sampler == "edm-heun" else
             dict(depth=args.depth, hidden_size=args.hidden, num_heads=args.heads, patch_size=2))  # fmt: skip
    return TrainConfig(data="digits", image_size=16, model=spec.registry, steps=steps, global_batch=args.batch, lr=args.lr,
                       ema_decay=args.ema_decay, seed=args.train_seed, log_every=max(1, min(100, steps // 2)), out=out,
                       resume=resume, progress=not args.no_progress, **sizes)  # fmt: skip


def _latest(out: str) -> str | None:
    folder = os.path.join(out, "checkpoints")
    names = sorted(n for n in os.listdir(folder) if n.endswith(".pt")) if os.path.isdir(folder) else []
    return os.path.join(folder, names[-1]) if names else None


def train_model(spec: Spec, args: argparse.Namespace) -> tuple[str, int, float]:
    """Train ``spec`` for its budget; returns (EMA export, total steps, training seconds measured)."""
    out = os.path.join(args.work, spec.tag)
    export, budget_path = os.path.join(out, "ema.safetensors"), os.path.join(out, "budget.json")
    budget = json.load(open(budget_path)) if os.path.isfile(budget_path) else None
    if budget is None:
        if args.steps:
            budget = dict(steps=args.steps, seconds=None)
        else:  # probe: time --probe-steps, then set the total from the last window's steps/s
            probe = train_config(spec, args, args.probe_steps, out, _latest(out))
            train(dataclasses.replace(probe, log_every=max(1, args.probe_steps // 2)))
            with open(os.path.join(out, "log.jsonl")) as f:
                rate = json.loads(f.readlines()[-1])["steps_per_s"]
            budget = dict(steps=max(args.probe_steps + 1, int(args.train_seconds * rate)), seconds=args.train_seconds, probe_steps_per_s=rate)
        os.makedirs(out, exist_ok=True)
        atomic_write(budget_path, json.dumps(budget, indent=1) + "\n")
    if not os.path.isfile(export):
        cfg = dataclasses.replace(train_config(spec, args, budget["steps"], out, _latest(out)), export=export)
        print(f"{spec.name} ({spec.registry}): training to step {cfg.steps}, batch {cfg.global_batch} -> {out}")
        t0 = time.perf_counter()
        result = train(cfg)
        budget.setdefault("measured_seconds", time.perf_counter() - t0)
        atomic_write(budget_path, json.dumps(budget, indent=1) + "\n")
        if not all(torch.isfinite(p).all() for p in result["ema"].parameters()):
            os.unlink(export)
            raise SystemExit(f"error: training {spec.name} diverged (last logged loss {result['loss']}); its export was removed")
    return export, budget["steps"], budget.get("measured_seconds", float("nan"))


def sample_images(spec: Spec, export: str, steps: int, args: argparse.Namespace, device: torch.device):
    """uint8 (N, 16, 16, 1) samples, cached as an ADM .npz in the work folder."""
    path = os.path.join(args.work, "samples", f"{spec.tag}_{spec.sampler}{steps}_n{args.num_samples}_seed{args.seed}_{device.type}.npz")
    if os.path.isfile(path):
        import numpy as np

        with np.load(path) as f:
            return f["arr_0"]
    model = ditfast.load_model(export, device=device)
    t0 = time.perf_counter()
    gen = ditfast.sample(model, labels=range(10), num_samples=args.num_samples, sampler=spec.sampler, steps=steps, cfg_scale=1.0,
                         clip_denoised=True, seed=args.seed, batch_size=args.sample_batch, progress=not args.no_progress)  # fmt: skip
    dt = time.perf_counter() - t0
    print(f"  {spec.name} {spec.sampler} {steps} steps: {args.num_samples} samples in {dt:.1f} s")
    images = gen.images.numpy()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_npz(path, images)
    return images


def table(rows: list[dict]) -> str:
    lines = ["| model | Gflops | train steps | sampler | NFE | FID | sFID | precision | recall |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {float(r['gflops']):.3f} | {r['train_steps']} | {r['sampler']} | {r['nfe']} | "
                     f"{float(r['fid']):.2f} | {float(r['sfid']):.2f} | {float(r['precision']):.3f} | {float(r['recall']):.3f} |")  # fmt: skip
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name in dict.fromkeys(r["model"] for r in rows):
        pts = sorted((int(r["nfe"]), float(r["fid"])) for r in rows if r["model"] == name)
        ax.plot(*zip(*pts), marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("model evaluations per image")
    ax.set_ylabel(f"FID-{rows[0]['num_samples']} vs real digits")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--train-seconds", type=float, default=1800.0, help="wall-clock training budget of every model")
    p.add_argument("--probe-steps", type=int, default=100, help="steps timed to turn --train-seconds into steps")
    p.add_argument("--steps", type=int, default=0, help="train every model this many steps instead of a time budget")
    p.add_argument("--unet-channels", type=int, default=64)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--train-seed", type=int, default=0)
    p.add_argument("--edm-steps", type=int, nargs="+", default=[5, 10, 18])
    p.add_argument("--ddpm-steps", type=int, nargs="+", default=[50, 250])
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--sample-batch", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ref-limit", type=int, default=0, help="use only the first N real digits as the reference (tests)")
    p.add_argument("--inception-batch", type=int, default=100)
    p.add_argument("--work", default=os.path.join("runs", "diffit_unet"))
    p.add_argument("--out", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.steps < 0 or args.probe_steps < 1 or not args.train_seconds > 0:
        p.error("need --steps >= 0, --probe-steps >= 1 and --train-seconds > 0")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = args.out or os.path.join(RESULTS_DIR, f"diffit_unet_{device.type if device.type == 'cuda' else 'cpu'}.csv")
    out = out.replace("_cuda.csv", "_gpu.csv")
    specs = [MODELS[m] for m in args.models]
    # a work folder holds models of one training recipe and budget: refuse to mix (another --work)
    check_study(args.work, {k: getattr(args, k) for k in ("train_seconds", "probe_steps", "steps", "unet_channels", "depth", "hidden",
                                                          "heads", "batch", "lr", "ema_decay", "train_seed")})  # fmt: skip
    trained = {s.name: train_model(s, args) for s in specs}
    ref = reference_statistics(args)
    classifier = digit_classifier()
    done, rows = measured(out, ROW_KEY), []
    for spec in specs:
        export, steps, seconds = trained[spec.name]
        flops = ditfast.gflops(ditfast.load_model(export))
        for n in args.edm_steps if spec.sampler == "edm-heun" else args.ddpm_steps:
            env = row_environment(device)
            row = dict(model=spec.name, gflops=f"{flops:.5f}", num_samples=str(args.num_samples), train_steps=str(steps),
                       sampler=f"{spec.sampler}{n}", provider="ditfast", seed=str(args.seed), device=env["device"],
                       nfe=str(2 * n - 1 if spec.sampler == "edm-heun" else n), train_seconds=f"{seconds:.1f}")  # fmt: skip
            key = tuple(row[k] for k in ROW_KEY)
            if key in done:
                rows.append(done[key])
                print(f"  {spec.name} {row['sampler']}: measured before ({out})")
                continue
            images = sample_images(spec, export, n, args, device)
            row.update({k: f"{v:.4f}" for k, v in score(images, ref, args).items()}, **env)
            append_rows(out, [row], fields=FIELDS)
            print(f"  {spec.name} {row['sampler']}: FID {float(row['fid']):.2f}; the digit classifier reads the requested "
                  f"digit in {recognised(classifier, images):.1%}")  # fmt: skip
            rows.append(row)
    text = table(rows)
    atomic_write(os.path.splitext(out)[0] + ".md", text + "\n")
    plot_path = args.plot or os.path.splitext(out)[0] + ".png"
    plot(rows, plot_path)
    print(text)
    print(f"{len(rows)} rows in {out}; plot {plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
