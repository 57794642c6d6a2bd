"""Numbers and tables as text, the same in every report of :mod:`stellarfield.eval` (``report.md`` of
the bench, the pairs summary, ``explain.md``).

* :func:`format_number`: ``digits`` significant figures for a real number, integers as they are,
  ``"-"`` for a missing (None) or non-finite value;
* :func:`format_summary`: a :class:`~.metrics.PercentileSummary` dict as ``"median (p16-p84)"``;
* :func:`markdown_table`: a Markdown table, non-text cells through :func:`format_number`;
* :func:`finite_or_none`: numbers made JSON-safe (NaN and infinities as null, numpy scalars as Python's).
"""

from __future__ import annotations

import math

import numpy as np


def format_number(x, digits: int = 3) -> str:
    """``x`` to ``digits`` significant figures (``"%.3g"``); integers and booleans as they are; ``"-"``
    for None, NaN and infinities; anything else through ``str``."""
    if x is None:
        return "-"
    if isinstance(x, (bool, int, np.integer)):
        return str(x)
    if isinstance(x, (float, np.floating)):
        return f"{x:.{digits}g}" if math.isfinite(x) else "-"
    return str(x)


def format_summary(summary: dict | None, digits: int = 3) -> str:
    """``"median (p16-p84)"`` of a percentile summary (``{"median", "p16", "p84", "n"}``), ``"-"`` when
    it is missing or counts no value."""
    if not summary or not summary.get("n"):
        return "-"
    f = format_number
    return f"{f(summary['median'], digits)} ({f(summary['p16'], digits)}-{f(summary['p84'], digits)})"


def markdown_table(header: list[str], rows: list[list]) -> list[str]:
    """The lines of a Markdown table; cells that are not text go through :func:`format_number`."""
    def cell(value) -> str:
        return value if isinstance(value, str) else format_number(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return lines


def finite_or_none(value):
    """JSON-safe: NaN and infinities become null (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    if isinstance(value, np.generic):
        return finite_or_none(value.item())
    return value
