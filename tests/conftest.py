"""Shared test helpers: tolerances, comparison with a readable report, model randomisation."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's CPU interpreter. triton.jit reads this when the
# kernels are decorated, so it is set before any test imports ditfast.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One tolerance table for every numerical test: (rtol, atol) per dtype, forward and backward.
TOLERANCES = {
    ("fwd", torch.float64): (1e-10, 1e-12),
    ("fwd", torch.float32): (1e-5, 1e-5),
    ("fwd", torch.bfloat16): (2e-2, 2e-2),
    ("fwd", torch.float16): (2e-3, 2e-3),
    ("bwd", torch.float64): (1e-9, 1e-11),
    ("bwd", torch.float32): (1e-4, 1e-5),
    ("bwd", torch.bfloat16): (5e-2, 5e-2),
    ("bwd", torch.float16): (5e-3, 5e-3),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype=None, kind: str = "fwd", rtol=None, atol=None, what: str = ""):
    """torch.testing.assert_close with the table's tolerance and a report of where it failed."""
    dtype = dtype or expected.dtype
    table_rtol, table_atol = TOLERANCES[(kind, dtype)]
    rtol = table_rtol if rtol is None else rtol
    atol = table_atol if atol is None else atol
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    err = (a - e).abs()
    bad = err > atol + rtol * e.abs()
    if bad.any() or not torch.isfinite(a).all():
        idx = tuple(int(i) for i in torch.nonzero(bad | ~torch.isfinite(a))[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{a.numel()} elements out of tolerance (rtol={rtol}, atol={atol}); "
            f"max abs err {err.max().item():.3e}, max rel err {(err / e.abs().clamp_min(1e-30)).max().item():.3e}; "
            f"first at {idx}: got {a[idx].item():.8g}, expected {e[idx].item():.8g}"
        )


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest error relative to the reference's overall scale: max|a-e| / max|e|."""
    a, e = actual.detach().double(), expected.detach().double()
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


@torch.no_grad()
def randomize_(model: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Overwrite every trainable parameter with random values (the zero-initialised ones too).

    The frozen pos_embed is left as the model made it. Scale keeps activations O(1).
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        fan_in = p.shape[1] * (p[0, 0].numel() if p.dim() > 2 else 1) if p.dim() >= 2 else 1
        scale = std if p.dim() < 2 else fan_in**-0.5
        p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * scale)
    return model


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def expect_extension() -> bool:
    """CI sets DITFAST_EXPECT_EXT=1: there the compiled extension must have loaded."""
    return os.environ.get("DITFAST_EXPECT_EXT", "0") == "1"


@pytest.fixture(scope="session")
def inception_weights() -> str:
    """Path of the FID Inception TorchScript file; skips (with the reason) when it is not installed.

    CI sets DITFAST_EXPECT_INCEPTION=1: there a missing file fails instead of skipping.
    """
    from ditfast.metrics import inception_weights_path

    try:
        return inception_weights_path()
    except FileNotFoundError as exc:
        if os.environ.get("DITFAST_EXPECT_INCEPTION", "0") == "1":
            pytest.fail(f"DITFAST_EXPECT_INCEPTION=1 but {exc}")
        pytest.skip(f"FID Inception weights not installed: {exc}")


def free_port() -> int:
    """A free TCP port on the loopback interface, for a local torch.distributed rendezvous."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def join_process_group_env(rank: int, world: int, port: int) -> None:
    """Set the torchrun-style variables of one rank of a local (gloo, 1 thread) process group."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)


def skip_module_unless_triton_runs() -> str:
    """The device Triton kernel tests run on ("cuda", or "cpu" under the interpreter); skips the
    calling test module, with the reason, where the kernels cannot run."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from ditfast import ops

    reason = ops.triton_status(device)
    if reason is not None:
        pytest.skip(f"Triton kernels cannot run here: {reason}", allow_module_level=True)
    return device


def assert_same_training_signal(model: torch.nn.Module, inputs: tuple, attr: str, ref_value: str, value: str, what: str) -> None:
    """Run ``model(*inputs)`` forward and backward with ``model.<attr>`` set to ``ref_value``, then
    to ``value``; assert the outputs and every parameter gradient agree (fp32 tolerances)."""
    results = {}
    for setting in (ref_value, value):
        setattr(model, attr, setting)
        model.zero_grad(set_to_none=True)
        out = model(*inputs)
        out.square().mean().backward()
        results[setting] = (out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    (out_r, grads_r), (out_v, grads_v) = results[ref_value], results[value]
    assert out_r.abs().max() > 0.1, f"{what}: degenerate test, the reference output is ~zero"
    assert_close(out_v, out_r, rtol=1e-4, atol=1e-4 * out_r.abs().max().item(), what=f"{what} output")
    assert grads_v.keys() == grads_r.keys()
    for name, ref in grads_r.items():
        assert_close(grads_v[name], ref, rtol=1e-3, atol=1e-4 * max(ref.abs().max().item(), 1e-6), what=f"{what} grad {name}")


BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def load_benchmark(name: str):
    """Import ``benchmarks/<name>.py`` as a module (its folder on sys.path while it loads)."""
    sys.path.insert(0, BENCHMARKS)
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(BENCHMARKS, f"{name}.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # dataclasses look their module up there
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(BENCHMARKS)


# ------------------------------------------------------------------------------------------
# What a CUDA graph needs of a captured step, checked on the CPU (the sampling engines' graph mode)
# ------------------------------------------------------------------------------------------

# Ops a captured step must not run, by their tags: host reads of device values and data-dependent
# shapes (the capture fails, or the replay freezes the value), random draws (the engines feed
# noise through a buffer); and by name, tensors built from Python values (host->device constants).
_NOT_CAPTURABLE_TAGS = (torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape, torch.Tag.nondeterministic_seeded)
_NOT_CAPTURABLE_NAMES = ("lift_fresh", "lift_fresh_copy", "scalar_tensor", "_local_scalar_dense")


class OpTrace(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every aten op with its tensor shapes/dtypes, its non-tensor arguments and whether a
    CUDA graph could hold it."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        def describe(a):
            if isinstance(a, torch.Tensor):
                return ("T", tuple(a.shape), a.dtype)
            if isinstance(a, (list, tuple)):
                return tuple(describe(v) for v in a)
            return a

        bad = func.overloadpacket.__name__ in _NOT_CAPTURABLE_NAMES or any(tag in func.tags for tag in _NOT_CAPTURABLE_TAGS)
        if bad and torch.Tag.nondeterministic_seeded in func.tags:  # attention kernels: seeded only for dropout
            schema = func._schema.arguments
            given = {**{a.name: a.default_value for a in schema if a.has_default_value()},
                     **dict(zip([a.name for a in schema], args)), **(kwargs or {})}  # fmt: skip
            bad = given.get("dropout_p", 1.0) != 0.0
        self.ops.append((func.overloadpacket.__name__, str(func), describe(args), describe(sorted((kwargs or {}).items())), bad))
        return func(*args, **(kwargs or {}))


def assert_replayable(steps: list, buffers: dict[str, torch.Tensor]) -> None:
    """Run ``steps`` (callables, one per sampling step, in order) and assert what a replayed CUDA
    graph of each needs: no op a graph cannot hold or would freeze, every call of the same callable
    the same ops on the same shapes with the same non-tensor arguments (per-step values come from
    device tensors), and ``buffers`` updated in place. As the engines' capture does, each distinct
    callable first runs once untraced (warm-up: caches built on a first call), and the buffers are
    restored. (Copies between devices cannot show on a CPU; the GPU tests run the real capture.)"""
    pointers = {n: b.data_ptr() for n, b in buffers.items()}
    first: dict = {}
    with torch.no_grad():
        saved = {n: b.clone() for n, b in buffers.items()}
        for step in dict.fromkeys(steps):
            step()
        for n, b in buffers.items():
            b.copy_(saved[n])
        for k, step in enumerate(steps):
            with OpTrace() as trace:
                step()
            bad = sorted({op[0] for op in trace.ops if op[-1]})
            assert not bad, f"step {k} runs ops a CUDA graph cannot hold or would freeze: {bad}"
            k0, ops0 = first.setdefault(step, (k, trace.ops))
            if trace.ops != ops0:
                ops = trace.ops
                i = next((i for i, (a, b) in enumerate(zip(ops, ops0)) if a != b), min(len(ops), len(ops0)))
                pytest.fail(f"step {k} differs from step {k0} at op {i}: {ops[i:i + 1]} vs {ops0[i:i + 1]} "
                            f"({len(ops)} vs {len(ops0)} ops): a replayed graph would repeat step {k0}")  # fmt: skip
    assert {n: b.data_ptr() for n, b in buffers.items()} == pointers, "the steps must update their buffers in place"
