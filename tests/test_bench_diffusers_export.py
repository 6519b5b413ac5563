"""benchmarks/bench_diffusers_export.py on a reduced case (small batch): the diffusers-native models
cross to ditfast bit-identically and back; the bundled official-math model's export differs."""

from __future__ import annotations

import csv

import pytest

pytest.importorskip("diffusers")

from conftest import load_benchmark  # noqa: E402

bench = load_benchmark("bench_diffusers_export")


def test_reduced_run(tmp_path):
    out = str(tmp_path / "export.csv")
    assert bench.main(["--cases", "digits", "native", "--batch", "2", "--out", out]) == 0
    rows = list(csv.DictReader(open(out, newline="")))
    assert [r["case"] for r in rows] == ["digits"] + [f"{k}-{n}" for n in bench.NATIVE for k in ("native", "roundtrip")]
    digits = rows[0]
    assert digits["direction"] == "ditfast->diffusers" and digits["bit_identical"] == "False"
    assert 0 < float(digits["max_rel_diff"]) < 1
    for r in rows[1:]:
        assert r["bit_identical"] == "True" and float(r["max_rel_diff"]) == 0.0, r["case"]
    assert all(r["dtype"] == "float32" and r["diffusers"] and r["git_sha"] for r in rows)
