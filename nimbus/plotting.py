"""Plots (matplotlib imported lazily). Every function takes ax=None and returns ax."""
from __future__ import annotations


def _axes(ax):
    if ax is None:
        import matplotlib
        if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
            pass
        import matplotlib.pyplot as plt
        _, ax = plt.subplots(figsize=(5, 3.5))
    return ax


def plot_tradeoff(table, ax=None, x="C", y="nmse", logy=True):
    """NMSE against C (or any two columns) from a :func:`nimbus.compare` table.

    One line per method; the "exact" row (no C) is skipped when x is "C".

    Returns
    -------
    matplotlib Axes
    """
    ax = _axes(ax)
    methods = []
    for r in table:
        if r["method"] not in methods:
            methods.append(r["method"])
    for m in methods:
        pts = sorted((r[x], r[y]) for r in table.where(method=m) if r.get(x) is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    if x == "C":
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.legend()
    ax.grid(True, alpha=0.3)
    return ax
