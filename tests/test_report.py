"""benchmarks/report.py: tables from whatever result rows exist, plots when matplotlib is there."""

from __future__ import annotations

import pytest

from conftest import load_benchmark

report = load_benchmark("report")
results = load_benchmark("_results")

ENV = dict(torch="2.13", triton="3.9", git_sha="abc", date="2026-01-01T00:00:00Z")


def _timing(what, shape, provider, ms, device="GPU X", gbps="", tflops=""):
    return dict(what=what, shape=shape, dtype="bfloat16", provider=provider, median_ms=str(ms), p20_ms=str(ms * 0.9),
                p80_ms=str(ms * 1.1), tflops=tflops, gbps=gbps, device=device, **ENV)  # fmt: skip


def _fid(model, gflops, provider, seed, fid):
    return dict(model=model, gflops=gflops, fid=fid, sfid=fid * 2, precision=0.5, recall=0.4, num_samples=1000,
                train_steps=2000, sampler="ddpm250", provider=provider, seed=seed, device="GPU X", **ENV)  # fmt: skip


@pytest.fixture
def results_dir(tmp_path):
    d = tmp_path / "results"
    results.append_rows(str(d / "model.csv"), [
        _timing("DiT-S/2 forward", "B=1,256px", "eager", 4.0), _timing("DiT-S/2 forward", "B=1,256px", "ditfast", 2.0),
        _timing("DiT-S/2 forward", "B=8,256px", "eager", 8.0), _timing("DiT-S/2 forward", "B=8,256px", "ditfast", 5.0),
        _timing("DiT-S/2 forward", "B=8,256px", "ditfast", 4.0),  # re-measured: the last row wins
    ])  # fmt: skip
    results.append_rows(str(d / "ops.csv"), [
        _timing("device copy", "3 elems", "torch copy_", 1.0, gbps="2000.0"),
        _timing("adaln_layernorm fwd", "B=4,N=256,D=1152", "ditfast triton", 0.05, gbps="1500.0"),
    ])  # fmt: skip
    results.append_rows(str(d / "fid.csv"), [_fid("DiT-S/8", 0.36, "ditfast", s, f) for s, f in ((0, 40.0), (1, 42.0))]
                        + [_fid("DiT-S/4", 1.41, "ditfast", 0, 30.0), _fid("DiT-S/8", 0.36, "ditfast", 1, 42.0)],  # seed 1 again
                        fields=results.FID_FIELDS)  # fmt: skip
    (d / "other.csv").write_text("a,b\n1,2\n")
    return d


def test_report_tables(results_dir, tmp_path):
    out = tmp_path / "REPORT.md"
    text = report.build_report(str(results_dir), str(out), str(tmp_path / "plots"), plots=False)
    assert out.read_text() == text
    lines = text.splitlines()
    # throughput: images/s = B / time; speed-up over eager in the same (what, shape, device); latest row wins
    assert any("| DiT-S/2 forward | B=8,256px | bfloat16 | ditfast | GPU X | 4.000" in line and "| 2000 |" in line and "| 2.00 |" in line for line in lines)
    assert any("| B=1,256px | bfloat16 | ditfast |" in line and "| 500 |" in line and "| 2.00 |" in line for line in lines)
    assert not any("5.000" in line for line in lines)
    # bandwidth, against the copy ceiling of the same device and run; the copy itself is not a row
    assert any("adaln_layernorm fwd" in line and "| 1500.0 | 75% |" in line for line in lines)
    assert not any(line.startswith("| device copy") for line in lines)
    # FID: mean and spread over seeds, a seed measured twice counted once
    assert any(line.startswith("| DiT-S/8 | 0.36 | ditfast |") and "| 41.00 ± 1.41 | 2 |" in line for line in lines)
    assert any(line.startswith("| DiT-S/4 | 1.41 |") and "| 30.00 | 1 |" in line for line in lines)
    assert "other.csv: columns ['a', 'b']" in text


def test_report_with_no_rows_says_so(tmp_path):
    text = report.build_report(str(tmp_path / "none"), str(tmp_path / "R.md"), str(tmp_path / "p"), plots=False)
    assert text.count("_No rows:") == 3 and "no results folder" in text


def test_append_rows_refuses_mixed_columns(results_dir):
    with pytest.raises(ValueError, match="use another file"):
        results.append_rows(str(results_dir / "fid.csv"), [_timing("x", "B=1", "eager", 1.0)])


def _append_many(path: str, proc: int, n: int) -> None:
    for i in range(n):
        results.append_rows(path, [_timing(f"p{proc}", f"row {i}", "eager", 1.0)])


def test_append_rows_from_processes_side_by_side_keeps_every_row(tmp_path):
    # two study processes appending to one results file (bench_diffit_unet --models halves) lose no row
    import multiprocessing as mp

    path = str(tmp_path / "shared.csv")
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(path, k, 25)) for k in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    assert all(proc.exitcode == 0 for proc in procs)
    import csv

    with open(path, newline="") as f:
        got = sorted((r["what"], r["shape"]) for r in csv.DictReader(f))
    assert got == sorted((f"p{k}", f"row {i}") for k in range(4) for i in range(25))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared.csv"]  # no lock or temporary file left behind


def test_report_plots(results_dir, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib (ditfast[bench]) is not installed: plots untested")
    text = report.build_report(str(results_dir), str(tmp_path / "REPORT.md"), str(tmp_path / "plots"))
    pngs = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert pngs == ["bandwidth_gpu-x.png", "gflops_fid.png", "throughput_dit-s-2-forward-bfloat16-gpu-x.png"]
    for name in pngs:
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](plots/{name})" in text
