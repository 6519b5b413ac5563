"""Attention backends on DiT shapes: forward and forward+backward time and TFLOP/s.

    python benchmarks/bench_attention.py [--out results/attention_gpu.csv] [--dtype bfloat16]
                                         [--backends triton sdpa-flash ...] [--no-backward]

Every provider starts from the packed qkv GEMM output (B, N, 3*H*Dh) and ends with the (B, N, H*Dh)
input of the output projection, exactly as ``ditfast.attention.attention`` runs it inside a DiT
block, so each backend is timed with the layout copies it needs (SDPA's strided views and output
transpose-copy; none for flash-attn, xformers and the Triton kernel). The Triton kernel is timed
with both head-dim layouts ("pad" 72 -> 128, "split" 72 -> 64 + 16), and "auto" is the dispatcher's
own choice (the provider column names what it picked).

FLOPs (the usual FlashAttention accounting, no softmax or masking):
    forward   4 * B * H * N^2 * Dh      (two matmuls, QK^T and PV, 2 FLOPs per multiply-add)
    backward  2.5 * forward             (five matmuls: recomputed QK^T, dV, dP, dS^T Q, dS K)
    fwd+bwd   3.5 * forward
ditfast's Triton backward, being atomic-free, actually runs seven matmuls; it is credited with the
same 2.5x so all backends are compared on the same work.

GPU shapes (bf16): DiT-XL/2 (H=16, Dh=72) at 256px (N=256) with batch 64 and 256 (a 128-image CFG
batch doubled), at 512px (N=1024, batch 32); DiT-L/2 (H=16, Dh=64) and DiT-B/2 (H=12, Dh=64) at
256px, batch 64. The script ends with a summary: the automatic choice against the best backend
(target: within 3%), Triton against the best SDPA kernel at N=256, Dh=72 (target: at least as fast),
pad against split, and the measured backend order as a line to paste into
``ditfast/attention.py``'s PRIORITY["cuda"].

Without a GPU the script still runs, on small fp32 shapes, and says so: those numbers are CPU
timings of torch's CPU kernels and mean nothing for GPUs.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _results import append_rows, device_name, row, time_fn  # noqa: E402

from ditfast import attention as attn  # noqa: E402

GPU_CASES = [  # (label, B, N, H, Dh)
    ("DiT-XL/2 256px", 64, 256, 16, 72),
    ("DiT-XL/2 256px CFG-doubled", 256, 256, 16, 72),
    ("DiT-XL/2 512px", 32, 1024, 16, 72),
    ("DiT-L/2 256px", 64, 256, 16, 64),
    ("DiT-B/2 256px", 64, 256, 12, 64),
]
CPU_CASES = [("small (CPU)", 2, 64, 4, 72), ("small (CPU)", 2, 64, 4, 64)]
FWD_BWD_FACTOR = 3.5  # forward + 2.5x forward for the backward


def forward_flops(B: int, N: int, H: int, Dh: int) -> int:
    return 4 * B * H * N * N * Dh


def providers(qkv: torch.Tensor, H: int, needs_grad: bool, only: list[str] | None):
    """(label, backend name, Triton head layout or None) for each backend that can run this problem."""
    problem = attn.AttentionProblem(str(qkv.device), qkv.dtype, H, qkv.shape[-1] // (3 * H), needs_grad)
    out, skipped = [], []
    for name, backend in attn.BACKENDS.items():
        if only and name not in only:
            continue
        reasons = backend.not_supported_reasons(problem)
        if reasons:
            skipped.append(f"{name}: {'; '.join(reasons)}")
        elif name == "triton":
            out += [(f"triton[{layout}]", name, layout) for layout in triton_kernels.HEAD_LAYOUTS]
        else:
            out.append((name, name, None))
    return out, skipped


try:  # the Triton kernels' head-dim layout is a module setting; the benchmark flips it per provider
    from ditfast.kernels import attention as triton_kernels

    DEFAULT_LAYOUT = triton_kernels.HEAD_LAYOUT
except ImportError:  # no triton: the "triton" backend reports itself unusable
    triton_kernels = DEFAULT_LAYOUT = None


def make_call(qkv: torch.Tensor, H: int, name: str, layout: str | None, backward: bool, dout: torch.Tensor):
    """A no-argument callable running one attention (and its backward) from packed qkv."""
    if triton_kernels is not None:
        triton_kernels.HEAD_LAYOUT = layout or DEFAULT_LAYOUT
    if not backward:
        return lambda: attn.attention(qkv, H, backend=name)
    leaf = qkv.detach().requires_grad_()

    def fwd_bwd():
        out = attn.attention(leaf, H, backend=name)
        return torch.autograd.grad(out, leaf, dout)  # no accumulation into .grad

    return fwd_bwd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="CSV to append rows to (default results/attention_<gpu|cpu>.csv)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"], help="default bf16 on GPU, fp32 on CPU")
    parser.add_argument("--backends", nargs="*", default=None, help=f"subset of {list(attn.BACKENDS)} (default: all that fit)")
    parser.add_argument("--no-backward", action="store_true", help="time the forward only")
    parser.add_argument("--quick", action="store_true", help="GPU: only DiT-XL/2 at N=256 (B 64) and N=1024 (B 32), head dim 72")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    cases = GPU_CASES if cuda else CPU_CASES
    if cuda and args.quick:
        cases = [c for c in GPU_CASES if c[0] in ("DiT-XL/2 256px", "DiT-XL/2 512px")]
    if not cuda:
        print("no CUDA device: timing torch's CPU attention on small fp32 shapes; these numbers mean nothing for GPUs")
    out_path = args.out or os.path.join("results", f"attention_{'gpu' if cuda else 'cpu'}.csv")
    print(f"device: {device_name(device)}, dtype {str(dtype).replace('torch.', '')}")

    rows = []
    times: dict[tuple, dict[str, float]] = defaultdict(dict)  # (case, mode) -> provider -> median ms
    auto_pick: dict[tuple, str] = {}
    modes = ["fwd"] if args.no_backward else ["fwd", "fwd+bwd"]
    for label, B, N, H, Dh in cases:
        g = torch.Generator(device=device).manual_seed(0)
        qkv = torch.randn(B, N, 3 * H * Dh, device=device, dtype=dtype, generator=g)  # a qkv GEMM output
        dout = torch.randn(B, N, H * Dh, device=device, dtype=dtype, generator=g)
        shape = f"B={B},N={N},H={H},Dh={Dh}"
        for mode in modes:
            backward = mode == "fwd+bwd"
            flops = forward_flops(B, N, H, Dh) * (FWD_BWD_FACTOR if backward else 1)
            found, skipped = providers(qkv, H, backward, args.backends)
            for line in skipped:
                print(f"  {label} {mode}: skip {line}")
            picked = attn.select_backend(qkv.detach().requires_grad_(backward), H).name
            auto_pick[(label, shape, mode)] = picked
            for provider, name, layout in found + [(f"auto ({picked})", "auto", None)]:
                fn = make_call(qkv, H, name, layout, backward, dout)
                try:
                    fn()  # first call: Triton compiles and autotunes here, outside the timing
                    if cuda:
                        torch.cuda.synchronize()
                    timing = time_fn(fn, device)
                except Exception as exc:  # noqa: BLE001  a backend that fails is reported, not fatal
                    print(f"  {label} {mode} {provider}: FAILED ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
                    continue
                times[(label, shape, mode)][provider] = timing[0]
                rows.append(row(f"attention {mode} ({label})", shape, dtype, provider, timing, device, flops=flops))
                print(f"{label:>28} {shape:>26} {mode:>7} {provider:>26}: {timing[0]:9.3f} ms  "
                      f"{flops / timing[0] / 1e9:7.1f} TFLOP/s")  # fmt: skip
        if cuda:
            del qkv, dout
            torch.cuda.empty_cache()
    path = append_rows(out_path, rows)
    print(f"{len(rows)} rows appended to {path}")
    summarize(times, auto_pick, suggest_priority=cuda)


def summarize(times: dict[tuple, dict[str, float]], auto_pick: dict[tuple, str], suggest_priority: bool) -> None:
    print("\nsummary")
    ratios: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))  # mode -> backend -> t/best
    for (label, shape, mode), by_provider in times.items():
        backends = {p: t for p, t in by_provider.items() if not p.startswith("auto")}
        if not backends:
            continue
        best_name, best = min(backends.items(), key=lambda kv: kv[1])
        auto_t = next((t for p, t in by_provider.items() if p.startswith("auto")), None)
        if auto_t is not None:
            print(f"  {label} {shape} {mode}: best {best_name} {best:.3f} ms; auto picked {auto_pick[(label, shape, mode)]} "
                  f"at {auto_t:.3f} ms = {100 * (auto_t / best - 1):+.1f}% vs best (target <= +3%)")  # fmt: skip
        sdpa = {p: t for p, t in backends.items() if p.startswith("sdpa")}
        tri = {p: t for p, t in backends.items() if p.startswith("triton")}
        if sdpa and tri:
            (bs, ts), (bt, tt) = min(sdpa.items(), key=lambda kv: kv[1]), min(tri.items(), key=lambda kv: kv[1])
            print(f"    {bt} {tt:.3f} ms vs best SDPA kernel {bs} {ts:.3f} ms: {ts / tt:.2f}x (target >= 1.00x at N=256, Dh=72)")
        if "triton[pad]" in tri and "triton[split]" in tri:
            print(f"    triton pad/split time: {tri['triton[pad]'] / tri['triton[split]']:.2f}")
        # a backend's score is its best layout's time relative to the case's best
        per_backend: dict[str, float] = {}
        for p, t in backends.items():
            name = p.split("[")[0]
            per_backend[name] = min(per_backend.get(name, math.inf), t)
        for name, t in per_backend.items():
            ratios[mode][name].append(t / best)
    if not suggest_priority:
        print("  (no priority suggestion off the GPU: the CPU list stays torch's own SDPA choice)")
        return
    for mode, by_backend in ratios.items():
        ranked = sorted(by_backend, key=lambda n: (n == "sdpa-math", math.exp(sum(map(math.log, by_backend[n])) / len(by_backend[n]))))
        ranked = [n for n in ranked if n != "sdpa"]  # torch's own pick is one of the explicit kernels
        rest = [n for n in attn.PRIORITY.get("cuda", []) if n not in ranked]
        scores = ", ".join(f"{n} {math.exp(sum(map(math.log, by_backend[n])) / len(by_backend[n])):.2f}x" for n in ranked)
        print(f"  measured order by {mode} (geometric mean of time / best): {scores}")
        print(f'    PRIORITY["cuda"] = {ranked + rest}  # from bench_attention.py {mode}')


if __name__ == "__main__":
    main()
