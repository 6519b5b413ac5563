"""Seeded random streams shared by training and sampling: :func:`generator` gives the CPU generator
of one (seed, stream...) tuple, so every draw is addressed by what it is for -- a training step
(seed, step), an epoch's data order (seed, -1, epoch), sample i's noise (seed, i) or its label
(seed, i, 1) -- and does not depend on batch sizes, rank counts or what was drawn before.
"""

from __future__ import annotations

import numbers

import torch

__all__ = ["SEED_MAX", "generator"]

SEED_MAX = 2**63 - 1  # seeds are 63-bit: larger ones would fold onto smaller ones' streams


def generator(seed: int, *stream: int) -> torch.Generator:
    """A CPU generator for one (seed, stream...) tuple, e.g. (seed, step). ``seed`` must lie in
    [0, SEED_MAX]: the mixing keeps 63 bits, so 2**63 would give the streams of seed 0."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= SEED_MAX:
        raise ValueError(f"seed must be an integer in [0, 2**63 - 1], got {seed!r}")
    state = seed & 0x7FFF_FFFF_FFFF_FFFF
    for value in stream:  # an LCG step per element: a fixed, platform-independent mixing
        state = (state * 6364136223846793005 + value + 1442695040888963407) % (1 << 63)
    return torch.Generator().manual_seed(state)
