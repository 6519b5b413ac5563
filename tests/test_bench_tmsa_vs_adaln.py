"""benchmarks/bench_tmsa_vs_adaln.py end to end at toy size: DiT and DiffiT scored at two lengths with
a seed spread (Inception features cost about a second per image on this CPU: few of them), a rerun
that measures nothing, both trained and resumed to a longer length, the verdict lines, and bad
settings refused before any work."""

from __future__ import annotations

import argparse
import math
import os
import shutil

import pytest

from conftest import load_benchmark

bench = load_benchmark("bench_tmsa_vs_adaln")

TINY = ["--size", "S/4", "--eval-steps", "1", "2", "--batch", "8", "--num-samples", "4", "--sampling-steps", "2",
        "--seeds", "0", "1", "--ref-limit", "5", "--sample-batch", "4", "--no-progress"]  # fmt: skip


def _rows(path):
    return list(bench.gf.measured(path, bench.ROW_KEY).values())  # in file order


def test_study_scores_both_models_at_every_length_and_resumes(tmp_path, inception_weights, capsys):
    work, out = str(tmp_path / "work"), str(tmp_path / "tmsa.csv")
    assert bench.main(TINY + ["--work", work, "--out", out]) == 0
    rows = _rows(out)
    # length by length, both models on seed 0; then the spread model's (DiT's) seed 1 at the longest length
    expected = [(a, steps, "0") for steps in ("1", "2") for a in ("DiT", "DiffiT")] + [("DiT", "2", "1")]
    assert [(r["arch"], r["train_steps"], r["seed"]) for r in rows] == expected
    for r in rows:
        assert math.isfinite(float(r["fid"])) and float(r["fid"]) > 0 and 0 <= float(r["precision"]) <= 1
        assert 0 <= float(r["recognised"]) <= 1 and r["sampler"] == "ddpm2 cfg1"
        assert r["model"].startswith(f"{r['arch']}-S/4 (depth 4, hidden 64, 1 head(s), patch 4)")
    dit, diffit = ((float(r["gflops"]), int(r["params"])) for r in rows[:2])
    assert diffit[1] < dit[1] and dit[0] > 0 and diffit[0] > 0  # no adaLN: fewer parameters
    assert rows[2]["fid"] != rows[0]["fid"] and rows[-1]["fid"] != rows[2]["fid"]  # longer training, another seed
    assert isinstance(bench.ditfast.load_model(os.path.join(work, "S-4_DiffiT", "ema_2steps.safetensors")), bench.ditfast.DiffiT)
    text = capsys.readouterr().out
    assert text.count("(from scratch)") == 2 and text.count("0000001.pt)") == 2  # the second length resumed the first
    assert "| model | Gflops | params | FID, 1 steps | FID, 2 steps |" in text and "± " in text and "(2 seeds)" in text
    assert text.count("FID: DiffiT ") == 2 and "seed spread: DiT at 2 steps" in text and "cost: DiffiT " in text
    with open(str(tmp_path / "tmsa.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    # a rerun: every row measured before, nothing trained, sampled or appended
    assert bench.main(TINY + ["--work", work, "--out", out]) == 0
    assert _rows(out) == rows
    text = capsys.readouterr().out
    assert "training" not in text and "samples in" not in text and text.count("measured before") == len(rows)


def _row(arch, steps, seed, fid):
    return dict(arch=arch, train_steps=str(steps), seed=str(seed), fid=str(fid), params="100" if arch == "DiT" else "80",
                gflops="0.2" if arch == "DiT" else "0.19")  # fmt: skip


def test_verdicts_say_who_wins_and_whether_the_gap_exceeds_the_seed_spread():
    args = argparse.Namespace(eval_steps=[1, 2], seeds=[0, 1, 2], spread_arch="DiT")
    rows = [_row("DiT", 1, 0, 10.0), _row("DiffiT", 1, 0, 8.0), _row("DiT", 2, 0, 6.0), _row("DiffiT", 2, 0, 6.5),
            _row("DiT", 2, 1, 6.4), _row("DiT", 2, 2, 5.8)]  # fmt: skip
    lines = bench.verdicts(rows, args)
    assert lines[0] == "at 1 steps, FID: DiffiT 8.00 vs DiT 10.00: DiffiT beats DiT by 2.00; the gap exceeds the seed spread (0.60)"
    assert lines[1].startswith("at 2 steps, FID: DiffiT 6.50 vs DiT 6.00: DiT beats DiffiT by 0.50; the gap is within the seed spread")
    assert lines[2].startswith("seed spread: DiT at 2 steps, FID over seeds 0, 1, 2: 6.00, 6.40, 5.80 (spread 0.60")
    assert lines[3].startswith("cost: DiffiT 80 parameters vs DiT 100 (-20.0%)")
    one_seed = argparse.Namespace(eval_steps=[1], seeds=[0], spread_arch="DiT")
    assert bench.verdicts(rows[:2], one_seed)[0].endswith("no seed spread measured (give --seeds two or more)")


@pytest.mark.parametrize("bad, message", [
    (["--archs", "DiffiT"], "include --spread-arch DiT"),
    (["--archs", "DiT", "DiT"], "must differ from each other"),
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


def test_both_train_and_resume_and_a_work_folder_refuses_another_recipe_or_model(tmp_path, capsys):
    work = tmp_path / "w"

    def run(steps, batch, archs=("DiT",), spread="DiT"):
        return bench.main(["--eval-steps", *steps, "--batch", batch, "--train-only", "--archs", *archs, "--spread-arch", spread,
                           "--size", "S/4", "--no-progress", "--work", str(work)])  # fmt: skip

    assert run(["1"], "4", ["DiT", "DiffiT"]) == 0
    assert run(["1", "2"], "4", ["DiT", "DiffiT"]) == 0  # more lengths: the same recipe, each resumed at step 1
    assert capsys.readouterr().out.count("0000001.pt)") == 2
    for arch, tag, cls in (("DiT", "S-4", bench.ditfast.DiT), ("DiffiT", "S-4_DiffiT", bench.ditfast.DiffiT)):
        assert sorted(n for n in os.listdir(work / tag) if n.endswith(".safetensors")) == ["ema_1steps.safetensors", "ema_2steps.safetensors"]
        assert type(bench.ditfast.load_model(str(work / tag / "ema_2steps.safetensors"))) is cls, arch
    with pytest.raises(SystemExit, match="global_batch: 4 there, 8 now"):
        run(["1"], "8")
    # a DiT's export where the DiffiT's belongs is refused, not scored as a DiffiT
    shutil.copy(work / "S-4" / "ema_1steps.safetensors", work / "S-4_DiffiT" / "ema_3steps.safetensors")
    with pytest.raises(SystemExit, match=r"holds a model with \(architecture, .*\) = \('DiT', "):
        run(["3"], "4", ["DiffiT"], "DiffiT")
