"""``ditfast check``: every fast op against its float64 reference, what it could not check, the exit code."""

from __future__ import annotations

import json

import pytest
import torch

from ditfast import check, ops


def test_check_on_this_machine_passes_and_says_what_it_skipped(tmp_path, capsys):
    out = tmp_path / "check.json"
    assert check.main(["--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "op" in text.splitlines()[1] and "max error" in text
    rows = json.loads(out.read_text())["rows"]
    checked = [r for r in rows if r["ok"] is not None]
    ops_checked = {r["op"] for r in checked}
    assert {"adaln_layernorm", "gated_residual_adaln backward", "attention", "attention backward"} <= ops_checked
    # what the other block designs add: the ungated and affine adaLN ops, cross-attention
    assert {"gated_residual_adaln (no gate) backward", "adaln_layernorm (affine) backward", "cross-attention backward"} <= ops_checked
    assert {r["backend"] for r in checked if r["op"] == "cross-attention"} >= {"sdpa", "sdpa-math"}
    assert all(r["ok"] and r["error"] <= r["tolerance"] for r in checked)
    if not torch.cuda.is_available():
        graph = [r for r in rows if r["backend"] == "cuda graph"]
        assert graph and graph[0]["ok"] is None and "need a CUDA device" in graph[0]["note"]
    assert {r["backend"] for r in checked if r["op"] == "attention"} >= {"sdpa", "sdpa-math"}


def test_a_wrong_op_fails_the_check(monkeypatch, capsys):
    real = ops.gated_residual

    def off_by_a_little(x, y, gate):
        return real(x, y, gate) * (1 + 1e-3)

    monkeypatch.setattr(ops, "gated_residual", off_by_a_little)
    assert check.main(["--only", "adaln"]) == 1
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("gated_residual ")]
    assert lines and "FAIL" in lines[0]


def test_a_crashing_check_is_a_failure_and_the_others_still_run(monkeypatch):
    def boom(device, small):
        raise RuntimeError("kernel exploded")

    monkeypatch.setitem(check.CHECKS, "patch ops", boom)
    rows = check.run_checks("cpu", only=["patch ops", "adaln"])
    crashed = [r for r in rows if r.ok is False]
    assert len(crashed) == 1 and "kernel exploded" in crashed[0].note
    assert any(r.op == "adaln_layernorm" and r.ok for r in rows)


def test_bad_arguments(capsys):
    assert check.main(["--only", "nothing"]) == 2
    assert "invalid choice" in capsys.readouterr().err
