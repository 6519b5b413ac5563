"""Error classes and argument checks shared by every public boundary of ditfast.

Every public entry point (constructors, ``forward``, ``create_diffusion`` and its loops,
``load_model``, ``gflops``, the ops, ``attention``, ``sample``, the metrics and the CLIs) checks
its arguments here before any work starts, so a user mistake is reported as one
``ValueError``/``TypeError`` that names the argument, what was expected and what was given,
instead of a raw exception from deep inside torch, numpy, pickle or safetensors.

The error classes subclass ``ValueError`` so that code which already catches ``ValueError`` (the
CLIs) turns them into a one-line message.
"""

from __future__ import annotations

import math
import numbers

import torch

__all__ = [
    "CheckpointError",
    "DeviceError",
    "check_bool",
    "check_choice",
    "check_float",
    "check_int",
    "resolve_device",
]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: missing, empty, truncated, corrupt, foreign (not a
    checkpoint at all), holding a pickled object that the safe loader refuses, or holding tensors
    of the wrong kind. The message names the file and what is wrong with it."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"checkpoint {self.path!r}: {problem}")


class DeviceError(ValueError):
    """A device that is malformed or not present on this machine."""


def _given(value) -> str:
    """The given value as a message shows it: its repr and, where that could mislead, its type."""
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


def _is_int(value) -> bool:
    # bool is an int subclass, and True as a depth or a seed is a mistake, not a 1.
    if isinstance(value, bool):
        return False
    if isinstance(value, numbers.Integral):
        return True
    return isinstance(value, torch.Tensor) and value.ndim == 0 and not value.is_floating_point() \
        and value.dtype != torch.bool and not value.is_complex()


def check_int(name: str, value, min: int | None = None, max: int | None = None) -> int:
    """``value`` as a plain int, or a TypeError (not an integer; bools and floats such as 2.0 are
    refused) / ValueError (outside ``[min, max]``) naming ``name``."""
    if not _is_int(value):
        expected = "an integer" if min is None else f"an integer >= {min}"
        raise TypeError(f"{name} must be {expected}, got {_given(value)}")
    value = int(value)
    if (min is not None and value < min) or (max is not None and value > max):
        if min is not None and max is not None:
            expected = f"an integer in [{min}, {max}]"
        elif min is not None:
            expected = f"an integer >= {min}"
        else:
            expected = f"an integer <= {max}"
        raise ValueError(f"{name} must be {expected}, got {value}")
    return value


def check_float(name: str, value, lo: float | None = None, hi: float | None = None,
                lo_inclusive: bool = True, hi_inclusive: bool = True) -> float:
    """``value`` as a finite float within the bounds, or a TypeError (not a real number; bools
    are refused) / ValueError (NaN, infinite or out of range) naming ``name``."""
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) or (
            isinstance(value, torch.Tensor) and value.ndim == 0 and value.dtype != torch.bool
            and not value.is_complex())):
        raise TypeError(f"{name} must be a real number, got {_given(value)}")
    value = float(value)
    lo_ok = lo is None or (value >= lo if lo_inclusive else value > lo)
    hi_ok = hi is None or (value <= hi if hi_inclusive else value < hi)
    if not math.isfinite(value) or not (lo_ok and hi_ok):
        if lo is not None and hi is not None:
            expected = f"a finite number in {'[' if lo_inclusive else '('}{lo}, {hi}{']' if hi_inclusive else ')'}"
        elif lo is not None:
            expected = f"a finite number {'>=' if lo_inclusive else '>'} {lo}"
        elif hi is not None:
            expected = f"a finite number {'<=' if hi_inclusive else '<'} {hi}"
        else:
            expected = "a finite number"
        raise ValueError(f"{name} must be {expected}, got {value}")
    return value


def check_bool(name: str, value) -> bool:
    """``value`` if it is a bool, else a TypeError naming ``name`` (1 and "yes" are refused)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {_given(value)}")
    return value


def check_choice(name: str, value, choices):
    """``value`` if it is one of ``choices``, else a ValueError naming ``name`` and listing them."""
    choices = tuple(choices)
    try:
        ok = value in choices
    except TypeError:  # unhashable value tested against a set/dict
        ok = False
    if not ok:
        listed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {listed}; got {_given(value)}")
    return value


_DEVICE_FORMS = "None (automatic), 'cpu', 'cuda', 'cuda:N', an integer N (CUDA device N) or a torch.device"


def resolve_device(device, what: str = "device") -> torch.device:
    """A ``torch.device`` that exists on this machine, resolved once at the boundary.

    ``device`` may be None (CUDA device ``torch.cuda.current_device()`` when CUDA is available,
    else the CPU), a string (``"cpu"``, ``"cuda"``, ``"cuda:1"``), a ``torch.device`` or an integer
    (a CUDA index). ``"cuda"`` becomes ``cuda:<current>``, so later code never sees a device
    without an index. ``what`` names the argument in the messages. Raises :class:`DeviceError`
    for a malformed device, for CUDA on a machine without it and for an index past the last
    device; :class:`TypeError` for a value of another type.
    """
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    if isinstance(device, bool):
        raise TypeError(f"{what} must be one of {_DEVICE_FORMS}; got {_given(device)}")
    if isinstance(device, numbers.Integral):
        if device < 0:
            raise DeviceError(f"{what} must be a CUDA device index >= 0, got {device}")
        dev = torch.device("cuda", int(device))
    elif isinstance(device, torch.device):
        dev = device
    elif isinstance(device, str):
        try:
            dev = torch.device(device.strip())
        except (RuntimeError, ValueError):
            raise DeviceError(f"{what} {device!r} is not a device: expected {_DEVICE_FORMS}") from None
    else:
        raise TypeError(f"{what} must be one of {_DEVICE_FORMS}; got {_given(device)}")
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = ("this torch is a CPU build (torch.version.cuda is None)" if torch.version.cuda is None
                     else f"this torch is built for CUDA {torch.version.cuda}, but no GPU or driver was found")
            raise DeviceError(f"{what} {str(device)!r}: CUDA requested but torch.cuda.is_available() is False "
                              f"({build}); use device='cpu'")
        count = torch.cuda.device_count()
        index = torch.cuda.current_device() if dev.index is None else dev.index
        if index >= count:
            raise DeviceError(f"{what} {str(device)!r}: CUDA device index {index} does not exist; "
                              f"this machine has {count} CUDA device(s): 0..{count - 1}")
        return torch.device("cuda", index)
    if dev.type == "meta":
        return dev
    raise DeviceError(f"{what} {str(device)!r}: ditfast runs on 'cpu' or 'cuda', not on {dev.type!r}")
