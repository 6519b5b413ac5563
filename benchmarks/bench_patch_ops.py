"""Patch ops of ditfast._C vs the eager op sequences they replace (and torch.compile of those).

    python benchmarks/bench_patch_ops.py [--out results/patch_ops_gpu.csv] [--dtype bfloat16]
        [--batches 1,8,32,64,256] [--compile-mode max-autotune | none]

GPU: DiT-XL/2 shapes (p=2, C=4 in, 8 out, D=1152), latents 32x32 (256 tokens, 256px images) and
64x64 (1024 tokens, 512px), model batch B (after CFG doubling) in --batches. Ops and the eager
sequences they are measured against:

  patch_embed fwd   Conv2d + flatten(2).transpose(1, 2) + pos_embed add (DiT.forward's first line)
  patch_embed bwd   weight and bias gradients (training; the latents need no gradient)
  unpatchify        DiT.unpatchify: reshape + einsum('nhwpqc->nchpwq') + reshape
  unpatchify_cfg    DiT.forward_with_cfg after the final layer: unpatchify, split, guided combine
                    on channels [:3], cat -- full batch (the official output) and half batch

Providers: "ditfast" (the compiled op), "eager" (the sequence above), "torch.compile <mode>" of
that sequence, and a device-to-device copy of the op's output size as the bandwidth ceiling.
GB/s counts the bytes an op must move (BYTES below); "% of copy" compares it with the copy's
GB/s at the same size. Without a GPU the script runs small CPU shapes and says so: those rows
time the C++ CPU ops and say nothing about the CUDA kernels.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _results import append_rows, device_name, row, time_fn  # noqa: E402

from ditfast import ops  # noqa: E402
from ditfast._ext import op_available  # noqa: E402

P, C_IN, C_OUT, D = 2, 4, 8, 1152  # DiT-XL/2


def eager_patch_embed(x, w, b, pos):
    return F.conv2d(x, w, b, stride=P).flatten(2).transpose(1, 2) + pos


def eager_cfg(tokens, full_batch):
    return ops.unpatchify_cfg_ref(tokens, P, C_OUT, 4.0, 3, full_batch)  # the official math


def cases(latent: int, B: int, dtype, device):
    """(name, nbytes, {provider-independent callables}) for one shape."""
    T = (latent // P) ** 2
    x = torch.randn(B, C_IN, latent, latent, device=device, dtype=dtype)
    w = torch.randn(D, C_IN, P, P, device=device, dtype=dtype) * 0.25
    b = torch.randn(D, device=device, dtype=dtype)
    pos = torch.randn(1, T, D, device=device, dtype=dtype)
    tokens = torch.randn(B, T, P * P * C_OUT, device=device, dtype=dtype)
    size = x.element_size()
    # bytes each op must move: inputs read once, outputs written once
    embed_bytes = (x.numel() + w.numel() + b.numel() + pos.numel() + B * T * D) * size
    out = {
        "patch_embed fwd": (embed_bytes, B * T * D * size, lambda: ops.patch_embed(x, w, b, pos), lambda: eager_patch_embed(x, w, b, pos)),
        "unpatchify": (2 * tokens.numel() * size, tokens.numel() * size, lambda: ops.unpatchify(tokens, P, C_OUT),
                       lambda: ops.unpatchify_ref(tokens, P, C_OUT)),
    }  # fmt: skip
    if B % 2 == 0:
        for full in (True, False):
            written = tokens.numel() // (1 if full else 2)
            out[f"unpatchify_cfg {'full' if full else 'half'}"] = (
                (tokens.numel() + written) * size, written * size,
                lambda full=full: ops.unpatchify_cfg(tokens, P, C_OUT, 4.0, 3, full_batch=full),
                lambda full=full: eager_cfg(tokens, full),
            )  # fmt: skip
    # training: gradients of weight and bias through one retained graph per provider
    wl, bl = w.detach().requires_grad_(), b.detach().requires_grad_()
    grad = torch.randn(B, T, D, device=device, dtype=dtype)
    bwd_bytes = (grad.numel() + x.numel() + w.numel() + b.numel()) * size

    def backward_of(fn):
        y = fn(x, wl, bl, pos)
        return lambda: torch.autograd.grad(y, (wl, bl), grad, retain_graph=True)

    out["patch_embed bwd"] = (bwd_bytes, grad.numel() * size, backward_of(ops.patch_embed), backward_of(eager_patch_embed))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="CSV to append rows to (default results/patch_ops_<cpu|gpu>.csv)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--batches", default=None, help="comma-separated model batch sizes (default GPU 1,8,32,64,256; CPU 2,8)")
    parser.add_argument("--compile-mode", default="max-autotune", help='torch.compile mode of the eager sequences, or "none"')
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype)
    if not op_available(device):
        print(f"warning: ditfast._C has no {device.type} ops here: the 'ditfast' rows time the PyTorch fallback")
    if cuda:
        latents, batches = [32, 64], [1, 8, 32, 64, 256]
    else:
        latents, batches = [32], [2, 8]
        print("no CUDA device: timing the C++ CPU ops on small shapes; these rows say nothing about the CUDA kernels")
    if args.batches:
        batches = [int(b) for b in args.batches.split(",")]
    compile_mode = None if args.compile_mode == "none" or not cuda else args.compile_mode
    ditfast_name = "ditfast CUDA" if cuda else "ditfast C++ CPU"
    out = args.out or os.path.join("results", f"patch_ops_{'gpu' if cuda else 'cpu'}.csv")
    print(f"device: {device_name(device)}, dtype {args.dtype}, DiT-XL/2 (p={P}, D={D})")

    rows = []
    for latent in latents:
        for B in batches:
            shape = f"B={B},latent={latent}x{latent},T={(latent // P) ** 2},D={D}"
            for what, (nbytes, out_bytes, fused, eager) in cases(latent, B, dtype, device).items():
                src = torch.empty(out_bytes // 2, device=device, dtype=torch.float16)
                dst = torch.empty_like(src)
                t_copy = time_fn(lambda: dst.copy_(src), device)
                copy_gbps = 2 * out_bytes / t_copy[0] / 1e6
                rows.append(row(f"copy ({what} output size)", shape, dtype, "torch copy_", t_copy, device, nbytes=2 * out_bytes))
                providers = {ditfast_name: fused, "eager": eager}
                if compile_mode is not None and what != "patch_embed bwd":
                    providers[f"torch.compile {compile_mode}"] = torch.compile(eager, mode=compile_mode)
                timings = {}
                for provider, fn in providers.items():
                    timings[provider] = t = time_fn(fn, device)
                    rows.append(row(what, shape, dtype, provider, t, device, nbytes=nbytes))
                line = f"{shape:>36} {what:>20}:"
                for provider, t in timings.items():
                    line += f"  {provider} {t[0] * 1e3:9.1f} us ({nbytes / t[0] / 1e6 / copy_gbps:4.0%} of copy)"
                speedups = [f"x{timings[p][0] / timings[ditfast_name][0]:.2f} vs {p}" for p in timings if p != ditfast_name]
                print(line + "  | " + ", ".join(speedups))
    path = append_rows(out, rows)
    print(f"{len(rows)} rows appended to {path}")


if __name__ == "__main__":
    main()
