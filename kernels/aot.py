"""Ahead-of-time compile check of every ditfast Triton kernel for sm_80 and sm_90, without a GPU.

    python -m ditfast.kernels.aot                 the default set (CI; under 10 minutes on 2 cores)
    python -m ditfast.kernels.aot --full          every shape of the sweep below
    python -m ditfast.kernels.aot --all-configs   also the autotune configs that pruning drops

What is compiled is what the launchers can launch. The real launchers (``attention_fwd`` /
``attention_bwd``, ``tmsa_fwd`` / ``tmsa_bwd``, ``adaln_fwd`` / ``adaln_bwd``) run on meta tensors that report ``is_cuda``,
and every kernel launch is intercepted (``JITFunction.run``, ``Autotuner.run``). A plain launch
yields one configuration; an autotuned one yields every config its ``early_config_prune`` keeps
for the target, called with ``arch=(major, minor)`` (``ditfast.kernels.attention.prune_configs``),
so what is checked for sm_80 and sm_90 is exactly what the autotuner may pick there. Triton's own
binder specialises the arguments (dtypes, 16-byte divisibility, ints equal to 1) as a launch would.
Each distinct (kernel, arch, signature, constexprs, num_warps, num_stages) is compiled once with
``triton.compile(..., target=GPUTarget("cuda", 80|90, 32))``, in a process pool; results are
cached under ``$DITFAST_AOT_CACHE`` (default ``~/.cache/ditfast/aot``), keyed on the kernel's
source hash (its code and every jit function it calls), the triton version and the configuration.

Read from the compiled code, not from a GPU: registers per thread (``cuobjdump
--dump-resource-usage`` on the cubin; the metadata's n_regs stays 0 without a driver), spill
bytes (the ``ptxas -v`` log of Triton's own ptxas run, ``TRITON_DUMP_PTXAS_LOG=1``), shared
memory (the kernel metadata's ``shared``, the dynamic allocation a launch requests) and whether
tensor-core instructions are used (``mma.sync`` / ``wgmma`` in the PTX). Blocks per SM follow
from those and the limits in ``ARCHS``. These are compile-time facts, not speed.

The table goes to stdout and to benchmarks/results/kernels_static.csv (atomically). The exit
status is 1 when a configuration that can be chosen fails to compile, spills registers, or asks
for more shared memory than one block may have; each failure is named.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import csv
import dataclasses
import datetime
import hashlib
import importlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Iterator
from unittest import mock

import torch

__all__ = ["ARCHS", "Arch", "Job", "enumerate_jobs", "compile_job", "blocks_per_sm", "main"]


# ------------------------------------------------------------------------------------------
# Targets
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Arch:
    """Per-SM limits of one target (CUDA C++ Programming Guide, "Technical Specifications per
    Compute Capability"; A100 and H100 tuning guides for the shared memory carve-outs)."""

    name: str
    capability: tuple[int, int]
    smem_per_sm: int  # bytes of shared memory per SM at the largest carve-out
    smem_per_block: int  # most dynamic shared memory one block may opt in to
    smem_reserved_per_block: int = 1024  # taken by the system from each resident block (sm_80+)
    regs_per_sm: int = 65536
    reg_alloc_unit: int = 256  # registers are allocated per warp in units of 256
    max_threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32


ARCHS = {
    80: Arch("sm_80", (8, 0), smem_per_sm=164 * 1024, smem_per_block=163 * 1024),  # A100
    90: Arch("sm_90", (9, 0), smem_per_sm=228 * 1024, smem_per_block=227 * 1024),  # H100/H200
}


def blocks_per_sm(arch: Arch, regs: int, shared: int, num_warps: int) -> tuple[int, str]:
    """(resident blocks per SM, the limiting resource) of a kernel using ``regs`` registers per
    thread and ``shared`` bytes of shared memory per block, launched with ``num_warps`` warps."""
    threads = 32 * num_warps
    regs_per_warp = -(-max(regs, 1) * 32 // arch.reg_alloc_unit) * arch.reg_alloc_unit
    limits = {
        "regs": (arch.regs_per_sm // regs_per_warp) // num_warps,
        "smem": arch.smem_per_sm // (shared + arch.smem_reserved_per_block),
        "threads": arch.max_threads_per_sm // threads,
        "blocks": arch.max_blocks_per_sm,
    }
    limiter = min(limits, key=limits.get)
    return limits[limiter], limiter


# ------------------------------------------------------------------------------------------
# Shapes: what the launchers are driven with
# ------------------------------------------------------------------------------------------

# (hidden D, head dim): DiT-S/B/L/XL widths at head dim 64, and XL's own 1152 / 16 heads = 72.
# Every D that the head dim divides; 72 does not divide 384, 768 or 1024.
FULL_WIDTHS = [(384, 64), (768, 64), (1024, 64), (1152, 64), (1152, 72)]
FULL_TOKENS = [256, 1024]
FULL_BATCHES = [2, 8, 64, 512]  # CFG-doubled batches (adaLN's rows per program depend on B*N)

# (name, torch dtype, TF32 allowed): fp32 is compiled both ways, since the launcher follows
# torch.backends.cuda.matmul.allow_tf32.
DTYPES = [
    ("bf16", torch.bfloat16, False),
    ("fp16", torch.float16, False),
    ("fp32", torch.float32, False),
    ("fp32-tf32", torch.float32, True),
]

# The default (CI) set. Attention: DiT-B (12 heads of 64) and DiT-XL (16 heads of 72, both head
# layouts) cover every head-block shape and both 16-divisibility cases of H; fp16 compiles to the
# same code as bf16 bar the conversions, so it is checked at XL only. adaLN: the smallest and the
# non-power-of-two width, one row and 16 rows per program. No attention launch depends on the
# batch, nor (at 256 tokens and up) on N. --full adds every other combination.
DEFAULT_WIDTHS = {
    "bf16": [(768, 64), (1152, 72)], "fp16": [(1152, 72)], "fp32": [(768, 64), (1152, 72)], "fp32-tf32": [(768, 64), (1152, 72)],
}  # fmt: skip
DEFAULT_ADALN_WIDTHS = [384, 1152]
DEFAULT_TOKENS = [256]
DEFAULT_BATCHES = [2, 512]


class _CudaStandIn(torch.Tensor):
    """A meta tensor (shape, dtype, strides; no storage) that the launchers take for a CUDA one."""

    @property
    def is_cuda(self) -> bool:
        return True


def _t(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta").as_subclass(_CudaStandIn)


def _drive_attention(B: int, N: int, D: int, head_dim: int, layout: str, dtype: torch.dtype) -> None:
    from ditfast.kernels import attention

    H = D // head_dim
    qkv = _t(B, N, 3 * D, dtype=dtype)
    out, lse = attention.attention_fwd(qkv, H, head_dim**-0.5, layout)
    attention.attention_bwd(_t(B, N, D, dtype=dtype), qkv, out.as_subclass(_CudaStandIn), lse, H, head_dim**-0.5, layout)


def _drive_adaln(B: int, N: int, D: int, dtype: torch.dtype) -> None:
    """The ops of every block design: (gated or ungated) residual + adaLN, adaLN alone, (gated or
    ungated) residual alone; shift/scale/gate are chunks of the (B, 6*D) modulation, as in the model."""
    from ditfast.kernels import adaln

    x, y = _t(B, N, D, dtype=dtype), _t(B, N, D, dtype=dtype)
    mod = _t(B, 6 * D, dtype=dtype)
    shift, scale, gate = mod[:, :D], mod[:, D : 2 * D], mod[:, 2 * D : 3 * D]
    mean, rstd = _t(B * N, dtype=torch.float32), _t(B * N, dtype=torch.float32)
    for res, gated, norm in ((True, True, True), (False, False, True), (True, True, False), (True, False, True), (True, False, False)):
        adaln.adaln_fwd(x, y if res else None, gate if gated else None, shift if norm else None, scale if norm else None, 1e-6, dtype)
    grad = _t(B, N, D, dtype=dtype)
    #          dr,   dh,   normed, y,    gate, scale
    for dr, dh, normed, yy, g, sc in (
        (grad, grad, x, y, gate, scale),  # gated residual + adaLN, both outputs used
        (None, grad, x, y, gate, scale),  # ... only h used (r's gradient is None)
        (None, grad, x, None, None, scale),  # adaLN alone
        (grad, grad, x, None, None, scale),  # ungated residual + adaLN (the adaLN design): dy = dx
        (grad, None, None, y, gate, None),  # gated residual alone
    ):
        adaln.adaln_bwd(dr, dh, normed, yy, g, sc, mean, rstd, dtype)


def _drive_tmsa(B: int, grid: tuple[int, int], window: tuple[int, int], D: int, head_dim: int, layout: str,
                dtype: torch.dtype, qkv_t: bool = True, bias: bool = True) -> None:  # fmt: skip
    """DiffiT's TMSA forward and backward (time projection, relative position bias, windows)."""
    from ditfast.kernels import tmsa

    H, N = D // head_dim, grid[0] * grid[1]
    qkv = _t(B, N, 3 * D, dtype=dtype)
    t = _t(B, 3 * D, dtype=dtype) if qkv_t else None
    table = _t((2 * window[0] - 1) * (2 * window[1] - 1), H, dtype=torch.float32) if bias else None
    out, lse = tmsa.tmsa_fwd(qkv, H, grid, window, head_dim**-0.5, t, table, layout)
    tmsa.tmsa_bwd(_t(B, N, D, dtype=dtype), qkv, out.as_subclass(_CudaStandIn), lse, H, grid, window, head_dim**-0.5,
                  t, table, layout)  # fmt: skip


# TMSA (DiffiT): the latent model's global attention with bias and time projection at 256px
# (16x16 tokens, 16 heads of 72) and, in --full, 512px (32x32); windowed attention at image-space
# shapes (32x32 tokens in 8x8 windows; --full adds 16x16 in 4x4 windows, head dim 64 and the
# launches without the time projection or the bias). (B, grid, window, D, Dh, qkv_t, bias).
# The default (CI) set compiles the "pad" head layout in bf16 at the global shape only (--full: all).
DEFAULT_TMSA = [(2, (16, 16), (16, 16), 1152, 72, True, True), (4, (32, 32), (8, 8), 1152, 72, True, True)]
FULL_TMSA = DEFAULT_TMSA + [
    (8, (32, 32), (32, 32), 1152, 72, True, True), (8, (16, 16), (4, 4), 1024, 64, True, True),
    (2, (16, 16), (16, 16), 1152, 72, False, True), (2, (16, 16), (16, 16), 1152, 72, True, False),
    (2, (16, 16), (8, 8), 768, 64, False, False),
]  # fmt: skip


def cases(full: bool) -> Iterator[tuple[str, Callable[[], None]]]:
    """(label, launcher call) pairs of the sweep."""
    adaln_widths = sorted({d for d, _ in FULL_WIDTHS}) if full else DEFAULT_ADALN_WIDTHS
    tokens = FULL_TOKENS if full else DEFAULT_TOKENS
    batches = FULL_BATCHES if full else DEFAULT_BATCHES
    from ditfast.kernels import attention

    for dname, dtype, tf32 in DTYPES:
        for N in tokens:
            for B in batches:
                for D, dh in FULL_WIDTHS if full else DEFAULT_WIDTHS[dname]:
                    layouts = {attention.head_blocks(dh, lay): lay for lay in attention.HEAD_LAYOUTS}.values()
                    for lay in layouts:
                        call = _with_tf32(tf32, _drive_attention, B, N, D, dh, lay, dtype)
                        yield f"attention B={B} N={N} D={D} Dh={dh} {lay} {dname}", call
                if not tf32:  # adaLN has no matmul
                    for D in adaln_widths:
                        yield f"adaln B={B} N={N} D={D} {dname}", _with_tf32(tf32, _drive_adaln, B, N, D, dtype)
        if dname == "fp16" and not full:  # fp16 compiles as bf16 bar the conversions
            continue
        for B, grid, window, D, dh, has_t, has_bias in FULL_TMSA if full else DEFAULT_TMSA:
            layouts = list({attention.head_blocks(dh, lay): lay for lay in attention.HEAD_LAYOUTS}.values())
            if not full and (window != grid or dname != "bf16"):  # CI: the other layout in bf16, global only
                layouts = layouts[:1]
            for lay in layouts:
                extras = "".join(f" no-{n}" for n, on in (("qkv_t", has_t), ("bias", has_bias)) if not on)
                call = _with_tf32(tf32, _drive_tmsa, B, grid, window, D, dh, lay, dtype, has_t, has_bias)
                yield f"tmsa B={B} grid={grid[0]}x{grid[1]} window={window[0]}x{window[1]} D={D} Dh={dh} {lay}{extras} {dname}", call


def _with_tf32(tf32: bool, fn, *args) -> Callable[[], None]:
    def call():
        saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            fn(*args)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = saved

    return call


# ------------------------------------------------------------------------------------------
# Enumeration: intercept every launch, specialise as Triton would
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Job:
    """One compilation: a kernel specialised as a launch would specialise it, for one target."""

    module: str  # where the kernel lives, e.g. ditfast.kernels.attention
    kernel: str  # its attribute name there, e.g. _attn_bwd_kernel
    arch: int  # 80 or 90
    signature: tuple[tuple[str, str], ...]  # (argument, Triton type or "constexpr")
    constexprs: tuple[tuple[int, str, Any], ...]  # (argument index, name, value)
    attrs: tuple[tuple[int, str], ...]  # (argument index, JSON of the backend's attributes)
    num_warps: int
    num_stages: int
    choosable: bool  # False: an autotune config that pruning drops for this arch (--all-configs)

    @property
    def dtype(self) -> str:
        """Element type of the first pointer argument (the data the kernel works on)."""
        return next((t[1:] for _, t in self.signature if t.startswith("*")), "-")

    def describe(self) -> str:
        cx = " ".join(f"{n}={v}" for _, n, v in self.constexprs)
        return f"{self.kernel} sm_{self.arch} {self.dtype} [{cx}] num_warps={self.num_warps} num_stages={self.num_stages}"


def _binder(fn, arch: int, cache: dict):
    """Triton's own argument binder/specialiser for ``fn`` on ``arch`` (what a launch runs)."""
    key = (id(fn), arch)
    if key not in cache:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature

        backend = make_backend(GPUTarget("cuda", arch, 32))
        cache[key] = backend, create_function_from_signature(fn.signature, fn.params, backend)
    return cache[key]


def _job(fn, args, kwargs, arch: int, choosable: bool, cache: dict) -> Job:
    backend, binder = _binder(fn, arch, cache)
    bound, specialization, options = binder(*args, **kwargs)
    values = list(bound.values())
    names = [p.name for p in fn.params]
    signature, constexprs, attrs = [], [], []
    for i, (name, (ty, spec)) in enumerate(zip(names, specialization)):
        signature.append((name, ty))
        if ty == "constexpr":
            constexprs.append((i, name, values[i]))
        elif isinstance(spec, str):  # e.g. "D": divisible by 16
            attr = backend.parse_attr(spec)
            if attr:
                attrs.append((i, json.dumps(attr)))
    opts = backend.parse_options(dict(options))
    return Job(fn.__module__, fn.__name__, arch, tuple(signature), tuple(constexprs), tuple(attrs),
               opts.num_warps, opts.num_stages, choosable)  # fmt: skip


@contextlib.contextmanager
def _intercept(record: Callable[[Any, tuple, dict, int, bool], None], archs: list[int], all_configs: bool):
    """Replace kernel launches by ``record(fn, args, kwargs, arch, choosable)`` calls."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    def jit_run(self, *args, grid, warmup, **kwargs):
        for arch in archs:
            record(self, args, kwargs, arch, True)

    def tuner_run(self, *args, **kwargs):
        kwargs.pop("grid", None), kwargs.pop("warmup", None)
        if not isinstance(self.fn, JITFunction):
            raise TypeError(f"{self.fn!r}: only autotuners directly over a @triton.jit kernel are supported")
        named = dict(zip(self.arg_names, args))
        for arch in archs:
            keep = self.configs
            if self.early_config_prune is not None:
                keep = self.early_config_prune(self.configs, named, arch=ARCHS[arch].capability, **kwargs)
            for config in self.configs if all_configs else keep:
                record(self.fn, args, {**kwargs, **config.all_kwargs()}, arch, config in keep)

    with mock.patch.object(JITFunction, "run", jit_run), mock.patch.object(Autotuner, "run", tuner_run):
        yield


def enumerate_jobs(full: bool = False, archs: list[int] = (80, 90), all_configs: bool = False) -> dict[Job, list[str]]:
    """Every distinct compilation the sweep's launches ask for -> the labels of the cases asking."""
    _require_jit()
    jobs: dict[Job, list[str]] = {}
    cache: dict = {}
    label = ""

    def record(fn, args, kwargs, arch, choosable):
        job = _job(fn, args, kwargs, arch, choosable, cache)
        jobs.setdefault(job, []).append(label)

    with _intercept(record, list(archs), all_configs):
        for label, call in cases(full):
            call()
    # a config choosable for one shape and pruned for another counts as choosable
    return {job: where for job, where in jobs.items() if job.choosable or dataclasses.replace(job, choosable=True) not in jobs}


def _require_jit() -> None:
    from triton.runtime.jit import JITFunction

    from ditfast.kernels import adaln, attention

    if not isinstance(attention._attn_fwd_kernel, JITFunction) or not isinstance(adaln._adaln_fwd_kernel, JITFunction):
        raise RuntimeError(
            "the kernels were decorated for Triton's interpreter (TRITON_INTERPRET=1 when they were imported); "
            "run the AOT check in a process without it: python -m ditfast.kernels.aot"
        )


# ------------------------------------------------------------------------------------------
# Compilation (in worker processes)
# ------------------------------------------------------------------------------------------

_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_RESOURCE = re.compile(r"REG:(\d+) STACK:(\d+)")
_TENSOR_CORE = (("wgmma", re.compile(r"\bwgmma\.mma_async")), ("mma", re.compile(r"\bmma\.sync")))


def parse_ptxas_log(log: str) -> tuple[int, int, int]:
    """(stack frame, spill stores, spill loads) in bytes from a ``ptxas -v`` log."""
    m = _SPILL.search(log)
    if m is None:
        raise RuntimeError(f"no spill line in the ptxas log (was TRITON_DUMP_PTXAS_LOG honoured?): {log[-500:]!r}")
    return int(m[1]), int(m[2]), int(m[3])


def parse_resource_usage(text: str) -> tuple[int, int]:
    """(registers per thread, stack bytes) from ``cuobjdump --dump-resource-usage``."""
    m = _RESOURCE.search(text)
    if m is None:
        raise RuntimeError(f"no REG:/STACK: in cuobjdump's resource usage: {text[-500:]!r}")
    return int(m[1]), int(m[2])


def tensor_cores(ptx: str) -> str:
    """"wgmma", "mma" or "none": the tensor-core instructions in the PTX."""
    return next((name for name, pattern in _TENSOR_CORE if pattern.search(ptx)), "none")


def _cuobjdump() -> str:
    from triton import knobs

    return knobs.nvidia.cuobjdump.path


def compile_job(job: Job) -> dict:
    """Compile ``job``; its compile-time facts, or {"error": ...}. Runs in a worker process."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(job.module), job.kernel)
    constexprs = {(i,): v for i, _, v in job.constexprs}
    attrs = {(i,): json.loads(a) for i, a in job.attrs}
    # positional: triton 3.6 and 3.9 both take (fn, signature, constexprs, attrs), keyed by argument path
    src = ASTSource(fn, dict(job.signature), constexprs, attrs)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG=1 prints ptxas -v's log
            options = {"num_warps": job.num_warps, "num_stages": job.num_stages}
            kernel = triton.compile(src, target=GPUTarget("cuda", job.arch, 32), options=options)
        stack, spill_stores, spill_loads = parse_ptxas_log(log.getvalue())
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
        regs, _ = parse_resource_usage(usage)
    except Exception as exc:  # noqa: BLE001 -- reported per configuration
        text = f"{type(exc).__name__}: {exc}".strip()
        return {"error": text[:1500]}
    return {"regs": regs, "stack": stack, "spill_stores": spill_stores, "spill_loads": spill_loads,
            "shared": int(kernel.metadata.shared), "tensor_cores": tensor_cores(kernel.asm["ptx"])}  # fmt: skip


def _worker_init() -> None:
    import warnings

    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION")  # triton 3.9's notice, once per process
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # print ptxas -v's log (registers, spills)
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # a Triton cache hit would skip ptxas and its log


def _cache_dir() -> str:
    return os.environ.get("DITFAST_AOT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ditfast", "aot")


def _cache_key(job: Job) -> str:
    import triton

    fn = getattr(importlib.import_module(job.module), job.kernel)
    fields = dataclasses.asdict(dataclasses.replace(job, choosable=True))
    payload = json.dumps([triton.__version__, fn.cache_key, fields], sort_keys=True, default=repr)
    return hashlib.sha256(payload.encode()).hexdigest()


def compile_all(jobs: list[Job], workers: int, use_cache: bool) -> dict[Job, dict]:
    """Facts of every job: from the cache where present, else compiled in a process pool."""
    results, todo = {}, {}
    os.makedirs(_cache_dir(), exist_ok=True)
    for job in jobs:
        path = os.path.join(_cache_dir(), _cache_key(job) + ".json")
        if use_cache and os.path.exists(path):
            with open(path) as f:
                results[job] = json.load(f)
        else:
            todo[job] = path
    if todo:
        print(f"compiling {len(todo)} configurations ({len(results)} cached) on {workers} processes ...", flush=True)
        ctx = multiprocessing.get_context("spawn")  # no fork of a process with LLVM/torch threads
        pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init)
        try:
            # the slow ones (many warps, big blocks) first, so the pool does not end on one straggler
            order = sorted(todo, key=lambda j: -j.num_warps * max((v for _, _, v in j.constexprs if type(v) is int), default=1))
            futures = {pool.submit(compile_job, job): job for job in order}
            for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
                job = futures[future]
                results[job] = result = future.result()
                if "error" not in result:  # errors are not cached: a rerun tries again
                    _write_atomic(todo[job], json.dumps(result))
                if done % 25 == 0 or done == len(todo):
                    print(f"  {done}/{len(todo)}", flush=True)
        except BaseException:  # e.g. Ctrl-C: drop what has not started
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
    return results


# ------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------

FIELDS = [
    "kernel", "arch", "constexprs", "num_warps", "num_stages", "dtype", "choosable", "regs_per_thread",
    "spill_store_bytes", "spill_load_bytes", "stack_bytes", "shared_bytes", "shared_limit_bytes",
    "blocks_per_sm", "occupancy_limit", "tensor_cores", "status", "example", "triton", "git_sha", "date",
]  # fmt: skip


def _git_sha() -> str:
    """Short commit of the checkout the kernels come from ("-dirty" with uncommitted changes)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        status = ["git", "status", "--porcelain", "--untracked-files=no"]
        dirty = subprocess.run(status, cwd=root, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def rows(results: dict[Job, dict], where: dict[Job, list[str]]) -> list[dict]:
    import triton

    date, sha = datetime.date.today().isoformat(), _git_sha()
    out = []
    for job in sorted(results, key=lambda j: (j.kernel, j.arch, j.dtype, str(j.constexprs), j.num_warps, j.num_stages)):
        arch, r = ARCHS[job.arch], results[job]
        row = dict(kernel=job.kernel, arch=arch.name, constexprs=" ".join(f"{n}={v}" for _, n, v in job.constexprs),
                   num_warps=job.num_warps, num_stages=job.num_stages, dtype=job.dtype, choosable=job.choosable,
                   shared_limit_bytes=arch.smem_per_block, example=where[job][0],
                   triton=triton.__version__, git_sha=sha, date=date)  # fmt: skip
        if "error" in r:
            row.update(status="compile error: " + r["error"].splitlines()[0][:200])
        else:
            blocks, limiter = blocks_per_sm(arch, r["regs"], r["shared"], job.num_warps)
            problems = []
            if r["spill_stores"] or r["spill_loads"]:
                problems.append("spills")
            if r["shared"] > arch.smem_per_block:
                problems.append("shared memory over the per-block limit")
            row.update(regs_per_thread=r["regs"], spill_store_bytes=r["spill_stores"], spill_load_bytes=r["spill_loads"],
                       stack_bytes=r["stack"], shared_bytes=r["shared"], blocks_per_sm=blocks, occupancy_limit=limiter,
                       tensor_cores=r["tensor_cores"], status="; ".join(problems) or "ok")  # fmt: skip
        out.append(row)
    return out


def failures(table: list[dict]) -> list[str]:
    """One message per choosable configuration that must not ship."""
    return [
        f"{r['kernel']} {r['arch']} {r['dtype']} [{r['constexprs']}] num_warps={r['num_warps']} num_stages={r['num_stages']}: "
        f"{r['status']} (regs {r.get('regs_per_thread', '-')}, spill {r.get('spill_store_bytes', '-')}+{r.get('spill_load_bytes', '-')} B, "
        f"shared {r.get('shared_bytes', '-')}/{r['shared_limit_bytes']} B; e.g. {r['example']})"
        for r in table
        if r["choosable"] and r["status"] != "ok"
    ]


def summary(table: list[dict]) -> str:
    lines = []
    for arch in sorted({r["arch"] for r in table}):
        for choosable in (True, False):
            sel = [r for r in table if r["arch"] == arch and r["choosable"] == choosable and "regs_per_thread" in r]
            errors = sum(1 for r in table if r["arch"] == arch and r["choosable"] == choosable and "regs_per_thread" not in r)
            if not sel and not errors:
                continue
            spilling = [r for r in sel if r["spill_store_bytes"] or r["spill_load_bytes"]]
            big = max(sel, key=lambda r: r["shared_bytes"], default=None)
            lines.append(
                f"{arch} {'choosable' if choosable else 'pruned   '}: {len(sel) + errors} configs, {errors} compile errors, "
                f"max {max((r['regs_per_thread'] for r in sel), default=0)} regs/thread, {len(spilling)} spill"
                + (f" (up to {max(r['spill_store_bytes'] + r['spill_load_bytes'] for r in spilling)} B)" if spilling else "")
                + (f", max shared {big['shared_bytes']} of {big['shared_limit_bytes']} B "
                   f"({big['kernel']} [{big['constexprs']}] w{big['num_warps']} s{big['num_stages']})" if big else "")
            )  # fmt: skip
    return "\n".join(lines)


def print_table(table: list[dict]) -> None:
    cols = [("kernel", "kernel", 27), ("arch", "arch", 5), ("dtype", "dtype", 5), ("constexprs", "constexprs", 62),
            ("num_warps", "w", 2), ("num_stages", "s", 2), ("choosable", "chosen", 6), ("regs_per_thread", "regs", 4),
            ("spill_store_bytes", "spill", 5), ("spill_load_bytes", "+load", 5), ("shared_bytes", "shared", 6),
            ("blocks_per_sm", "b/SM", 4), ("tensor_cores", "tc", 5), ("status", "status", 0)]  # fmt: skip
    print("  ".join(f"{label:<{w}}" for _, label, w in cols))
    for r in table:
        print("  ".join(f"{str(r.get(name, '-')):<{w}}" for name, _, w in cols))


_HEADER = (
    "# Compile-time facts of ditfast's Triton kernels (python -m ditfast.kernels.aot), read from the code Triton "
    "generates for each target without a GPU: registers, spills, shared memory, occupancy. Not speed.\n"
)


def write_csv(path: str, table: list[dict]) -> None:
    buf = io.StringIO()
    buf.write(_HEADER)
    writer = csv.DictWriter(buf, FIELDS, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(table)
    _write_atomic(path, buf.getvalue())


def _write_atomic(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _default_out() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "results", "kernels_static.csv")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ditfast.kernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="every shape of the sweep, not the default (CI) set")
    parser.add_argument("--all-configs", action="store_true",
                        help="also compile the autotune configs pruning drops (reported, never failing)")
    parser.add_argument("--arch", default="80,90", help="comma-separated compute capabilities (default 80,90)")
    parser.add_argument("--kernel", action="append", default=[], help="only kernels whose name contains this (repeatable)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: CPU count)")
    parser.add_argument("--out", default=_default_out(), help="CSV to write (default benchmarks/results/kernels_static.csv)")
    parser.add_argument("--no-cache", action="store_true", help="recompile everything")
    parser.add_argument("--quiet", action="store_true", help="print the summary only, not the table")
    args = parser.parse_args(argv)
    archs = [int(a) for a in args.arch.split(",")]
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        parser.error(f"unknown arch {unknown}; known: {sorted(ARCHS)}")

    start = time.time()
    where = enumerate_jobs(args.full, archs, args.all_configs)
    jobs = [j for j in where if not args.kernel or any(k in j.kernel for k in args.kernel)]
    print(f"{len(where)} distinct configurations from the launchers ({sum(j.choosable for j in where)} choosable), {len(jobs)} selected")
    results = compile_all(jobs, max(1, args.jobs), not args.no_cache)
    table = rows(results, where)
    if not args.quiet:
        print_table(table)
    write_csv(args.out, table)
    print(summary(table))
    print(f"wrote {args.out} ({len(table)} rows) in {time.time() - start:.0f} s")
    bad = failures(table)
    for message in bad:
        print(f"FAIL {message}", file=sys.stderr)
    if bad:
        print(f"{len(bad)} choosable configuration(s) fail the AOT check", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)  # before the kernel modules are imported (and decorated)
    sys.exit(main())
