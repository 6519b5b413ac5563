"""The ``ditfast`` console command: ``ditfast COMMAND [ARGS]``; ``ditfast COMMAND --help`` for each.

Errors, in one place for every subcommand (:func:`command` wraps each one's ``main``): a user
mistake (a bad option, a missing or existing file, an unusable checkpoint, a device this machine
lacks, an op no backend can run, a missing optional dependency) ends the command with one line,
``ditfast COMMAND: error: MESSAGE``, on stderr and exit status 2, argparse's status for a usage
error; no traceback. ``--traceback`` (anywhere on the command line) or ``DITFAST_TRACEBACK=1``
shows the traceback instead, for debugging. Anything else is a bug and raises as usual.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import math
import os
import sys

__all__ = ["main", "COMMANDS", "command", "ArgumentParser", "int_at_least", "float_in", "device_arg", "folder_arg", "EXIT_USER_ERROR"]

EXIT_USER_ERROR = 2  # as argparse exits for a usage error
TRACEBACK_FLAG, TRACEBACK_ENV = "--traceback", "DITFAST_TRACEBACK"

# command -> (module whose main(argv) runs it, one-line help). Modules load only when used.
COMMANDS = {
    "info": ("ditfast.info", "print versions, the device and which compiled ops and kernels are available"),
    "check": ("ditfast.check", "run every fast op this device supports against its float64 reference; a table, exit 1 on a failure"),
    "demo": ("ditfast.demo", "sample a grid of digits with the bundled model; print speed and quality"),
    "train": ("ditfast.train", "train a DiT or a DiffiT (bundled digits, an image folder or latent shards; DiffiT-Digits16 ...: image-space, EDM)"),
    "extract-latents": ("ditfast.extract", "encode an image folder with a VAE into latent shards for training"),
    "eval": ("ditfast.metrics.cli", "FID, sFID, precision/recall (and IS) of SAMPLES.npz against REF.npz"),
    "sample": ("ditfast.sample_cli", "sample images (DDPM, DDIM, DPM-Solver++, EDM Heun; CUDA-graph loop) into PNGs and an ADM .npz"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "usage: ditfast COMMAND [ARGS]\n\nFast, drop-in Diffusion Transformers.\n\ncommands:\n" + "\n".join(lines)


def _user_errors() -> tuple[type[BaseException], ...]:
    from .errors import CheckpointError, DeviceError
    from .ops.dispatch import BackendError

    return (ValueError, TypeError, ImportError, FileNotFoundError, FileExistsError, IsADirectoryError,
            NotADirectoryError, PermissionError, CheckpointError, DeviceError, BackendError)  # fmt: skip


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return "; ".join(lines) if lines else type(exc).__name__


def command(prog: str):
    """Decorator for a subcommand's ``main(argv) -> int``: strips ``--traceback`` from ``argv``,
    turns a user error into ``PROG: error: MESSAGE`` on stderr and exit status 2, and returns
    argparse's exit status (usage error, ``--help``) instead of raising SystemExit."""

    def wrap(main):
        @functools.wraps(main)
        def run(argv: list[str] | None = None, *args, **kwargs) -> int:
            argv = list(sys.argv[1:] if argv is None else argv)
            show = TRACEBACK_FLAG in argv or os.environ.get(TRACEBACK_ENV, "0") not in ("", "0")
            argv = [a for a in argv if a != TRACEBACK_FLAG]
            try:
                return main(argv, *args, **kwargs)
            except SystemExit as exc:  # argparse (usage error, --help): a status to return, in process too
                return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USER_ERROR)
            except _user_errors() as exc:
                if show:
                    raise
                print(f"{kwargs.get('prog', prog)}: error: {_one_line(exc)}", file=sys.stderr)
                return EXIT_USER_ERROR

        return run

    return wrap


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a usage error reported as one line (``--help`` prints the usage)."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (--help for usage)\n")


def int_at_least(lo: int):
    """argparse type: an integer >= ``lo``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {lo}"
    return parse


def float_in(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False):
    """argparse type: a finite number in the interval (``lo``/``hi`` None: unbounded)."""
    left = "(" if lo_open or lo is None else "["
    right = ")" if hi_open or hi is None else "]"
    interval = f"{left}{'-inf' if lo is None else f'{lo:g}'}, {'inf' if hi is None else f'{hi:g}'}{right}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        ok = math.isfinite(value) and (lo is None or (value > lo if lo_open else value >= lo)) \
            and (hi is None or (value < hi if hi_open else value <= hi))  # fmt: skip
        if not ok:
            raise argparse.ArgumentTypeError(f"expected a number in {interval}, got {text!r}")
        return value

    parse.__name__ = f"number in {interval}"
    return parse


def device_arg(text: str) -> str:
    """argparse type: a device that exists on this machine (resolved by ditfast.errors.resolve_device)."""
    from .errors import resolve_device

    try:
        return str(resolve_device(text, what="device"))
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(_one_line(exc)) from None


def folder_arg(text: str) -> str:
    """argparse type: an output folder (missing is fine; an existing file is not)."""
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is an existing file; expected a folder")
    return text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if TRACEBACK_FLAG in argv[:1]:  # ditfast --traceback COMMAND ...: the subcommand's wrapper reads it
        argv = [*argv[1:], TRACEBACK_FLAG]
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
