"""Shared helper of the benchmark scripts: environment facts and atomic appends of result rows.

Every row carries: what, shape, dtype, provider, median_ms, p20_ms, p80_ms, a derived rate
(TFLOP/s or GB/s), device, torch and triton versions, git sha and date.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import os
import platform
import subprocess
import tempfile
from contextlib import contextmanager
from typing import Iterable, Iterator, Mapping

import torch

FIELDS = [
    "what", "shape", "dtype", "provider", "median_ms", "p20_ms", "p80_ms", "tflops", "gbps",
    "device", "torch", "triton", "git_sha", "date",
]  # fmt: skip

# Rows of sample-quality results (the Gflops-vs-FID scaling study), one per trained model, sampler
# and seed; benchmarks/report.py reads them from results/*.csv files whose header is this.
FID_FIELDS = [
    "model", "gflops", "fid", "sfid", "precision", "recall", "num_samples", "train_steps", "sampler",
    "provider", "seed", "device", "torch", "triton", "git_sha", "date",
]  # fmt: skip

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_name(device: torch.device | str | None = None) -> str:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "none"


def _git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=os.path.dirname(RESULTS_DIR), check=True
        )
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                               cwd=os.path.dirname(RESULTS_DIR)).stdout.strip()  # fmt: skip
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: torch.device | str | None = None) -> dict[str, str]:
    """The columns that describe where and when a row was measured."""
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "git_sha": _git_sha(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def append_rows(path: str, rows: Iterable[Mapping[str, object]], fields: list[str] = FIELDS) -> str:
    """Append rows to a CSV (header written on creation) by rewriting it atomically.

    The file is rebuilt in a temporary file in the same folder and renamed over the old one, so a
    crash never leaves a half-written results file; the read-and-rename holds a lock on the folder,
    so two study processes appending to one file side by side do not drop each other's rows.
    Unknown columns are an error. ``fields`` is ``FIELDS`` (timings) or ``FID_FIELDS`` (sample quality).
    """
    path = path if os.path.isabs(path) or os.path.dirname(path) else os.path.join(RESULTS_DIR, path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rows = list(rows)
    for row in rows:
        extra = set(row) - set(fields)
        if extra:
            raise ValueError(f"unknown result columns {sorted(extra)}; expected a subset of {fields}")
    with _folder_lock(os.path.dirname(path)):
        existing = ""
        if os.path.exists(path):
            with open(path, newline="") as f:
                existing = f.read()
            header = next(csv.reader(io.StringIO(existing)), None)
            if existing and header != fields:
                raise ValueError(f"{path} has columns {header}; these rows have {fields}: use another file")
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields)
        if not existing:
            writer.writeheader()
        writer.writerows(rows)
        return atomic_write(path, existing + buf.getvalue())


@contextmanager
def _folder_lock(folder: str) -> Iterator[None]:
    """An exclusive advisory lock (flock) on ``folder`` while the block runs; no lock file is left
    behind. Where flock does not exist (Windows) the block runs unlocked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def atomic_write(path: str, data: str | bytes) -> str:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def time_fn(fn, device: torch.device | str, warmup: int = 10, reps: int = 50) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of ``fn()`` after warm-up.

    CUDA: ``triton.testing.do_bench`` (it flushes the L2 cache between runs) when triton is
    installed, else CUDA events. CPU: wall clock per call.
    """
    import statistics
    import time

    device = torch.device(device)
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            med, p20, p80 = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
            return float(med), float(p20), float(p80)
        except ImportError:
            pass
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10, method="inclusive")
    return statistics.median(times), q[1], q[7]


def row(what: str, shape: str, dtype, provider: str, timing: tuple[float, float, float], device, *, flops=None, nbytes=None) -> dict:
    """A result row from a ``time_fn`` timing; ``flops``/``nbytes`` per call give TFLOP/s and GB/s."""
    med, p20, p80 = timing
    return dict(
        what=what, shape=shape, dtype=str(dtype).replace("torch.", ""), provider=provider,
        median_ms=f"{med:.4f}", p20_ms=f"{p20:.4f}", p80_ms=f"{p80:.4f}",
        tflops=f"{flops / med / 1e9:.3f}" if flops else "", gbps=f"{nbytes / med / 1e6:.1f}" if nbytes else "",
        **environment(device),
    )  # fmt: skip
