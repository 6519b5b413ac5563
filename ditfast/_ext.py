"""Loading the compiled extension ``ditfast._C`` and reporting what it provides."""

from __future__ import annotations

import warnings

import torch

__all__ = ["extension_loaded", "extension_error", "cuda_ops_version", "op_available", "warn_fallback"]


def _import_extension() -> str | None:
    """Import ``ditfast._C`` (registering its ops); return None on success, else the error text."""
    try:
        from . import _C  # noqa: F401
    except ImportError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


# Resolved once at import, so the checks below are plain attribute reads (cheap, and traceable).
_ERROR = _import_extension()
_CUDA_VERSION = int(torch.ops.ditfast._cuda_version()) if _ERROR is None else 0
_WARNED: set[tuple[str, str]] = set()


def extension_loaded() -> bool:
    return _ERROR is None


def extension_error() -> str | None:
    """Why ``ditfast._C`` could not be imported, or None when it loaded."""
    return _ERROR


def cuda_ops_version() -> int:
    """CUDA version the extension's CUDA ops were built with (e.g. 13000); 0 when there are none."""
    return _CUDA_VERSION


def op_available(device: torch.device) -> bool:
    """Whether ``ditfast._C`` has kernels for tensors on ``device``."""
    if _ERROR is not None:
        return False
    return device.type == "cpu" or (device.type == "cuda" and _CUDA_VERSION > 0)


def warn_fallback(op: str, device_type: str) -> None:
    """Warn once per (op, device type) that the pure-PyTorch fallback runs instead of ditfast._C."""
    if (op, device_type) in _WARNED:
        return
    _WARNED.add((op, device_type))
    reason = _ERROR or f"it was built without {device_type.upper()} ops"
    warnings.warn(
        f"ditfast: {op} on {device_type} runs the pure-PyTorch fallback because ditfast._C is "
        f"unavailable ({reason}); results are the same, only slower. `ditfast info` shows the build.",
        RuntimeWarning,
        stacklevel=3,
    )
