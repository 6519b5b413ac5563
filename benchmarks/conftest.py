"""pytest-benchmark suite (CPU-measurable parts): `pytest benchmarks --benchmark-only`.

Each benchmark test calls ``record(benchmark, ...)`` after timing; the row (median, p20/p80,
derived TFLOP/s, device, versions, git sha, date) is appended to benchmarks/results/<file>.csv.
Kept out of the CI test run (pyproject's testpaths is tests/).
"""

from __future__ import annotations

import statistics

import pytest

from _results import append_rows, environment


def _quantile(data: list[float], q: float) -> float:
    return statistics.quantiles(data, n=100, method="inclusive")[int(q * 100) - 1] if len(data) > 1 else data[0]


@pytest.fixture
def record(request):
    """record(benchmark, file=, what=, shape=, dtype=, provider=, flops=None, bytes=None)."""

    def _record(benchmark, *, file: str, what: str, shape: str, dtype: str, provider: str, flops=None, nbytes=None, device=None):
        if benchmark.stats is None:  # --benchmark-disable: nothing was timed
            return
        data = list(benchmark.stats.stats.data)
        median = statistics.median(data)
        row = dict(
            what=what, shape=shape, dtype=dtype, provider=provider,
            median_ms=f"{median * 1e3:.4f}", p20_ms=f"{_quantile(data, 0.2) * 1e3:.4f}", p80_ms=f"{_quantile(data, 0.8) * 1e3:.4f}",
            tflops=f"{flops / median / 1e12:.4f}" if flops else "",
            gbps=f"{nbytes / median / 1e9:.3f}" if nbytes else "",
            **environment(device),
        )  # fmt: skip
        append_rows(file, [row])

    return _record
