"""benchmarks/bench_gflops_fid.py end to end at toy size: train, sample, score, resume, refuse mixing."""

from __future__ import annotations

import csv
import math
import os

import pytest
import torch

from conftest import load_benchmark

bench = load_benchmark("bench_gflops_fid")

TINY = ["--models", "S/4", "B/4", "--spread-model", "S/4", "--steps", "2", "--batch", "8", "--num-samples", "6",
        "--sampling-steps", "2", "--seeds", "0", "1", "--ref-limit", "20", "--sample-batch", "4", "--no-progress"]  # fmt: skip


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_study_trains_scores_and_resumes(tmp_path, inception_weights, capsys):
    work, out = str(tmp_path / "work"), str(tmp_path / "fid.csv")
    assert bench.main(TINY + ["--work", work, "--out", out]) == 0
    rows = _rows(out)
    # every model on the first seed, the spread model on the other seed, and on a GPU its reference
    # path (on a CPU the defaults are that same computation: one row per model and seed)
    expected = [("DiT-S/4", "ditfast", "0"), ("DiT-B/4", "ditfast", "0"), ("DiT-S/4", "ditfast", "1")]
    gpu = torch.cuda.is_available()
    assert [(r["model"].split()[0], r["provider"], r["seed"]) for r in rows] == expected + ([("DiT-S/4", "reference", "0")] if gpu else [])
    for r in rows:
        assert math.isfinite(float(r["fid"])) and float(r["fid"]) > 0 and 0 <= float(r["precision"]) <= 1
        assert (r["num_samples"], r["train_steps"], r["sampler"]) == ("6", "2", "ddpm2 cfg1")
    s4, b4 = rows[0], rows[1]
    assert float(b4["gflops"]) > 3 * float(s4["gflops"])  # twice the width: about four times the flops
    assert rows[0]["fid"] != rows[2]["fid"]  # another seed, other samples
    text = capsys.readouterr().out
    assert "FID over seeds" in text and os.path.isfile(str(tmp_path / "fid_samples_2steps.png"))

    # a rerun reuses the trained models and the measured rows: nothing retrained, no row twice
    export = os.path.join(work, "S-4", "ema.safetensors")
    stamp = os.stat(export).st_mtime_ns
    assert bench.main(TINY + ["--work", work, "--out", out]) == 0
    assert os.stat(export).st_mtime_ns == stamp and _rows(out) == rows
    text = capsys.readouterr().out
    assert "training" not in text and text.count("measured before") == len(rows)
    if not gpu:
        assert "no reference-path row on a CPU" in text
    # more samples: new rows, scored on new samples, beside the old ones
    assert bench.main(TINY + ["--num-samples", "7", "--seeds", "0", "--work", work, "--out", out]) == 0
    new = _rows(out)[len(rows):]
    assert [(r["provider"], r["num_samples"]) for r in new] == [("ditfast", "7")] * 2 + ([("reference", "7")] if gpu else [])


def test_a_work_folder_refuses_other_training_settings(tmp_path):
    work = str(tmp_path / "work")
    bench.check_study(work, dict(steps=2, global_batch=8, lr=5e-4, ema_decay=0.999, seed=0))
    with pytest.raises(SystemExit, match="steps: 2 there, 3 now"):
        bench.check_study(work, dict(steps=3, global_batch=8, lr=5e-4, ema_decay=0.999, seed=0))


@pytest.mark.parametrize("bad, message", [
    (["--spread-model", "B/2"], "must be one of --models"),
    (["--num-samples", "1"], "num-samples >= 2"),
    (["--cfg-scale", "0.5"], "cfg-scale >= 1"),
    (["--seeds", "0", "0"], "--seeds must differ"),
    (["--ref-limit", "10"], "needs its own --out"),
])  # fmt: skip
def test_bad_settings_are_refused_before_any_work(tmp_path, capsys, bad, message):
    with pytest.raises(SystemExit):
        bench.main(["--models", "S/4", "B/4", "--spread-model", "S/4", "--work", str(tmp_path / "w")] + bad)
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "w")
