"""A small results table with a text repr, an HTML repr for Jupyter, and CSV/markdown."""
from __future__ import annotations

import html
import math


def _fmt(v):
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3e}"
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    return "-" if v is None else str(v)


class Table:
    """Rows of named values, shown as an aligned text table or HTML.

    Parameters
    ----------
    rows : list of dict (same keys)
    columns : list of str, the keys to show, in order (default: the first row's keys)
    title : str, optional
    """

    def __init__(self, rows, columns=None, title=None):
        self.rows = list(rows)
        self.columns = list(columns) if columns else (list(self.rows[0]) if self.rows else [])
        self.title = title

    def __len__(self):
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def __getitem__(self, i):
        return self.rows[i]

    def __add__(self, other):
        """Rows of both tables (e.g. two :func:`nimbus.compare` runs); columns of self."""
        if not isinstance(other, Table):
            return NotImplemented
        return Table(self.rows + other.rows, self.columns, self.title)

    def column(self, name):
        """All values of one column, as a list."""
        return [r.get(name) for r in self.rows]

    def where(self, **match):
        """A new Table with the rows whose values equal ``match``."""
        rows = [r for r in self.rows if all(r.get(k) == v for k, v in match.items())]
        return Table(rows, self.columns, self.title)

    def _cells(self):
        return [[_fmt(r.get(c)) for c in self.columns] for r in self.rows]

    def __str__(self):
        cells = self._cells()
        widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(self.columns)]
        line = "  ".join(c.rjust(w) for c, w in zip(self.columns, widths))
        out = ([self.title] if self.title else []) + [line, "  ".join("-" * w for w in widths)]
        out += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
        return "\n".join(out)

    __repr__ = __str__

    def to_markdown(self):
        head = "| " + " | ".join(self.columns) + " |"
        sep = "|" + "|".join("---" for _ in self.columns) + "|"
        body = ["| " + " | ".join(row) + " |" for row in self._cells()]
        return "\n".join([head, sep] + body)

    def _repr_html_(self):
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>"
                       for row in self._cells())
        cap = f"<caption>{html.escape(self.title)}</caption>" if self.title else ""
        return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
