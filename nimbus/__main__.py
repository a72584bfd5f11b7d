"""Command line: ``python -m nimbus compare | convert | bench``.

``python -m nimbus compare`` with no arguments runs the built-in task (sklearn
digits: 1377 training rows, 400 test rows, B = 20 held-out images) and prints
test NMSE, fit time and apply time for exact / pq / maddness / joint at several C.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np


def _int_list(text):
    try:
        vals = [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 8,16,32; got {text!r}")
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers; got {text!r}")
    return vals


def _load_npy(path, name):
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise SystemExit(f"error: {name} file not found: {path}")
    except ValueError as exc:
        raise SystemExit(f"error: cannot read {name} from {path}: {exc}")


def cmd_compare(args):
    import nimbus
    if args.files:
        if len(args.files) != 3:
            raise SystemExit("error: give three .npy files (A_train A_test B) or none "
                             "(the built-in digits task)")
        A_tr, A_te, B = (_load_npy(p, n) for p, n in zip(args.files, ("A_train", "A_test", "B")))
        source = " ".join(args.files)
    else:
        from nimbus.nn.data import digits_task
        A_tr, A_te, B = digits_task()
        source = "sklearn digits (built-in task)"
    methods = [m for m in args.method.replace(",", " ").split()]
    params = {"random_state": args.seed}
    if args.split:
        params["split"] = args.split
    try:
        table = nimbus.compare(A_tr, A_te, B, methods=methods, ncodebooks=args.ncodebooks,
                               verbose=not args.quiet, **params)
    except (ValueError, TypeError) as exc:
        raise SystemExit(f"error: {exc}")
    print(f"data: {source}")
    print(table)
    if args.plot:
        from nimbus import plotting
        ax = plotting.plot_tradeoff(table, x=args.plot_x)
        ax.figure.savefig(args.plot, dpi=120, bbox_inches="tight")
        print(f"plot written to {args.plot}")
    return 0


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m nimbus", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("compare", help="test NMSE and times of strategies on a task")
    p.add_argument("files", nargs="*", help="A_train.npy A_test.npy B.npy (default: digits)")
    p.add_argument("--method", default="exact,pq,maddness,joint",
                   help="comma-separated methods (default: exact,pq,maddness,joint)")
    p.add_argument("--ncodebooks", type=_int_list, default=[2, 4, 8, 16, 32],
                   help="comma-separated numbers of codebooks C (default: 2,4,8,16,32)")
    p.add_argument("--split", choices=["level", "node"], default=None,
                   help="tree split mode for tree methods")
    p.add_argument("--seed", type=int, default=0, help="random_state (default 0)")
    p.add_argument("--plot", metavar="OUT.png", default=None, help="also draw NMSE against C")
    p.add_argument("--plot-x", choices=["C", "time"], default="C",
                   help="x axis of --plot: C (default) or encode + lookup time")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_compare)
    from nimbus.nn.cli import add_parser as _add_convert; _add_convert(sub)  # noqa: E702
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
