"""The CUDA build's compiler flags (``csrc/build_flags.json``, read by setup.py and CI): every ``.cu``
compiled with them keeps accurate transcendental and division code (no fast math)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FLAGS = json.loads((ROOT / "csrc" / "build_flags.json").read_text())
APPROX = re.compile(r"\b(sin|cos|div|sqrt|rsqrt|lg2)\.approx\.[a-z0-9.]*")  # ex2.approx is part of accurate expf

NVCC = shutil.which("nvcc")
if NVCC is None and os.environ.get("CI") == "true":
    pytest.fail("nvcc is expected in CI (the CUDA sources are compile-checked there)", pytrace=False)
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found: the CUDA sources cannot be compiled here")


def ptx(source: Path, flags: list[str], tmp_path: Path) -> str:
    out = tmp_path / (source.stem + ".ptx")
    subprocess.run([NVCC, "-ptx", *flags, "-arch=sm_80", str(source), "-o", str(out)], check=True, capture_output=True)
    return out.read_text()


def test_setup_py_reads_the_flags_file():
    text = (ROOT / "setup.py").read_text()
    assert "build_flags.json" in text and '"--use_fast_math"' not in text
    assert "--use_fast_math" not in FLAGS["nvcc"]


@pytest.mark.parametrize("source", sorted((ROOT / "csrc" / "cuda").glob("*.cu")), ids=lambda p: p.name)
def test_no_approximate_math_in_the_build(source, tmp_path):
    found = sorted(set(m.group(0) for m in APPROX.finditer(ptx(source, FLAGS["nvcc"], tmp_path))))
    assert not found, f"{source.name} compiled with {FLAGS['nvcc']} uses approximate instructions {found}"


def test_the_check_sees_fast_math(tmp_path):
    """The PTX check can fail: with --use_fast_math the timestep embedding's cosf/sinf become
    the approximate hardware instructions (inaccurate for arguments far from [-pi, pi])."""
    text = ptx(ROOT / "csrc" / "cuda" / "timestep_embedding.cu", [*FLAGS["nvcc"], "--use_fast_math"], tmp_path)
    assert {"sin", "cos"} <= {m.group(1) for m in APPROX.finditer(text)}
