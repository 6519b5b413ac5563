"""``ditfast check`` (also ``python -m ditfast.check``): every fast op this device supports, run at
real shapes against its float64 reference; a table, and a non-zero exit on any failure.

    ditfast check [--json OUT.json] [--small]

Checked, as the dispatch layer (``ditfast.ops.dispatch``) declares what can run here: the fused
adaLN ops forward and backward (Triton; also without a gate and as a standard affine LayerNorm,
as the adaLN, in-context and cross-attention block designs use them), every attention and
cross-attention backend forward and backward, every TMSA backend (DiffiT's attention) forward and
backward, the compiled patch ops and timestep embedding
(``ditfast._C``), and on
CUDA the CUDA-graph sampling loops (a DiT's step, and the EDM Heun sampler's two graphs on an
image-space DiffiT) against the same runs eagerly. On a GPU the shapes
are DiT-XL/2's (D 1152, 256 tokens, 16 heads of 72; head dim 64 as in DiT-B too); on a CPU (or
with ``--small``) small shapes, the Triton kernels under Triton's interpreter. What cannot be
checked here is listed with the reason: a user with a GPU runs this first.

Error: ``max|out - ref| / max|ref|`` against the op's plain-PyTorch reference in float64 on the same
inputs (for backward: every input gradient for one random output gradient, the worst one).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

from .cli import ArgumentParser, command, device_arg
from .files import check_output_file
from .precision import tf32

__all__ = ["Result", "TOLERANCE", "run_checks", "main"]

# Largest allowed error relative to the reference's scale, per dtype and pass. fp32 is checked with
# TF32 off (that is a separate, opt-in precision).
TOLERANCE = {
    ("fwd", torch.float32): 2e-5, ("bwd", torch.float32): 1e-4,
    ("fwd", torch.bfloat16): 2e-2, ("bwd", torch.bfloat16): 4e-2,
    ("fwd", torch.float16): 4e-3, ("bwd", torch.float16): 8e-3,
}  # fmt: skip


@dataclass
class Result:
    op: str
    backend: str
    shape: str
    dtype: str
    error: float | None  # None: not checked (see note)
    tolerance: float | None
    ok: bool | None  # None: not checked
    note: str = ""


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _rel(a: torch.Tensor, e: torch.Tensor) -> float:
    a, e = a.detach().double(), e.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


def _outputs(value) -> list[torch.Tensor]:
    return list(value) if isinstance(value, (tuple, list)) else [value]


def compare(op: str, backend: str, shape: str, fn: Callable, ref: Callable, inputs: Sequence[torch.Tensor],
            dtype: torch.dtype, backward: bool = True, fwd_tolerance: float | None = None) -> list[Result]:  # fmt: skip
    """Run ``fn`` on ``inputs`` cast to ``dtype`` and ``ref`` on them in float64; forward error and,
    with ``backward``, the worst input-gradient error for one random output gradient.
    ``fwd_tolerance`` overrides the dtype's forward tolerance."""
    xs = [t.detach().to(dtype).requires_grad_(backward) for t in inputs]
    rs = [t.detach().to(dtype).double().requires_grad_(backward) for t in inputs]  # the same values
    outs, refs = _outputs(fn(*xs)), _outputs(ref(*rs))
    fwd = max(_rel(o, r) for o, r in zip(outs, refs))
    tol = TOLERANCE["fwd", dtype] if fwd_tolerance is None else fwd_tolerance
    rows = [Result(op, backend, shape, _name(dtype), fwd, tol, fwd <= tol)]
    if backward:
        grads_out = [torch.randn_like(r) for r in refs]
        got = torch.autograd.grad(outs, xs, [g.to(o.dtype) for g, o in zip(grads_out, outs)], allow_unused=True)
        want = torch.autograd.grad(refs, rs, grads_out, allow_unused=True)
        bwd = max(_rel(g, w) for g, w in zip(got, want) if w is not None)
        rows.append(Result(f"{op} backward", backend, shape, _name(dtype), bwd, TOLERANCE["bwd", dtype], bwd <= TOLERANCE["bwd", dtype]))
    return rows


def _skip(op: str, backend: str, shape: str, dtype: str, why: str) -> Result:
    return Result(op, backend, shape, dtype, None, None, None, why)


# ------------------------------------------------------------------------------------------
# The checks
# ------------------------------------------------------------------------------------------


def check_adaln(device: torch.device, small: bool) -> list[Result]:
    from . import ops

    B, N, D = (2, 17, 64) if small else (4, 256, 1152)
    dtypes = [torch.float32] if small else [torch.float32, torch.bfloat16]
    shape = f"B{B} N{N} D{D}"
    reasons = ops.ADALN.backends["triton"].not_supported_reasons(ops.AdaLNProblem(str(device), torch.float32, D))
    if reasons:
        return [_skip("adaln", "triton", shape, "-", "not checked: " + "; ".join(reasons))]
    rows = []
    for dtype in dtypes:
        x, y = torch.randn(B, N, D, device=device), torch.randn(B, N, D, device=device)
        gate, shift, scale = (0.5 * torch.randn(B, D, device=device) for _ in range(3))
        rows += compare("adaln_layernorm", "triton", shape, ops.adaln_layernorm, ops.adaln_layernorm_ref, (x, shift, scale), dtype)
        rows += compare("gated_residual_adaln", "triton", shape, ops.gated_residual_adaln, ops.gated_residual_adaln_ref,
                        (x, y, gate, shift, scale), dtype)  # fmt: skip
        rows += compare("gated_residual", "triton", shape, ops.gated_residual, ops.gated_residual_ref, (x, y, gate), dtype)
        # what the other block designs add: the residual without a gate (adaLN), and a standard
        # LayerNorm's weight and bias as the modulation (in-context, cross-attention)
        ungated = lambda op: lambda x_, y_, shift_, scale_: op(x_, y_, None, shift_, scale_)  # noqa: E731
        rows += compare("gated_residual_adaln (no gate)", "triton", shape, ungated(ops.gated_residual_adaln),
                        ungated(ops.gated_residual_adaln_ref), (x, y, shift, scale), dtype)  # fmt: skip
        weight, bias = 1 + 0.5 * torch.randn(D, device=device), 0.5 * torch.randn(D, device=device)
        affine_ln = lambda x_, w, b: ops.adaln_layernorm(x_, *ops.affine_modulation(w, b, B))  # noqa: E731
        layer_norm = lambda x_, w, b: torch.nn.functional.layer_norm(x_, (D,), w, b, 1e-6)  # noqa: E731
        rows += compare("adaln_layernorm (affine)", "triton", shape, affine_ln, layer_norm, (x, weight, bias), dtype)
    return rows


def check_attention(device: torch.device, small: bool) -> list[Result]:
    from .attention import BACKENDS, AttentionProblem
    from .ops import packed_attention_ref

    # (B, N, H, Dh, dtypes): every dtype at XL/2 256px; bf16 at 512px and at head dim 64 (each new
    # shape or dtype costs the Triton kernel an autotuning run)
    every = (torch.bfloat16, torch.float16, torch.float32)
    cases = [(1, 17, 2, 72, (torch.float32,))] if small else [
        (4, 256, 16, 72, every), (4, 1024, 16, 72, (torch.bfloat16,)), (4, 256, 12, 64, (torch.bfloat16,))]
    rows = []
    for B, N, H, Dh, dtypes in cases:
        shape = f"B{B} N{N} H{H} Dh{Dh}"
        for dtype in dtypes:
            qkv = torch.randn(B, N, 3 * H * Dh, device=device)
            problem = AttentionProblem(str(device), dtype, H, Dh, needs_grad=True)
            rows += _every_backend("attention", BACKENDS, problem, shape, lambda b, q, h=H: b(q, h, Dh**-0.5),
                                   lambda q, h=H: packed_attention_ref(q, h, Dh**-0.5), (qkv,))  # fmt: skip
    return rows


def _every_backend(op: str, backends: dict, problem, shape: str, call: Callable, ref: Callable, inputs) -> list[Result]:
    """:func:`compare` of ``call(backend, *inputs)`` with ``ref`` for each backend that can run
    ``problem`` (an attention problem); a row with the reasons for each one that cannot."""
    rows = []
    for name, backend in backends.items():
        reasons = backend.not_supported_reasons(problem)
        if reasons:
            rows.append(_skip(op, name, shape, _name(problem.dtype), "not checked: " + "; ".join(reasons)))
            continue
        rows += compare(op, name, shape, lambda *xs, b=backend: call(b, *xs), ref, inputs, problem.dtype)
    return rows


def check_cross_attention(device: torch.device, small: bool) -> list[Result]:
    """Every cross-attention backend: T image-token queries to the 2 conditioning tokens."""
    from .attention import CROSS_BACKENDS, AttentionProblem, cross_attention_ref

    B, N, M, H, Dh = (1, 17, 2, 2, 72) if small else (4, 256, 2, 16, 72)
    dtypes = (torch.float32,) if small else (torch.bfloat16, torch.float16, torch.float32)
    shape = f"B{B} N{N} M{M} H{H} Dh{Dh}"
    rows = []
    for dtype in dtypes:
        q, kv = torch.randn(B, N, H * Dh, device=device), torch.randn(B, M, 2 * H * Dh, device=device)
        problem = AttentionProblem(str(device), dtype, H, Dh, needs_grad=True)
        rows += _every_backend("cross-attention", CROSS_BACKENDS, problem, shape, lambda b, q_, kv_: b.cross_attend(q_, kv_, H, Dh**-0.5),
                               lambda q_, kv_: cross_attention_ref(q_, kv_, H, Dh**-0.5), (q, kv))  # fmt: skip
    return rows


def check_tmsa(device: torch.device, small: bool) -> list[Result]:
    """Every TMSA backend (DiffiT's attention: time projection, relative position bias, windows)."""
    from .ops.tmsa import BACKENDS, TMSAProblem, tmsa_attention_ref

    # (B, grid, window, H, Dh, dtypes): the latent DiffiT-XL/2 at 256px in every dtype, 512px and
    # image-space windows in bf16
    every = (torch.bfloat16, torch.float16, torch.float32)
    cases = [(1, (4, 4), None, 2, 72, (torch.float32,)), (3, (4, 8), (2, 4), 2, 64, (torch.float32,))] if small else [
        (4, (16, 16), None, 16, 72, every), (2, (32, 32), None, 16, 72, (torch.bfloat16,)),
        (4, (32, 32), (8, 8), 16, 72, (torch.bfloat16,))]  # fmt: skip
    rows = []
    for B, grid, window, H, Dh, dtypes in cases:
        wh, ww = grid if window is None else window
        shape = f"B{B} grid{grid[0]}x{grid[1]} window{wh}x{ww} H{H} Dh{Dh}"
        kw = dict(grid=grid, window=window, scale=Dh**-0.5)
        for dtype in dtypes:
            qkv = torch.randn(B, grid[0] * grid[1], 3 * H * Dh, device=device)
            qkv_t = 0.5 * torch.randn(B, 3 * H * Dh, device=device)
            table = torch.randn((2 * wh - 1) * (2 * ww - 1), H, device=device)
            problem = TMSAProblem(str(device), dtype, H, Dh, True, True, (wh, ww) != grid, True)
            call = lambda b, q, t, tab: b(q, _shape(q, t, tab, H, grid, window), t, tab, Dh**-0.5)  # noqa: E731
            ref = lambda q, t, tab, h=H, kw=kw: tmsa_attention_ref(q, h, qkv_t=t, bias_table=tab, **kw)  # noqa: E731
            rows += _every_backend("tmsa", BACKENDS, problem, shape, call, ref, (qkv, qkv_t, table))
    return rows


def _shape(qkv, qkv_t, table, H, grid, window):
    from .ops.tmsa import check_tmsa_inputs

    return check_tmsa_inputs(qkv, H, qkv_t, table, grid, window)


def check_patch_ops(device: torch.device, small: bool) -> list[Result]:
    from . import ops

    B, C, S, p, D = (2, 4, 8, 2, 64) if small else (8, 4, 32, 2, 1152)
    shape = f"B{B} C{C} {S}x{S} p{p} D{D}"
    reasons = ops.PATCH.backends["compiled"].not_supported_reasons(ops.dispatch.OpProblem(str(device)))
    if reasons:
        return [_skip("patch ops", "ditfast._C", shape, "-", "not checked: " + "; ".join(reasons))]
    rows = []
    dtypes = [torch.float32] if small else [torch.float32, torch.bfloat16]
    T, out = (S // p) ** 2, 2 * C
    for dtype in dtypes:
        x, w, b = torch.randn(B, C, S, S, device=device), 0.2 * torch.randn(D, C, p, p, device=device), torch.randn(D, device=device)
        pos = torch.randn(1, T, D, device=device)
        rows += compare("patch_embed", "ditfast._C", shape, ops.patch_embed, ops.patch_embed_ref, (x, w, b, pos), dtype)
        tokens = torch.randn(B, T, p * p * out, device=device)
        rows += compare("unpatchify", "ditfast._C", shape, lambda t: ops.unpatchify(t, p, out),
                        lambda t: ops.unpatchify_ref(t, p, out), (tokens,), dtype)  # fmt: skip
        rows += compare("unpatchify_cfg", "ditfast._C", shape, lambda t: ops.unpatchify_cfg(t, p, out, 4.0),
                        lambda t: ops.unpatchify_cfg_ref(t, p, out, 4.0), (tokens,), dtype, backward=False)  # fmt: skip
    # Arguments t * f reach 999 rad, where one float32 ulp is 6.1e-5: float32 implementations that
    # round the frequencies differently differ by about that much, so 1e-4. (Fast-math sin/cos
    # would be far off; CI also checks the build uses none, tests/csrc/test_build_flags.py.)
    t = torch.linspace(0, 999, 2 * B, device=device)
    rows += compare("timestep_embedding", "ditfast._C", f"B{2 * B} dim256", lambda v: ops.timestep_embedding(v, 256),
                    lambda v: ops.timestep_embedding_ref(v, 256), (t,), torch.float32, backward=False,
                    fwd_tolerance=1e-4)  # fmt: skip
    return rows


def check_graph_step(device: torch.device, small: bool) -> list[Result]:
    """A captured CUDA-graph sampling run (4 steps) against the same engine run eagerly."""
    shape = "DiT-S/2 8x8 B2" if small else "DiT-B/2 32x32 B8"
    if device.type != "cuda":
        return [_skip("sampling step", "cuda graph", shape, "-", "not checked: CUDA graphs need a CUDA device"),
                _skip("EDM Heun", "cuda graph", "DiffiT-Digits8" if small else "DiffiT-Digits16", "-",
                      "not checked: CUDA graphs need a CUDA device")]  # fmt: skip
    from .models import DiT_models
    from .samplers import make_plan
    from .sampling import SamplingEngine, index_labels, index_noise

    name, side, B = ("DiT-S/2", 8, 2) if small else ("DiT-B/2", 32, 8)
    torch.manual_seed(0)
    with torch.device(device):
        model = _random_weights(DiT_models[name](input_size=side, num_classes=1000))
    plan = make_plan("ddim", 4, eta=1.0)  # stochastic: the graph also reads the per-step noise buffer
    labels = index_labels(0, range(B), 1000)
    z, noise = index_noise(0, range(B), (4, side, side), steps=plan.steps)
    engine = functools.partial(SamplingEngine, model, plan, batch_size=B, cfg_scale=4.0)
    return _graph_vs_eager("sampling step x4 (graph vs eager)", shape, engine, (z, labels, noise), device) + _check_edm_graph(device, small)


def _check_edm_graph(device: torch.device, small: bool) -> list[Result]:
    """The EDM Heun sampler's two captured graphs (Heun step, last step) against the same engine
    run eagerly: an image-space DiffiT, 4 stochastic steps (7 evaluations), CFG."""
    from .diffit_unet import DiffiTUNet_models
    from .edm import EDMEngine, make_edm_plan
    from .sampling import index_labels, index_noise

    name, B = ("DiffiT-Digits8", 2) if small else ("DiffiT-Digits16", 8)
    torch.manual_seed(0)
    with torch.device(device):
        model = _random_weights(DiffiTUNet_models[name]())
    side = model.input_size
    plan = make_edm_plan(4, s_churn=2.0)  # stochastic: the graphs also read the per-step noise buffer
    labels = index_labels(0, range(B), model.num_classes)
    z, noise = index_noise(0, range(B), (model.in_channels, side, side), steps=plan.steps)
    engine = functools.partial(EDMEngine, model, plan, batch_size=B, cfg_scale=2.0)
    return _graph_vs_eager("EDM Heun x4 (graph vs eager)", f"{name} {side}x{side} B{B}", engine, (z, labels, noise), device)


def _random_weights(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in eval mode with every trainable weight random (the inits zero adaLN and the
    output layers, which would hide differences); frozen ones (DiT's pos_embed) kept."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * (p[0].numel() ** -0.5 if p.dim() > 1 else 0.02))
    return model.eval().requires_grad_(False)


def _graph_vs_eager(op: str, shape: str, engine: Callable, inputs: tuple, device: torch.device) -> list[Result]:
    """A sampling engine (``engine(precision=, mode=)``) run on ``inputs`` = (z, labels, noise)
    eagerly and as CUDA graph(s), in fp32 and bf16: a row each with their max relative difference."""
    rows = []
    for precision in ("fp32", "bf16"):
        results = {mode: engine(precision=precision, mode=mode).run(*(t.to(device) for t in inputs)) for mode in ("eager", "graph")}
        err = _rel(results["graph"], results["eager"])
        # the same kernels on the same buffers: replay should be exact, but cuBLAS may pick another
        # algorithm under capture, so the dtype's forward tolerance (the error is printed either way)
        tol = TOLERANCE["fwd", torch.float32 if precision == "fp32" else torch.bfloat16]
        rows.append(Result(op, "cuda graph", shape, precision, err, tol, err <= tol))
    return rows


CHECKS = {"adaln": check_adaln, "attention": check_attention, "cross-attention": check_cross_attention,
          "tmsa": check_tmsa, "patch ops": check_patch_ops, "graph step": check_graph_step}  # fmt: skip


def run_checks(device: torch.device | str | None = None, small: bool | None = None, only: Sequence[str] | None = None) -> list[Result]:
    """Every check on ``device`` (default: CUDA if available, else CPU); small shapes on the CPU."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    small = device.type != "cuda" if small is None else small
    rows = []
    with tf32(False):  # fp32 means fp32 here
        torch.manual_seed(0)
        for name, check in CHECKS.items():
            if only and name not in only:
                continue
            try:
                rows += check(device, small)
            except Exception as exc:  # a crash is a failure of that check, and the others still run
                rows.append(Result(name, "-", "-", "-", None, None, False, f"crashed: {type(exc).__name__}: {exc}"))
    return rows


def format_table(rows: list[Result]) -> str:
    head = ("op", "backend", "shape", "dtype", "max error", "tolerance", "ok")
    body = [(r.op, r.backend, r.shape, r.dtype, "-" if r.error is None else f"{r.error:.2e}",
             "-" if r.tolerance is None else f"{r.tolerance:.0e}",
             {True: "ok", False: "FAIL", None: "skip"}[r.ok] + (f"  {r.note}" if r.note else ""))
            for r in rows]  # fmt: skip
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    widths[-1] = 0  # last column unpadded
    return "\n".join("  ".join(f"{c:<{w}}" for c, w in zip(line, widths)).rstrip() for line in (head, *body))


def _write_json(path: str, data: dict) -> None:
    """Through a temporary file in the same folder and a rename: never a half-written file."""
    from .files import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)

    atomic_write(path, write)


@command("ditfast check")
def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="ditfast check", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", type=device_arg, default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--small", action="store_true", help="small shapes on a GPU too (quick)")
    p.add_argument("--only", action="append", choices=tuple(CHECKS), help="run only this check (repeatable)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.json:
        check_output_file(args.json, overwrite=True, what="--json")  # its folder must exist: checked before the checks run
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton kernels run in Triton's interpreter
    t0 = time.perf_counter()
    rows = run_checks(device, small=True if args.small else None, only=args.only)
    from .info import collect

    info = collect()
    print(f"ditfast check on {info['device']} | torch {info['torch']} | triton {info['triton']}")
    print(format_table(rows))
    failed = [r for r in rows if r.ok is False]
    checked = [r for r in rows if r.ok is not None]
    skipped = len(rows) - len(checked)
    print(f"\ncheck: {len(checked) - len(failed)} ok, {len(failed)} FAILED, {skipped} not checked here ({time.perf_counter() - t0:.1f} s)")
    if args.json:
        _write_json(args.json, {"device": info["device"], "torch": info["torch"], "triton": info["triton"],
                                "rows": [asdict(r) for r in rows]})  # fmt: skip
    return 1 if failed or not checked else 0


if __name__ == "__main__":
    sys.exit(main())
