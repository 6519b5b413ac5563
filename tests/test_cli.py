"""`ditfast info` and `python -m ditfast.info`."""

import shutil
import subprocess
import sys

import pytest

from ditfast.info import collect


def test_collect_reports_the_essentials():
    info = collect()
    for key in ("torch", "torch CUDA", "triton", "device", "ditfast._C", "ditfast._C CUDA ops"):
        assert info[key], key


@pytest.mark.parametrize("cmd", [[sys.executable, "-m", "ditfast.info"], [sys.executable, "-m", "ditfast", "info"]])
def test_info_commands_print_versions(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert "torch" in out and "ditfast._C" in out and "device" in out


def test_console_script():
    exe = shutil.which("ditfast")
    if exe is None:
        pytest.skip("the ditfast console script is not on PATH (package not pip-installed)")
    out = subprocess.run([exe, "info"], capture_output=True, text=True, check=True).stdout
    assert "ditfast._C" in out


def test_no_command_prints_help():
    res = subprocess.run([sys.executable, "-m", "ditfast"], capture_output=True, text=True)
    assert res.returncode == 2 and "info" in res.stdout
