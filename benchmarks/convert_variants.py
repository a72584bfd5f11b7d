"""Convert one float Fashion-MNIST MLP under several settings and print one line each.

    python benchmarks/convert_variants.py [--gpu] [--model FLOAT.npz] JSON [JSON ...]

Each JSON is a dict of extra keyword arguments of :func:`nimbus.nn.convert` (for example
``'{"depth": 8, "lut_form": "factored"}'``); the rest is the CLI's defaults: 3 DM epochs
per layer, 6 finetune epochs, batch 256, the test split for the reported accuracies, seed
0. The float model (784-256-256-256-10, 25 epochs with input noise 0.4, as ``python -m
nimbus convert`` trains it; ``--float-noise 0 --float-epochs 15``: the plain model) is
loaded from ``--model`` when the file exists, else trained and saved there, so every setting starts from the same weights. Prints each setting's table and a
``RESULT`` line (float, per-layer, finetune and final accuracies, conversion seconds).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import nimbus                                   # noqa: E402
from nimbus.arrays import backend               # noqa: E402
from nimbus.nn import convert, data, fit        # noqa: E402
from nimbus.nn.cli import build_mlp             # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("settings", nargs="+", help="JSON dicts of convert() keyword arguments")
    ap.add_argument("--model", default="float_mlp.npz", help="float model file (made if absent)")
    ap.add_argument("--gpu", action="store_true", help="convert on the GPU (CuPy)")
    ap.add_argument("--float-noise", type=float, default=0.4,
                    help="input noise while the float model trains (when it is made)")
    ap.add_argument("--float-epochs", type=int, default=25, help="float training epochs")
    args = ap.parse_args(argv)
    settings = [json.loads(s) for s in args.settings]
    Xtr, ytr, Xte, yte = data.load_fashion_mnist()
    if args.gpu:
        Xtr, ytr, Xte, yte = (backend.to_device(a) for a in (Xtr, ytr, Xte, yte))
    if not os.path.exists(args.model):
        model = build_mlp([784, 256, 256, 256, 10], seed=0)
        fit(model, Xtr, ytr, epochs=args.float_epochs, batch_size=256, lr=1e-3, random_state=0,
            input_noise=args.float_noise)
        nimbus.save(model, args.model)
    for extra in settings:
        model = nimbus.load(args.model)
        kw = dict(epochs_per_layer=3, finetune_epochs=6, batch_size=256,
                  validation=(Xte, yte), random_state=0)
        kw.update(extra)
        rep = convert(model, Xtr, ytr, **kw)
        print(rep.to_markdown())
        layers = [round(100 * r["accuracy"], 2) for r in rep.rows if r["stage"] == "layer"]
        ft = round(100 * rep.accuracy("finetune"), 2) if kw["finetune_epochs"] else None
        print("RESULT", json.dumps(extra), f"float {100 * rep.float_accuracy:.2f}",
              f"final {100 * rep.final_accuracy:.2f}", "layers", layers, "finetune", ft,
              f"convert_s {rep.conversion_seconds:.1f}", flush=True)


if __name__ == "__main__":
    main()
