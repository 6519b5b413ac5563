"""DiffiT's TMSA (time projection + relative position bias + windows): the fused Triton kernel vs
torch SDPA with a float mask vs the plain-PyTorch reference, forward and forward+backward.

    python benchmarks/bench_tmsa.py [--out results/tmsa_gpu.csv] [--dtype bfloat16] [--quick]
                                    [--providers triton sdpa eager] [--no-backward]

Every provider starts from the packed qkv GEMM output (B, N, 3*D), the time projection (B, 3*D)
and the ((2w-1)^2, H) table, and ends with the (B, N, D) input of the output projection, as
``ditfast.ops.tmsa.tmsa_attention`` runs it: "triton" reads qkv in place; "sdpa" adds qkv_t in a
pass over qkv, builds an (H, L, L) mask from the table and (windows) copies into window order and
back; "eager" is the reference (fp32 math). Before timing, each provider's forward output is
compared with the reference on the same inputs (max|out - ref| / max|ref|; the script exits 1 if
the fused kernel is over the dtype's tolerance).

FLOPs (FlashAttention accounting: matmuls only, no softmax, bias or masking), L = tokens per window:
    forward   4 * B * H * N * L * Dh     (QK^T and PV; L = N for global attention)
    fwd+bwd   3.5 * forward              (backward credited 2.5x, as bench_attention.py does; the
                                          fused backward runs 7 matmuls + 2 for the table gradient)

GPU shapes (bf16): DiffiT-XL/2 (16 heads of 72) at 256px (16x16 tokens, global, batch 64) and
512px (32x32 tokens, global, batch 16); image-space windowed attention (32x32 tokens in 8x8
windows, 8 heads of 64, batch 64). Without a GPU: small fp32 shapes, and the numbers are CPU
timings that mean nothing for GPUs (the Triton kernel runs on the CPU only under the interpreter;
it is skipped with its reason).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _results import append_rows, device_name, row, time_fn  # noqa: E402

from ditfast.ops import tmsa as T  # noqa: E402

GPU_CASES = [  # (label, B, grid, window, H, Dh)
    ("DiffiT-XL/2 256px", 64, (16, 16), None, 16, 72),
    ("DiffiT-XL/2 512px", 16, (32, 32), None, 16, 72),
    ("image-space 8x8 windows", 64, (32, 32), (8, 8), 8, 64),
]
CPU_CASES = [("small (CPU)", 2, (8, 8), None, 4, 72), ("small windowed (CPU)", 2, (8, 8), (4, 4), 4, 64)]
FWD_BWD_FACTOR = 3.5
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 2e-5}  # as ``ditfast check``


def forward_flops(B: int, N: int, L: int, H: int, Dh: int) -> int:
    return 4 * B * H * N * L * Dh


def rel_error(a: torch.Tensor, e: torch.Tensor) -> float:
    a, e = a.detach().double(), e.detach().double()
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="CSV to append rows to (default results/tmsa_<gpu|cpu>.csv)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"], help="default bf16 on GPU, fp32 on CPU")
    parser.add_argument("--providers", nargs="*", default=["triton", "sdpa", "eager"], help="TMSA backends to time")
    parser.add_argument("--no-backward", action="store_true", help="time the forward only")
    parser.add_argument("--quick", action="store_true", help="GPU: DiffiT-XL/2 256px and the windowed case only")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    cases = GPU_CASES if cuda else CPU_CASES
    if cuda and args.quick:
        cases = [GPU_CASES[0], GPU_CASES[2]]
    if not cuda:
        print("no CUDA device: timing on small fp32 CPU shapes; these numbers mean nothing for GPUs")
    out_path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"tmsa_{'gpu' if cuda else 'cpu'}.csv")
    print(f"device: {device_name(device)}, dtype {str(dtype).replace('torch.', '')}")

    rows, failed = [], False
    modes = ["fwd"] if args.no_backward else ["fwd", "fwd+bwd"]
    for label, B, grid, window, H, Dh in cases:
        wh, ww = grid if window is None else window
        N, L, D = grid[0] * grid[1], wh * ww, H * Dh
        g = torch.Generator(device=device).manual_seed(0)
        qkv = torch.randn(B, N, 3 * D, device=device, dtype=dtype, generator=g)
        qkv_t = 0.5 * torch.randn(B, 3 * D, device=device, dtype=dtype, generator=g)
        table = 0.02 * torch.randn((2 * wh - 1) * (2 * ww - 1), H, device=device, generator=g)  # fp32, as the parameter
        dout = torch.randn(B, N, D, device=device, dtype=dtype, generator=g)
        kw = dict(grid=grid, window=window)
        shape = f"B={B},grid={grid[0]}x{grid[1]},window={wh}x{ww},H={H},Dh={Dh}"
        ref = T.tmsa_attention_ref(qkv, H, qkv_t=qkv_t, bias_table=table, **kw)
        for mode in modes:
            backward = mode == "fwd+bwd"
            flops = forward_flops(B, N, L, H, Dh) * (FWD_BWD_FACTOR if backward else 1)
            problem = T.TMSAProblem(str(device), dtype, H, Dh, True, True, (wh, ww) != grid, backward)
            for name in args.providers:
                reasons = T.BACKENDS[name].not_supported_reasons(problem)
                if reasons:
                    print(f"  {label} {mode}: skip {name}: {'; '.join(reasons)}")
                    continue
                leaves = [x.detach().requires_grad_(backward) for x in (qkv, qkv_t, table)]

                def call(name=name, leaves=leaves, backward=backward):
                    out = T.tmsa_attention(leaves[0], H, qkv_t=leaves[1], bias_table=leaves[2], **kw, backend=name)
                    return torch.autograd.grad(out, leaves, dout) if backward else out

                try:
                    if not backward:  # correctness first (the first call also compiles and autotunes)
                        err = rel_error(call(), ref)
                        ok = err <= TOLERANCE[dtype] or name == "eager"
                        failed |= name == "triton" and not ok
                        print(f"  {label} {name}: forward error vs reference {err:.2e} (tolerance {TOLERANCE[dtype]:.0e}) "
                              f"{'ok' if ok else 'FAIL'}")  # fmt: skip
                    else:
                        call()
                    if cuda:
                        torch.cuda.synchronize()
                    timing = time_fn(call, device)
                except Exception as exc:  # noqa: BLE001  a provider that fails is reported, not fatal
                    print(f"  {label} {mode} {name}: FAILED ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
                    failed |= name == "triton"
                    continue
                rows.append(row(f"tmsa {mode} ({label})", shape, dtype, name, timing, device, flops=flops))
                print(f"{label:>26} {shape:>44} {mode:>7} {name:>7}: {timing[0]:9.3f} ms  {flops / timing[0] / 1e9:7.2f} TFLOP/s")
        if cuda:
            del qkv, qkv_t, dout, ref
            torch.cuda.empty_cache()
    path = append_rows(out_path, rows)
    print(f"{len(rows)} rows appended to {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
