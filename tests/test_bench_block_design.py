"""benchmarks/bench_block_design.py end to end at toy size: two designs scored at two lengths with a
seed spread (Inception features cost about a second per image on this CPU: few of them), a rerun
that measures nothing, every design trained and resumed to a longer length, and bad settings
refused before any work."""

from __future__ import annotations

import math
import os

import pytest

from conftest import load_benchmark

bench = load_benchmark("bench_block_design")

DESIGNS = ["adaLN-Zero", "in-context"]
TINY = ["--designs", *DESIGNS, "--size", "S/4", "--eval-steps", "1", "2", "--batch", "8", "--num-samples", "4",
        "--sampling-steps", "2", "--seeds", "0", "1", "--ref-limit", "5", "--sample-batch", "4", "--no-progress"]  # fmt: skip


def _rows(path):
    return list(bench.gf.measured(path, bench.ROW_KEY).values())  # in file order


def test_study_scores_designs_at_every_length_and_resumes(tmp_path, inception_weights, capsys):
    work, out = str(tmp_path / "work"), str(tmp_path / "design.csv")
    assert bench.main(TINY + ["--work", work, "--out", out]) == 0
    rows = _rows(out)
    # length by length, every design on seed 0; then the spread design's seed 1 at the longest length
    expected = [(d, steps, "0") for steps in ("1", "2") for d in DESIGNS] + [("adaLN-Zero", "2", "1")]
    assert [(r["block"], r["train_steps"], r["seed"]) for r in rows] == expected
    for r in rows:
        assert math.isfinite(float(r["fid"])) and float(r["fid"]) > 0 and 0 <= float(r["precision"]) <= 1
        assert 0 <= float(r["recognised"]) <= 1 and r["model"].startswith("DiT-S/4 ") and r["sampler"] == "ddpm2 cfg1"
    zero, in_context = ((float(r["gflops"]), int(r["params"])) for r in rows[:2])
    assert in_context[0] > zero[0] and in_context[1] < zero[1]  # two more tokens per block; no modulation
    assert rows[2]["fid"] != rows[0]["fid"] and rows[-1]["fid"] != rows[2]["fid"]  # longer training, another seed
    text = capsys.readouterr().out
    assert text.count("(from scratch)") == 2 and text.count("0000001.pt)") == 2  # the second length resumed the first
    assert "| design | Gflops | params | FID, 1 steps | FID, 2 steps |" in text and "± " in text and "(2 seeds)" in text
    assert "at 2 steps, FID: " in text and "with the paper" in text and "seed spread: adaLN-Zero at 2 steps" in text
    with open(str(tmp_path / "design.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    # a rerun: every row measured before, nothing trained, sampled or appended
    assert bench.main(TINY + ["--work", work, "--out", out]) == 0
    assert _rows(out) == rows
    text = capsys.readouterr().out
    assert "training" not in text and "samples in" not in text and text.count("measured before") == len(rows)


@pytest.mark.parametrize("bad, message", [
    (["--designs", "adaLN", "in-context"], "include --spread-design adaLN-Zero"),
    (["--designs", "adaLN-Zero", "adaLN-Zero"], "must differ from each other"),
    (["--eval-steps", "2", "1"], "--eval-steps must be ascending"),
    (["--eval-steps", "0", "1"], "--eval-steps must be ascending and >= 1"),
    (["--num-samples", "1"], "num-samples >= 2"),
    (["--seeds", "0", "0"], "--seeds must differ"),
    (["--ref-limit", "5"], "needs its own --out"),
])  # fmt: skip
def test_bad_settings_are_refused_before_any_work(tmp_path, capsys, bad, message):
    with pytest.raises(SystemExit):
        bench.main(["--work", str(tmp_path / "w")] + bad)
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "w")


def test_train_only_takes_half_of_the_designs_without_the_spread_design(tmp_path, capsys):
    # the two-process recipe of the docstring: the half without adaLN-Zero is not refused
    work = tmp_path / "w"
    assert bench.main(["--eval-steps", "1", "--batch", "4", "--train-only", "--designs", "adaLN", "in-context", "--size", "S/4",
                       "--no-progress", "--work", str(work)]) == 0  # fmt: skip
    assert sorted(os.listdir(work)) == ["S-4_adaLN", "S-4_in-context", "study.json"]


def test_every_design_trains_and_a_work_folder_refuses_another_recipe(tmp_path, capsys):
    work = tmp_path / "w"

    def run(steps, batch, designs=("adaLN-Zero",)):
        return bench.main(["--eval-steps", *steps, "--batch", batch, "--train-only", "--designs", *designs, "--size", "S/4",
                           "--no-progress", "--work", str(work)])  # fmt: skip

    designs = ["adaLN-Zero", "adaLN", "cross-attention", "in-context"]
    assert run(["1"], "4", designs) == 0
    assert run(["1", "2"], "4", designs) == 0  # more lengths: the same recipe, each design resumed at step 1
    assert capsys.readouterr().out.count("0000001.pt)") == 4
    for d in designs:
        tag = "S-4" + ("" if d == "adaLN-Zero" else f"_{d}")
        assert sorted(n for n in os.listdir(work / tag) if n.endswith(".safetensors")) == ["ema_1steps.safetensors", "ema_2steps.safetensors"]
        assert bench.ditfast.load_model(str(work / tag / "ema_2steps.safetensors")).block == d
    with pytest.raises(SystemExit, match="global_batch: 4 there, 8 now"):
        run(["1"], "8")
