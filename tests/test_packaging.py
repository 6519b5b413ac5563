"""setup.py ships every subpackage and data file that the code imports or opens."""

from __future__ import annotations

import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup_kwargs() -> dict:
    """The literal keyword arguments of the setup(...) call in setup.py."""
    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
            return {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg in ("packages", "package_dir", "package_data")}
    raise AssertionError("no setup(...) call in setup.py")


def test_every_subpackage_is_listed():
    kw = _setup_kwargs()
    found = {os.path.relpath(os.path.dirname(p), ROOT).replace(os.sep, ".") for p in glob.glob(os.path.join(ROOT, "ditfast", "**", "__init__.py"), recursive=True)}
    found.add("ditfast.kernels")  # kernels/ is installed under this name
    assert found <= set(kw["packages"]), f"setup.py packages lack {sorted(found - set(kw['packages']))}"
    assert kw["package_dir"]["ditfast.kernels"] == "kernels" and os.path.isfile(os.path.join(ROOT, "kernels", "__init__.py"))


def test_data_files_are_listed():
    data = _setup_kwargs()["package_data"]
    shipped = set()
    for package, patterns in data.items():
        base = os.path.join(ROOT, *package.split("."))
        for pattern in patterns:
            shipped |= {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(base, pattern))}
    needed = {os.path.relpath(p, ROOT) for ext in ("npz", "safetensors", "json") for p in glob.glob(os.path.join(ROOT, "ditfast", "**", f"*.{ext}"), recursive=True)}
    assert needed and needed <= shipped, f"not in package_data: {sorted(needed - shipped)}"


def test_import_does_not_load_the_compiler_stack():
    """``import ditfast`` stays close to ``import torch`` (benchmarks/bench_import.py measures it):
    nothing imports torch._dynamo (2-3 s on the CPU machine) or triton at import time."""
    import subprocess
    import sys

    code = "import sys, ditfast; print(sorted(m for m in ('torch._dynamo', 'triton', 'scipy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"import ditfast loaded {out}"
