"""``python -m ditfast.info``: what this ditfast installation can run, and with what."""

from __future__ import annotations

import importlib.util
import platform
import sys

import torch

from . import __version__
from ._ext import cuda_ops_version, extension_error, extension_loaded

__all__ = ["collect", "main"]


def _module_version(name: str) -> str:
    if importlib.util.find_spec(name) is None:
        return "not installed"
    try:
        module = __import__(name)
    except Exception as exc:  # a broken install says why rather than crashing `info`
        return f"installed but import failed ({type(exc).__name__}: {exc})"
    return str(getattr(module, "__version__", "unknown version"))


def collect() -> dict[str, str]:
    """The facts ``ditfast info`` prints, as ordered (name, value) pairs."""
    info = {
        "ditfast": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda or "none (CPU build)",
        "triton": _module_version("triton"),
        "flash-attn": _module_version("flash_attn"),
        "xformers": _module_version("xformers"),
    }
    if torch.cuda.is_available():
        idx = torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(idx)
        info["device"] = f"cuda:{idx} {torch.cuda.get_device_name(idx)} (sm_{major}{minor}), {torch.cuda.device_count()} visible"
    else:
        info["device"] = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), no CUDA device"
    from .ops import dispatch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        info["note"] = "Triton kernels run on CPU tensors only under TRITON_INTERPRET=1 (correct but slow, for tests)"
    for op, dispatcher in dispatch.REGISTRY.items():  # every fast op: each backend, usable or why not
        for name, text in dispatcher.describe(device).items():
            info[f"{op} {name}"] = text
        order = ", ".join(dispatcher.device_priority(device))
        info[f"{op} auto order"] = f"{device}: {order} (first that fits; {dispatcher.env_var} forces one)"
    if extension_loaded():
        info["ditfast._C"] = "loaded"
        version = cuda_ops_version()
        info["ditfast._C CUDA ops"] = f"yes (built with CUDA {version // 1000}.{version % 1000 // 10})" if version else "no (CPU-only build)"
    else:
        info["ditfast._C"] = f"not loaded, pure-PyTorch fallbacks in use ({extension_error()})"
        info["ditfast._C CUDA ops"] = "no"
    return info


def main(argv: list[str] | None = None) -> int:
    if argv:
        print("usage: ditfast info (takes no arguments)", file=sys.stderr)
        return 2
    info = collect()
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
