"""nimbus.plotting: lazy matplotlib, ax=None -> new axes, returns ax, one line per method."""
import os
import subprocess
import sys

import numpy as np
import pytest

from nimbus.table import Table

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

from nimbus import plotting  # noqa: E402


def _table(rng):
    rows = [{"method": "exact", "C": None, "nmse": 0.0, "fit_s": 0.001, "apply_s": 1e-5,
             "lut_bytes": 5120}]
    for m in ("pq", "maddness", "joint"):
        for C in (4, 8, 16):
            rows.append({"method": m, "C": C, "nmse": float(rng.uniform(0.01, 0.5)),
                         "fit_s": float(rng.uniform(0.1, 2)), "apply_s": float(rng.uniform(1e-5, 1e-3)),
                         "lut_bytes": C * 16 * 20})
    return Table(rows, title="t")


def test_nmse_against_C_one_line_per_method(rng):
    import matplotlib.pyplot as plt
    t = _table(rng)
    ax = plotting.plot_tradeoff(t)
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert set(lines) == {"pq", "maddness", "joint"}          # exact has no C
    for m, ln in lines.items():
        rows = sorted((r["C"], r["nmse"]) for r in t.where(method=m))
        np.testing.assert_allclose(ln.get_xdata(), [c for c, _ in rows])
        np.testing.assert_allclose(ln.get_ydata(), [e for _, e in rows])
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert ax.get_xlabel() == "codebooks C" and ax.get_ylabel() == "test NMSE"
    plt.close(ax.figure)


def test_against_time_on_given_axes(rng):
    import matplotlib.pyplot as plt
    t = _table(rng)
    fig, axes = plt.subplots(1, 2)
    ax = plotting.plot_tradeoff(t, ax=axes[1], x="time", logy=False)
    assert ax is axes[1] and not axes[0].get_lines()
    joint = [ln for ln in ax.get_lines() if ln.get_label() == "joint"][0]
    rows = sorted((r["C"], r["apply_s"]) for r in t.where(method="joint"))
    np.testing.assert_allclose(joint.get_xdata(), [a for _, a in rows])   # in order of C
    # exact: one point at NMSE 0 -> drawn, here on a linear y axis, as a point
    exact = [ln for ln in ax.get_lines() if ln.get_label() == "exact"]
    assert len(exact) == 1 and list(exact[0].get_xdata()) == [1e-5]
    ax2 = plotting.plot_tradeoff(t, x="apply_s")                # log y: exact as a vline
    labels = [ln.get_label() for ln in ax2.get_lines()]
    assert any(lbl.startswith("exact") for lbl in labels) and len(labels) == 4
    plt.close("all")


def test_bad_tables():
    with pytest.raises(ValueError, match="no rows"):
        plotting.plot_tradeoff(Table([], ["method", "C", "nmse"]))
    with pytest.raises(ValueError, match="no column 'speed'"):
        plotting.plot_tradeoff(Table([{"method": "pq", "C": 4, "nmse": 0.1}]), x="speed")


def test_matplotlib_imported_lazily():
    code = ("import sys, nimbus, nimbus.plotting; "
            "print('matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "MPLBACKEND": "Agg"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_frontier_one_marker_per_point_and_the_bar(rng):
    import matplotlib.pyplot as plt
    pts = [{"label": f"d{d} w{w}", "speedup": float(rng.uniform(1, 10)),
            "points_lost": float(rng.uniform(0, 3)), "lost_sd": 0.2}
           for d, w in ((4, 2), (5, 4), (6, 8))]
    ax = plotting.plot_frontier(pts)
    xs = sorted(float(c.get_children()[0].get_xdata()[0]) for c in ax.containers)
    assert xs == sorted(p["speedup"] for p in pts)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [p["label"] for p in pts]
    assert any(list(line.get_ydata()) == [1.0, 1.0] for line in ax.get_lines())
    plt.close(ax.figure)
    with pytest.raises(ValueError, match="at least one"):
        plotting.plot_frontier([])
    with pytest.raises(ValueError, match="speedup"):
        plotting.plot_frontier([{"points_lost": 1.0}])
