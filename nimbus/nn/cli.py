"""``python -m nimbus convert``: train an MLP and convert it to lookup tables.

Fashion-MNIST by default (the Debian package dataset-fashion-mnist, or the folder in
NIMBUS_FASHION_MNIST); ``--quick`` uses sklearn digits instead. Prints the accuracy
and time after every stage and layer (float, each layer, finetune, int8, folded).
"""
from __future__ import annotations

import argparse
import time


def _sizes(text):
    try:
        vals = [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layer widths like 256,256,256; got {text!r}")
    if min(vals, default=0) < 1:
        raise argparse.ArgumentTypeError(f"layer widths must be positive; got {text!r}")
    return vals


def add_parser(subparsers):
    """Add the ``convert`` subcommand to an argparse subparsers object.

    Every default comes from the recipe (:data:`nimbus.nn.recipe.DEFAULT`; ``--quick``:
    :data:`nimbus.nn.recipe.QUICK`): an option left out keeps the recipe's value."""
    from .recipe import DEFAULT as D, QUICK as Q
    p = subparsers.add_parser(
        "convert", help="train an MLP and convert every layer to lookup tables",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="sklearn digits and a small MLP instead of Fashion-MNIST")
    p.add_argument("--hidden", type=_sizes, default=None,
                   help="hidden widths (default 256,256,256; --quick: 64,32)")
    p.add_argument("--n-train", type=int, default=None, help="training rows (default: all)")
    p.add_argument("--n-test", type=int, default=None, help="test rows (default: all)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"float training epochs (default {D.float_epochs}; --quick: "
                        f"{Q.float_epochs})")
    p.add_argument("--epochs-per-layer", type=int, default=None,
                   help=f"DM epochs per converted layer (default {D.epochs_per_layer}; --quick: "
                        f"{Q.epochs_per_layer})")
    p.add_argument("--finetune-epochs", type=int, default=None,
                   help=f"epochs with every layer in DM (default {D.finetune_epochs}; --quick: "
                        f"{Q.finetune_epochs})")
    p.add_argument("--float-noise", type=float, default=None,
                   help="input noise of every layer while the float model trains, in "
                        "standard deviations of each input (makes it robust to quantized "
                        f"inputs; default {D.float_noise:g})")
    p.add_argument("--codebook-dim", type=int, default=None,
                   help=f"input dimensions per codebook: C = ceil(D / this) (default "
                        f"{D.codebook_dim})")
    p.add_argument("--depth", type=int, default=None,
                   help=f"tree depth, 1..10: 2**depth LUT rows per codebook (default "
                        f"{D.depth}; --quick: {Q.depth})")
    p.add_argument("--lut-form", choices=["free", "factored"], default=None,
                   help="DM LUT parameters while training: every entry (free) or "
                        "prototypes x weights (factored); default factored at depth >= 6, "
                        "free below (measured best on Fashion-MNIST)")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"default {D.batch_size} (--quick: {Q.batch_size})")
    p.add_argument("--lr", type=float, default=None,
                   help=f"DM step, relative (default {D.lr:g})")
    p.add_argument("--noise", type=float, default=None,
                   help="training-time input noise of the DM layers, in column standard "
                        f"deviations (default {D.noise:g}; 0 turns it off)")
    p.add_argument("--schedule", choices=["layerwise", "published"], default=None)
    p.add_argument("--no-int8", action="store_true", help="keep float LUTs")
    p.add_argument("--no-fold", action="store_true", help="do not fold BatchNorm/ReLU")
    p.add_argument("--gpu", action="store_true", help="train and convert on the GPU (CuPy)")
    p.add_argument("--seed", type=int, default=0, help="random_state (default 0)")
    p.add_argument("--save", metavar="MODEL.npz", default=None, help="save the converted model")
    p.add_argument("--markdown", action="store_true", help="print the report as markdown")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_convert)
    return p


def recipe_from_args(args):
    """The recipe of a ``convert`` command line: the default (or quick) recipe with the
    options given."""
    from . import recipe as R
    base = R.QUICK if args.quick else R.DEFAULT
    given = {"float_epochs": args.epochs, "epochs_per_layer": args.epochs_per_layer,
             "finetune_epochs": args.finetune_epochs, "float_noise": args.float_noise,
             "codebook_dim": args.codebook_dim, "depth": args.depth, "lut_form": args.lut_form,
             "batch_size": args.batch_size, "lr": args.lr, "noise": args.noise,
             "schedule": args.schedule}
    changes = {k: v for k, v in given.items() if v is not None}
    if args.no_int8:
        changes["int8"] = False
    if args.no_fold:
        changes["fold"] = False
    return base.replace(**changes).resolved()


def build_mlp(sizes, seed=0):
    """Sequential MLP: Linear -> BatchNorm -> ReLU per hidden layer, then Linear."""
    from . import layers as L
    mods = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        mods.append(L.Linear(a, b, random_state=seed + i))
        if i < len(sizes) - 2:
            mods += [L.BatchNorm(b), L.ReLU()]
    return L.Sequential(*mods)


def cmd_convert(args):
    import nimbus
    from . import convert, data, fit
    from ..arrays import backend
    quick = args.quick
    try:
        if quick:
            Xtr, ytr, Xte, yte = data.load_digits(random_state=args.seed)
            name = "sklearn digits"
        else:
            Xtr, ytr, Xte, yte = data.load_fashion_mnist(n_train=args.n_train, n_test=args.n_test)
            name = "Fashion-MNIST"
    except FileNotFoundError as exc:
        raise SystemExit(f"error: {exc}\n(use --quick for the built-in digits data)")
    if quick and args.n_train:
        Xtr, ytr = Xtr[:args.n_train], ytr[:args.n_train]
    if quick and args.n_test:
        Xte, yte = Xte[:args.n_test], yte[:args.n_test]
    hidden = args.hidden or ([64, 32] if quick else [256, 256, 256])
    try:
        recipe = recipe_from_args(args)
    except (ValueError, TypeError) as exc:
        raise SystemExit(f"error: {exc}")
    if args.gpu:
        if not backend.has_cuda():
            raise SystemExit("error: --gpu needs CuPy and a CUDA device")
        Xtr, ytr, Xte, yte = (backend.to_device(a) for a in (Xtr, ytr, Xte, yte))
    sizes = [Xtr.shape[1]] + hidden + [int(backend.to_host(ytr).max()) + 1]
    model = build_mlp(sizes, seed=args.seed)
    where = "GPU" if args.gpu else "CPU"
    print(f"data: {name}, train {tuple(Xtr.shape)}, test {tuple(Xte.shape)}, on the {where}")
    print(f"model: MLP {'-'.join(map(str, sizes))} (Linear -> BatchNorm -> ReLU); trees of "
          f"depth {recipe.depth} ({2 ** recipe.depth} LUT rows per codebook), {recipe.lut_form} "
          f"DM LUTs, DM input noise {recipe.noise:g}")
    try:
        t0 = time.perf_counter()
        fit(model, Xtr, ytr, epochs=recipe.float_epochs, batch_size=recipe.batch_size,
            lr=recipe.float_lr, random_state=args.seed, verbose=not args.quiet,
            input_noise=recipe.float_noise)
        train_s = time.perf_counter() - t0
        print(f"float training: {recipe.float_epochs} epochs, input noise "
              f"{recipe.float_noise:g}, in {train_s:.1f} s")
        report = convert(model, Xtr, ytr, recipe=recipe, validation=(Xte, yte),
                         random_state=args.seed, verbose=not args.quiet)
    except (ValueError, TypeError) as exc:
        raise SystemExit(f"error: {exc}")
    print(report.to_markdown() if args.markdown else report)
    drop = 100 * (report.float_accuracy - report.final_accuracy)
    print(f"float {100 * report.float_accuracy:.2f}% -> converted {100 * report.final_accuracy:.2f}% "
          f"({drop:.2f} points lost), conversion {report.conversion_seconds:.1f} s")
    if args.save:
        nimbus.save(model, args.save)
        print(f"model written to {args.save}")
    return 0
