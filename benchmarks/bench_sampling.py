"""Sampling throughput: the official loop vs faster recipes vs diffusers vs the ditfast engine.

    python benchmarks/bench_sampling.py [--model DiT-XL/2 | DiffiT-XL/2] [--batches 8 32 128] [--samplers ddpm ddim dpm-solver++]
        [--providers ...] [--cfg-scale 1.5] [--out results/sampling_gpu.csv]

DiT-XL/2 at 256px (32x32x4 latents) with random weights (speed does not depend on them), CFG 1.5
(the model runs on the doubled batch), 250 DDPM, 50 DDIM and 20 DPM-Solver++ steps, batch 8/32/128.
What is timed is one denoising step (model forward on the 2B batch + CFG combine + sampler update)
with CUDA-event / do_bench timing after warm-up; images/s = B / (steps * step time), and
TFLOP/s = 2 * B * 2 * ditfast.gflops(model) * 1e9 / step time (2B model rows per step, 2 flops per
multiply-accumulate). Steady state: graph capture, compilation and the VAE decode are not in it.
``--end-to-end`` also times whole ``SamplingEngine.run`` calls of ditfast at batch 32.

Providers (bf16 = bf16 autocast over fp32 weights unless said otherwise):
  official fp32+tf32   create_diffusion(...).p_sample / ddim_sample on the doubled state with
                       model.forward_with_cfg, eager ops, fp32 with TF32 (what the official sample.py runs)
  eager bf16           the same loop, bf16 autocast
  compile bf16         the same loop, torch.compile(model.forward_with_cfg, mode="max-autotune")
  diffusers bf16       the same loop driving diffusers' DiTTransformer2DModel (bf16 weights, random
                       init: speed does not depend on the weights), CFG on all 4 channels as DiTPipeline does
  diffusers compile    the same, torch.compile(mode="max-autotune")
  ditfast eager        ditfast.SamplingEngine, bf16 weights cast once, eager loop
  ditfast              ditfast.SamplingEngine, CUDA-graph mode (the default on CUDA)
  ditfast compile      ditfast.SamplingEngine, torch.compile mode
The official code has no DPM-Solver++: for that sampler the first three providers run the ditfast
engine's eager loop with the official (eager-op) model in the same precision, compiled for the third.
The dense bf16 GEMM rate (8192^3 matmul) is measured in the same run, for the 60% target at batch 32.
``--model DiffiT-XL/2`` times the latent DiffiT release instead (``ditfast.DiffiT``: TMSA blocks, its
guidance rule, power-cosine at 256px): the official providers drive the release's math (the TMSA
reference, ``backend="eager"``) through the same loop, ditfast its fused TMSA kernel and the engine;
diffusers has no DiffiT, so its providers are left out, and said so.
Without a GPU it runs a tiny model on the CPU and says so; such rows only show that it runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _results import append_rows, device_name, row, time_fn  # noqa: E402

import ditfast  # noqa: E402
from ditfast.engine import SamplingEngine  # noqa: E402
from ditfast.samplers import make_plan  # noqa: E402

PROVIDERS = ["official fp32+tf32", "eager bf16", "compile bf16", "diffusers bf16", "diffusers compile",
             "ditfast eager", "ditfast", "ditfast compile"]  # fmt: skip
STEPS = {"ddpm": 250, "ddim": 50, "dpm-solver++": 20}
OFFICIAL = ("official fp32+tf32", "eager bf16", "compile bf16")


REGISTRY = {**ditfast.DiT_models, **ditfast.DiffiT_models}


def build_model(name: str, input_size: int, device: torch.device) -> ditfast.DiT | ditfast.DiffiT:
    """A registry DiT or DiffiT with random weights, the zero-initialised layers included (no degenerate zeros)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = REGISTRY[name](input_size=input_size, num_classes=1000)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and not p.any():
                p.normal_(std=0.02)
    return model.eval().requires_grad_(False)


def build_diffusers(model: ditfast.DiT, device: torch.device):
    """diffusers' DiTTransformer2DModel of the same shape, bf16, or None with the reason printed."""
    try:
        from diffusers import DiTTransformer2DModel
    except ImportError as exc:
        print(f"diffusers providers skipped: diffusers is not importable ({exc})")
        return None
    hidden, heads = model.pos_embed.shape[-1], model.num_heads
    torch.manual_seed(0)
    net = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=model.in_channels,
                                out_channels=model.out_channels, num_layers=len(model.blocks), sample_size=model.input_size,
                                patch_size=model.patch_size, num_embeds_ada_norm=model.num_classes)  # fmt: skip
    return net.to(device=device, dtype=torch.bfloat16).eval().requires_grad_(False)


def guided_fn(provider: str, model: ditfast.DiT, diffusers_net, cfg_scale: float):
    """The ``model(x, t, y)`` callable the official loop drives, for a provider of that loop."""
    if provider.startswith("diffusers"):
        net = torch.compile(diffusers_net, mode="max-autotune") if "compile" in provider else diffusers_net
        channels = model.in_channels

        def diffusers_cfg(x, t, y):  # DiTPipeline's guidance: all latent channels, variance passed through
            half = x[: len(x) // 2]
            out = net(torch.cat([half, half]).to(torch.bfloat16), timestep=t, class_labels=y, return_dict=False)[0].float()
            eps, rest = out[:, :channels], out[:, channels:]
            cond, uncond = eps.chunk(2)
            guided = uncond + cfg_scale * (cond - uncond)
            return torch.cat([torch.cat([guided, guided]), rest], dim=1)

        return diffusers_cfg
    fn = torch.compile(model.forward_with_cfg, mode="max-autotune") if provider == "compile bf16" else model.forward_with_cfg
    bf16 = provider != "official fp32+tf32"

    def official_cfg(x, t, y):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            return fn(x, t, y, cfg_scale).float()

    return official_cfg


def official_step(provider, sampler, steps, model, diffusers_net, batch, cfg_scale, device):
    """One step of the official loop at a mid-schedule timestep, on the doubled state (the model with
    its official math, ``backend="eager"``; timed before any other provider changes it)."""
    model.backend = "eager"
    diffusion = ditfast.create_diffusion(str(steps))
    fn = guided_fn(provider, model, diffusers_net, cfg_scale)
    x = torch.randn(2 * batch, model.in_channels, model.input_size, model.input_size, device=device)
    y = torch.cat([torch.randint(0, 1000, (batch,), device=device), torch.full((batch,), 1000, device=device)])
    t = torch.full((2 * batch,), steps // 2, dtype=torch.long, device=device)
    step = diffusion.p_sample if sampler == "ddpm" else diffusion.ddim_sample

    def one():
        with torch.no_grad():
            step(fn, x, t, clip_denoised=False, model_kwargs=dict(y=y))

    return one


def engine_for(provider, sampler, steps, model, batch, cfg_scale, device):
    """A ditfast SamplingEngine for a ditfast provider, or the eager engine with the official model
    and the official provider's precision (for DPM-Solver++, which the official code lacks)."""
    mode = {"ditfast": "graph" if device.type == "cuda" else "eager", "ditfast eager": "eager", "ditfast compile": "compile"}
    if provider in OFFICIAL:
        model.backend = "eager"
        precision = "tf32" if provider == "official fp32+tf32" else "bf16"
        engine = SamplingEngine(model, make_plan(sampler, steps), batch_size=batch, cfg_scale=cfg_scale,
                                precision=precision, mode="compile" if provider == "compile bf16" else "eager")  # fmt: skip
    else:
        model.backend = "auto"
        engine = SamplingEngine(model, make_plan(sampler, steps), batch_size=batch, cfg_scale=cfg_scale,
                                precision="bf16" if device.type == "cuda" else "fp32", mode=mode[provider])  # fmt: skip
    engine.prepare()
    mid = steps // 2

    def one():
        engine.k.fill_(mid)
        engine.step()

    return engine, one


def gemm_rate(device: torch.device) -> float:
    """Dense bf16 matmul TFLOP/s (8192^3 on CUDA; 1024^3 fp32 on the CPU)."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    med, _, _ = time_fn(lambda: a @ b, device)
    return 2 * n**3 / med / 1e9


def end_to_end(engine: SamplingEngine, device: torch.device, reps: int = 2) -> float:
    """Seconds per whole ``run`` (loading the batch, all steps, copying out), median of ``reps``."""
    plan, B = engine.plan, engine.batch_size
    shape = tuple(engine.x.shape[1:])
    z, labels = torch.randn(B, *shape), torch.randint(0, 1000, (B,))
    noise = torch.randn(plan.steps, B, *shape) if plan.stochastic else None
    engine.run(z, labels, noise)  # warm-up
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.run(z, labels, noise)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="DiT-XL/2", choices=list(REGISTRY), metavar="NAME",
                        help="a DiT_models or DiffiT_models name (default: %(default)s)")
    parser.add_argument("--batches", type=int, nargs="*", default=[8, 32, 128], help="images per batch (before CFG doubling)")
    parser.add_argument("--samplers", nargs="*", default=list(STEPS), choices=list(STEPS))
    parser.add_argument("--providers", nargs="*", default=PROVIDERS, choices=PROVIDERS)
    parser.add_argument("--cfg-scale", type=float, default=1.5)
    parser.add_argument("--end-to-end", action="store_true", help="also time whole engine runs of ditfast at batch 32")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    name, input_size, batches, steps = args.model, 32, args.batches, dict(STEPS)
    providers = args.providers
    if not cuda:
        name, input_size, batches, steps = f"{name.split('-')[0]}-S/4", 16, [2], {"ddpm": 10, "ddim": 5, "dpm-solver++": 4}
        providers = [p for p in providers if p in ("official fp32+tf32", "ditfast eager", "ditfast")]
        print(f"no CUDA device: timing {name} at {input_size * 8}px, batch {batches[0]}, fewer steps, on the CPU "
              f"({', '.join(providers)}; 'ditfast' runs the eager loop); these rows only show the script runs")  # fmt: skip
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    out = args.out or os.path.join("results", f"sampling_{'gpu' if cuda else 'cpu'}.csv")
    print(f"device: {device_name(device)}")
    model = build_model(name, input_size, device)
    per_image_forward = ditfast.gflops(model)
    if isinstance(model, ditfast.DiffiT) and any(p.startswith("diffusers") for p in providers):
        print("diffusers providers skipped: diffusers has no DiffiT model")
        providers = [p for p in providers if not p.startswith("diffusers")]
    diffusers_net = build_diffusers(model, device) if any(p.startswith("diffusers") for p in providers) else None
    if diffusers_net is None:
        providers = [p for p in providers if not p.startswith("diffusers")]
    peak = gemm_rate(device)
    print(f"dense {'bf16' if cuda else 'fp32'} GEMM rate: {peak:.1f} TFLOP/s")
    rows, table = [], {}
    for batch in batches:
        flops_per_step = 2 * batch * 2 * per_image_forward * 1e9
        for provider in providers:
            for sampler in args.samplers:
                S = steps[sampler]
                if provider in OFFICIAL and sampler != "dpm-solver++":
                    fn = official_step(provider, sampler, S, model, diffusers_net, batch, args.cfg_scale, device)
                elif provider.startswith("diffusers") and sampler == "dpm-solver++":
                    fn = official_step(provider, "ddim", S, model, diffusers_net, batch, args.cfg_scale, device)  # same model cost
                else:
                    _, fn = engine_for(provider, sampler, S, model, batch, args.cfg_scale, device)
                fn()  # compile / autotune / first-call work outside the timing
                timing = time_fn(fn, device, warmup=2, reps=5 if cuda else 3)
                ips = batch * 1e3 / (timing[0] * S)
                tflops = flops_per_step / timing[0] / 1e9
                table[(batch, provider, sampler)] = (ips, tflops)
                shape = f"B={batch},cfg={args.cfg_scale},steps={S},latent={input_size}x{input_size}x4,images_per_s={ips:.3f}"
                dtype = "fp32" if provider == "official fp32+tf32" or not cuda else "bf16"
                rows.append(row(f"{name} sampling step ({sampler})", shape, dtype, provider, timing, device, flops=flops_per_step))
                print(f"B={batch:>4} {sampler:>13} {provider:>20}: {timing[0]:8.2f} ms/step, {ips:9.2f} images/s, "
                      f"{tflops:8.3g} TFLOP/s ({100 * tflops / peak:.0f}% of the GEMM rate)")  # fmt: skip
    if args.end_to_end and "ditfast" in providers:
        batch = 32 if cuda else batches[0]
        for sampler in args.samplers:
            engine, _ = engine_for("ditfast", sampler, steps[sampler], model, batch, args.cfg_scale, device)
            seconds = end_to_end(engine, device)
            print(f"end to end, ditfast, B={batch}, {sampler} {steps[sampler]} steps: {batch / seconds:.2f} images/s "
                  f"({seconds:.2f} s per batch, noise and labels already on the host)")  # fmt: skip
            shape = f"B={batch},cfg={args.cfg_scale},steps={steps[sampler]},whole run,images_per_s={batch / seconds:.3f}"
            flops = 2 * batch * 2 * per_image_forward * 1e9 * steps[sampler]
            rows.append(row(f"{name} sampling run ({sampler})", shape, "bf16" if cuda else "fp32", "ditfast", (seconds * 1e3,) * 3, device, flops=flops))
    for batch in batches:
        for sampler in args.samplers:
            mine = table.get((batch, "ditfast", sampler))
            if mine is None:
                continue
            ref = table.get((batch, "official fp32+tf32", sampler))
            peers = [table[(batch, p, sampler)] for p in ("compile bf16", "diffusers bf16", "diffusers compile") if (batch, p, sampler) in table]
            parts = [f"B={batch} {sampler}: ditfast {mine[0]:.2f} images/s"]
            if ref:
                parts.append(f"{mine[0] / ref[0]:.2f}x official (target >= 3x)")
            if peers:
                parts.append(f"{mine[0] / max(p[0] for p in peers):.2f}x the best compiled/diffusers peer (target >= 1.2x)")
            parts.append(f"{100 * mine[1] / peak:.0f}% of the dense GEMM rate" + (" (target >= 60% at B=32)" if batch == 32 else ""))
            print(", ".join(parts))
    path = append_rows(out, rows)
    print(f"{len(rows)} rows appended to {path}")


if __name__ == "__main__":
    main()
