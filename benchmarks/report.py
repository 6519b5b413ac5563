"""Turn benchmarks/results/*.csv into markdown tables and PNG plots for the README.

    python benchmarks/report.py [--results benchmarks/results] [--out results/REPORT.md] [--plots results/plots]

Reads every CSV in the results folder: timing rows (``_results.FIELDS``) and sample-quality rows
(``_results.FID_FIELDS``, written by the Gflops-vs-FID study). Of rows measured more than once
(same what, shape, dtype, provider, device) the last one in the file is reported. Writes:

* ``REPORT.md``: tables of throughput (rows whose shape names a batch ``B=``: ms, images/s,
  TFLOP/s and the speed-up over the ``--baseline`` provider measured on the same device),
  kernel bandwidth (rows with GB/s, with the share of the ``device copy`` ceiling of the same
  run when there is one) and Gflops vs FID (mean and spread over seeds per model and provider);
* PNG plots (matplotlib, ``pip install ditfast[bench]``): throughput vs batch per provider for
  each measured thing and device, GB/s per kernel and provider, and FID vs Gflops.

Every section that has no rows, and every plot that cannot be drawn, is named in the report with
the reason, so it works on whatever rows exist.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import re
import statistics
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _results import FID_FIELDS, FIELDS, RESULTS_DIR, atomic_write  # noqa: E402

_KEY = ("what", "shape", "dtype", "provider", "device")


def load_rows(results_dir: str) -> tuple[list[dict], list[dict], list[str]]:
    """(timing rows, FID rows, notes) from every CSV in ``results_dir`` (sorted by file name)."""
    timing, fid, notes = [], [], []
    if not os.path.isdir(results_dir):
        return timing, fid, [f"no results folder {results_dir}"]
    for name in sorted(os.listdir(results_dir)):
        if not name.endswith(".csv"):
            continue
        with open(os.path.join(results_dir, name), newline="") as f:
            reader = csv.DictReader(f)
            rows = [dict(r, source=name) for r in reader]
            header = reader.fieldnames or []
        if header == FIELDS:
            timing.extend(rows)
        elif header == FID_FIELDS:
            fid.extend(rows)
        else:
            notes.append(f"{name}: columns {header} are neither the timing nor the FID columns; skipped")
    return timing, fid, notes


def latest(rows: list[dict]) -> list[dict]:
    """The last row of each (what, shape, dtype, provider, device), in first-seen order."""
    out: dict[tuple, dict] = {}
    for r in rows:
        key = tuple(r[k] for k in _KEY)
        out.pop(key, None)
        out[key] = r
    return list(out.values())


def batch_of(shape: str) -> int | None:
    m = re.search(r"(?:^|,)\s*B=(\d+)", shape)
    return int(m.group(1)) if m else None


def _num(x: str) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _fmt(v: float | None, spec: str = ".3g") -> str:
    return "" if v is None else format(v, spec)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def throughput_rows(rows: list[dict], baseline: str) -> list[dict]:
    """Rows with a batch size and a time, with images/s and the speed-up over ``baseline``."""
    out = []
    base = {(r["what"], r["shape"], r["dtype"], r["device"]): _num(r["median_ms"]) for r in rows if r["provider"] == baseline}
    for r in rows:
        b, ms = batch_of(r["shape"]), _num(r["median_ms"])
        if b is None or not ms or _num(r["gbps"]) is not None:  # kernels (GB/s rows) have their own table
            continue
        ref = base.get((r["what"], r["shape"], r["dtype"], r["device"]))
        out.append(dict(r, batch=b, ms=ms, ips=b * 1e3 / ms, speedup=ref / ms if ref else None))
    return out


def bandwidth_rows(rows: list[dict]) -> list[dict]:
    """Rows with GB/s (not the copy itself), with the share of the same device's copy GB/s."""
    ceiling = {}
    for r in rows:
        if r["what"] == "device copy" and _num(r["gbps"]):
            ceiling[(r["device"], r["git_sha"])] = _num(r["gbps"])
    out = []
    for r in rows:
        gbps = _num(r["gbps"])
        if gbps is None or r["what"] == "device copy":
            continue
        c = ceiling.get((r["device"], r["git_sha"]))
        out.append(dict(r, gbps_v=gbps, of_copy=gbps / c if c else None, copy=c))
    return out


def fid_summary(rows: list[dict]) -> list[dict]:
    """Per (model, provider, sampler, training steps, samples, device): Gflops and mean / spread
    of FID over seeds (a seed measured more than once counts once, with its last row)."""
    per_seed: dict[tuple, dict] = {}
    for r in rows:
        if _num(r["fid"]) is not None and _num(r["gflops"]) is not None:
            per_seed[(r["model"], r["provider"], r["sampler"], r["train_steps"], r["num_samples"], r["device"], r["seed"])] = r
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for key, r in per_seed.items():
        groups[key[:-1]].append(r)
    out = []
    for (model, provider, sampler, steps, _, device), rs in groups.items():
        fids = [_num(r["fid"]) for r in rs]

        def mean_of(col):
            vals = [v for v in (_num(r[col]) for r in rs) if v is not None]
            return statistics.fmean(vals) if vals else None

        out.append(dict(
            model=model, provider=provider, sampler=sampler, train_steps=steps, device=device,
            gflops=_num(rs[0]["gflops"]), fid=statistics.fmean(fids), fid_std=statistics.stdev(fids) if len(fids) > 1 else None,
            seeds=len(rs), sfid=mean_of("sfid"), precision=mean_of("precision"), recall=mean_of("recall"),
            num_samples=rs[0]["num_samples"],
        ))  # fmt: skip
    return sorted(out, key=lambda d: (d["provider"], d["gflops"], d["model"]))


def _slug(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", "_".join(parts)).strip("-").lower()[:80]


def save_figure(fig, path: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return atomic_write(path, buf.getvalue())


def plot_throughput(tp: list[dict], plots_dir: str, plt) -> tuple[list[str], list[str]]:
    """One plot per (what, dtype, device): images/s vs batch, a line per provider."""
    made, skipped = [], []
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in tp:
        groups[(r["what"], r["dtype"], r["device"])].append(r)
    for (what, dtype, device), rs in groups.items():
        batches = {r["batch"] for r in rs}
        if len(batches) < 2:
            skipped.append(f"throughput of {what} ({dtype}, {device}): one batch size only ({batches.pop()}); see the table")
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for provider in sorted({r["provider"] for r in rs}):
            pts = sorted((r["batch"], r["ips"]) for r in rs if r["provider"] == provider)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="batch", ylabel="images / s", title=f"{what} ({dtype})\n{device}")
        ax.grid(alpha=0.3)
        ax.legend()
        made.append(save_figure(fig, os.path.join(plots_dir, f"throughput_{_slug(what, dtype, device)}.png")))
        plt.close(fig)
    return made, skipped


def plot_bandwidth(bw: list[dict], plots_dir: str, plt) -> tuple[list[str], list[str]]:
    """One bar chart per device: GB/s of each (kernel, shape) and provider, copy ceiling as a line."""
    made = []
    for device in sorted({r["device"] for r in bw}):
        rs = [r for r in bw if r["device"] == device]
        labels = list(dict.fromkeys(f"{r['what']}\n{r['shape']} {r['dtype']}" for r in rs))
        providers = sorted({r["provider"] for r in rs})
        width = 0.8 / len(providers)
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels)), 4))
        for i, provider in enumerate(providers):
            vals = {f"{r['what']}\n{r['shape']} {r['dtype']}": r["gbps_v"] for r in rs if r["provider"] == provider}
            ax.bar([j + i * width for j in range(len(labels))], [vals.get(lab, 0) for lab in labels], width, label=provider)
        ceilings = {r["copy"] for r in rs if r["copy"]}
        for c in ceilings:
            ax.axhline(c, color="k", ls="--", lw=1)
        if ceilings:
            ax.plot([], [], color="k", ls="--", lw=1, label="device copy")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels, rotation=60, ha="right", fontsize=7)
        ax.set(ylabel="GB/s", title=f"kernel bandwidth\n{device}")
        ax.legend(fontsize=7)
        made.append(save_figure(fig, os.path.join(plots_dir, f"bandwidth_{_slug(device)}.png")))
        plt.close(fig)
    return made, []


def plot_fid(fs: list[dict], plots_dir: str, plt) -> tuple[list[str], list[str]]:
    """FID vs Gflops (log x), one series per (provider, training steps, sampler, device), error
    bars = seed-to-seed standard deviation; points labelled by the model's short name."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    steps_of = lambda r: _num(r["train_steps"]) or 0  # noqa: E731
    series = sorted({(r["provider"], steps_of(r), r["sampler"], r["device"]) for r in fs})
    several = {"sampler": len({k[2] for k in series}) > 1, "device": len({k[3] for k in series}) > 1}  # say them when they vary
    for key in series:
        provider, steps, sampler, device = key
        rs = sorted((r for r in fs if (r["provider"], steps_of(r), r["sampler"], r["device"]) == key), key=lambda r: r["gflops"])
        label = ", ".join([provider, f"{steps:g} training steps"] + [sampler] * several["sampler"] + [device] * several["device"])
        ax.errorbar([r["gflops"] for r in rs], [r["fid"] for r in rs], yerr=[r["fid_std"] or 0 for r in rs],
                    marker="o" if provider != "reference" else "x", capsize=3, label=label, linestyle="-" if len(rs) > 1 else "none")  # fmt: skip
        for r in rs if provider != "reference" else []:  # the reference sits on a model already named
            ax.annotate(r["model"].split(" (")[0], (r["gflops"], r["fid"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(plt.NullFormatter())  # log-axis minor labels collide
    ax.set(xlabel="Gflops per forward", ylabel="FID", title="sample quality vs compute")
    ax.grid(alpha=0.3)
    ax.legend()
    path = save_figure(fig, os.path.join(plots_dir, "gflops_fid.png"))
    plt.close(fig)
    return [path], []


def _shown(path: str) -> str:
    """``path`` relative to the repository root when it is inside it, else as given."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rel = os.path.relpath(os.path.abspath(path), root)
    return path if rel.startswith("..") else rel


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def build_report(results_dir: str, out: str, plots_dir: str, baseline: str = "eager", plots: bool = True) -> str:
    """Write the markdown report (and plots); return its text."""
    timing, fid, notes = load_rows(results_dir)
    timing = latest(timing)
    tp, bw, fs = throughput_rows(timing, baseline), bandwidth_rows(timing), fid_summary(fid)
    plt = pyplot() if plots else None
    if plots and plt is None:
        notes.append("matplotlib is not installed: no plots (pip install ditfast[bench])")
    rel = lambda p: os.path.relpath(p, os.path.dirname(os.path.abspath(out)))  # noqa: E731

    parts = ["# Benchmark report", "",
             f"Generated by `benchmarks/report.py` from `{_shown(results_dir)}` (the last row of each "
             "repeated measurement). Every number below was measured; see each row's device, versions and git sha "
             "in the CSV files.", ""]  # fmt: skip

    def section(title, rows_exist, table, plotter, data, empty):
        parts.extend([f"## {title}", ""])
        if not rows_exist:
            parts.extend([f"_No rows: {empty}_", ""])
            return
        parts.extend([table, ""])
        if plt is not None:
            made, skipped = plotter(data, plots_dir, plt)
            parts.extend(f"![{title}]({rel(p)})" for p in made)
            parts.extend(f"_Plot skipped: {s}_" for s in skipped)
            parts.append("")

    section(
        "Throughput", bool(tp),
        markdown_table(["what", "shape", "dtype", "provider", "device", "median ms (p20-p80)", "images/s", "TFLOP/s", f"x {baseline}"],
               [[r["what"], r["shape"], r["dtype"], r["provider"], r["device"], f"{r['ms']:.3f} ({_fmt(_num(r['p20_ms']), '.3f')}-{_fmt(_num(r['p80_ms']), '.3f')})",
                 _fmt(r["ips"], ".4g"), r["tflops"], _fmt(r["speedup"], ".2f")] for r in tp]),
        plot_throughput, tp, "no timing row names a batch size (B=...) in its shape",
    )  # fmt: skip
    section(
        "Kernel bandwidth", bool(bw),
        markdown_table(["what", "shape", "dtype", "provider", "device", "median us", "GB/s", "of copy GB/s"],
               [[r["what"], r["shape"], r["dtype"], r["provider"], r["device"], _fmt(_num(r["median_ms"]) * 1e3, ".4g"),
                 r["gbps"], f"{100 * r['of_copy']:.0f}%" if r["of_copy"] else ""] for r in bw]),
        plot_bandwidth, bw, "no timing row has a GB/s value",
    )  # fmt: skip
    section(
        "Gflops vs FID", bool(fs),
        markdown_table(["model", "Gflops", "provider", "sampler", "train steps", "samples", "FID (mean ± std over seeds)", "seeds", "sFID", "precision", "recall", "device"],
               [[r["model"], _fmt(r["gflops"], ".3g"), r["provider"], r["sampler"], r["train_steps"], r["num_samples"],
                 _fmt(r["fid"], ".2f") + (f" ± {r['fid_std']:.2f}" if r["fid_std"] is not None else ""), str(r["seeds"]),
                 _fmt(r["sfid"], ".2f"), _fmt(r["precision"], ".3f"), _fmt(r["recall"], ".3f"), r["device"]] for r in fs]),
        plot_fid, fs, "no FID results yet (rows with the FID_FIELDS columns of benchmarks/_results.py)",
    )  # fmt: skip
    if notes:
        parts.extend(["## Notes", ""] + [f"- {n}" for n in notes] + [""])
    text = "\n".join(parts)
    atomic_write(out, text)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=RESULTS_DIR, help="folder of result CSVs (default benchmarks/results)")
    parser.add_argument("--out", default=None, help="markdown file to write (default RESULTS/REPORT.md)")
    parser.add_argument("--plots", default=None, help="folder for PNG plots (default RESULTS/plots)")
    parser.add_argument("--baseline", default="eager", help="provider the speed-ups are relative to (default 'eager')")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    args = parser.parse_args(argv)
    out = args.out or os.path.join(args.results, "REPORT.md")
    plots_dir = args.plots or os.path.join(args.results, "plots")
    text = build_report(args.results, out, plots_dir, args.baseline, plots=not args.no_plots)
    print(text)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
