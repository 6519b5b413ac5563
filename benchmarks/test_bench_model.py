"""Eager DiT forward (the official math) at a few configs: the baseline later paths are compared to.

TFLOP/s uses ditfast.gflops (multiply-accumulates, the paper's convention) x 2 flops per MAC.
"""

from __future__ import annotations

import pytest
import torch

import ditfast

CASES = [
    # (model, image size -> latent size / 8, batch)
    ("DiT-S/2", 256, 2),
    ("DiT-S/4", 256, 8),
    ("DiT-B/4", 256, 2),
]


@pytest.mark.parametrize("name,image_size,batch", CASES, ids=[f"{n}-{s}px-b{b}" for n, s, b in CASES])
def test_eager_forward(benchmark, record, name, image_size, batch):
    torch.manual_seed(0)
    latent = image_size // 8
    model = ditfast.DiT_models[name](input_size=latent, num_classes=1000).eval()
    x = torch.randn(batch, 4, latent, latent)
    t = torch.randint(0, 1000, (batch,))
    y = torch.randint(0, 1000, (batch,))

    def run():
        with torch.inference_mode():
            model(x, t, y)

    benchmark.pedantic(run, rounds=10, warmup_rounds=2, iterations=1)
    record(
        benchmark, file="model_forward_cpu.csv", what=f"{name} forward", shape=f"B={batch},{image_size}px",
        dtype="float32", provider="ditfast eager", flops=2e9 * ditfast.gflops(name, image_size) * batch, device="cpu",
    )  # fmt: skip
