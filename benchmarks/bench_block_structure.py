"""Does fusing across block boundaries pay? DiT's per-block structure vs the cross-block one.

    python benchmarks/bench_block_structure.py [--model DiT-XL/2] [--batch 64] [--out results/block_structure_gpu.csv]

Both run the same fused Triton adaLN kernels, attention and GEMMs, bf16 autocast, forward only
(a sampling step's model call):

  per-block      ``DiT.forward``: each block computes its six adaLN vectors from its own
                 ``adaLN_modulation`` and runs norm1+modulate, attention, gated residual+norm2+
                 modulate, MLP, gated residual (three fused kernels per block)
  cross-block    the structure ditfast used before: every block's adaLN vectors from one GEMM
                 over weights concatenated once (a second copy of them), and each MLP residual
                 fused with the next block's norm1 (two fused kernels per block, one read of x less)

The cross-block structure is written out below for this measurement only; it comes back into
``models.py`` only if this shows it pays on a GPU. Without a GPU it runs DiT-S/2 at 8x8 latents on
the CPU (the ops' PyTorch fallback) and says so: those rows only show that the script runs.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _results import append_rows, device_name, row, time_fn  # noqa: E402

from ditfast import DiT_models, gflops, ops  # noqa: E402
from ditfast.models import DiT, patch_ops_enabled  # noqa: E402


def stacked_modulation(model: DiT) -> tuple[torch.Tensor, torch.Tensor]:
    """Every adaLN Linear (blocks, then the final layer) stacked into one weight and bias: the copy
    the cross-block structure keeps."""
    linears = [b.adaLN_modulation[1] for b in model.blocks] + [model.final_layer.adaLN_modulation[1]]
    return torch.cat([lin.weight for lin in linears]), torch.cat([lin.bias for lin in linears])


def cross_block_forward(model: DiT, stacked, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """DiT.forward with the one-GEMM modulation and each MLP residual fused into the next LayerNorm."""
    fused_patch = patch_ops_enabled(model.backend, x.device)
    if fused_patch:
        h0 = ops.patch_embed(x, model.x_embedder.proj.weight, model.x_embedder.proj.bias, model.pos_embed)
    else:
        h0 = model.x_embedder(x) + model.pos_embed  # (B, T, D)
    c = model.t_embedder(t) + model.y_embedder(y, False)  # (B, D)
    D = c.shape[1]
    flat = F.linear(F.silu(c), *stacked).split(D, dim=1)  # depth * 6 + 2 vectors of (B, D)
    mods = [flat[6 * i : 6 * i + 6] for i in range(len(model.blocks))] + [flat[-2:]]
    x, h = h0, ops.adaln_layernorm(h0, mods[0][0], mods[0][1])
    for i, block in enumerate(model.blocks):
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[i]
        x, h = ops.gated_residual_adaln(x, block.attn(h), gate_msa, shift_mlp, scale_mlp)
        x, h = ops.gated_residual_adaln(x, block.mlp(h), gate_mlp, *mods[i + 1][:2])
    tokens = model.final_layer.linear(h)  # (B, T, p*p*C_out)
    if fused_patch:
        return ops.unpatchify(tokens, model.patch_size, model.out_channels)
    return model.unpatchify(tokens)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="DiT-XL/2")
    parser.add_argument("--batch", type=int, default=64, help="model batch (a CFG-doubled 32-image batch by default)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    name, batch, size = args.model, args.batch, 32
    if not cuda:
        name, batch, size = "DiT-S/2", 4, 8
        print(f"no CUDA device: timing {name} at {size}x{size} latents, batch {batch}, on the CPU; these rows only show the script runs")
    torch.manual_seed(0)
    with torch.device(device):
        model = DiT_models[name](input_size=size, num_classes=1000).eval().requires_grad_(False)
        with torch.no_grad():  # random weights everywhere (the official init zeroes adaLN)
            for pname, p in model.named_parameters():
                if pname != "pos_embed":
                    p.copy_(torch.randn_like(p) * (p[0].numel() ** -0.5 if p.dim() > 1 else 0.02))
        x = torch.randn(batch, 4, size, size)
        t = torch.randint(0, 1000, (batch,))
        y = torch.randint(0, 1000, (batch,))
    stacked = stacked_modulation(model)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    with torch.no_grad(), autocast:
        a, b = model(x, t, y), cross_block_forward(model, stacked, x, t, y)
        err = ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
        print(f"per-block vs cross-block outputs: max rel difference {err:.2e}")
        if err > (3e-2 if cuda else 1e-4):
            sys.exit(f"the two structures disagree ({err:.2e}): not timing them")
        timings = {
            "per-block": time_fn(lambda: model(x, t, y), device, warmup=3, reps=10 if cuda else 3),
            "cross-block": time_fn(lambda: cross_block_forward(model, stacked, x, t, y), device, warmup=3, reps=10 if cuda else 3),
        }
    flops = 2 * batch * gflops(model) * 1e9
    rows = [row(f"{name} forward", f"B={batch},latent={size}x{size}x4", "bf16" if cuda else "fp32", provider, tm, device, flops=flops)
            for provider, tm in timings.items()]  # fmt: skip
    for provider, tm in timings.items():
        print(f"{provider:>12}: {tm[0]:.3f} ms (p20 {tm[1]:.3f}, p80 {tm[2]:.3f}), {flops / tm[0] / 1e9:.1f} TFLOP/s")
    ratio = timings["per-block"][0] / timings["cross-block"][0]
    print(f"per-block / cross-block time: {ratio:.3f} on {device_name(device)}")
    out = args.out or os.path.join("results", f"block_structure_{'gpu' if cuda else 'cpu'}.csv")
    print(f"{len(rows)} rows appended to {append_rows(out, rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
