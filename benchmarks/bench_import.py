"""Import time of ditfast against torch alone, each in a fresh interpreter.

    python benchmarks/bench_import.py [--reps 7] [--out results/import_cpu.csv]

Providers: "import torch" and "import ditfast" (which imports torch), each the wall time of
``python -c "<statement>"`` minus that of ``python -c "pass"`` (the interpreter's own start),
median over --reps alternating runs after one warm-up run of each (file cache). The row of
"import ditfast" also reports its difference from "import torch" in the printout.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _results import append_rows, environment  # noqa: E402

STATEMENTS = {"python": "pass", "import torch": "import torch", "import ditfast": "import ditfast"}


def wall(statement: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", statement], check=True)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--out", default="import_cpu.csv")
    p.add_argument("--what", default="import", help="the rows' what column, e.g. to label a run of another checkout")
    args = p.parse_args(argv)
    if args.reps < 3:
        p.error("--reps must be at least 3 (median and quantiles)")
    times = {name: [] for name in STATEMENTS}
    for name, stmt in STATEMENTS.items():
        wall(stmt)  # warm-up: file cache
    for _ in range(args.reps):
        for name, stmt in STATEMENTS.items():
            times[name].append(wall(stmt))
    base = statistics.median(times["python"])
    rows, medians = [], {}
    for name in ("import torch", "import ditfast"):
        ms = sorted((t - base) * 1e3 for t in times[name])
        q = statistics.quantiles(ms, n=10, method="inclusive")
        medians[name] = statistics.median(ms)
        rows.append(dict(what=args.what, shape="", dtype="", provider=name, median_ms=f"{medians[name]:.1f}",
                         p20_ms=f"{q[1]:.1f}", p80_ms=f"{q[7]:.1f}", tflops="", gbps="",
                         **environment("cpu")))  # fmt: skip
        print(f"{name:15s} median {medians[name]:7.1f} ms (p20 {q[1]:.1f}, p80 {q[7]:.1f}; {args.reps} runs)")
    print(f"ditfast adds {medians['import ditfast'] - medians['import torch']:.1f} ms to import torch")
    print("wrote", append_rows(args.out, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
