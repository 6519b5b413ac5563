"""One dispatch layer for every fast op: which backend runs, and why not the others.

Each op (``adaln``, ``attention``, ``tmsa``, ``patch``, ``timestep``) has a :class:`Dispatcher` holding its
backends, a priority list per device type and an environment variable. A backend is a small class
that declares what it supports -- device types, dtypes, minimum CUDA compute capability -- and
says in words why it cannot run a given problem (:meth:`Backend.not_supported_reasons`). The
policy is the same for every op:

- ``"auto"``: the op's environment variable if set (and not "auto"), else the first backend of
  the priority list for the device type that has no reasons;
- a backend name (or an alias) forces that backend; when it cannot run, the error lists every
  backend's reasons;
- the choice is cached per (problem, request, environment, priority list); it is a plain function
  of constants, so ``torch.compile`` traces it and folds it into the graph.

``REGISTRY`` maps op names to dispatchers; ``describe(device)`` says for every op and backend
whether it can run there (``ditfast info`` prints it, ``ditfast check`` runs what can).
"""

from __future__ import annotations

import os
from typing import Any

import torch

__all__ = ["Backend", "BackendError", "Dispatcher", "REGISTRY", "describe", "dtype_name", "register", "OpProblem",
           "EagerBackend", "CompiledBackend"]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class BackendError(RuntimeError):
    """No backend (or not the forced one) can run the given problem; the message says why."""


class Backend:
    """One implementation of an op; subclasses declare what they support.

    A problem is any object with ``device`` (str) and ``dtype`` attributes plus what the op needs
    (e.g. head dim for attention); :meth:`extra_reasons` checks those op-specific fields.
    """

    name: str = ""
    device_types: tuple[str, ...] | None = ("cuda",)  # None: any device
    dtypes: tuple[torch.dtype, ...] | None = None  # None: any dtype
    min_compute_capability: tuple[int, int] | None = None  # CUDA devices only

    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run at all here (e.g. its package is missing), else None."""
        return None

    def device_reasons(self, device: torch.device) -> list[str]:
        """Why this backend cannot run on ``device`` regardless of the inputs (empty when it can)."""
        reasons = []
        missing = self.unavailable_reason()
        if missing:
            reasons.append(missing)
        if self.device_types is not None and device.type not in self.device_types:
            reasons.append(f"runs on {' or '.join(self.device_types)} tensors, not {device.type}")
        elif device.type == "cuda" and self.device_types is not None:  # (any-device backends: no CUDA checks)
            if not torch.cuda.is_available():
                reasons.append("no CUDA device is available")
            elif self.min_compute_capability is not None:
                have, need = torch.cuda.get_device_capability(device), self.min_compute_capability
                if have < need:
                    reasons.append(f"needs compute capability >= {need[0]}.{need[1]}, the device has {have[0]}.{have[1]}")
        return reasons

    def not_supported_reasons(self, problem: Any) -> list[str]:
        """Why this backend cannot run ``problem``, in words; empty when it can."""
        reasons = self.device_reasons(torch.device(problem.device))
        if self.dtypes is not None and problem.dtype not in self.dtypes:
            reasons.append(f"dtype {dtype_name(problem.dtype)} is not one of {', '.join(map(dtype_name, self.dtypes))}")
        reasons += self.declared_reasons(problem)
        if not reasons:
            reasons = self.extra_reasons(problem)
        return reasons

    def declared_reasons(self, problem: Any) -> list[str]:
        """Checks of further declarations (a subclass's own limits), run with the ones above."""
        return []

    def extra_reasons(self, problem: Any) -> list[str]:
        """Checks beyond the declarations (e.g. asking a library), run once those pass."""
        return []

    def summary(self) -> str:
        """The declarations, in one line (for ``ditfast info``)."""
        devices = "any device" if self.device_types is None else "/".join(self.device_types)
        cc = f" (CUDA sm{self.min_compute_capability[0]}{self.min_compute_capability[1]}+)" if self.min_compute_capability else ""
        dtypes = "any dtype" if self.dtypes is None else "/".join(map(dtype_name, self.dtypes))
        return f"{devices}{cc}; {dtypes}"

    def __repr__(self) -> str:
        return f"<backend {self.name!r}>"


class Dispatcher:
    """The backends of one op and the policy that picks one (see the module docstring)."""

    def __init__(self, op: str, backends: list[Backend], priority: dict[str, list[str]], env_var: str,
                 default_priority: list[str], aliases: dict[str, str] | None = None,
                 error: type[BackendError] = BackendError):  # fmt: skip
        self.op = op
        self.backends: dict[str, Backend] = {b.name: b for b in backends}
        self.priority = priority  # device type -> names, tried in order by "auto"
        self.default_priority = default_priority  # for any other device type
        self.env_var = env_var
        self.aliases = dict(aliases or {})  # old name -> backend name
        self.error = error
        self.cache: dict[tuple, str] = {}

    def names(self) -> list[str]:
        return list(self.backends)

    def check_name(self, name: str) -> str:
        """The backend name ``name`` stands for ("auto", a backend, or an alias), else a ValueError."""
        if name == "auto" or name in self.backends:
            return name
        if name in self.aliases:
            return self.aliases[name]
        aliases = f" (aliases: {', '.join(f'{a}={b}' for a, b in self.aliases.items())})" if self.aliases else ""
        raise ValueError(f"{self.op} backend must be 'auto' or one of {self.names()}{aliases}, got {name!r}")

    def device_priority(self, device_type: str) -> list[str]:
        """The backends "auto" tries on ``device_type``, in order."""
        return self.priority.get(device_type, self.default_priority)

    def choose(self, backend: str, problem_type: type, device: str, *fields: Any) -> str:
        """The name of the backend that runs ``problem_type(device, *fields)`` for the request
        ``backend``. Takes the problem's fields, not the problem: the cache lookup is then a
        plain tuple of constants, which torch.compile traces without building the object."""
        env = os.environ.get(self.env_var) if backend == "auto" else None
        key = (problem_type, device, fields, backend, env, tuple(self.device_priority(device.partition(":")[0])))
        chosen = self.cache.get(key)
        if chosen is None:
            chosen = self.cache[key] = self._decide(problem_type(device, *fields), backend, env)
        return chosen

    def _decide(self, problem: Any, backend: str, env: str | None) -> str:
        source = "backend="
        if backend == "auto" and env and env.strip() != "auto":
            backend, source = env.strip(), f"{self.env_var}="
            if backend not in self.backends and backend not in self.aliases:
                raise ValueError(f"{self.env_var} must be 'auto' or one of {self.names()}, got {backend!r}")
        backend = self.check_name(backend)
        device_list = self.device_priority(torch.device(problem.device).type)
        if backend == "auto":
            chosen = next((n for n in device_list if n in self.backends and not self.backends[n].not_supported_reasons(problem)), None)
            if chosen is None:
                raise self.error(f"no {self.op} backend can run {problem}:\n{self.all_reasons(problem, device_list)}")
            return chosen
        reasons = self.backends[backend].not_supported_reasons(problem)
        if reasons:
            raise self.error(
                f"{self.op} backend {backend!r} (set by {source}{backend!r}) cannot run {problem}: " + "; ".join(reasons)
                + f"\nEvery backend for this problem:\n{self.all_reasons(problem, device_list)}"
            )  # fmt: skip
        return backend

    def all_reasons(self, problem: Any, candidates: list[str]) -> str:
        lines = []
        kind = torch.device(problem.device).type
        for name, b in self.backends.items():
            reasons = b.not_supported_reasons(problem)
            if not reasons:
                reasons = ["fits"] if name in candidates else [
                    f"could run, but is not in the {kind} priority list {candidates} "
                    f"(force it with backend={name!r} or {self.env_var}={name})"
                ]  # fmt: skip
            lines.append(f"  {name}: " + "; ".join(reasons))
        return "\n".join(lines)

    def describe(self, device: torch.device | str) -> dict[str, str]:
        """Every backend on ``device``: usable (with its declarations), or why not."""
        device = torch.device(device)
        out = {}
        for name, b in self.backends.items():
            reasons = b.device_reasons(device)
            out[name] = f"usable on {device.type}: {b.summary()}" if not reasons else "not usable: " + "; ".join(reasons)
        return out


REGISTRY: dict[str, Dispatcher] = {}


def register(dispatcher: Dispatcher) -> Dispatcher:
    REGISTRY[dispatcher.op] = dispatcher
    return dispatcher


def describe(device: torch.device | str | None = None) -> dict[str, dict[str, str]]:
    """op -> backend -> what ``Dispatcher.describe`` says, for every registered op."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return {op: d.describe(device) for op, d in REGISTRY.items()}


# ------------------------------------------------------------------------------------------
# The two backends every op with a compiled kernel in ditfast._C has
# ------------------------------------------------------------------------------------------


class OpProblem:
    """A problem that is only a device and a dtype (the patch ops, the timestep embedding)."""

    def __init__(self, device: str, dtype: torch.dtype | None = None):
        self.device, self.dtype = device, dtype

    def __str__(self) -> str:
        return f"{dtype_name(self.dtype) if self.dtype is not None else 'tensors'} on {self.device}"


class EagerBackend(Backend):
    """The official PyTorch statement of the op, on any device and dtype."""

    name = "eager"
    device_types = None

    def summary(self) -> str:
        return "any device; any dtype (the official PyTorch math)"


class CompiledBackend(Backend):
    """The op's kernel in ditfast._C (C++ on the CPU, CUDA when built with it)."""

    name = "compiled"
    device_types = ("cpu", "cuda")

    def device_reasons(self, device: torch.device) -> list[str]:
        from .._ext import extension_error, op_available

        reasons = super().device_reasons(device)
        if not reasons and not op_available(device):
            reasons.append(extension_error() or f"ditfast._C was built without {device.type.upper()} ops")
        return reasons

    def summary(self) -> str:
        return "ditfast._C kernels; cpu/cuda; any float dtype"
