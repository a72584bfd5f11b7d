"""Plots (matplotlib imported lazily). Every function takes ax=None and returns ax."""
from __future__ import annotations

_LABELS = {"C": "codebooks C", "nmse": "test NMSE", "fit_s": "fit time (s)",
           "apply_s": "encode + lookup time (s)", "lut_bytes": "LUT bytes"}
_ALIASES = {"time": "apply_s"}


def _axes(ax):
    if ax is None:
        import matplotlib.pyplot as plt   # lazy: importing nimbus never needs matplotlib
        _, ax = plt.subplots(figsize=(5.5, 3.8), layout="constrained")
    return ax


def plot_tradeoff(table, ax=None, x="C", y="nmse", logy=True, title=None):
    """Test NMSE against C (or against time), one line per method.

    Parameters
    ----------
    table : :class:`nimbus.table.Table` from :func:`nimbus.compare` (rows with
        ``method`` and the columns named by x and y)
    ax : matplotlib Axes, optional (default: a new figure)
    x : "C" (default), "apply_s" (or "time": encode + lookup seconds), "fit_s",
        "lut_bytes", or any numeric column
    y : numeric column, default "nmse"
    logy : bool, logarithmic y axis (NMSE spans decades)
    title : str, optional (default: the table's title)

    Rows without a value for x (the "exact" row has no C) are left out. A method
    with a single point whose y cannot be drawn (the exact product's NMSE is 0
    on a log axis) is drawn as a vertical dashed line at its x: with x = "apply_s"
    that is the speed to beat.

    Returns
    -------
    matplotlib Axes
    """
    x = _ALIASES.get(x, x)
    y = _ALIASES.get(y, y)
    rows = list(table)
    if not rows:
        raise ValueError("the table has no rows to plot")
    for col in ("method", x, y):
        if not any(col in r for r in rows):
            raise ValueError(f"the table has no column {col!r}; its columns: "
                             f"{', '.join(getattr(table, 'columns', rows[0].keys()))}")
    ax = _axes(ax)
    methods = []
    for r in rows:
        if r["method"] not in methods:
            methods.append(r["method"])
    for m in methods:
        # points joined in order of C (timings are noisy: x order would zigzag)
        mine = sorted((r for r in rows if r["method"] == m and r.get(x) is not None
                       and r.get(y) is not None),
                      key=lambda r: (r.get("C") if r.get("C") is not None else 0, r[x]))
        pts = [(r[x], r[y]) for r in mine]
        drawable = [p for p in pts if not logy or p[1] > 0]
        if drawable:
            ax.plot([p[0] for p in drawable], [p[1] for p in drawable], marker="o", label=m)
        elif len(pts) == 1:
            ax.axvline(pts[0][0], linestyle="--", color="0.4", label=f"{m} ({y} {pts[0][1]:.3g})")
    ax.set_xlabel(_LABELS.get(x, x))
    ax.set_ylabel(_LABELS.get(y, y))
    if x == "C":
        ax.set_xscale("log", base=2)
        Cs = sorted({r[x] for r in rows if r.get(x) is not None})
        ax.set_xticks(Cs)
        ax.set_xticklabels([str(c) for c in Cs])
    elif x in ("apply_s", "fit_s", "lut_bytes"):
        from matplotlib.ticker import NullFormatter
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())   # crowded labels otherwise
    if logy:
        ax.set_yscale("log")
    t = title if title is not None else getattr(table, "title", None)
    if t:
        ax.set_title(t, fontsize=9)
    ax.legend()
    ax.grid(True, alpha=0.3)
    return ax


def plot_frontier(points, ax=None, speedup="speedup", lost="points_lost", label="label",
                  bar=1.0, title=None):
    """Accuracy lost against speed-up, one marker per operating point.

    Parameters
    ----------
    points : list of dicts, each with the keys named by ``speedup`` (the converted model's
        speed-up over the float model: float ms / converted ms), ``lost`` (points of
        accuracy lost against the float model, mean over seeds) and ``label`` (e.g.
        "d5 w4"); an optional ``lost_sd`` draws an error bar
    ax : matplotlib Axes, optional (default: a new figure)
    bar : float or None, accuracy-loss target drawn as a dashed line (default 1.0 point)
    title : str, optional

    Returns
    -------
    matplotlib Axes
    """
    if not points:
        raise ValueError("plot_frontier needs at least one point")
    ax = _axes(ax)
    markers = "osD^v<>ph*"
    for i, p in enumerate(points):
        for key in (speedup, lost):
            if key not in p:
                raise ValueError(f"point {i} has no {key!r} value")
        ax.errorbar([p[speedup]], [p[lost]], yerr=[p.get("lost_sd", 0.0)],
                    marker=markers[i % len(markers)], linestyle="none", capsize=3,
                    label=str(p.get(label, i)))
    if bar is not None:
        ax.axhline(bar, ls="--", color="gray", lw=1)
    ax.set_xlabel("speed-up over the float model (x)")
    ax.set_ylabel("accuracy lost (points)")
    ax.set_title(title or "operating points: accuracy lost against speed")
    ax.legend(fontsize="small", ncol=2)
    return ax
