"""``ditfast eval``: FID, sFID, precision/recall (and IS) with the ADM evaluator's semantics.

Outputs (``--make-ref OUT.npz``, ``--json OUT.json``) are checked before any work: an existing
file is replaced only with ``--overwrite``, and its folder must exist.
"""

from __future__ import annotations

import argparse
import sys

from ..cli import ArgumentParser, command, device_arg, int_at_least
from ..files import check_output_file

__all__ = ["main"]


def _eval(args: argparse.Namespace) -> int:
    from . import evaluate, load_logits_weight, make_reference

    if args.make_ref:
        if len(args.paths) != 1:
            raise ValueError("usage: ditfast eval --make-ref OUT.npz FOLDER_OR_NPZ (one source)")
        unused = [flag for flag, value in (("--is-weights", args.is_weights), ("--json", args.json)) if value]
        if unused:
            raise ValueError(f"{' and '.join(unused)} apply to an evaluation, not to --make-ref")
        out = make_reference(args.paths[0], args.make_ref, batch_size=args.batch_size, device=args.device,
                             progress=not args.no_progress, overwrite=args.overwrite)  # fmt: skip
        print(f"wrote {out}")
        return 0
    if len(args.paths) != 2:
        raise ValueError("usage: ditfast eval SAMPLES.npz REF.npz")
    if args.json:
        check_output_file(args.json, args.overwrite, "--json")
    weight = load_logits_weight(args.is_weights) if args.is_weights else None
    res = evaluate(*args.paths, batch_size=args.batch_size, device=args.device, progress=not args.no_progress, logits_weight=weight)
    for key, name in (("inception_score", "Inception Score"), ("fid", "FID"), ("sfid", "sFID"), ("precision", "Precision"), ("recall", "Recall")):
        if res[key] is not None:
            print(f"{name}: {res[key]:.6g}")
    for note in res["notes"]:
        print(note, file=sys.stderr)
    if args.json:
        from .npz import write_json

        write_json(args.json, res)
    return 0


@command("ditfast eval")
def main(argv: list[str] | None = None) -> int:
    p_eval = ArgumentParser(
        prog="ditfast eval", epilog="FID, sFID, precision/recall (and IS) of SAMPLES.npz against REF.npz, ADM evaluator semantics",
        description="ditfast eval SAMPLES.npz REF.npz   |   ditfast eval --make-ref OUT.npz FOLDER_OR_NPZ",
    )  # fmt: skip
    p_eval.add_argument("paths", nargs="+", metavar="PATH", help="SAMPLES.npz REF.npz, or with --make-ref the image folder / .npz")
    p_eval.add_argument("--make-ref", metavar="OUT.npz", help="write a reference batch (images + mu, sigma, mu_s, sigma_s)")
    p_eval.add_argument("--batch-size", type=int_at_least(1), default=64, help="images per Inception batch (default 64)")
    p_eval.add_argument("--device", type=device_arg, default=None, help="torch device (default: cuda when available)")
    p_eval.add_argument("--is-weights", metavar="W", help="(2048, K) logits weight (.npy/.npz/.pt) to also compute the Inception Score")
    p_eval.add_argument("--json", metavar="OUT.json", help="also write the results as JSON")
    p_eval.add_argument("--overwrite", action="store_true", help="replace an existing --make-ref or --json file")
    p_eval.add_argument("--no-progress", action="store_true", help="no progress bar")
    return _eval(p_eval.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
