"""Training-step throughput and peak memory: the official-equivalent path vs faster recipes vs ditfast.

    python benchmarks/bench_training.py [--model DiT-XL/2] [--batch 32] [--out results/training.csv]

One step = forward + backward (diffusion eps-MSE + VB loss) + AdamW step + EMA update, on random
32x32x4 latents. Providers:
  official fp32+tf32   eager, fp32 weights and math with TF32 matmuls (what the official train.py runs)
  eager bf16           eager, bf16 autocast over fp32 weights
  ckpt + bf16          the fast-DiT recipe: gradient checkpointing + bf16 autocast
  compile bf16         torch.compile(mode="max-autotune") of the eager model, bf16 autocast
  ditfast              the fused Triton adaLN kernels (and their backward), bf16 autocast
TFLOP/s = images/s * 3 * 2 * ditfast.gflops(model) * 1e9 (fwd+bwd = 3x forward; 2 flops per MAC).
Without a GPU it runs a small model on the CPU and says so; such rows only show that it runs.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _results import append_rows, device_name, row, time_fn  # noqa: E402

import ditfast  # noqa: E402
from ditfast.train import update_ema  # noqa: E402

PROVIDERS = ["official fp32+tf32", "eager bf16", "ckpt + bf16", "compile bf16", "ditfast"]


def make_step(name: str, batch: int, provider: str, device: torch.device, input_size: int):
    torch.manual_seed(0)
    model = ditfast.DiT_models[name](input_size=input_size, num_classes=1000).to(device)
    model.backend = "triton" if provider == "ditfast" else "eager"
    model.grad_checkpointing = provider == "ckpt + bf16"
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    net = torch.compile(model, mode="max-autotune") if provider == "compile bf16" else model
    diffusion = ditfast.create_diffusion("")
    bf16 = provider != "official fp32+tf32"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    x = torch.randn(batch, 4, input_size, input_size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)

    def step():
        t = torch.randint(0, 1000, (batch,), device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = diffusion.training_losses(net, x, t, model_kwargs=dict(y=y))["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        update_ema(ema, model, 0.9999)

    return model, step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="DiT-XL/2")
    parser.add_argument("--batch", type=int, default=32, help="per-GPU batch")
    parser.add_argument("--providers", nargs="*", default=PROVIDERS, choices=PROVIDERS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    name, batch, input_size = args.model, args.batch, 32
    providers = args.providers
    if not cuda:
        name, batch, input_size = "DiT-S/4", 4, 16
        providers = [p for p in providers if p in ("official fp32+tf32", "eager bf16")]
        print(f"no CUDA device: timing {name} at batch {batch} on the CPU ({', '.join(providers)}); "
              "these rows only show the script runs")  # fmt: skip
    out = args.out or os.path.join("results", f"training_{'gpu' if cuda else 'cpu'}.csv")
    print(f"device: {device_name(device)}")
    rows = []
    for provider in providers:
        model, step = make_step(name, batch, provider, device, input_size)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        timing = time_fn(step, device, warmup=3, reps=10 if cuda else 3)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        flops = batch * 3 * 2 * ditfast.gflops(model) * 1e9
        shape = f"B={batch},latent={input_size}x{input_size}x4,peak_mem_GiB={peak:.2f}"
        rows.append(row(f"{name} train step", shape, "bf16" if provider != "official fp32+tf32" else "fp32", provider, timing, device, flops=flops))
        print(f"{provider:>20}: {1e3 / timing[0]:.2f} steps/s, {batch * 1e3 / timing[0]:.1f} img/s, "
              f"{flops / timing[0] / 1e9:.1f} TFLOP/s, peak {peak:.2f} GiB")  # fmt: skip
        del model, step
    path = append_rows(out, rows)
    print(f"{len(rows)} rows appended to {path}")


if __name__ == "__main__":
    main()
