"""Multi-process sampling: ``torchrun --nproc_per_node=N -m ditfast.sample_ddp [ditfast sample options]``.

The same run as ``ditfast sample`` (see :func:`ditfast.sampling.run`): every rank builds the model, the
shards of ``--shard-size`` consecutive sample indices are dealt round-robin to the ranks (NCCL on
GPUs, gloo on CPUs), each rank writes its finished shards atomically, a restarted run skips the
finished ones, and rank 0 merges ``samples.npz`` in index order. Sample i depends only on
(seed, i), so the images are the same for any number of ranks.
"""

from __future__ import annotations

import sys

from .sample_cli import main as _sample_main

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    return _sample_main(argv, prog="python -m ditfast.sample_ddp")


if __name__ == "__main__":
    sys.exit(main())
