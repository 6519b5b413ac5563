"""benchmarks/bench_diffit_unet.py end to end at toy size: train (fixed steps and a time budget),
sample (EDM Heun and DDPM), score, table and plot, resume without redoing anything."""

from __future__ import annotations

import csv
import json
import math
import os

from conftest import load_benchmark

bench = load_benchmark("bench_diffit_unet")

TINY = ["--unet-channels", "16", "--depth", "1", "--hidden", "32", "--heads", "1", "--batch", "4", "--num-samples", "4",
        "--edm-steps", "1", "2", "--ddpm-steps", "2", "--ref-limit", "10", "--sample-batch", "4", "--inception-batch", "4",
        "--no-progress"]  # fmt: skip


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_comparison_at_toy_size(tmp_path, inception_weights, capsys):
    work, out = str(tmp_path / "work"), str(tmp_path / "cmp.csv")
    assert bench.main(TINY + ["--steps", "2", "--work", work, "--out", out]) == 0
    rows = _rows(out)
    assert [(r["model"], r["sampler"], r["nfe"]) for r in rows] == [
        ("DiffiT-UNet", "edm-heun1", "1"), ("DiffiT-UNet", "edm-heun2", "3"), ("DiT", "ddpm2", "2"), ("DiffiT-latent", "ddpm2", "2")]
    for r in rows:
        assert math.isfinite(float(r["fid"])) and float(r["fid"]) > 0 and 0 <= float(r["recall"]) <= 1
        assert r["train_steps"] == "2" and float(r["gflops"]) > 0
    assert os.path.isfile(str(tmp_path / "cmp.png")) and "| DiffiT-UNet |" in open(str(tmp_path / "cmp.md")).read()
    capsys.readouterr()
    # a rerun trains and measures nothing again
    stamp = os.stat(os.path.join(work, "DiT", "ema.safetensors")).st_mtime_ns
    assert bench.main(TINY + ["--steps", "2", "--work", work, "--out", out]) == 0
    assert _rows(out) == rows and os.stat(os.path.join(work, "DiT", "ema.safetensors")).st_mtime_ns == stamp
    assert capsys.readouterr().out.count("measured before") == 4
    # another training recipe in the same work folder is refused before any work
    try:
        bench.main(TINY + ["--steps", "2", "--lr", "1e-3", "--work", work, "--out", out])
        raise AssertionError("another --lr in the same --work was not refused")
    except SystemExit as exc:
        assert "holds models trained with other settings (lr: 0.0002 there, 0.001 now)" in str(exc)
    assert _rows(out) == rows


def test_time_budget_sets_the_steps(tmp_path, inception_weights):
    work, out = str(tmp_path / "work"), str(tmp_path / "cmp.csv")
    args = TINY + ["--models", "DiffiT-UNet", "--edm-steps", "1", "--train-seconds", "0.5", "--probe-steps", "2",
                   "--work", work, "--out", out]  # fmt: skip
    assert bench.main(args) == 0
    budget = json.load(open(os.path.join(work, "DiffiT-UNet", "budget.json")))
    assert budget["steps"] == max(3, int(0.5 * budget["probe_steps_per_s"])) and budget["seconds"] == 0.5
    assert _rows(out)[0]["train_steps"] == str(budget["steps"])
