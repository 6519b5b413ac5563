"""benchmarks/model_sizes.py on a reduced case: the rows it writes carry the counts the tests check
(DiT-XL/2's 675,129,632 parameters, the DiffiT-XL/2 count of tests/test_diffit.py) and ditfast.gflops."""

from __future__ import annotations

import csv

import ditfast
from conftest import load_benchmark

bench = load_benchmark("model_sizes")


def test_reduced_run_writes_the_counts(tmp_path, capsys):
    out = str(tmp_path / "sizes.csv")
    assert bench.main(["--models", "DiT-XL/2", "DiffiT-XL/2", "DiffiT-Digits8", "--out", out]) == 0
    rows = {(r["model"], r["block"], r["image_size"]): r for r in csv.DictReader(open(out, newline=""))}
    assert list(next(csv.reader(open(out, newline="")))) == bench.FIELDS
    assert rows[("DiT-XL/2", "adaLN-Zero", "256")]["params"] == "675129632"
    assert {b for m, b, s in rows if m == "DiT-XL/2" and s == "256"} == set(bench.BLOCKS)
    for (model, block, size), r in rows.items():
        if model.startswith("DiT-"):
            assert float(r["gflops"]) == ditfast.gflops(model, int(size), block=block)
        assert int(r["params"]) >= int(r["trainable_params"]) > 0 and r["formula"] and r["git_sha"]
    assert float(rows[("DiffiT-XL/2", "TMSA", "512")]["gflops"]) == ditfast.gflops("DiffiT-XL/2", 512)
    assert rows[("DiffiT-Digits8", "TMSA-window", "8")]["params"] == str(sum(p.numel() for p in ditfast.DiffiTUNet_models["DiffiT-Digits8"]().parameters()))
    assert "DiffiT-XL/2 / DiT-XL/2 parameters" in capsys.readouterr().out
