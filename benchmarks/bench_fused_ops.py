"""Fused adaLN ops vs the eager op sequences they replace (and torch.compile of those), fwd and bwd.

    python benchmarks/bench_fused_ops.py [--out results/fused_ops.csv] [--dtype bfloat16]

GPU: DiT-XL/2 shapes (D=1152; B in {32, 128} at N=256 (256px) and B=32 at N=1024 (512px)),
providers "ditfast triton", "eager" (the official op sequence) and "torch.compile max-autotune" of
that sequence, plus a device-to-device copy of the same number of bytes as the bandwidth ceiling.
Achieved GB/s counts the bytes each op must move (listed in BYTES below).

Without a GPU the script still runs, on small shapes, and says so: there the "ditfast" provider
is the PyTorch fallback of the ops, not a Triton kernel, so the CPU rows measure nothing about
the kernels.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _results import append_rows, device_name, row, time_fn  # noqa: E402

from ditfast import ops  # noqa: E402

# (B, N, D) tensors read + written per call, in units of B*N*D elements
BYTES = {
    ("adaln_layernorm", "fwd"): 2, ("gated_residual_adaln", "fwd"): 4, ("gated_residual", "fwd"): 3,
    ("adaln_layernorm", "bwd"): 3, ("gated_residual_adaln", "bwd"): 6, ("gated_residual", "bwd"): 4,
}  # fmt: skip
OPS = {
    "adaln_layernorm": (ops.adaln_layernorm, ops.adaln_layernorm_ref, lambda x, y, g, sh, sc: (x, sh, sc)),
    "gated_residual_adaln": (ops.gated_residual_adaln, ops.gated_residual_adaln_ref, lambda x, y, g, sh, sc: (x, y, g, sh, sc)),
    "gated_residual": (ops.gated_residual, ops.gated_residual_ref, lambda x, y, g, sh, sc: (x, y, g)),
}


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="CSV to append rows to (default results/fused_ops_<cpu|gpu>.csv)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    parser.add_argument("--quick", action="store_true", help="GPU: only B=32, N=256, D=1152")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype)
    if cuda:
        cases = [(32, 256, 1152)] if args.quick else [(32, 256, 1152), (128, 256, 1152), (32, 1024, 1152)]
        status = ops.triton_status(device)
        if status is not None:
            sys.exit(f"the Triton kernels cannot run here: {status}")
    else:
        cases = [(4, 256, 1152)]
        print("no CUDA device: timing the ops' PyTorch fallback on the CPU; these rows say nothing about the Triton kernels")
    out = args.out or os.path.join("results", f"fused_ops_{'gpu' if cuda else 'cpu'}.csv")
    print(f"device: {device_name(device)}, dtype {args.dtype}")

    rows = []
    for B, N, D in cases:
        x = torch.randn(B, N, D, device=device, dtype=dtype)
        y = torch.randn(B, N, D, device=device, dtype=dtype)
        mod = torch.randn(B, 6 * D, device=device, dtype=dtype)
        g, sh, sc = mod[:, :D], mod[:, D : 2 * D], mod[:, 2 * D : 3 * D]
        shape = f"B={B},N={N},D={D}"
        elems = B * N * D * x.element_size()
        copy_src = torch.randn(B * N * D * 3, device=device, dtype=dtype)  # 3 tensors' worth
        copy_dst = torch.empty_like(copy_src)
        t_copy = time_fn(lambda: copy_dst.copy_(copy_src), device)
        copy_bytes = 2 * copy_src.numel() * copy_src.element_size()
        rows.append(row("device copy", f"{copy_src.numel()} elems", dtype, "torch copy_", t_copy, device, nbytes=copy_bytes))
        copy_gbps = copy_bytes / t_copy[0] / 1e6
        for name, (fused, ref, pick) in OPS.items():
            inputs = pick(x, y, g, sh, sc)
            providers = {"ditfast triton" if cuda else "ditfast (CPU fallback)": fused, "eager": ref}
            if cuda and not args.no_compile:
                providers["torch.compile max-autotune"] = torch.compile(ref, mode="max-autotune")
            for provider, fn in providers.items():
                t_fwd = time_fn(lambda: fn(*inputs), device)
                nbytes = BYTES[(name, "fwd")] * elems
                rows.append(row(f"{name} fwd", shape, dtype, provider, t_fwd, device, nbytes=nbytes))
                # backward: grads of every floating input, through one retained graph
                leaves = [t.detach().requires_grad_() for t in (x, y, mod)]
                lx, ly, lmod = leaves
                linputs = pick(lx, ly, lmod[:, :D], lmod[:, D : 2 * D], lmod[:, 2 * D : 3 * D])
                outs = as_tuple(fn(*linputs))
                grads = [torch.randn_like(o) for o in outs]
                used = [t for t in leaves if any(t is u or (u._base is t) for u in linputs)]
                t_bwd = time_fn(lambda: torch.autograd.grad(outs, used, grads, retain_graph=True), device)
                rows.append(row(f"{name} bwd", shape, dtype, provider, t_bwd, device, nbytes=BYTES[(name, "bwd")] * elems))
                print(f"{shape:>22} {name:>21} {provider:>28}: fwd {t_fwd[0] * 1e3:8.1f} us "
                      f"({nbytes / t_fwd[0] / 1e6 / copy_gbps:5.1%} of copy bw), bwd {t_bwd[0] * 1e3:8.1f} us")  # fmt: skip
    path = append_rows(out, rows)
    print(f"{len(rows)} rows appended to {path}")


if __name__ == "__main__":
    main()
