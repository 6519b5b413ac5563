"""The ``ditfast`` console command: ``ditfast COMMAND [ARGS]``; ``ditfast COMMAND --help`` for each."""

from __future__ import annotations

import importlib
import sys

__all__ = ["main", "COMMANDS"]

# command -> (module whose main(argv) runs it, one-line help). Modules load only when used.
COMMANDS = {
    "info": ("ditfast.info", "print versions, the device and which compiled ops and kernels are available"),
    "check": ("ditfast.check", "run every fast op this device supports against its float64 reference; a table, exit 1 on a failure"),
    "demo": ("ditfast.demo", "sample a grid of digits with the bundled model; print speed and quality"),
    "train": ("ditfast.train", "train a DiT (bundled digits, an image folder or latent shards)"),
    "extract-latents": ("ditfast.extract", "encode an image folder with a VAE into latent shards for training"),
    "eval": ("ditfast.metrics.cli", "FID, sFID, precision/recall (and IS) of SAMPLES.npz against REF.npz"),
    "sample": ("ditfast.sample_cli", "sample images (DDPM, DDIM, DPM-Solver++; CUDA-graph loop) into PNGs and an ADM .npz"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "usage: ditfast COMMAND [ARGS]\n\nFast, drop-in Diffusion Transformers.\n\ncommands:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"ditfast: unknown command {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
